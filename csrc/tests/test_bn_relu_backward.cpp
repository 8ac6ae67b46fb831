// BN-ReLU backward: the reduction (sum dz, sum dz*xhat) and the input gradient
// in training and eval mode against the float64 reference, plus the ReLU mask
// at its edge (z == 0 exactly gets no gradient).
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "check.h"
#include "kernel_test_support.h"

using namespace fused_preact_test;

namespace {

// Layouts of (grad, dx) for an x layout: all equal, and all different.
std::vector<std::pair<Layout, Layout>> grad_and_dx_layouts(Layout x_layout) {
  return {{x_layout, x_layout}, {next_layout(x_layout), next_layout(next_layout(x_layout))}};
}

template <typename T>
void check_backward_against_reference(uint64_t seed, bool training) {
  using Tol = Tolerance<T>;
  using S = stat_t<T>;
  Rng rng(seed);
  for (const Shape& shape : test_shapes())
    for (Layout layout : kAllLayouts)
      for (const auto& [grad_layout, dx_layout] : grad_and_dx_layouts(layout)) {
        const std::string where = case_name<T>(shape, layout) + " grad " + to_string(grad_layout) + " dx " +
                                  to_string(dx_layout) + (training ? " training" : " eval");
        const KernelParams<T> p = random_params<T>(shape.c, rng);
        StridedTensor<T> x(shape, layout), grad(shape, grad_layout), dx(shape, dx_layout);
        x.assign_nchw(random_input_off_relu_edge<T>(shape, p, rng));
        grad.assign_nchw(random_gradient<T>(shape, rng));
        const std::vector<double> x64 = x.to_nchw(), grad64 = grad.to_nchw();

        std::vector<S> sum_dz(shape.c), sum_dz_xhat(shape.c);
        if (training) {
          fused_preact::bn_relu_backward_reduce_cpu(grad.data(), grad.view, x.data(), x.view, p.view(), sum_dz.data(),
                                                    sum_dz_xhat.data());
          const RefSums ref = ref_backward_sums(grad64, x64, shape, p.ref());
          for (int64_t c = 0; c < shape.c; ++c) {
            const std::string at = where + " c=" + std::to_string(c);
            CHECK_NEAR(sum_dz[c], ref.dz[c], Tol::reduction * ref.dz_abs[c] + Tol::tiny, at);
            CHECK_NEAR(sum_dz_xhat[c], ref.dz_xhat[c], Tol::reduction * ref.dz_xhat_abs[c] + Tol::tiny, at);
          }
        }
        // Eval mode is selected by null sums, exactly as the binding passes them.
        fused_preact::bn_relu_backward_input_cpu(grad.data(), grad.view, x.data(), x.view, p.view(),
                                                 training ? sum_dz.data() : nullptr,
                                                 training ? sum_dz_xhat.data() : nullptr, dx.data(), dx.view);
        const RefElementwise ref = ref_backward_input(grad64, x64, shape, p.ref(), training);
        const std::vector<double> got = dx.to_nchw();
        for (size_t i = 0; i < got.size(); ++i) {
          const double tol = Tol::storage * std::fabs(ref.value[i]) + Tol::elementwise * ref.magnitude[i] + Tol::tiny;
          if (!CHECK_NEAR(got[i], ref.value[i], tol, where + " i=" + std::to_string(i))) break;
        }
        CHECK_MSG(dx.clobbered_padding() == 0, where);
      }
}

// Eval mode is a pure product: dx must be scale*dz computed in the compute type
// and rounded once, bit for bit (0 where the ReLU was off).
template <typename T>
void check_eval_backward_is_scale_times_dz(uint64_t seed) {
  using A = compute_t<T>;
  Rng rng(seed);
  const Shape shape{2, 5, 33, 33};
  for (Layout layout : kAllLayouts) {
    const KernelParams<T> p = random_params<T>(shape.c, rng);
    StridedTensor<T> x(shape, layout), grad(shape, layout), dx(shape, layout);
    x.assign_nchw(random_input_off_relu_edge<T>(shape, p, rng));
    grad.assign_nchw(random_gradient<T>(shape, rng));
    fused_preact::bn_relu_backward_input_cpu(grad.data(), grad.view, x.data(), x.view, p.view(), nullptr, nullptr,
                                             dx.data(), dx.view);
    int64_t mismatches = 0;
    for (int64_t n = 0; n < shape.n; ++n)
      for (int64_t c = 0; c < shape.c; ++c)
        for (int64_t s = 0; s < shape.s(); ++s) {
          const A xv = fused_preact::load(&x.storage[x.offset(n, c, s)]);
          const bool active = double(xv) * double(p.scale[c]) + double(p.shift[c]) > 0;
          const A dz = active ? A(fused_preact::load(&grad.storage[grad.offset(n, c, s)])) : A(0);
          T want;
          fused_preact::store(&want, A(p.scale[c]) * dz);
          mismatches += std::memcmp(&want, &dx.storage[dx.offset(n, c, s)], sizeof(T)) != 0;
        }
    CHECK_MSG(mismatches == 0, case_name<T>(shape, layout) + " mismatches=" + std::to_string(mismatches));
  }
}

// x values put z = x*scale + shift exactly at 0 and on both sides of it, for a
// positive and a negative scale. Gradients where z <= 0 are NaN: any leak of
// them into dx or the sums shows up as a NaN.
template <typename T>
void check_relu_mask_at_the_edge() {
  using S = stat_t<T>;
  const Shape shape{2, 2, 3, 3};
  // channel 0: scale 2, shift -1 -> z = 0 at x = 0.5, on for x > 0.5
  // channel 1: scale -1, shift 0.5 -> z = 0 at x = 0.5, on for x < 0.5
  KernelParams<T> p;
  p.mean = {S(0.25), S(-0.5)};
  p.invstd = {S(2), S(1)};
  p.scale = {S(2), S(-1)};
  p.shift = {S(-1), S(0.5)};
  const double xs[] = {-2, -0.5, 0, 0.25, 0.5, 0.5, 0.75, 1, 3};  // exact in every type
  std::vector<double> x64(shape.numel()), grad64(shape.numel());
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (int64_t n = 0; n < shape.n; ++n)
    for (int64_t c = 0; c < shape.c; ++c)
      for (int64_t s = 0; s < shape.s(); ++s) {
        const int64_t i = shape.nchw(n, c, s);
        x64[i] = xs[(s + n * 4) % 9];
        const bool on = c == 0 ? x64[i] > 0.5 : x64[i] < 0.5;
        grad64[i] = on ? 0.5 + double(s) : nan;
      }
  for (Layout layout : kAllLayouts) {
    const std::string where = case_name<T>(shape, layout);
    StridedTensor<T> x(shape, layout), grad(shape, layout), out(shape, layout), dx(shape, layout);
    x.assign_nchw(x64);
    grad.assign_nchw(grad64);

    fused_preact::bn_relu_apply_cpu(x.data(), x.view, p.scale.data(), p.shift.data(), out.data(), out.view);
    const std::vector<double> a = out.to_nchw();
    for (int64_t i = 0; i < shape.numel(); ++i)
      if (std::isnan(grad64[i])) CHECK_MSG(a[i] == 0 && !std::signbit(a[i]), where + " forward not +0 at z<=0");

    fused_preact::bn_relu_backward_input_cpu(grad.data(), grad.view, x.data(), x.view, p.view(), nullptr, nullptr,
                                             dx.data(), dx.view);
    const std::vector<double> eval_dx = dx.to_nchw();
    for (int64_t i = 0; i < shape.numel(); ++i)
      if (std::isnan(grad64[i])) CHECK_MSG(eval_dx[i] == 0, where + " eval gradient leaked through z<=0");

    std::vector<S> sum_dz(shape.c), sum_dz_xhat(shape.c);
    fused_preact::bn_relu_backward_reduce_cpu(grad.data(), grad.view, x.data(), x.view, p.view(), sum_dz.data(),
                                              sum_dz_xhat.data());
    const RefSums ref = ref_backward_sums(grad64, x64, shape, p.ref());
    for (int64_t c = 0; c < shape.c; ++c) {
      CHECK_NEAR(sum_dz[c], ref.dz[c], 1e-6 * ref.dz_abs[c], where);  // NaN fails this too
      CHECK_NEAR(sum_dz_xhat[c], ref.dz_xhat[c], 1e-6 * ref.dz_xhat_abs[c], where);
    }
    fused_preact::bn_relu_backward_input_cpu(grad.data(), grad.view, x.data(), x.view, p.view(), sum_dz.data(),
                                             sum_dz_xhat.data(), dx.data(), dx.view);
    const RefElementwise train_ref = ref_backward_input(grad64, x64, shape, p.ref(), true);
    const std::vector<double> train_dx = dx.to_nchw();
    for (int64_t i = 0; i < shape.numel(); ++i) {
      const double tol = Tolerance<T>::storage * std::fabs(train_ref.value[i]) + 1e-6 * train_ref.magnitude[i];
      CHECK_NEAR(train_dx[i], train_ref.value[i], tol, where + " training dx i=" + std::to_string(i));
    }
  }
}

}  // namespace

TEST_CASE(backward_training_float_matches_reference) { check_backward_against_reference<float>(301, true); }
TEST_CASE(backward_training_double_matches_reference) { check_backward_against_reference<double>(302, true); }
TEST_CASE(backward_training_fp16_matches_reference) { check_backward_against_reference<fp16_t>(303, true); }
TEST_CASE(backward_training_bf16_matches_reference) { check_backward_against_reference<bf16_t>(304, true); }
TEST_CASE(backward_eval_float_matches_reference) { check_backward_against_reference<float>(311, false); }
TEST_CASE(backward_eval_double_matches_reference) { check_backward_against_reference<double>(312, false); }
TEST_CASE(backward_eval_fp16_matches_reference) { check_backward_against_reference<fp16_t>(313, false); }
TEST_CASE(backward_eval_bf16_matches_reference) { check_backward_against_reference<bf16_t>(314, false); }

TEST_CASE(backward_eval_float_is_exactly_scale_times_dz) { check_eval_backward_is_scale_times_dz<float>(321); }
TEST_CASE(backward_eval_double_is_exactly_scale_times_dz) { check_eval_backward_is_scale_times_dz<double>(322); }
TEST_CASE(backward_eval_fp16_is_exactly_scale_times_dz) { check_eval_backward_is_scale_times_dz<fp16_t>(323); }
TEST_CASE(backward_eval_bf16_is_exactly_scale_times_dz) { check_eval_backward_is_scale_times_dz<bf16_t>(324); }

TEST_CASE(relu_mask_float_blocks_gradient_where_z_le_0) { check_relu_mask_at_the_edge<float>(); }
TEST_CASE(relu_mask_double_blocks_gradient_where_z_le_0) { check_relu_mask_at_the_edge<double>(); }
TEST_CASE(relu_mask_fp16_blocks_gradient_where_z_le_0) { check_relu_mask_at_the_edge<fp16_t>(); }
TEST_CASE(relu_mask_bf16_blocks_gradient_where_z_le_0) { check_relu_mask_at_the_edge<bf16_t>(); }
