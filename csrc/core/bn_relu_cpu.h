// CPU kernels for the BatchNorm -> ReLU part of BN -> ReLU -> conv (torch-free).
//
// Math (the op's, as in fused_preact/reference.py), per channel c over the m = N*H*W elements:
//   mean, invstd = 1/sqrt(var + eps)         (biased variance)
//   xhat = (x - mean) * invstd,  z = x * scale + shift,  a = relu(z)
//   with scale = gamma * invstd and shift = beta - mean * scale.
//   Backward: dz = da * [z > 0],  sum_dz = sum(dz),  sum_dz_xhat = sum(dz * xhat)
//   training: dx = scale * (dz - sum_dz / m - xhat * sum_dz_xhat / m)
//   eval:     dx = scale * dz
// The ReLU mask is recomputed from x, never stored.
//
// Work is split into chunks of one image and a block of spatial positions;
// reductions produce one partial per (chunk, channel) and merge them in chunk
// order, so results do not depend on the number of threads. Parallelism is
// injected by the caller as `pfor(begin, end, work, fn)`, which must call
// fn(b, e) on disjoint sub-ranges covering [begin, end); `work` is about how
// many elements one index touches, so the caller can keep small ranges on one
// thread (the torch binding passes at::parallel_for with a grain from it;
// tests pass a serial loop and real threads).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "bn_fold.h"
#include "half.h"
#include "view.h"

namespace fused_preact {

constexpr int64_t kChunkSpatial = 1024;

struct SerialFor {
  template <typename F>
  void operator()(int64_t begin, int64_t end, int64_t /*work*/, F&& fn) const {
    if (begin < end) fn(begin, end);
  }
};

struct Chunks {
  int64_t per_image, count, work;  // work: elements in one (full) chunk
  explicit Chunks(const ActView& v)
      : per_image((v.s + kChunkSpatial - 1) / kChunkSpatial),
        count(v.n * per_image),
        work(v.c * std::min(v.s, kChunkSpatial)) {}
};

// Where element (n, s, c) of an operand lives. The two dense layouts fix the
// innermost stride to 1 at compile time (spatial for NCHW rows, channels for
// channels_last), so the compiler vectorises the inner loops; with runtime
// strides it cannot, and the kernels ran up to 3-4x slower than ATen's batch norm.
struct StridedLayout {
  int64_t stride_n, stride_c, stride_s;
  int64_t at(int64_t n, int64_t s, int64_t c) const { return n * stride_n + s * stride_s + c * stride_c; }
};
struct PlanarLayout {  // stride_s == 1
  int64_t stride_n, stride_c;
  int64_t at(int64_t n, int64_t s, int64_t c) const { return n * stride_n + s + c * stride_c; }
};
struct ChannelsLastLayout {  // stride_c == 1
  int64_t stride_n, stride_s;
  int64_t at(int64_t n, int64_t s, int64_t c) const { return n * stride_n + s * stride_s + c; }
};

// Calls fn(layout of each view...) with the densest layout type that all
// views share. Every kernel body is written once, against `layout.at`.
template <typename F, typename... Views>
inline void with_layouts(F&& fn, const ActView& lead, const Views&... views) {
  const auto all = [&](auto&& pred) { return pred(lead) && (pred(views) && ...); };
  if (all([&](const ActView& v) { return !v.channels_inner() && v.stride_s == 1; }))
    fn(PlanarLayout{lead.stride_n, lead.stride_c}, PlanarLayout{views.stride_n, views.stride_c}...);
  else if (all([&](const ActView& v) { return v.channels_inner() && v.stride_c == 1; }))
    fn(ChannelsLastLayout{lead.stride_n, lead.stride_s}, ChannelsLastLayout{views.stride_n, views.stride_s}...);
  else
    fn(StridedLayout{lead.stride_n, lead.stride_c, lead.stride_s},
       StridedLayout{views.stride_n, views.stride_c, views.stride_s}...);
}

// Calls fn(n, s, c) for every element of one chunk, in the lead view's memory order.
template <typename F>
inline void for_each_in_chunk(const ActView& lead, const Chunks& chunks, int64_t chunk, F&& fn) {
  const int64_t n = chunk / chunks.per_image;
  const int64_t s0 = (chunk % chunks.per_image) * kChunkSpatial;
  const int64_t s1 = std::min(lead.s, s0 + kChunkSpatial);
  if (lead.channels_inner()) {
    for (int64_t s = s0; s < s1; ++s)
      for (int64_t c = 0; c < lead.c; ++c) fn(n, s, c);
  } else {
    for (int64_t c = 0; c < lead.c; ++c)
      for (int64_t s = s0; s < s1; ++s) fn(n, s, c);
  }
}

// Two per-channel sums, each kept as kLanes interleaved partial sums:
// consecutive spatial positions of a channel add into independent
// accumulators (lane s % kLanes) instead of one serial dependency chain, and
// the lanes fold in a fixed order. Both loop orders below add the same terms
// in the same order, so a channel's sums do not depend on the layout.
template <typename A>
struct LaneSums {
  static constexpr int64_t kLanes = 8;
  int64_t channels;
  std::vector<A> first, second;  // [lane][channel]
  explicit LaneSums(int64_t c) : channels(c), first(kLanes * c), second(kLanes * c) {}
  void clear() {
    std::fill(first.begin(), first.end(), A(0));
    std::fill(second.begin(), second.end(), A(0));
  }
  A total_first(int64_t c) const { return fold(first.data() + c); }
  A total_second(int64_t c) const { return fold(second.data() + c); }

 private:
  A fold(const A* v) const {
    A t(0);
    for (int64_t k = 0; k < kLanes; ++k) t += v[k * channels];
    return t;
  }
};

// Reduces one chunk into `acc`: elem(n, s, c) returns the pair of terms of one
// element. Visits the lead view's memory order, kBlock elements at a time:
// their terms go to stack buffers first, in a plain elementwise loop the
// compiler vectorises, and are then added to the lanes. Adding each term
// straight from elem() into its lane defeats the vectoriser (about 2x slower).
// Terms of spatial position s go to lane s % kLanes in both loop orders.
constexpr int64_t kBlock = 64;  // a multiple of kLanes: blocks start on lane 0

template <typename A, typename Elem>
inline void reduce_in_chunk(const ActView& lead, const Chunks& chunks, int64_t chunk, LaneSums<A>& acc,
                            Elem&& elem) {
  constexpr int64_t K = LaneSums<A>::kLanes;
  static_assert(kBlock % K == 0, "a block must start on lane 0");
  const int64_t n = chunk / chunks.per_image;
  const int64_t s0 = (chunk % chunks.per_image) * kChunkSpatial;
  const int64_t s1 = std::min(lead.s, s0 + kChunkSpatial);
  const int64_t C = lead.c;
  A bu[kBlock], bv[kBlock];
  if (lead.channels_inner()) {  // a block: consecutive channels of one position
    acc.clear();
    for (int64_t s = s0; s < s1; ++s) {
      A* u_row = acc.first.data() + (s % K) * C;
      A* v_row = acc.second.data() + (s % K) * C;
      for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
        const int64_t len = std::min(kBlock, C - c0);
        for (int64_t i = 0; i < len; ++i) {
          const auto [u, v] = elem(n, s, c0 + i);
          bu[i] = u;
          bv[i] = v;
        }
        for (int64_t i = 0; i < len; ++i) {
          u_row[c0 + i] += bu[i];
          v_row[c0 + i] += bv[i];
        }
      }
    }
    return;
  }
  for (int64_t c = 0; c < C; ++c) {  // a block: consecutive positions of one channel
    A u_lane[K] = {}, v_lane[K] = {};
    for (int64_t b = s0; b < s1; b += kBlock) {
      const int64_t len = std::min(kBlock, s1 - b);
      for (int64_t i = 0; i < len; ++i) {
        const auto [u, v] = elem(n, b + i, c);
        bu[i] = u;
        bv[i] = v;
      }
      if (len == kBlock) {
        for (int64_t j = 0; j < kBlock; j += K) {
#pragma GCC unroll 8
          for (int64_t k = 0; k < K; ++k) {
            u_lane[k] += bu[j + k];
            v_lane[k] += bv[j + k];
          }
        }
      } else {
        for (int64_t i = 0; i < len; ++i) {
          u_lane[i % K] += bu[i];
          v_lane[i % K] += bv[i];
        }
      }
    }
    for (int64_t k = 0; k < K; ++k) {
      acc.first[k * C + c] = u_lane[k];
      acc.second[k * C + c] = v_lane[k];
    }
  }
}

// Count, mean and sum of squared deviations of one group of values.
struct Moments {
  double count = 0, mean = 0, m2 = 0;
  // Chan et al.'s parallel merge: stable where sum(x^2) - m*mean^2 cancels.
  void merge(const Moments& o) {
    if (o.count == 0) return;
    const double total = count + o.count;
    const double delta = o.mean - mean;
    mean += delta * (o.count / total);
    m2 += o.m2 + delta * delta * (count * o.count / total);
    count = total;
  }
};

// With a wanted `fold`, also writes the BN affine fold and updates the
// running statistics (bn_fold.h) from the same per-channel totals.
template <typename T, typename ParallelFor = SerialFor>
void batch_stats_cpu(const T* x, const ActView& vx, double eps, stat_t<T>* mean, stat_t<T>* invstd,
                     ParallelFor&& pfor = {}, const BnFold<stat_t<T>>& fold = {}) {
  using acc_t = compute_t<T>;
  const Chunks chunks(vx);
  std::vector<Moments> partial(chunks.count * vx.c);
  with_layouts([&](auto lx) {
    pfor(0, chunks.count, chunks.work, [&](int64_t b, int64_t e) {
      LaneSums<acc_t> acc(vx.c);
      std::vector<acc_t> mean(vx.c);
      for (int64_t chunk = b; chunk < e; ++chunk) {
        // Corrected two-pass over a cache-resident chunk: a provisional mean,
        // then deviations from it. The provisional mean carries the rounding of
        // an fp32 sum; the deviations' own sum (resid) measures that error and
        // removes it from both the mean and m2 (Chan, Golub & LeVeque 1983).
        reduce_in_chunk(vx, chunks, chunk, acc, [&](int64_t n, int64_t s, int64_t c) {
          return std::pair<acc_t, acc_t>(load(x + lx.at(n, s, c)), acc_t(0));
        });
        const int64_t s0 = (chunk % chunks.per_image) * kChunkSpatial;
        const acc_t cnt = acc_t(std::min(vx.s, s0 + kChunkSpatial) - s0);
        for (int64_t c = 0; c < vx.c; ++c) mean[c] = acc.total_first(c) / cnt;
        reduce_in_chunk(vx, chunks, chunk, acc, [&](int64_t n, int64_t s, int64_t c) {
          const acc_t d = acc_t(load(x + lx.at(n, s, c))) - mean[c];
          return std::pair<acc_t, acc_t>(d, d * d);  // (resid, m2)
        });
        for (int64_t c = 0; c < vx.c; ++c) {
          const double r = double(acc.total_first(c));
          partial[chunk * vx.c + c] = {double(cnt), double(mean[c]) + r / double(cnt),
                                       double(acc.total_second(c)) - r * r / double(cnt)};
        }
      }
    });
  }, vx);
  pfor(0, vx.c, chunks.count, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      Moments total;
      for (int64_t chunk = 0; chunk < chunks.count; ++chunk) total.merge(partial[chunk * vx.c + c]);
      const double var = total.m2 / total.count;
      mean[c] = stat_t<T>(total.mean);
      invstd[c] = stat_t<T>(1.0 / std::sqrt(var + eps));
      if (fold.wanted()) fold(c, total.mean, var, invstd[c]);
    }
  });
}

template <typename T, typename ParallelFor = SerialFor>
void bn_relu_apply_cpu(const T* x, const ActView& vx, const stat_t<T>* scale, const stat_t<T>* shift,
                       T* out, const ActView& vout, ParallelFor&& pfor = {}) {
  using acc_t = compute_t<T>;
  const Chunks chunks(vx);
  with_layouts([&](auto lx, auto lout) {
    pfor(0, chunks.count, chunks.work, [&](int64_t b, int64_t e) {
      for (int64_t chunk = b; chunk < e; ++chunk)
        for_each_in_chunk(vx, chunks, chunk, [&](int64_t n, int64_t s, int64_t c) {
          const acc_t z = acc_t(load(x + lx.at(n, s, c))) * acc_t(scale[c]) + acc_t(shift[c]);
          store(out + lout.at(n, s, c), z < acc_t(0) ? acc_t(0) : z);  // NaN propagates, as torch.relu
        });
    });
  }, vx, vout);
}

template <typename T, typename ParallelFor = SerialFor>
void bn_relu_backward_reduce_cpu(const T* grad, const ActView& vg, const T* x, const ActView& vx,
                                 BnReluParams<stat_t<T>> p, stat_t<T>* sum_dz, stat_t<T>* sum_dz_xhat,
                                 ParallelFor&& pfor = {}) {
  using acc_t = compute_t<T>;
  const Chunks chunks(vx);
  std::vector<double> part_dz(chunks.count * vx.c), part_dzx(chunks.count * vx.c);
  with_layouts([&](auto lx, auto lg) {
    pfor(0, chunks.count, chunks.work, [&](int64_t b, int64_t e) {
      LaneSums<acc_t> acc(vx.c);  // (sum dz, sum dz * xhat)
      for (int64_t chunk = b; chunk < e; ++chunk) {
        reduce_in_chunk(vx, chunks, chunk, acc, [&](int64_t n, int64_t s, int64_t c) {
          const acc_t xv = load(x + lx.at(n, s, c));
          const acc_t g = load(grad + lg.at(n, s, c));
          // ReLU mask as in apply (NaN: off), as a select rather than a branch
          // that random data would mispredict half the time.
          const acc_t dz = xv * acc_t(p.scale[c]) + acc_t(p.shift[c]) > acc_t(0) ? g : acc_t(0);
          return std::pair<acc_t, acc_t>(dz, dz * ((xv - acc_t(p.mean[c])) * acc_t(p.invstd[c])));
        });
        for (int64_t c = 0; c < vx.c; ++c) {
          part_dz[chunk * vx.c + c] = acc.total_first(c);
          part_dzx[chunk * vx.c + c] = acc.total_second(c);
        }
      }
    });
  }, vx, vg);
  pfor(0, vx.c, chunks.count, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      double a = 0, ax = 0;
      for (int64_t chunk = 0; chunk < chunks.count; ++chunk) {
        a += part_dz[chunk * vx.c + c];
        ax += part_dzx[chunk * vx.c + c];
      }
      sum_dz[c] = stat_t<T>(a);
      sum_dz_xhat[c] = stat_t<T>(ax);
    }
  });
}

// sum_dz == nullptr selects the eval-mode gradient (statistics are constants).
template <typename T, typename ParallelFor = SerialFor>
void bn_relu_backward_input_cpu(const T* grad, const ActView& vg, const T* x, const ActView& vx,
                                BnReluParams<stat_t<T>> p, const stat_t<T>* sum_dz,
                                const stat_t<T>* sum_dz_xhat, T* dx, const ActView& vdx,
                                ParallelFor&& pfor = {}) {
  using acc_t = compute_t<T>;
  const Chunks chunks(vx);
  // Per-channel coefficients, computed once: dx = scale * dz - shift_c - (x - mean) * slope_c
  // with shift_c = scale * sum_dz / m and slope_c = scale * invstd * sum_dz_xhat / m
  // (both zero in eval mode, where the statistics are constants).
  const acc_t inv_m = acc_t(1) / acc_t(vx.rows());
  std::vector<acc_t> shift_c(vx.c, acc_t(0)), slope_c(vx.c, acc_t(0));
  if (sum_dz != nullptr) {
    for (int64_t c = 0; c < vx.c; ++c) {
      shift_c[c] = acc_t(p.scale[c]) * acc_t(sum_dz[c]) * inv_m;
      slope_c[c] = acc_t(p.scale[c]) * acc_t(p.invstd[c]) * acc_t(sum_dz_xhat[c]) * inv_m;
    }
  }
  with_layouts([&](auto lx, auto lg, auto ldx) {
    const auto dz_at = [&](int64_t n, int64_t s, int64_t c, acc_t xv) {
      const acc_t g = load(grad + lg.at(n, s, c));
      return xv * acc_t(p.scale[c]) + acc_t(p.shift[c]) > acc_t(0) ? g : acc_t(0);
    };
    // Two loops rather than a per-element test of the mode: the compiler does
    // not hoist that test, and it costs a factor of 20 on this kernel.
    pfor(0, chunks.count, chunks.work, [&](int64_t b, int64_t e) {
      for (int64_t chunk = b; chunk < e; ++chunk) {
        if (sum_dz != nullptr) {
          for_each_in_chunk(vx, chunks, chunk, [&](int64_t n, int64_t s, int64_t c) {
            const acc_t xv = load(x + lx.at(n, s, c));
            store(dx + ldx.at(n, s, c),
                  acc_t(p.scale[c]) * dz_at(n, s, c, xv) - shift_c[c] - (xv - acc_t(p.mean[c])) * slope_c[c]);
          });
        } else {
          for_each_in_chunk(vx, chunks, chunk, [&](int64_t n, int64_t s, int64_t c) {
            store(dx + ldx.at(n, s, c), acc_t(p.scale[c]) * dz_at(n, s, c, load(x + lx.at(n, s, c))));
          });
        }
      }
    });
  }, vx, vg, vdx);
}

}  // namespace fused_preact
