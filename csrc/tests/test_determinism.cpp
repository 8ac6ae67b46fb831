// Every kernel must give bit-identical results whether pfor runs the range
// serially or split into uneven pieces on several threads: partials are per
// chunk and merged in chunk order, never in thread order.
#include <cstring>
#include <vector>

#include "check.h"
#include "kernel_test_support.h"
#include "threaded_for.h"

using namespace fused_preact_test;

namespace {

template <typename T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// All outputs of one forward + backward pass, in their raw storage.
template <typename T>
struct PassResults {
  std::vector<stat_t<T>> mean, invstd, sum_dz, sum_dz_xhat;
  std::vector<T> out, dx_train, dx_eval;
};

template <typename T, typename ParallelFor>
PassResults<T> run_all_kernels(const StridedTensor<T>& x, const StridedTensor<T>& grad, const KernelParams<T>& p,
                               ParallelFor&& pfor) {
  namespace fp = fused_preact;
  const Shape& shape = x.shape;
  PassResults<T> r;
  r.mean.resize(shape.c), r.invstd.resize(shape.c), r.sum_dz.resize(shape.c), r.sum_dz_xhat.resize(shape.c);
  fp::batch_stats_cpu(x.data(), x.view, kEps, r.mean.data(), r.invstd.data(), pfor);

  StridedTensor<T> out(shape, x.layout), dx(shape, x.layout);
  fp::bn_relu_apply_cpu(x.data(), x.view, p.scale.data(), p.shift.data(), out.data(), out.view, pfor);
  r.out = out.storage;
  fp::bn_relu_backward_reduce_cpu(grad.data(), grad.view, x.data(), x.view, p.view(), r.sum_dz.data(),
                                  r.sum_dz_xhat.data(), pfor);
  fp::bn_relu_backward_input_cpu(grad.data(), grad.view, x.data(), x.view, p.view(), r.sum_dz.data(),
                                 r.sum_dz_xhat.data(), dx.data(), dx.view, pfor);
  r.dx_train = dx.storage;
  fp::bn_relu_backward_input_cpu(grad.data(), grad.view, x.data(), x.view, p.view(), nullptr, nullptr, dx.data(),
                                 dx.view, pfor);
  r.dx_eval = dx.storage;
  return r;
}

template <typename T>
void check_threaded_matches_serial(uint64_t seed) {
  Rng rng(seed);
  // 6 and 4 chunks of uneven fill; 17 channels for the per-channel merge loop.
  for (const Shape& shape : {Shape{3, 5, 40, 40}, Shape{2, 17, 33, 33}})
    for (Layout layout : kAllLayouts) {
      const KernelParams<T> p = random_params<T>(shape.c, rng);
      StridedTensor<T> x(shape, layout), grad(shape, layout);
      x.assign_nchw(random_activation<T>(shape, rng));
      grad.assign_nchw(random_gradient<T>(shape, rng));
      const PassResults<T> serial = run_all_kernels(x, grad, p, fused_preact::SerialFor{});
      for (int pieces : {2, 3, 7}) {
        const PassResults<T> threaded = run_all_kernels(x, grad, p, ThreadedFor{pieces});
        const std::string where = case_name<T>(shape, layout) + " pieces=" + std::to_string(pieces);
        CHECK_MSG(same_bits(serial.mean, threaded.mean), where + " mean");
        CHECK_MSG(same_bits(serial.invstd, threaded.invstd), where + " invstd");
        CHECK_MSG(same_bits(serial.out, threaded.out), where + " apply output");
        CHECK_MSG(same_bits(serial.sum_dz, threaded.sum_dz), where + " sum_dz");
        CHECK_MSG(same_bits(serial.sum_dz_xhat, threaded.sum_dz_xhat), where + " sum_dz_xhat");
        CHECK_MSG(same_bits(serial.dx_train, threaded.dx_train), where + " training dx");
        CHECK_MSG(same_bits(serial.dx_eval, threaded.dx_eval), where + " eval dx");
      }
    }
}

}  // namespace

TEST_CASE(threaded_float_is_bit_identical_to_serial) { check_threaded_matches_serial<float>(401); }
TEST_CASE(threaded_double_is_bit_identical_to_serial) { check_threaded_matches_serial<double>(402); }
TEST_CASE(threaded_fp16_is_bit_identical_to_serial) { check_threaded_matches_serial<fp16_t>(403); }
TEST_CASE(threaded_bf16_is_bit_identical_to_serial) { check_threaded_matches_serial<bf16_t>(404); }
