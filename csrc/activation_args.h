// Argument checks, tensor -> ActView conversion and operand preparation shared
// by the CPU and CUDA bindings, so both devices reject the same bad input with
// the same message and hand their kernels the same operands.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <array>
#include <cmath>
#include <optional>

#include "core/bn_fold.h"
#include "core/view.h"

namespace fused_preact {

// Statistics and per-channel parameters are fp32, except for fp64 activations
// (where fp32 statistics would make gradcheck meaningless).
inline at::ScalarType stats_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_activation(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be a 4-D (N, C, H, W) tensor, got ", t.dim(), "-D");
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op, ": ",
              name, " must be float32, float64, float16 or bfloat16, got ", dt);
}

inline void check_same_activation(const char* op, const char* name, const at::Tensor& t,
                                  const at::Tensor& x) {
  check_activation(op, name, t);
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " must have the shape of x ", x.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have the dtype of x (",
              x.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on the device of x (", x.device(),
              "), got ", t.device());
}

inline void check_channel_vector(const char* op, const char* name, const at::Tensor& t,
                                 const at::Tensor& x) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), op, ": ", name,
              " must be a 1-D tensor with one value per channel of x (", x.size(1), "), got shape ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == stats_dtype(x), op, ": ", name, " must be ", stats_dtype(x),
              " for a ", x.scalar_type(), " x, got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on the device of x (", x.device(),
              "), got ", t.device());
}

// H and W merge into one spatial axis when stepping along W then wrapping to
// the next row is a single stride, which holds for NCHW, channels_last and
// batch slices of either. Anything else is copied once into a dense layout.
inline at::Tensor as_kernel_operand(const at::Tensor& t) {
  const bool mergeable = t.size(2) == 1 || t.size(3) == 1 || t.stride(2) == t.size(3) * t.stride(3);
  return mergeable ? t : t.contiguous(t.suggest_memory_format());
}

inline ActView activation_view(const at::Tensor& t) {
  ActView v;
  v.n = t.size(0);
  v.c = t.size(1);
  v.s = t.size(2) * t.size(3);
  v.stride_n = t.stride(0);
  v.stride_c = t.stride(1);
  v.stride_s = t.size(3) == 1 ? t.stride(2) : t.stride(3);
  // A size-1 axis has an arbitrary stride; keep the layout test meaningful.
  if (v.c == 1) v.stride_c = v.s * v.stride_s;
  if (v.s == 1) v.stride_s = v.c * v.stride_c;
  return v;
}

// Outputs take the kernel operand's layout by at::empty_like's rule (its
// strides when dense, else its suggested memory format); the fake
// implementations in fused_preact/ops/kernel_tables.py follow the same rule.
inline at::Tensor empty_activation_like(const at::Tensor& operand) { return at::empty_like(operand); }

#define FUSED_PREACT_DISPATCH(x, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (x).scalar_type(), name, __VA_ARGS__)

// A tensor's data as the kernels' storage type T (same bit layout as its dtype).
template <typename T>
const T* data_as(const at::Tensor& t) {
  return static_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* mutable_data_as(at::Tensor& t) {
  return static_cast<T*>(t.mutable_data_ptr());
}
template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? data_as<T>(t) : nullptr;
}

inline void check_eps(const char* op, double eps) {
  TORCH_CHECK(eps > 0, op, ": eps must be positive, got ", eps);
}

// Operands of the backward op, checked; the statistics vectors are dense.
struct BackwardArgs {
  at::Tensor grad, x, mean, invstd, scale, shift;
};

inline BackwardArgs backward_args(const char* op, const at::Tensor& grad, const at::Tensor& x,
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

// Operands of batch_norm_stats, checked: the activation, and the BatchNorm's
// optional parameters and running statistics (undefined tensors when absent).
struct BatchNormStatsArgs {
  at::Tensor x, weight, bias, running_mean, running_var, num_batches_tracked;
};

inline BatchNormStatsArgs batch_norm_stats_args(const char* op, const at::Tensor& x_in,
                                                const std::optional<at::Tensor>& weight,
                                                const std::optional<at::Tensor>& bias,
                                                const std::optional<at::Tensor>& running_mean,
                                                const std::optional<at::Tensor>& running_var,
                                                const std::optional<at::Tensor>& num_batches_tracked,
                                                double momentum, double eps) {
  check_activation(op, "x", x_in);
  check_eps(op, eps);
  TORCH_CHECK(momentum >= 0 && momentum <= 1, op, ": momentum must be in [0, 1], got ", momentum);
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(), op,
              ": running_mean and running_var must be given together or both be None");
  BatchNormStatsArgs a;
  a.x = as_kernel_operand(x_in);
  const auto vector = [&](const char* name, const std::optional<at::Tensor>& t, bool in_place) {
    if (!t.has_value()) return at::Tensor();
    check_channel_vector(op, name, *t, x_in);
    TORCH_CHECK(!in_place || t->is_contiguous(), op, ": ", name, " must be contiguous (it is updated in place)");
    return in_place ? *t : t->contiguous();
  };
  a.weight = vector("weight", weight, false);
  a.bias = vector("bias", bias, false);
  a.running_mean = vector("running_mean", running_mean, true);
  a.running_var = vector("running_var", running_var, true);
  if (running_mean.has_value())
    TORCH_CHECK(x_in.numel() > x_in.size(1), op,
                ": updating running statistics needs more than one value per channel, got x of shape ",
                x_in.sizes());
  if (num_batches_tracked.has_value()) {
    const at::Tensor& t = *num_batches_tracked;
    TORCH_CHECK(t.scalar_type() == at::kLong && t.numel() == 1 && t.device() == x_in.device(), op,
                ": num_batches_tracked must be a one-element int64 tensor on x's device (", x_in.device(),
                "), got ", t.scalar_type(), " of shape ", t.sizes(), " on ", t.device());
    a.num_batches_tracked = t;
  }
  return a;
}

// batch_norm_stats' outputs (mean, invstd, scale, shift): one value per
// channel of x in the statistics dtype, all NaN for an x with no values (as
// torch.var_mean of nothing); the kernels fill them otherwise.
inline std::array<at::Tensor, 4> stats_outputs(const at::Tensor& x) {
  const at::Tensor mean = at::empty({x.size(1)}, x.options().dtype(stats_dtype(x)));
  std::array<at::Tensor, 4> out{mean, at::empty_like(mean), at::empty_like(mean), at::empty_like(mean)};
  if (x.numel() == 0) {
    for (at::Tensor& t : out) t.fill_(NAN);
  }
  return out;
}

// The kernels' view of the fold: where to read gamma/beta, write scale/shift
// and update the running statistics.
template <typename S>
BnFold<S> bn_fold_of(BatchNormStatsArgs& a, at::Tensor& scale, at::Tensor& shift, double momentum) {
  BnFold<S> f;
  f.weight = data_or_null<S>(a.weight);
  f.bias = data_or_null<S>(a.bias);
  f.scale = mutable_data_as<S>(scale);
  f.shift = mutable_data_as<S>(shift);
  f.running_mean = a.running_mean.defined() ? mutable_data_as<S>(a.running_mean) : nullptr;
  f.running_var = a.running_var.defined() ? mutable_data_as<S>(a.running_var) : nullptr;
  f.num_batches_tracked =
      a.num_batches_tracked.defined() ? a.num_batches_tracked.mutable_data_ptr<int64_t>() : nullptr;
  f.momentum = momentum;
  f.count = double(a.x.numel() / a.x.size(1));
  return f;
}

template <typename S>
BnReluParams<S> bn_relu_params(const BackwardArgs& a) {
  return {data_as<S>(a.mean), data_as<S>(a.invstd), data_as<S>(a.scale), data_as<S>(a.shift)};
}

}  // namespace fused_preact
