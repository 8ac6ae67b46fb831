// Operator schemas of the fused_preact library and their CPU implementations.
// The CUDA implementations register against the same schemas in cuda/.
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>  // at::internal::GRAIN_SIZE
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

// Threads only where each gets at least at::internal::GRAIN_SIZE elements, as
// ATen's own elementwise kernels: waking a thread costs more than a small
// layer's whole pass (ResNet-1001's 8x8 stage at a small batch).
struct AtenParallelFor {
  template <typename F>
  void operator()(int64_t begin, int64_t end, int64_t work, F&& fn) const {
    at::parallel_for(begin, end, std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(work, 1)), fn);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpu_batch_norm_stats(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, double momentum, double eps) {
  auto a = batch_norm_stats_args("batch_norm_stats", x_in, weight, bias, running_mean, running_var,
                                 num_batches_tracked, momentum, eps);
  std::array<at::Tensor, 4> out = stats_outputs(a.x);
  at::Tensor &mean = out[0], &invstd = out[1], &scale = out[2], &shift = out[3];
  if (a.x.numel() == 0) return {mean, invstd, scale, shift};
  FUSED_PREACT_DISPATCH(a.x, "batch_norm_stats_cpu", [&] {
    using T = typename core_storage<scalar_t>::type;
    batch_stats_cpu(data_as<T>(a.x), activation_view(a.x), eps, mutable_data_as<stat_t<T>>(mean),
                    mutable_data_as<stat_t<T>>(invstd), AtenParallelFor{},
                    bn_fold_of<stat_t<T>>(a, scale, shift, momentum));
  });
  return {mean, invstd, scale, shift};
}

at::Tensor cpu_bn_relu_apply(const at::Tensor& x_in, const at::Tensor& scale, const at::Tensor& shift) {
  check_activation("bn_relu_apply", "x", x_in);
  check_channel_vector("bn_relu_apply", "scale", scale, x_in);
  check_channel_vector("bn_relu_apply", "shift", shift, x_in);
  const at::Tensor x = as_kernel_operand(x_in);
  const at::Tensor sc = scale.contiguous(), sh = shift.contiguous();
  at::Tensor out = empty_activation_like(x);
  FUSED_PREACT_DISPATCH(x, "bn_relu_apply_cpu", [&] {
    using T = typename core_storage<scalar_t>::type;
    bn_relu_apply_cpu(data_as<T>(x), activation_view(x), data_as<stat_t<T>>(sc), data_as<stat_t<T>>(sh),
                      mutable_data_as<T>(out), activation_view(out), AtenParallelFor{});
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_bn_relu_backward(const at::Tensor& grad_act, const at::Tensor& x,
                                                                  const at::Tensor& mean, const at::Tensor& invstd,
                                                                  const at::Tensor& scale, const at::Tensor& shift,
                                                                  bool training) {
  const auto a = backward_args("bn_relu_backward", grad_act, x, mean, invstd, scale, shift);
  auto sum_dz = at::empty_like(a.mean);
  auto sum_dz_xhat = at::empty_like(a.mean);
  at::Tensor dx = empty_activation_like(a.x);
  FUSED_PREACT_DISPATCH(a.x, "bn_relu_backward_cpu", [&] {
    using T = typename core_storage<scalar_t>::type;
    using S = stat_t<T>;
    const ActView vg = activation_view(a.grad), vx = activation_view(a.x);
    bn_relu_backward_reduce_cpu(data_as<T>(a.grad), vg, data_as<T>(a.x), vx, bn_relu_params<S>(a),
                                mutable_data_as<S>(sum_dz), mutable_data_as<S>(sum_dz_xhat), AtenParallelFor{});
    // Eval-mode statistics are constants: dx takes no correction terms.
    bn_relu_backward_input_cpu(data_as<T>(a.grad), vg, data_as<T>(a.x), vx, bn_relu_params<S>(a),
                               training ? data_as<S>(sum_dz) : nullptr, training ? data_as<S>(sum_dz_xhat) : nullptr,
                               mutable_data_as<T>(dx), activation_view(dx), AtenParallelFor{});
  });
  return {dx, sum_dz, sum_dz_xhat};
}

}  // namespace

TORCH_LIBRARY(fused_preact, m) {
  // Training-mode statistics of x with the affine fold (scale, shift) and the
  // running-statistics update done in the same launch (core/bn_fold.h).
  m.def(
      "batch_norm_stats(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, float momentum, float eps) "
      "-> (Tensor mean, Tensor invstd, Tensor scale, Tensor shift)");
  m.def("bn_relu_apply(Tensor x, Tensor scale, Tensor shift) -> Tensor");
  // dx of BN -> ReLU from the activation's gradient, and the sums that give
  // gamma's and beta's gradients; training=False: statistics are constants.
  m.def(
      "bn_relu_backward(Tensor grad_act, Tensor x, Tensor mean, Tensor invstd, Tensor scale, Tensor shift, "
      "bool training) -> (Tensor dx, Tensor sum_dz, Tensor sum_dz_xhat)");
}

TORCH_LIBRARY_IMPL(fused_preact, CPU, m) {
  m.impl("batch_norm_stats", &cpu_batch_norm_stats);
  m.impl("bn_relu_apply", &cpu_bn_relu_apply);
  m.impl("bn_relu_backward", &cpu_bn_relu_backward);
}

}  // namespace fused_preact
