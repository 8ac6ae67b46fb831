// Torch-free description of a 4-D activation as the kernels see it.
//
// BatchNorm reduces over (N, H, W) per channel, so every kernel in this package
// walks an activation as [N, C, S] with S = H*W merged into one spatial axis.
// That merge is valid for NCHW, channels_last and batch-sliced tensors alike
// (the caller checks stride_h == W * stride_w), which is why one strided view
// serves all layouts instead of one kernel per memory format.
#pragma once

#include <cstdint>

namespace fused_preact {

struct ActView {
  int64_t n = 0, c = 0, s = 0;                  // batch, channels, H*W
  int64_t stride_n = 0, stride_c = 0, stride_s = 0;  // in elements

  int64_t rows() const { return n * s; }        // elements per channel (m)
  // Channels are the fastest axis (channels_last): iterate channels innermost.
  bool channels_inner() const { return stride_c < stride_s; }
  int64_t offset(int64_t row, int64_t ch) const {
    return (row / s) * stride_n + (row % s) * stride_s + ch * stride_c;
  }
};

}  // namespace fused_preact
