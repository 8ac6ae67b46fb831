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
// injected by the caller as `pfor(begin, end, fn)`, which must call fn(b, e)
// on disjoint sub-ranges covering [begin, end) (the torch binding passes
// at::parallel_for; tests pass a serial loop).
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
  void operator()(int64_t begin, int64_t end, F&& fn) const {
    if (begin < end) fn(begin, end);
  }
};

struct Chunks {
  int64_t per_image, count;
  explicit Chunks(const ActView& v)
      : per_image((v.s + kChunkSpatial - 1) / kChunkSpatial), count(v.n * per_image) {}
};

// Calls fn(n, s, c) for every element of one chunk, in x's memory order.
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

inline int64_t at(const ActView& v, int64_t n, int64_t s, int64_t c) {
  return n * v.stride_n + s * v.stride_s + c * v.stride_c;
}

// Two per-channel sums, each kept as kLanes interleaved partial sums:
// consecutive elements of a channel add into independent accumulators instead
// of one serial dependency chain. Folded in a fixed order.
template <typename A>
struct LanePair {
  static constexpr int64_t kLanes = 8;
  A first[kLanes] = {}, second[kLanes] = {};
  A total_first() const { return fold(first); }
  A total_second() const { return fold(second); }

 private:
  static A fold(const A* v) {
    A t(0);
    for (int64_t k = 0; k < kLanes; ++k) t += v[k];
    return t;
  }
};

// Reduces one chunk into acc[c] (one LanePair per channel): elem(n, s, c)
// returns the pair of terms of one element. Visits x's memory order. For a
// planar (NCHW) run the lanes are unrolled with compile-time indices, so the
// accumulators live in registers; for channels_last the inner loop runs over
// channels, each with its own accumulators.
template <typename A, typename Elem>
inline void reduce_in_chunk(const ActView& lead, const Chunks& chunks, int64_t chunk, std::vector<LanePair<A>>& acc,
                            Elem&& elem) {
  constexpr int64_t K = LanePair<A>::kLanes;
  const int64_t n = chunk / chunks.per_image;
  const int64_t s0 = (chunk % chunks.per_image) * kChunkSpatial;
  const int64_t s1 = std::min(lead.s, s0 + kChunkSpatial);
  if (lead.channels_inner()) {
    std::fill(acc.begin(), acc.end(), LanePair<A>{});
    for (int64_t s = s0; s < s1; ++s)
      for (int64_t c = 0; c < lead.c; ++c) {
        const auto [u, v] = elem(n, s, c);
        acc[c].first[s % K] += u;
        acc[c].second[s % K] += v;
      }
    return;
  }
  for (int64_t c = 0; c < lead.c; ++c) {
    A u_lane[K] = {}, v_lane[K] = {};
    int64_t s = s0;
    for (; s + K <= s1; s += K) {
#pragma GCC unroll 8
      for (int64_t k = 0; k < K; ++k) {
        const auto [u, v] = elem(n, s + k, c);
        u_lane[k] += u;
        v_lane[k] += v;
      }
    }
    for (; s < s1; ++s) {
      const auto [u, v] = elem(n, s, c);
      u_lane[0] += u;
      v_lane[0] += v;
    }
    std::copy(u_lane, u_lane + K, acc[c].first);
    std::copy(v_lane, v_lane + K, acc[c].second);
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
  pfor(0, chunks.count, [&](int64_t b, int64_t e) {
    std::vector<LanePair<acc_t>> acc(vx.c);
    std::vector<acc_t> mean(vx.c);
    for (int64_t chunk = b; chunk < e; ++chunk) {
      // Corrected two-pass over a cache-resident chunk: a provisional mean,
      // then deviations from it. The provisional mean carries the rounding of
      // an fp32 sum; the deviations' own sum (resid) measures that error and
      // removes it from both the mean and m2 (Chan, Golub & LeVeque 1983).
      reduce_in_chunk(vx, chunks, chunk, acc, [&](int64_t n, int64_t s, int64_t c) {
        return std::pair<acc_t, acc_t>(load(x + at(vx, n, s, c)), acc_t(0));
      });
      const int64_t s0 = (chunk % chunks.per_image) * kChunkSpatial;
      const acc_t cnt = acc_t(std::min(vx.s, s0 + kChunkSpatial) - s0);
      for (int64_t c = 0; c < vx.c; ++c) mean[c] = acc[c].total_first() / cnt;
      reduce_in_chunk(vx, chunks, chunk, acc, [&](int64_t n, int64_t s, int64_t c) {
        const acc_t d = acc_t(load(x + at(vx, n, s, c))) - mean[c];
        return std::pair<acc_t, acc_t>(d, d * d);  // (resid, m2)
      });
      for (int64_t c = 0; c < vx.c; ++c) {
        const double r = double(acc[c].total_first());
        partial[chunk * vx.c + c] = {double(cnt), double(mean[c]) + r / double(cnt),
                                     double(acc[c].total_second()) - r * r / double(cnt)};
      }
    }
  });
  pfor(0, vx.c, [&](int64_t b, int64_t e) {
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
  pfor(0, chunks.count, [&](int64_t b, int64_t e) {
    for (int64_t chunk = b; chunk < e; ++chunk)
      for_each_in_chunk(vx, chunks, chunk, [&](int64_t n, int64_t s, int64_t c) {
        const acc_t z = acc_t(load(x + at(vx, n, s, c))) * acc_t(scale[c]) + acc_t(shift[c]);
        store(out + at(vout, n, s, c), z < acc_t(0) ? acc_t(0) : z);  // NaN propagates, as torch.relu
      });
  });
}

template <typename T, typename ParallelFor = SerialFor>
void bn_relu_backward_reduce_cpu(const T* grad, const ActView& vg, const T* x, const ActView& vx,
                                 BnReluParams<stat_t<T>> p, stat_t<T>* sum_dz, stat_t<T>* sum_dz_xhat,
                                 ParallelFor&& pfor = {}) {
  using acc_t = compute_t<T>;
  const Chunks chunks(vx);
  std::vector<double> part_dz(chunks.count * vx.c), part_dzx(chunks.count * vx.c);
  pfor(0, chunks.count, [&](int64_t b, int64_t e) {
    std::vector<LanePair<acc_t>> acc(vx.c);  // (sum dz, sum dz * xhat)
    for (int64_t chunk = b; chunk < e; ++chunk) {
      reduce_in_chunk(vx, chunks, chunk, acc, [&](int64_t n, int64_t s, int64_t c) {
        const acc_t xv = load(x + at(vx, n, s, c));
        const acc_t g = load(grad + at(vg, n, s, c));
        // ReLU mask as in apply (NaN: off), as a select rather than a branch
        // that random data would mispredict half the time.
        const acc_t dz = xv * acc_t(p.scale[c]) + acc_t(p.shift[c]) > acc_t(0) ? g : acc_t(0);
        return std::pair<acc_t, acc_t>(dz, dz * ((xv - acc_t(p.mean[c])) * acc_t(p.invstd[c])));
      });
      for (int64_t c = 0; c < vx.c; ++c) {
        part_dz[chunk * vx.c + c] = acc[c].total_first();
        part_dzx[chunk * vx.c + c] = acc[c].total_second();
      }
    }
  });
  pfor(0, vx.c, [&](int64_t b, int64_t e) {
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
  const auto dz_at = [&](int64_t n, int64_t s, int64_t c, acc_t xv) {
    const acc_t g = load(grad + at(vg, n, s, c));
    return xv * acc_t(p.scale[c]) + acc_t(p.shift[c]) > acc_t(0) ? g : acc_t(0);
  };
  // Two loops rather than a per-element test of the mode: the compiler does
  // not hoist that test, and it costs a factor of 20 on this kernel.
  pfor(0, chunks.count, [&](int64_t b, int64_t e) {
    for (int64_t chunk = b; chunk < e; ++chunk) {
      if (sum_dz != nullptr) {
        for_each_in_chunk(vx, chunks, chunk, [&](int64_t n, int64_t s, int64_t c) {
          const acc_t xv = load(x + at(vx, n, s, c));
          store(dx + at(vdx, n, s, c),
                acc_t(p.scale[c]) * dz_at(n, s, c, xv) - shift_c[c] - (xv - acc_t(p.mean[c])) * slope_c[c]);
        });
      } else {
        for_each_in_chunk(vx, chunks, chunk, [&](int64_t n, int64_t s, int64_t c) {
          store(dx + at(vdx, n, s, c), acc_t(p.scale[c]) * dz_at(n, s, c, load(x + at(vx, n, s, c))));
        });
      }
    }
  });
}

}  // namespace fused_preact
