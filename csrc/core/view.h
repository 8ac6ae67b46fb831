// Torch-free description of the kernels' operands: a 4-D activation as a
// strided [N, C, H*W] view, and the per-channel statistics that go with it.
//
// BatchNorm reduces over (N, H, W) per channel, so every kernel in this package
// walks an activation as [N, C, S] with S = H*W merged into one spatial axis.
// That merge is valid for NCHW, channels_last and batch-sliced tensors alike
// (the caller checks stride_h == W * stride_w), which is why one strided view
// serves all layouts instead of one kernel per memory format.
#pragma once

#include <cstdint>
#include <type_traits>

namespace fused_preact {

struct ActView {
  int64_t n = 0, c = 0, s = 0;                  // batch, channels, H*W
  int64_t stride_n = 0, stride_c = 0, stride_s = 0;  // in elements

  int64_t rows() const { return n * s; }        // elements per channel (m)
  // Channels are the fastest axis (channels_last): iterate channels innermost.
  bool channels_inner() const { return stride_c < stride_s; }
};

// Kernels accumulate in compute_t and keep per-channel vectors in stat_t:
// fp32 for fp32/fp16/bf16 tensors, fp64 for fp64 tensors (where fp32 would
// make gradcheck meaningless). The bindings allocate statistics accordingly.
template <typename T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
template <typename T>
using stat_t = compute_t<T>;

// Per-channel BN parameters of the backward pass, all of length C.
template <typename S>
struct BnReluParams {
  const S* mean;
  const S* invstd;
  const S* scale;
  const S* shift;
};

}  // namespace fused_preact
