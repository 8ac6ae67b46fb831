// Operator schemas of the fused_preact library and their CPU implementations.
// The CUDA implementations register against the same schemas in cuda/.
#include <Python.h>

#include <ATen/Parallel.h>
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

struct AtenParallelFor {
  template <typename F>
  void operator()(int64_t begin, int64_t end, F&& fn) const {
    at::parallel_for(begin, end, /*grain_size=*/4, fn);
  }
};

std::tuple<at::Tensor, at::Tensor> cpu_batch_stats(const at::Tensor& x_in, double eps) {
  check_activation("batch_stats", "x", x_in);
  check_eps("batch_stats", eps);
  const at::Tensor x = as_kernel_operand(x_in);
  auto mean = at::empty({x.size(1)}, x.options().dtype(stats_dtype(x)));
  auto invstd = at::empty_like(mean);
  if (x.numel() == 0) return {mean.fill_(NAN), invstd.fill_(NAN)};
  FUSED_PREACT_DISPATCH(x, "batch_stats_cpu", [&] {
    using T = typename core_storage<scalar_t>::type;
    batch_stats_cpu(data_as<T>(x), activation_view(x), eps, mutable_data_as<stat_t<T>>(mean),
                    mutable_data_as<stat_t<T>>(invstd), AtenParallelFor{});
  });
  return {mean, invstd};
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

std::tuple<at::Tensor, at::Tensor> cpu_bn_relu_backward_reduce(const at::Tensor& grad_act, const at::Tensor& x,
                                                               const at::Tensor& mean, const at::Tensor& invstd,
                                                               const at::Tensor& scale, const at::Tensor& shift) {
  const auto a = backward_args("bn_relu_backward_reduce", grad_act, x, mean, invstd, scale, shift);
  auto sum_dz = at::empty_like(a.mean);
  auto sum_dz_xhat = at::empty_like(a.mean);
  FUSED_PREACT_DISPATCH(a.x, "bn_relu_backward_reduce_cpu", [&] {
    using T = typename core_storage<scalar_t>::type;
    bn_relu_backward_reduce_cpu(data_as<T>(a.grad), activation_view(a.grad), data_as<T>(a.x), activation_view(a.x),
                                bn_relu_params<stat_t<T>>(a), mutable_data_as<stat_t<T>>(sum_dz),
                                mutable_data_as<stat_t<T>>(sum_dz_xhat), AtenParallelFor{});
  });
  return {sum_dz, sum_dz_xhat};
}

at::Tensor cpu_bn_relu_backward_input(const at::Tensor& grad_act, const at::Tensor& x, const at::Tensor& mean,
                                      const at::Tensor& invstd, const at::Tensor& scale, const at::Tensor& shift,
                                      const std::optional<at::Tensor>& sum_dz,
                                      const std::optional<at::Tensor>& sum_dz_xhat) {
  const char* op = "bn_relu_backward_input";
  const auto a = backward_args(op, grad_act, x, mean, invstd, scale, shift);
  const std::pair<at::Tensor, at::Tensor> sums = backward_sums(op, x, sum_dz, sum_dz_xhat);
  at::Tensor dx = empty_activation_like(a.x);
  FUSED_PREACT_DISPATCH(a.x, "bn_relu_backward_input_cpu", [&] {
    using T = typename core_storage<scalar_t>::type;
    bn_relu_backward_input_cpu(data_as<T>(a.grad), activation_view(a.grad), data_as<T>(a.x), activation_view(a.x),
                               bn_relu_params<stat_t<T>>(a), data_or_null<stat_t<T>>(sums.first),
                               data_or_null<stat_t<T>>(sums.second), mutable_data_as<T>(dx), activation_view(dx),
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
