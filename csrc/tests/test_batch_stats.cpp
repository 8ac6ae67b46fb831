// batch_stats_cpu against the float64 reference for every storage type,
// shape and layout, and on data where a naive fp32 sum of squares cancels.
#include <cmath>
#include <vector>

#include "check.h"
#include "kernel_test_support.h"

using namespace fused_preact_test;

namespace {

template <typename T>
void check_batch_stats_against_reference(uint64_t seed) {
  using Tol = Tolerance<T>;
  Rng rng(seed);
  for (const Shape& shape : test_shapes())
    for (Layout layout : kAllLayouts) {
      const std::string where = case_name<T>(shape, layout);
      StridedTensor<T> x(shape, layout);
      x.assign_nchw(random_activation<T>(shape, rng));
      std::vector<stat_t<T>> mean(shape.c), invstd(shape.c);
      fused_preact::batch_stats_cpu(x.data(), x.view, kEps, mean.data(), invstd.data());
      const RefStats ref = ref_batch_stats(x.to_nchw(), shape, kEps);
      for (int64_t c = 0; c < shape.c; ++c) {
        const std::string at = where + " c=" + std::to_string(c);
        CHECK_NEAR(mean[c], ref.mean[c], Tol::reduction * ref.mean_abs[c], at);
        CHECK_NEAR(invstd[c], ref.invstd[c], Tol::reduction * ref.invstd[c], at);
      }
    }
}

}  // namespace

TEST_CASE(batch_stats_float_matches_reference) { check_batch_stats_against_reference<float>(101); }
TEST_CASE(batch_stats_double_matches_reference) { check_batch_stats_against_reference<double>(102); }
TEST_CASE(batch_stats_fp16_matches_reference) { check_batch_stats_against_reference<fp16_t>(103); }
TEST_CASE(batch_stats_bf16_matches_reference) { check_batch_stats_against_reference<bf16_t>(104); }

// Mean 1e4, std 0.1 in float: sum(x^2)/m - mean^2 loses every significant digit
// in fp32, so only a shifted/two-pass scheme gets the variance right.
TEST_CASE(batch_stats_float_is_stable_for_large_mean_small_variance) {
  const Shape shape{3, 8, 40, 40};  // 8 channels: 8 independent chances to expose an error
  const double eps = 0;  // so 1/invstd^2 is the variance itself
  for (Layout layout : kAllLayouts) {
    Rng rng(7);
    std::vector<double> values(shape.numel());
    for (double& v : values) v = double(float(1e4 + 0.1 * rng.normal()));
    StridedTensor<float> x(shape, layout);
    x.assign_nchw(values);
    std::vector<float> mean(shape.c), invstd(shape.c);
    fused_preact::batch_stats_cpu(x.data(), x.view, eps, mean.data(), invstd.data());
    const RefStats ref = ref_batch_stats(values, shape, eps);
    for (int64_t c = 0; c < shape.c; ++c) {
      const std::string at = case_name<float>(shape, layout) + " c=" + std::to_string(c);
      const double var = 1.0 / (double(invstd[c]) * double(invstd[c]));
      CHECK_NEAR(var, ref.var[c], 1e-3 * ref.var[c], at);
      CHECK_NEAR(mean[c], ref.mean[c], 1e-6 * ref.mean[c], at);  // ~10 float ulps at 1e4

      // The data is hard enough: the textbook fp32 formula is far off here.
      float sum = 0, sum_sq = 0;
      for (int64_t n = 0; n < shape.n; ++n)
        for (int64_t s = 0; s < shape.s(); ++s) {
          const float v = float(values[shape.nchw(n, c, s)]);
          sum += v, sum_sq += v * v;
        }
      const float m = float(shape.n * shape.s());
      const double naive_var = double(sum_sq / m - (sum / m) * (sum / m));
      CHECK(std::fabs(naive_var - ref.var[c]) > 1e-3 * ref.var[c]);
    }
  }
}

// The fold written out from nn.BatchNorm2d's definition: z = gamma * (x - mean)
// * invstd + beta = x * scale + shift; running <- running + momentum * (batch -
// running) with the unbiased batch variance; one more batch counted.
TEST_CASE(batch_stats_fold_gives_the_affine_and_the_running_update) {
  const Shape shape{2, 5, 3, 7};
  Rng rng(11);
  StridedTensor<float> x(shape, Layout::channels_last);
  x.assign_nchw(random_activation<float>(shape, rng));
  std::vector<float> mean(shape.c), invstd(shape.c), scale(shape.c), shift(shape.c);
  std::vector<float> gamma(shape.c), beta(shape.c), running_mean(shape.c), running_var(shape.c);
  for (int64_t c = 0; c < shape.c; ++c)
    gamma[c] = float(0.5 + c), beta[c] = float(c) - 2.f, running_mean[c] = float(c), running_var[c] = 1.f + c;
  const std::vector<float> mean0 = running_mean, var0 = running_var;
  int64_t batches = 7;
  fused_preact::BnFold<float> fold;
  fold.weight = gamma.data(), fold.bias = beta.data(), fold.scale = scale.data(), fold.shift = shift.data();
  fold.running_mean = running_mean.data(), fold.running_var = running_var.data();
  fold.num_batches_tracked = &batches, fold.momentum = 0.25, fold.count = double(shape.n * shape.s());
  fused_preact::batch_stats_cpu(x.data(), x.view, kEps, mean.data(), invstd.data(), fused_preact::SerialFor{}, fold);
  const RefStats ref = ref_batch_stats(x.to_nchw(), shape, kEps);
  const double m = double(shape.n * shape.s());
  for (int64_t c = 0; c < shape.c; ++c) {
    const std::string at = "c=" + std::to_string(c);
    for (double v : {-1.5, 0.0, 2.0}) {  // z at a few x: the fold is the affine map of BatchNorm
      const double z = gamma[c] * (v - ref.mean[c]) * ref.invstd[c] + beta[c];
      CHECK_NEAR(v * scale[c] + shift[c], z, 1e-5 * (1 + std::fabs(z)), at);
    }
    CHECK_NEAR(running_mean[c], mean0[c] + 0.25 * (ref.mean[c] - mean0[c]), 1e-5, at);
    CHECK_NEAR(running_var[c], var0[c] + 0.25 * (ref.var[c] * m / (m - 1) - var0[c]), 1e-5 * (1 + var0[c]), at);
  }
  CHECK(batches == 8);
}
