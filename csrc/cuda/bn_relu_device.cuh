// Device helpers and the per-channel reduction machinery of the BN-ReLU CUDA
// kernels (bn_relu_kernels.cu, the only file that includes this one): value
// loads/stores per storage type, the pre-activation, Chan's merge, and the
// two-stage reductions (partials per row block, then a fixed-order merge).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cuda/bn_relu_kernels.cuh"

namespace fused_preact {
namespace gpu {
namespace detail {

constexpr int kBlock = 256;
constexpr int kWarps = kBlock / 32;
constexpr int kUnroll = 4;  // independent loads in flight per thread
constexpr unsigned kFullMask = 0xffffffffu;
// Reductions aim for about this many blocks (a few waves on a 132-SM GPU) but
// give each thread at least kMinRowsPerThread rows. Fixed numbers rather than
// the SM count keep the partial split, and hence the result bits, per shape.
constexpr int64_t kTargetReductionBlocks = 1024;
constexpr int64_t kMinRowsPerThread = 8;
constexpr int64_t kMaxElementwiseBlocks = 8192;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ float load_value(const float* p) { return *p; }
__device__ __forceinline__ double load_value(const double* p) { return *p; }
__device__ __forceinline__ float load_value(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_value(const __nv_bfloat16* p) { return __bfloat162float(*p); }

__device__ __forceinline__ void store_value(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_value(double* p, double v) { *p = v; }
__device__ __forceinline__ void store_value(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_value(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// z = x * scale + shift rounded twice, as the CPU twin (built with
// -ffp-contract=off) computes it: the _rn intrinsics are never fused into an
// fma, so the ReLU mask recomputed by the backward kernels is bit-identical to
// the one the forward kernel applied, and to the CPU's. An fma would differ
// where the product and shift cancel: a constant channel (x == mean, so
// shift == -x * scale rounded) gets z = 0 from two roundings but the
// product's rounding error, of either sign, from one, which turns its ReLU
// mask on at random and lets through gradients that the CPU gives as 0.
__device__ __forceinline__ float pre_activation(float x, float scale, float shift) {
  return __fadd_rn(__fmul_rn(x, scale), shift);
}
__device__ __forceinline__ double pre_activation(double x, double scale, double shift) {
  return __dadd_rn(__dmul_rn(x, scale), shift);
}

__device__ __forceinline__ int64_t element_offset(const ActView& v, int64_t n, int64_t s, int64_t c) {
  return n * v.stride_n + s * v.stride_s + c * v.stride_c;
}

// Shuffles every field of a State; each State here holds fields of one type.
template <typename Field, typename State>
__device__ __forceinline__ State shuffle_xor(State st, int lane_mask) {
  static_assert(sizeof(State) % sizeof(Field) == 0, "State must consist of Field members only");
  Field fields[sizeof(State) / sizeof(Field)];
  memcpy(fields, &st, sizeof st);
#pragma unroll
  for (Field& f : fields) f = __shfl_xor_sync(kFullMask, f, lane_mask);
  memcpy(&st, fields, sizeof st);
  return st;
}

// Chan et al.'s merge of (count, mean, m2) groups; an empty b is a no-op and
// an empty a takes b, so idle threads may merge freely.
template <typename A>
__device__ __forceinline__ void chan_merge(A& count, A& mean, A& m2, A count_b, A mean_b, A m2_b) {
  if (count_b == A(0)) return;
  const A total = count + count_b;
  const A delta = mean_b - mean;
  const A weight_b = count_b / total;
  mean += delta * weight_b;
  m2 += m2_b + delta * delta * count * weight_b;
  count = total;
}

// ---------------------------------------------------------------------------
// Per-channel reductions, stage 1: one partial per (row block, channel).
// An Op supplies State (a POD of acc_t), Channel (per-channel constants),
// Sample (what one element loads), and identity/add/combine/write_partial.
// Partials live at ws[field][row_block][channel].

template <typename T>
struct StatsReduction {
  using acc_t = compute_t<T>;
  struct State { acc_t count, mean, m2; };
  struct Channel {};
  using Sample = acc_t;

  const T* x;
  ActView vx;

  __device__ Channel channel(int64_t) const { return {}; }
  __device__ Sample load(int64_t n, int64_t s, int64_t c) const {
    return load_value(x + element_offset(vx, n, s, c));
  }
  __device__ static State identity() { return {acc_t(0), acc_t(0), acc_t(0)}; }
  // Welford: stable where the sum of squares minus m*mean^2 would cancel.
  __device__ static void add(State& st, const Channel&, Sample v) {
    st.count += acc_t(1);
    const acc_t delta = v - st.mean;
    st.mean += delta / st.count;
    st.m2 += delta * (v - st.mean);
  }
  __device__ static void combine(State& a, const State& b) {
    chan_merge(a.count, a.mean, a.m2, b.count, b.mean, b.m2);
  }
  // The count is not stored: the merge derives it exactly from the grid.
  __device__ static void write_partial(const State& st, acc_t* ws, int64_t slot, int64_t field_stride) {
    ws[slot] = st.mean;
    ws[field_stride + slot] = st.m2;
  }
};

template <typename T>
struct GradSumsReduction {
  using acc_t = compute_t<T>;
  struct State { acc_t dz, dz_xhat; };
  struct Channel { acc_t mean, invstd, scale, shift; };
  struct Sample { acc_t x, grad; };

  const T* grad;
  ActView vg;
  const T* x;
  ActView vx;
  BnReluParams<stat_t<T>> p;

  __device__ Channel channel(int64_t c) const {
    return {acc_t(p.mean[c]), acc_t(p.invstd[c]), acc_t(p.scale[c]), acc_t(p.shift[c])};
  }
  __device__ Sample load(int64_t n, int64_t s, int64_t c) const {
    return {load_value(x + element_offset(vx, n, s, c)), load_value(grad + element_offset(vg, n, s, c))};
  }
  __device__ static State identity() { return {acc_t(0), acc_t(0)}; }
  // ReLU mask as in apply (NaN: off). A masked-off element still adds 0 * xhat,
  // as the CPU twin and torch do: an inf or NaN x makes sum_dz_xhat NaN (what
  // AMP's GradScaler looks for) rather than being skipped.
  __device__ static void add(State& st, const Channel& ch, const Sample& e) {
    const acc_t dz = pre_activation(e.x, ch.scale, ch.shift) > acc_t(0) ? e.grad : acc_t(0);
    st.dz += dz;
    st.dz_xhat += dz * ((e.x - ch.mean) * ch.invstd);
  }
  __device__ static void combine(State& a, const State& b) {
    a.dz += b.dz;
    a.dz_xhat += b.dz_xhat;
  }
  __device__ static void write_partial(const State& st, acc_t* ws, int64_t slot, int64_t field_stride) {
    ws[slot] = st.dz;
    ws[field_stride + slot] = st.dz_xhat;
  }
};

// Block (bx, by) reduces channels [bx*tile_c, +tile_c) over rows
// [by*rows_per_block, +rows_per_block). Thread t owns channel t % tile_c and
// every (kBlock/tile_c)-th row from t / tile_c.
template <typename Op>
__global__ void __launch_bounds__(kBlock)
    channel_partials_kernel(Op op, ActView v, ReductionGrid g, typename Op::acc_t* ws) {
  using State = typename Op::State;
  const int tc = int(threadIdx.x) % g.tile_c;
  const int64_t row_step = kBlock / g.tile_c;
  const int64_t c = int64_t(blockIdx.x) * g.tile_c + tc;
  const int64_t rows = v.n * v.s;
  const int64_t row_begin = int64_t(blockIdx.y) * g.rows_per_block;
  const int64_t row_end = min(rows, row_begin + g.rows_per_block);

  State st = Op::identity();
  if (c < v.c) {
    const typename Op::Channel ch = op.channel(c);
    int64_t row = row_begin + int64_t(threadIdx.x) / g.tile_c;
    int64_t n = row / v.s, s = row % v.s;  // cursor; advanced by (step_n, step_s) with a carry
    const int64_t step_n = row_step / v.s, step_s = row_step % v.s;
    auto advance = [&] {
      s += step_s;
      n += step_n;
      if (s >= v.s) s -= v.s, ++n;
    };
    for (; row + (kUnroll - 1) * row_step < row_end; row += kUnroll * row_step) {
      typename Op::Sample e[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) e[u] = op.load(n, s, c), advance();
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) Op::add(st, ch, e[u]);
    }
    for (; row < row_end; row += row_step) Op::add(st, ch, op.load(n, s, c)), advance();
  }

  // Merge the threads of one channel: lanes of a warp by shuffles (lane l and
  // l ^ k share a channel for k >= tile_c), then the warps in a fixed order.
  for (int k = 16; k >= g.tile_c; k >>= 1) Op::combine(st, shuffle_xor<typename Op::acc_t>(st, k));
  __shared__ State warp_states[kWarps][32];
  const int lane = int(threadIdx.x) % 32, warp = int(threadIdx.x) / 32;
  if (lane < g.tile_c) warp_states[warp][lane] = st;
  __syncthreads();
  if (int(threadIdx.x) < g.tile_c && c < v.c) {
    State total = warp_states[0][threadIdx.x];
    for (int w = 1; w < kWarps; ++w) Op::combine(total, warp_states[w][threadIdx.x]);
    Op::write_partial(total, ws, int64_t(blockIdx.y) * v.c + c, g.blocks_rows * v.c);
  }
}

// ---------------------------------------------------------------------------
// Stage 2: one warp per channel merges that channel's partials in double; lane
// l takes row blocks l, l+32, ... in order, then a fixed xor tree joins lanes.

template <typename T>
struct StatsMerge {
  struct State { double count, mean, m2; };
  const compute_t<T>* ws;
  int64_t channels, rows;
  ReductionGrid g;
  double eps;
  stat_t<T>* mean;
  stat_t<T>* invstd;
  BnFold<stat_t<T>> fold;

  __device__ static State identity() { return {0.0, 0.0, 0.0}; }
  __device__ State partial(int64_t block_row, int64_t c) const {
    const int64_t first = block_row * g.rows_per_block;
    const int64_t slot = block_row * channels + c;
    return {double(min(rows, first + g.rows_per_block) - first), double(ws[slot]),
            double(ws[g.blocks_rows * channels + slot])};
  }
  __device__ static void combine(State& a, const State& b) {
    chan_merge(a.count, a.mean, a.m2, b.count, b.mean, b.m2);
  }
  __device__ void write(const State& st, int64_t c) const {
    const double var = st.m2 / st.count;  // NaN for an empty channel, as the CPU binding answers
    mean[c] = stat_t<T>(st.count > 0 ? st.mean : var);
    invstd[c] = stat_t<T>(1.0 / sqrt(var + eps));
    if (fold.wanted()) fold(c, st.mean, var, invstd[c]);
  }
};

template <typename T>
struct GradSumsMerge {
  struct State { double dz, dz_xhat; };
  const compute_t<T>* ws;
  int64_t channels;
  ReductionGrid g;
  stat_t<T>* sum_dz;
  stat_t<T>* sum_dz_xhat;

  __device__ static State identity() { return {0.0, 0.0}; }
  __device__ State partial(int64_t block_row, int64_t c) const {
    const int64_t slot = block_row * channels + c;
    return {double(ws[slot]), double(ws[g.blocks_rows * channels + slot])};
  }
  __device__ static void combine(State& a, const State& b) {
    a.dz += b.dz;
    a.dz_xhat += b.dz_xhat;
  }
  __device__ void write(const State& st, int64_t c) const {
    sum_dz[c] = stat_t<T>(st.dz);
    sum_dz_xhat[c] = stat_t<T>(st.dz_xhat);
  }
};

template <typename Merge>
__global__ void __launch_bounds__(kBlock)
    channel_merge_kernel(Merge merge, int64_t channels, int64_t blocks_rows) {
  const int lane = int(threadIdx.x) % 32;
  const int64_t c = int64_t(blockIdx.x) * kWarps + int(threadIdx.x) / 32;
  if (c >= channels) return;  // whole warps leave together, so the shuffles below stay full
  typename Merge::State st = Merge::identity();
  for (int64_t b = lane; b < blocks_rows; b += 32) Merge::combine(st, merge.partial(b, c));
  for (int k = 16; k >= 1; k >>= 1) Merge::combine(st, shuffle_xor<double>(st, k));
  if (lane == 0) merge.write(st, c);
}

template <typename Op, typename Merge>
void reduce_channels(const Op& op, const Merge& merge, const ActView& v, const ReductionGrid& g,
                     typename Op::acc_t* ws, cudaStream_t stream) {
  if (v.c == 0) return;
  const dim3 partial_blocks(unsigned(g.blocks_c), unsigned(g.blocks_rows));
  if (g.blocks_rows > 0) channel_partials_kernel<<<partial_blocks, kBlock, 0, stream>>>(op, v, g, ws);
  channel_merge_kernel<<<unsigned(ceil_div(v.c, kWarps)), kBlock, 0, stream>>>(merge, v.c, g.blocks_rows);
}

}  // namespace detail
}  // namespace gpu
}  // namespace fused_preact
