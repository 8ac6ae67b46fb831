// Test tensors in the three memory layouts the kernels must accept, built by
// choosing strides over one buffer, plus conversion to/from the plain float64
// [N][C][H][W] arrays the reference works on.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "core/half.h"
#include "core/view.h"

namespace fused_preact_test {

using fused_preact::ActView;

struct Shape {
  int64_t n, c, h, w;
  int64_t s() const { return h * w; }
  int64_t numel() const { return n * c * h * w; }
  // Index into a contiguous NCHW array (the reference layout).
  int64_t nchw(int64_t in, int64_t ic, int64_t is) const { return (in * c + ic) * s() + is; }
};

inline std::string to_string(const Shape& sh) {
  return "N=" + std::to_string(sh.n) + " C=" + std::to_string(sh.c) + " H=" + std::to_string(sh.h) +
         " W=" + std::to_string(sh.w);
}

enum class Layout {
  nchw,
  channels_last,  // NHWC
  batch_slice,    // x[:, 1:C+1] of an NCHW tensor with C+2 channels: stride_n > C*S
};
constexpr Layout kAllLayouts[] = {Layout::nchw, Layout::channels_last, Layout::batch_slice};

inline const char* to_string(Layout l) {
  switch (l) {
    case Layout::nchw: return "nchw";
    case Layout::channels_last: return "channels_last";
    case Layout::batch_slice: return "batch_slice";
  }
  return "?";
}

// A different layout than `l`, for kernels whose inputs/outputs may disagree.
inline Layout next_layout(Layout l) {
  return l == Layout::nchw ? Layout::channels_last : l == Layout::channels_last ? Layout::batch_slice : Layout::nchw;
}

// Storage value outside the view; must survive every kernel call untouched.
constexpr float kSentinel = -777.0f;

template <typename T>
struct StridedTensor {
  Shape shape;
  Layout layout;
  std::vector<T> storage;
  int64_t base = 0;  // element offset of (0, 0, 0) in storage
  ActView view;

  StridedTensor(const Shape& sh, Layout l) : shape(sh), layout(l) {
    const int64_t s = sh.s();
    view.n = sh.n;
    view.c = sh.c;
    view.s = s;
    switch (l) {
      case Layout::nchw:
        view.stride_n = sh.c * s, view.stride_c = s, view.stride_s = 1;
        storage.resize(sh.numel());
        break;
      case Layout::channels_last:
        view.stride_n = s * sh.c, view.stride_c = 1, view.stride_s = sh.c;
        storage.resize(sh.numel());
        break;
      case Layout::batch_slice:
        view.stride_n = (sh.c + 2) * s, view.stride_c = s, view.stride_s = 1;
        storage.resize((sh.c + 2) * s * sh.n);
        base = s;  // skip channel 0 of the parent tensor
        break;
    }
    T sentinel;
    fused_preact::store(&sentinel, kSentinel);
    storage.assign(storage.size(), sentinel);
  }

  T* data() { return storage.data() + base; }
  const T* data() const { return storage.data() + base; }
  int64_t offset(int64_t n, int64_t c, int64_t s) const {
    return base + n * view.stride_n + c * view.stride_c + s * view.stride_s;
  }

  // Rounds each value to T (the kernels' inputs are whatever T can hold).
  void assign_nchw(const std::vector<double>& values) {
    for (int64_t n = 0; n < shape.n; ++n)
      for (int64_t c = 0; c < shape.c; ++c)
        for (int64_t s = 0; s < shape.s(); ++s)
          fused_preact::store(&storage[offset(n, c, s)], scalar(values[shape.nchw(n, c, s)]));
  }

  std::vector<double> to_nchw() const {
    std::vector<double> out(shape.numel());
    for (int64_t n = 0; n < shape.n; ++n)
      for (int64_t c = 0; c < shape.c; ++c)
        for (int64_t s = 0; s < shape.s(); ++s)
          out[shape.nchw(n, c, s)] = double(fused_preact::load(&storage[offset(n, c, s)]));
    return out;
  }

  // Number of storage elements outside the view that no longer hold the sentinel.
  int64_t clobbered_padding() const {
    std::vector<bool> inside(storage.size(), false);
    for (int64_t n = 0; n < shape.n; ++n)
      for (int64_t c = 0; c < shape.c; ++c)
        for (int64_t s = 0; s < shape.s(); ++s) inside[offset(n, c, s)] = true;
    T sentinel;
    fused_preact::store(&sentinel, kSentinel);
    int64_t bad = 0;
    for (size_t i = 0; i < storage.size(); ++i)
      bad += !inside[i] && std::memcmp(&storage[i], &sentinel, sizeof(T)) != 0;
    return bad;
  }

 private:
  // float for 16-bit types: store() of a double would not resolve for them.
  static fused_preact::compute_t<T> scalar(double v) { return fused_preact::compute_t<T>(v); }
};

}  // namespace fused_preact_test
