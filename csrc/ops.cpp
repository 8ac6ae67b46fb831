// Operator schemas of the fused_preact library and their CPU implementations.
// The CUDA implementations register against the same schemas in cuda/.
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "activation_args.h"
#include "core/bn_relu_cpu.h"

// `import fused_preact._C` loads this library, whose static initialisers
// register the operators below; the module itself has no Python members.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace fused_preact {
namespace {

// ATen scalar type -> the core's storage type (identical bit layout).
template <typename T>
struct core_storage {
  using type = T;
};
template <>
struct core_storage<at::Half> {
  using type = fp16_t;
};
template <>
struct core_storage<at::BFloat16> {
  using type = bf16_t;
};

template <typename scalar_t>
auto* core_ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename core_storage<scalar_t>::type*>(t.const_data_ptr<scalar_t>());
}
template <typename scalar_t>
auto* core_mut_ptr(at::Tensor& t) {
  return reinterpret_cast<typename core_storage<scalar_t>::type*>(t.mutable_data_ptr<scalar_t>());
}

struct AtenParallelFor {
  template <typename F>
  void operator()(int64_t begin, int64_t end, F&& fn) const {
    at::parallel_for(begin, end, /*grain_size=*/4, fn);
  }
};

#define FUSED_PREACT_DISPATCH(x, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (x).scalar_type(), name, __VA_ARGS__)

std::tuple<at::Tensor, at::Tensor> cpu_batch_stats(const at::Tensor& x_in, double eps) {
  check_activation("batch_stats", "x", x_in);
  TORCH_CHECK(eps > 0, "batch_stats: eps must be positive, got ", eps);
  const at::Tensor x = as_kernel_operand(x_in);
  auto mean = at::empty({x.size(1)}, x.options().dtype(stats_dtype(x)));
  auto invstd = at::empty_like(mean);
  if (x.numel() == 0) return {mean.fill_(NAN), invstd.fill_(NAN)};
  FUSED_PREACT_DISPATCH(x, "batch_stats_cpu", [&] {
    using S = stat_t<typename core_storage<scalar_t>::type>;
    fused_preact::batch_stats_cpu(core_ptr<scalar_t>(x), activation_view(x), eps,
                                  mean.mutable_data_ptr<S>(), invstd.mutable_data_ptr<S>(), AtenParallelFor{});
  });
  return {mean, invstd};
}

at::Tensor cpu_bn_relu_apply(const at::Tensor& x_in, const at::Tensor& scale, const at::Tensor& shift) {
  check_activation("bn_relu_apply", "x", x_in);
  check_channel_vector("bn_relu_apply", "scale", scale, x_in);
  check_channel_vector("bn_relu_apply", "shift", shift, x_in);
  const at::Tensor x = as_kernel_operand(x_in);
  at::Tensor out = empty_activation_like(x);
  FUSED_PREACT_DISPATCH(x, "bn_relu_apply_cpu", [&] {
    using S = stat_t<typename core_storage<scalar_t>::type>;
    const auto sc = scale.contiguous(), sh = shift.contiguous();
    fused_preact::bn_relu_apply_cpu(core_ptr<scalar_t>(x), activation_view(x), sc.const_data_ptr<S>(),
                                    sh.const_data_ptr<S>(), core_mut_ptr<scalar_t>(out),
                                    activation_view(out), AtenParallelFor{});
  });
  return out;
}

// Shared checks of the two backward ops; returns the kernel operands.
struct BackwardArgs {
  at::Tensor grad, x, mean, invstd, scale, shift;
};

BackwardArgs backward_args(const char* op, const at::Tensor& grad, const at::Tensor& x,
                           const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& scale,
                           const at::Tensor& shift) {
  check_activation(op, "x", x);
  check_same_activation(op, "grad_act", grad, x);
  check_channel_vector(op, "mean", mean, x);
  check_channel_vector(op, "invstd", invstd, x);
  check_channel_vector(op, "scale", scale, x);
  check_channel_vector(op, "shift", shift, x);
  return {as_kernel_operand(grad), as_kernel_operand(x), mean.contiguous(), invstd.contiguous(),
          scale.contiguous(), shift.contiguous()};
}

template <typename S>
BnReluParams<S> bn_relu_params(const BackwardArgs& a) {
  return {a.mean.const_data_ptr<S>(), a.invstd.const_data_ptr<S>(), a.scale.const_data_ptr<S>(),
          a.shift.const_data_ptr<S>()};
}

std::tuple<at::Tensor, at::Tensor> cpu_bn_relu_backward_reduce(const at::Tensor& grad_act, const at::Tensor& x,
                                                               const at::Tensor& mean, const at::Tensor& invstd,
                                                               const at::Tensor& scale, const at::Tensor& shift) {
  const auto a = backward_args("bn_relu_backward_reduce", grad_act, x, mean, invstd, scale, shift);
  auto sum_dz = at::empty_like(a.mean);
  auto sum_dz_xhat = at::empty_like(a.mean);
  FUSED_PREACT_DISPATCH(a.x, "bn_relu_backward_reduce_cpu", [&] {
    using S = stat_t<typename core_storage<scalar_t>::type>;
    fused_preact::bn_relu_backward_reduce_cpu(core_ptr<scalar_t>(a.grad), activation_view(a.grad),
                                              core_ptr<scalar_t>(a.x), activation_view(a.x), bn_relu_params<S>(a),
                                              sum_dz.mutable_data_ptr<S>(), sum_dz_xhat.mutable_data_ptr<S>(),
                                              AtenParallelFor{});
  });
  return {sum_dz, sum_dz_xhat};
}

at::Tensor cpu_bn_relu_backward_input(const at::Tensor& grad_act, const at::Tensor& x, const at::Tensor& mean,
                                      const at::Tensor& invstd, const at::Tensor& scale, const at::Tensor& shift,
                                      const std::optional<at::Tensor>& sum_dz,
                                      const std::optional<at::Tensor>& sum_dz_xhat) {
  const char* op = "bn_relu_backward_input";
  const auto a = backward_args(op, grad_act, x, mean, invstd, scale, shift);
  TORCH_CHECK(sum_dz.has_value() == sum_dz_xhat.has_value(), op,
              ": sum_dz and sum_dz_xhat must be given together (training) or both omitted (eval)");
  at::Tensor sdz, sdzx;
  if (sum_dz.has_value()) {
    check_channel_vector(op, "sum_dz", *sum_dz, x);
    check_channel_vector(op, "sum_dz_xhat", *sum_dz_xhat, x);
    sdz = sum_dz->contiguous();
    sdzx = sum_dz_xhat->contiguous();
  }
  at::Tensor dx = empty_activation_like(a.x);
  FUSED_PREACT_DISPATCH(a.x, "bn_relu_backward_input_cpu", [&] {
    using S = stat_t<typename core_storage<scalar_t>::type>;
    fused_preact::bn_relu_backward_input_cpu(
        core_ptr<scalar_t>(a.grad), activation_view(a.grad), core_ptr<scalar_t>(a.x), activation_view(a.x),
        bn_relu_params<S>(a), sdz.defined() ? sdz.const_data_ptr<S>() : nullptr,
        sdzx.defined() ? sdzx.const_data_ptr<S>() : nullptr, core_mut_ptr<scalar_t>(dx), activation_view(dx),
        AtenParallelFor{});
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY(fused_preact, m) {
  m.def("batch_stats(Tensor x, float eps) -> (Tensor mean, Tensor invstd)");
  m.def("bn_relu_apply(Tensor x, Tensor scale, Tensor shift) -> Tensor");
  m.def(
      "bn_relu_backward_reduce(Tensor grad_act, Tensor x, Tensor mean, Tensor invstd, Tensor scale, "
      "Tensor shift) -> (Tensor sum_dz, Tensor sum_dz_xhat)");
  m.def(
      "bn_relu_backward_input(Tensor grad_act, Tensor x, Tensor mean, Tensor invstd, Tensor scale, "
      "Tensor shift, Tensor? sum_dz, Tensor? sum_dz_xhat) -> Tensor");
}

TORCH_LIBRARY_IMPL(fused_preact, CPU, m) {
  m.impl("batch_stats", &cpu_batch_stats);
  m.impl("bn_relu_apply", &cpu_bn_relu_apply);
  m.impl("bn_relu_backward_reduce", &cpu_bn_relu_backward_reduce);
  m.impl("bn_relu_backward_input", &cpu_bn_relu_backward_input);
}

}  // namespace fused_preact
