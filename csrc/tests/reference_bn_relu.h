// Float64 reference for BatchNorm -> ReLU, written as direct loops over plain
// [N][C][H][W] arrays (H*W merged into s), independent of the kernels' chunking,
// strides and accumulation order. Each result also carries a "magnitude": the
// sum of absolute values of the terms that formed it, which scales the
// rounding error a correct fp32 implementation may make.
#pragma once

#include <cmath>
#include <vector>

#include "strided_tensor.h"

namespace fused_preact_test {

struct RefStats {
  std::vector<double> mean, var, invstd, mean_abs;  // mean_abs = mean(|x|), scales mean's error
};

inline RefStats ref_batch_stats(const std::vector<double>& x, const Shape& sh, double eps) {
  RefStats r;
  const double m = double(sh.n * sh.s());
  for (int64_t c = 0; c < sh.c; ++c) {
    double sum = 0, sum_abs = 0;
    for (int64_t n = 0; n < sh.n; ++n)
      for (int64_t s = 0; s < sh.s(); ++s) sum += x[sh.nchw(n, c, s)], sum_abs += std::fabs(x[sh.nchw(n, c, s)]);
    const double mean = sum / m;
    double sq = 0;  // two-pass in float64 is exact enough to be the truth
    for (int64_t n = 0; n < sh.n; ++n)
      for (int64_t s = 0; s < sh.s(); ++s) sq += (x[sh.nchw(n, c, s)] - mean) * (x[sh.nchw(n, c, s)] - mean);
    r.mean.push_back(mean);
    r.var.push_back(sq / m);
    r.invstd.push_back(1.0 / std::sqrt(sq / m + eps));
    r.mean_abs.push_back(sum_abs / m);
  }
  return r;
}

// Per-channel parameters as double copies of what the kernel was given.
struct RefParams {
  std::vector<double> mean, invstd, scale, shift;
};

inline double ref_z(const RefParams& p, double x, int64_t c) { return x * p.scale[c] + p.shift[c]; }

struct RefElementwise {
  std::vector<double> value, magnitude;
};

inline RefElementwise ref_apply(const std::vector<double>& x, const Shape& sh, const RefParams& p) {
  RefElementwise r{std::vector<double>(x.size()), std::vector<double>(x.size())};
  for (int64_t n = 0; n < sh.n; ++n)
    for (int64_t c = 0; c < sh.c; ++c)
      for (int64_t s = 0; s < sh.s(); ++s) {
        const int64_t i = sh.nchw(n, c, s);
        const double z = ref_z(p, x[i], c);
        r.value[i] = z > 0 ? z : 0;
        r.magnitude[i] = std::fabs(x[i] * p.scale[c]) + std::fabs(p.shift[c]);
      }
  return r;
}

struct RefSums {
  std::vector<double> dz, dz_xhat, dz_abs, dz_xhat_abs;
};

inline RefSums ref_backward_sums(const std::vector<double>& grad, const std::vector<double>& x, const Shape& sh,
                                 const RefParams& p) {
  RefSums r{std::vector<double>(sh.c), std::vector<double>(sh.c), std::vector<double>(sh.c),
            std::vector<double>(sh.c)};
  for (int64_t n = 0; n < sh.n; ++n)
    for (int64_t c = 0; c < sh.c; ++c)
      for (int64_t s = 0; s < sh.s(); ++s) {
        const int64_t i = sh.nchw(n, c, s);
        if (!(ref_z(p, x[i], c) > 0)) continue;  // ReLU passes no gradient where z <= 0
        const double xhat = (x[i] - p.mean[c]) * p.invstd[c];
        r.dz[c] += grad[i];
        r.dz_xhat[c] += grad[i] * xhat;
        r.dz_abs[c] += std::fabs(grad[i]);
        r.dz_xhat_abs[c] += std::fabs(grad[i] * xhat);
      }
  return r;
}

// training == false: statistics are constants, dx = scale * dz.
inline RefElementwise ref_backward_input(const std::vector<double>& grad, const std::vector<double>& x,
                                         const Shape& sh, const RefParams& p, bool training) {
  const RefSums sums = ref_backward_sums(grad, x, sh, p);
  const double m = double(sh.n * sh.s());
  RefElementwise r{std::vector<double>(x.size()), std::vector<double>(x.size())};
  for (int64_t n = 0; n < sh.n; ++n)
    for (int64_t c = 0; c < sh.c; ++c)
      for (int64_t s = 0; s < sh.s(); ++s) {
        const int64_t i = sh.nchw(n, c, s);
        const double dz = ref_z(p, x[i], c) > 0 ? grad[i] : 0.0;
        double g = dz, mag = std::fabs(dz);
        if (training) {
          const double xhat = (x[i] - p.mean[c]) * p.invstd[c];
          g -= sums.dz[c] / m + xhat * sums.dz_xhat[c] / m;
          mag += (sums.dz_abs[c] + std::fabs(xhat) * sums.dz_xhat_abs[c]) / m;
        }
        r.value[i] = p.scale[c] * g;
        r.magnitude[i] = std::fabs(p.scale[c]) * mag;
      }
  return r;
}

}  // namespace fused_preact_test
