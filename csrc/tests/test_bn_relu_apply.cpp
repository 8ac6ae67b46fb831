// bn_relu_apply_cpu against the float64 reference: every storage type, shape,
// and input layout, writing to the same and to a different output layout.
#include <cmath>
#include <vector>

#include "check.h"
#include "kernel_test_support.h"

using namespace fused_preact_test;

namespace {

template <typename T>
void check_apply_against_reference(uint64_t seed) {
  using Tol = Tolerance<T>;
  Rng rng(seed);
  for (const Shape& shape : test_shapes())
    for (Layout layout : kAllLayouts)
      for (Layout out_layout : {layout, next_layout(layout)}) {
        const std::string where = case_name<T>(shape, layout) + " out " + to_string(out_layout);
        const KernelParams<T> p = random_params<T>(shape.c, rng);
        StridedTensor<T> x(shape, layout), out(shape, out_layout);
        x.assign_nchw(random_activation<T>(shape, rng));
        fused_preact::bn_relu_apply_cpu(x.data(), x.view, p.scale.data(), p.shift.data(), out.data(), out.view);
        const RefElementwise ref = ref_apply(x.to_nchw(), shape, p.ref());
        const std::vector<double> got = out.to_nchw();
        for (size_t i = 0; i < got.size(); ++i) {
          const double tol = Tol::storage * std::fabs(ref.value[i]) + Tol::elementwise * ref.magnitude[i] + Tol::tiny;
          if (!CHECK_NEAR(got[i], ref.value[i], tol, where + " i=" + std::to_string(i))) break;
        }
        CHECK_MSG(out.clobbered_padding() == 0, where);
      }
}

}  // namespace

TEST_CASE(apply_float_matches_reference) { check_apply_against_reference<float>(201); }
TEST_CASE(apply_double_matches_reference) { check_apply_against_reference<double>(202); }
TEST_CASE(apply_fp16_matches_reference) { check_apply_against_reference<fp16_t>(203); }
TEST_CASE(apply_bf16_matches_reference) { check_apply_against_reference<bf16_t>(204); }
