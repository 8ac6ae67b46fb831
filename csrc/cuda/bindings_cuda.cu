// CUDA implementations of the fused_preact operators (schemas in bindings_cpu.cpp).
// Each mirrors its CPU twin in bindings_cpu.cpp: same checks (activation_args.h), same
// output allocation, same semantics; only the kernels differ.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "activation_args.h"
#include "cuda/bn_relu_kernels.cuh"

namespace fused_preact {
namespace {

// ATen scalar type -> the kernels' storage type (identical bit layout).
template <typename T>
struct gpu_storage {
  using type = T;
};
template <>
struct gpu_storage<at::Half> {
  using type = __half;
};
template <>
struct gpu_storage<at::BFloat16> {
  using type = __nv_bfloat16;
};

void check_cuda(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
}

// Partials of the per-channel reductions: from the caching allocator, so
// nothing synchronises and the op stays CUDA-graph capturable.
at::Tensor reduction_workspace(const at::Tensor& x, size_t bytes) {
  return at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_stats_cuda(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, double momentum, double eps) {
  const char* op = "batch_norm_stats";
  check_cuda(op, "x", x_in);
  auto a = batch_norm_stats_args(op, x_in, weight, bias, running_mean, running_var, num_batches_tracked, momentum,
                                 eps);
  const c10::cuda::CUDAGuard guard(x_in.device());
  std::array<at::Tensor, 4> out = stats_outputs(a.x);
  at::Tensor &mean = out[0], &invstd = out[1], &scale = out[2], &shift = out[3];
  if (a.x.numel() == 0) return {mean, invstd, scale, shift};
  FUSED_PREACT_DISPATCH(a.x, "batch_norm_stats_cuda", [&] {
    using T = typename gpu_storage<scalar_t>::type;
    const ActView vx = activation_view(a.x);
    at::Tensor ws = reduction_workspace(a.x, gpu::reduction_workspace_bytes<T>(vx));
    gpu::batch_stats(data_as<T>(a.x), vx, eps, mutable_data_as<stat_t<T>>(mean), mutable_data_as<stat_t<T>>(invstd),
                     bn_fold_of<stat_t<T>>(a, scale, shift, momentum), ws.mutable_data_ptr(),
                     at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, invstd, scale, shift};
}

at::Tensor bn_relu_apply_cuda(const at::Tensor& x_in, const at::Tensor& scale, const at::Tensor& shift) {
  check_activation("bn_relu_apply", "x", x_in);
  check_cuda("bn_relu_apply", "x", x_in);
  check_channel_vector("bn_relu_apply", "scale", scale, x_in);
  check_channel_vector("bn_relu_apply", "shift", shift, x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = as_kernel_operand(x_in);
  const at::Tensor sc = scale.contiguous(), sh = shift.contiguous();
  at::Tensor out = empty_activation_like(x);
  FUSED_PREACT_DISPATCH(x, "bn_relu_apply_cuda", [&] {
    using T = typename gpu_storage<scalar_t>::type;
    gpu::bn_relu_apply(data_as<T>(x), activation_view(x), data_as<stat_t<T>>(sc), data_as<stat_t<T>>(sh),
                       mutable_data_as<T>(out), activation_view(out), at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// Two launches, the sums then the elementwise dx (which in training needs every sum).
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_backward_cuda(const at::Tensor& grad_act, const at::Tensor& x,
                                                                   const at::Tensor& mean, const at::Tensor& invstd,
                                                                   const at::Tensor& scale, const at::Tensor& shift,
                                                                   bool training) {
  const char* op = "bn_relu_backward";
  check_cuda(op, "x", x);
  const auto a = backward_args(op, grad_act, x, mean, invstd, scale, shift);
  const c10::cuda::CUDAGuard guard(x.device());
  auto sum_dz = at::empty_like(a.mean);
  auto sum_dz_xhat = at::empty_like(a.mean);
  at::Tensor dx = empty_activation_like(a.x);
  FUSED_PREACT_DISPATCH(a.x, "bn_relu_backward_cuda", [&] {
    using T = typename gpu_storage<scalar_t>::type;
    using S = stat_t<T>;
    const ActView vg = activation_view(a.grad), vx = activation_view(a.x);
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    at::Tensor ws = reduction_workspace(a.x, gpu::reduction_workspace_bytes<T>(vx));
    gpu::bn_relu_backward_reduce(data_as<T>(a.grad), vg, data_as<T>(a.x), vx, bn_relu_params<S>(a),
                                 mutable_data_as<S>(sum_dz), mutable_data_as<S>(sum_dz_xhat), ws.mutable_data_ptr(),
                                 stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // Eval-mode statistics are constants: dx takes no correction terms.
    gpu::bn_relu_backward_input(data_as<T>(a.grad), vg, data_as<T>(a.x), vx, bn_relu_params<S>(a),
                                training ? data_as<S>(sum_dz) : nullptr, training ? data_as<S>(sum_dz_xhat) : nullptr,
                                mutable_data_as<T>(dx), activation_view(dx), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dx, sum_dz, sum_dz_xhat};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_preact, CUDA, m) {
  m.impl("batch_norm_stats", &batch_norm_stats_cuda);
  m.impl("bn_relu_apply", &bn_relu_apply_cuda);
  m.impl("bn_relu_backward", &bn_relu_backward_cuda);
}

}  // namespace fused_preact
