// Argument checks and tensor -> ActView conversion shared by the CPU and CUDA
// bindings, so both devices reject the same bad input with the same message.
#pragma once

#include <ATen/ATen.h>

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

// Output with x's layout: empty_like keeps the strides of a dense x and picks
// x's suggested memory format for a strided slice.
inline at::Tensor empty_activation_like(const at::Tensor& x) {
  return at::empty_like(x, x.options(), x.is_non_overlapping_and_dense()
                                            ? at::MemoryFormat::Preserve
                                            : x.suggest_memory_format());
}

}  // namespace fused_preact
