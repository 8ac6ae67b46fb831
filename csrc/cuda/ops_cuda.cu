// CUDA implementations of the fused_preact operators (schemas in ops.cpp).
// Each mirrors its CPU twin in ops.cpp: same checks (activation_args.h), same
// output allocation, same semantics; only the kernels differ.
#include <ATen/Dispatch.h>
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

template <typename scalar_t>
auto* gpu_ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename gpu_storage<scalar_t>::type*>(t.const_data_ptr<scalar_t>());
}
template <typename scalar_t>
auto* gpu_mut_ptr(at::Tensor& t) {
  return reinterpret_cast<typename gpu_storage<scalar_t>::type*>(t.mutable_data_ptr<scalar_t>());
}

#define FUSED_PREACT_DISPATCH(x, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (x).scalar_type(), name, __VA_ARGS__)

void check_cuda(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
}

// Partials of the per-channel reductions: from the caching allocator, so
// nothing synchronises and the op stays CUDA-graph capturable.
at::Tensor reduction_workspace(const at::Tensor& x, size_t bytes) {
  return at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
}

std::tuple<at::Tensor, at::Tensor> batch_stats_cuda(const at::Tensor& x_in, double eps) {
  check_activation("batch_stats", "x", x_in);
  check_cuda("batch_stats", "x", x_in);
  TORCH_CHECK(eps > 0, "batch_stats: eps must be positive, got ", eps);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = as_kernel_operand(x_in);
  auto mean = at::empty({x.size(1)}, x.options().dtype(stats_dtype(x)));
  auto invstd = at::empty_like(mean);
  if (x.numel() == 0) return {mean.fill_(NAN), invstd.fill_(NAN)};
  FUSED_PREACT_DISPATCH(x, "batch_stats_cuda", [&] {
    using T = typename gpu_storage<scalar_t>::type;
    using S = stat_t<T>;
    const ActView vx = activation_view(x);
    at::Tensor ws = reduction_workspace(x, gpu::reduction_workspace_bytes<T>(vx));
    gpu::batch_stats(gpu_ptr<scalar_t>(x), vx, eps, mean.mutable_data_ptr<S>(), invstd.mutable_data_ptr<S>(),
                     ws.mutable_data_ptr(), at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, invstd};
}

at::Tensor bn_relu_apply_cuda(const at::Tensor& x_in, const at::Tensor& scale, const at::Tensor& shift) {
  check_activation("bn_relu_apply", "x", x_in);
  check_cuda("bn_relu_apply", "x", x_in);
  check_channel_vector("bn_relu_apply", "scale", scale, x_in);
  check_channel_vector("bn_relu_apply", "shift", shift, x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = as_kernel_operand(x_in);
  at::Tensor out = empty_activation_like(x);
  FUSED_PREACT_DISPATCH(x, "bn_relu_apply_cuda", [&] {
    using S = stat_t<typename gpu_storage<scalar_t>::type>;
    const auto sc = scale.contiguous(), sh = shift.contiguous();
    gpu::bn_relu_apply(gpu_ptr<scalar_t>(x), activation_view(x), sc.const_data_ptr<S>(), sh.const_data_ptr<S>(),
                       gpu_mut_ptr<scalar_t>(out), activation_view(out), at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// Shared checks of the two backward ops (as in ops.cpp); returns the kernel operands.
struct BackwardArgs {
  at::Tensor grad, x, mean, invstd, scale, shift;
};

BackwardArgs backward_args(const char* op, const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                           const at::Tensor& invstd, const at::Tensor& scale, const at::Tensor& shift) {
  check_activation(op, "x", x);
  check_cuda(op, "x", x);
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

std::tuple<at::Tensor, at::Tensor> bn_relu_backward_reduce_cuda(const at::Tensor& grad_act, const at::Tensor& x,
                                                                const at::Tensor& mean, const at::Tensor& invstd,
                                                                const at::Tensor& scale,
                                                                const at::Tensor& shift) {
  const auto a = backward_args("bn_relu_backward_reduce", grad_act, x, mean, invstd, scale, shift);
  const c10::cuda::CUDAGuard guard(x.device());
  auto sum_dz = at::empty_like(a.mean);
  auto sum_dz_xhat = at::empty_like(a.mean);
  FUSED_PREACT_DISPATCH(a.x, "bn_relu_backward_reduce_cuda", [&] {
    using T = typename gpu_storage<scalar_t>::type;
    using S = stat_t<T>;
    const ActView vx = activation_view(a.x);
    at::Tensor ws = reduction_workspace(a.x, gpu::reduction_workspace_bytes<T>(vx));
    gpu::bn_relu_backward_reduce(gpu_ptr<scalar_t>(a.grad), activation_view(a.grad), gpu_ptr<scalar_t>(a.x), vx,
                                 bn_relu_params<S>(a), sum_dz.mutable_data_ptr<S>(),
                                 sum_dz_xhat.mutable_data_ptr<S>(), ws.mutable_data_ptr(),
                                 at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sum_dz, sum_dz_xhat};
}

at::Tensor bn_relu_backward_input_cuda(const at::Tensor& grad_act, const at::Tensor& x, const at::Tensor& mean,
                                       const at::Tensor& invstd, const at::Tensor& scale, const at::Tensor& shift,
                                       const std::optional<at::Tensor>& sum_dz,
                                       const std::optional<at::Tensor>& sum_dz_xhat) {
  const char* op = "bn_relu_backward_input";
  const auto a = backward_args(op, grad_act, x, mean, invstd, scale, shift);
  const c10::cuda::CUDAGuard guard(x.device());
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
  FUSED_PREACT_DISPATCH(a.x, "bn_relu_backward_input_cuda", [&] {
    using S = stat_t<typename gpu_storage<scalar_t>::type>;
    gpu::bn_relu_backward_input(gpu_ptr<scalar_t>(a.grad), activation_view(a.grad), gpu_ptr<scalar_t>(a.x),
                                activation_view(a.x), bn_relu_params<S>(a),
                                sdz.defined() ? sdz.const_data_ptr<S>() : nullptr,
                                sdzx.defined() ? sdzx.const_data_ptr<S>() : nullptr, gpu_mut_ptr<scalar_t>(dx),
                                activation_view(dx), at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_preact, CUDA, m) {
  m.impl("batch_stats", &batch_stats_cuda);
  m.impl("bn_relu_apply", &bn_relu_apply_cuda);
  m.impl("bn_relu_backward_reduce", &bn_relu_backward_reduce_cuda);
  m.impl("bn_relu_backward_input", &bn_relu_backward_input_cuda);
}

}  // namespace fused_preact
