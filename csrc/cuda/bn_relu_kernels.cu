// CUDA kernels for BatchNorm -> ReLU; see bn_relu_kernels.cuh for the contract.
//
// Thread mapping. Threads that are adjacent in a warp must touch adjacent
// addresses, so the fast thread index follows x's fastest axis: channels for
// channels_last (stride_c < stride_s), the spatial axis for planar NCHW.
// Positions advance by a fixed step with carries instead of a 64-bit division
// per element, which would otherwise cost more than the memory access.
#include "cuda/bn_relu_kernels.cuh"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cuda/bn_relu_device.cuh"

namespace fused_preact {
namespace gpu {
using namespace detail;  // NOLINT: this file's device helpers and reductions (bn_relu_device.cuh)
namespace {
// ---------------------------------------------------------------------------
// Elementwise kernels: a grid-stride walk over x's memory order, the position
// kept as digits (n, mid, inner) with inner the fastest axis of x.

struct ElementwiseGrid {
  int64_t total, inner_size, mid_size;
  int64_t step_inner, step_mid, step_n;  // the grid stride written in those digits
  unsigned blocks;
};

ElementwiseGrid elementwise_grid(const ActView& v) {
  ElementwiseGrid g{};
  g.total = v.n * v.c * v.s;
  if (g.total == 0) return g;  // nothing to launch (and no digit sizes to divide by)
  g.inner_size = v.channels_inner() ? v.c : v.s;
  g.mid_size = v.channels_inner() ? v.s : v.c;
  g.blocks = unsigned(std::clamp<int64_t>(ceil_div(g.total, kBlock * kUnroll), 1, kMaxElementwiseBlocks));
  const int64_t stride = int64_t(g.blocks) * kBlock;
  g.step_inner = stride % g.inner_size;
  g.step_mid = (stride / g.inner_size) % g.mid_size;
  g.step_n = stride / g.inner_size / g.mid_size;
  return g;
}

template <bool kChannelsInner, typename Op>
__global__ void __launch_bounds__(kBlock) elementwise_kernel(Op op, ElementwiseGrid g) {
  const int64_t stride = int64_t(gridDim.x) * kBlock;
  int64_t i = int64_t(blockIdx.x) * kBlock + threadIdx.x;
  if (i >= g.total) return;
  int64_t inner = i % g.inner_size, mid = (i / g.inner_size) % g.mid_size, n = i / g.inner_size / g.mid_size;
  for (; i < g.total; i += kUnroll * stride) {
    int64_t pn[kUnroll], ps[kUnroll], pc[kUnroll];
    typename Op::Sample e[kUnroll] = {};
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      pn[u] = n;
      ps[u] = kChannelsInner ? mid : inner;
      pc[u] = kChannelsInner ? inner : mid;
      if (i + u * stride < g.total) e[u] = op.load(pn[u], ps[u], pc[u]);
      inner += g.step_inner;
      const int64_t carry = inner >= g.inner_size ? 1 : 0;
      inner -= carry * g.inner_size;
      mid += g.step_mid + carry;  // < 2 * mid_size, so one subtraction suffices
      if (mid >= g.mid_size) mid -= g.mid_size, ++n;
      n += g.step_n;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (i + u * stride < g.total) op.store(pn[u], ps[u], pc[u], e[u]);
  }
}

template <typename Op>
void launch_elementwise(const Op& op, const ActView& vx, cudaStream_t stream) {
  const ElementwiseGrid g = elementwise_grid(vx);
  if (g.total == 0) return;
  if (vx.channels_inner())
    elementwise_kernel<true><<<g.blocks, kBlock, 0, stream>>>(op, g);
  else
    elementwise_kernel<false><<<g.blocks, kBlock, 0, stream>>>(op, g);
}

template <typename T>
struct ApplyElementwise {
  using acc_t = compute_t<T>;
  using Sample = acc_t;
  const T* x;
  ActView vx;
  const stat_t<T>* scale;
  const stat_t<T>* shift;
  T* out;
  ActView vout;

  __device__ Sample load(int64_t n, int64_t s, int64_t c) const {
    return load_value(x + element_offset(vx, n, s, c));
  }
  __device__ void store(int64_t n, int64_t s, int64_t c, Sample xv) const {
    const acc_t z = pre_activation(xv, acc_t(scale[c]), acc_t(shift[c]));
    store_value(out + element_offset(vout, n, s, c), z < acc_t(0) ? acc_t(0) : z);  // NaN propagates, as torch.relu
  }
};

template <typename T>
struct InputGradElementwise {
  using acc_t = compute_t<T>;
  struct Sample { acc_t x, grad; };
  const T* grad;
  ActView vg;
  const T* x;
  ActView vx;
  BnReluParams<stat_t<T>> p;
  const stat_t<T>* sum_dz;  // null in eval mode
  const stat_t<T>* sum_dz_xhat;
  acc_t inv_m;
  T* dx;
  ActView vdx;

  __device__ Sample load(int64_t n, int64_t s, int64_t c) const {
    return {load_value(x + element_offset(vx, n, s, c)), load_value(grad + element_offset(vg, n, s, c))};
  }
  __device__ void store(int64_t n, int64_t s, int64_t c, const Sample& e) const {
    const acc_t scale = p.scale[c];
    acc_t dz = pre_activation(e.x, scale, acc_t(p.shift[c])) > acc_t(0) ? e.grad : acc_t(0);
    if (sum_dz != nullptr) {
      const acc_t xhat = (e.x - acc_t(p.mean[c])) * acc_t(p.invstd[c]);
      dz -= (acc_t(sum_dz[c]) + xhat * acc_t(sum_dz_xhat[c])) * inv_m;
    }
    store_value(dx + element_offset(vdx, n, s, c), scale * dz);
  }
};

}  // namespace

ReductionGrid reduction_grid(const ActView& v) {
  ReductionGrid g;
  if (v.channels_inner())
    while (g.tile_c < 32 && g.tile_c < v.c) g.tile_c *= 2;
  g.blocks_c = ceil_div(v.c, g.tile_c);
  const int64_t rows = v.n * v.s;
  if (rows == 0 || v.c == 0) return g;
  const int64_t row_step = kBlock / g.tile_c;
  const int64_t wanted =
      std::min(ceil_div(kTargetReductionBlocks, g.blocks_c), ceil_div(rows, row_step * kMinRowsPerThread));
  g.rows_per_block = ceil_div(rows, std::max<int64_t>(wanted, 1));
  g.blocks_rows = ceil_div(rows, g.rows_per_block);  // every row block is non-empty
  return g;
}

template <typename T>
size_t reduction_workspace_bytes(const ActView& vx) {
  return size_t(2 * reduction_grid(vx).blocks_rows * vx.c) * sizeof(compute_t<T>);
}

template <typename T>
void batch_stats(const T* x, const ActView& vx, double eps, stat_t<T>* mean, stat_t<T>* invstd,
                 const BnFold<stat_t<T>>& fold, void* workspace, cudaStream_t stream) {
  const ReductionGrid g = reduction_grid(vx);
  auto* ws = static_cast<compute_t<T>*>(workspace);
  reduce_channels(StatsReduction<T>{x, vx}, StatsMerge<T>{ws, vx.c, vx.rows(), g, eps, mean, invstd, fold}, vx, g,
                  ws, stream);
}

template <typename T>
void bn_relu_apply(const T* x, const ActView& vx, const stat_t<T>* scale, const stat_t<T>* shift, T* out,
                   const ActView& vout, cudaStream_t stream) {
  launch_elementwise(ApplyElementwise<T>{x, vx, scale, shift, out, vout}, vx, stream);
}

template <typename T>
void bn_relu_backward_reduce(const T* grad, const ActView& vg, const T* x, const ActView& vx,
                             BnReluParams<stat_t<T>> p, stat_t<T>* sum_dz, stat_t<T>* sum_dz_xhat,
                             void* workspace, cudaStream_t stream) {
  const ReductionGrid g = reduction_grid(vx);
  auto* ws = static_cast<compute_t<T>*>(workspace);
  reduce_channels(GradSumsReduction<T>{grad, vg, x, vx, p}, GradSumsMerge<T>{ws, vx.c, g, sum_dz, sum_dz_xhat},
                  vx, g, ws, stream);
}

template <typename T>
void bn_relu_backward_input(const T* grad, const ActView& vg, const T* x, const ActView& vx,
                            BnReluParams<stat_t<T>> p, const stat_t<T>* sum_dz, const stat_t<T>* sum_dz_xhat,
                            T* dx, const ActView& vdx, cudaStream_t stream) {
  using acc_t = compute_t<T>;
  const acc_t inv_m = acc_t(1) / acc_t(vx.rows());  // as the CPU twin rounds it
  const InputGradElementwise<T> op{grad, vg, x, vx, p, sum_dz, sum_dz_xhat, inv_m, dx, vdx};
  launch_elementwise(op, vx, stream);
}

#define FUSED_PREACT_INSTANTIATE(T)                                                                    \
  template size_t reduction_workspace_bytes<T>(const ActView&);                                        \
  template void batch_stats<T>(const T*, const ActView&, double, stat_t<T>*, stat_t<T>*,              \
                               const BnFold<stat_t<T>>&, void*, cudaStream_t);                         \
  template void bn_relu_apply<T>(const T*, const ActView&, const stat_t<T>*, const stat_t<T>*, T*,     \
                                 const ActView&, cudaStream_t);                                        \
  template void bn_relu_backward_reduce<T>(const T*, const ActView&, const T*, const ActView&,         \
                                           BnReluParams<stat_t<T>>, stat_t<T>*, stat_t<T>*, void*,     \
                                           cudaStream_t);                                              \
  template void bn_relu_backward_input<T>(const T*, const ActView&, const T*, const ActView&,          \
                                          BnReluParams<stat_t<T>>, const stat_t<T>*, const stat_t<T>*, \
                                          T*, const ActView&, cudaStream_t);

FUSED_PREACT_INSTANTIATE(float)
FUSED_PREACT_INSTANTIATE(double)
FUSED_PREACT_INSTANTIATE(__half)
FUSED_PREACT_INSTANTIATE(__nv_bfloat16)
#undef FUSED_PREACT_INSTANTIATE

}  // namespace gpu
}  // namespace fused_preact
