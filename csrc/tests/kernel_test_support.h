// Shared inputs for the kernel tests: the shape list, per-type tolerances,
// a portable deterministic RNG, and random BN parameters / activations.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "core/bn_relu_cpu.h"
#include "reference_bn_relu.h"
#include "strided_tensor.h"

namespace fused_preact_test {

using fused_preact::bf16_t;
using fused_preact::compute_t;
using fused_preact::fp16_t;
using fused_preact::stat_t;

constexpr double kEps = 1e-5;

// Every combination of odd sizes (N in {1,2,3}, C in {1,3,5,17}, H and W in
// {1,3,7,33}: 192 shapes, including m = 1), then S = 1024 (exactly one chunk)
// and 40x40 (a full chunk plus a remainder). 33x33 also spans two chunks.
// 70 channels take the CPU reductions past one 64-term block along C.
inline const std::vector<Shape>& test_shapes() {
  static const std::vector<Shape> shapes = [] {
    std::vector<Shape> all;
    for (int64_t n : {1, 2, 3})
      for (int64_t c : {1, 3, 5, 17})
        for (int64_t h : {1, 3, 7, 33})
          for (int64_t w : {1, 3, 7, 33}) all.push_back({n, c, h, w});
    for (const Shape& chunk_edge :
         {Shape{1, 5, 32, 32}, Shape{3, 3, 40, 40}, Shape{2, 1, 40, 40}, Shape{2, 70, 5, 7}})
      all.push_back(chunk_edge);
    return all;
  }();
  return shapes;
}

// How far a correct implementation may be from the float64 reference.
//   storage:     relative rounding of one store to T (half an ulp)
//   elementwise: compute error relative to the magnitude of the terms
//   reduction:   error of a per-channel sum relative to the sum of |terms|
//   tiny:        absolute rounding near zero (subnormal spacing)
template <typename T>
struct Tolerance {
  static constexpr double storage = 0x1p-24, elementwise = 1e-6, reduction = 2e-5, tiny = 1e-37;
};
template <>
struct Tolerance<double> {
  static constexpr double storage = 0x1p-53, elementwise = 1e-14, reduction = 1e-12, tiny = 1e-300;
};
template <>
struct Tolerance<fp16_t> {
  static constexpr double storage = 0x1p-11, elementwise = 1e-6, reduction = 2e-5, tiny = 0x1p-25;
};
template <>
struct Tolerance<bf16_t> {
  static constexpr double storage = 0x1p-8, elementwise = 1e-6, reduction = 2e-5, tiny = 1e-37;
};

template <typename T>
const char* type_name();
template <>
inline const char* type_name<float>() { return "float"; }
template <>
inline const char* type_name<double>() { return "double"; }
template <>
inline const char* type_name<fp16_t>() { return "fp16"; }
template <>
inline const char* type_name<bf16_t>() { return "bf16"; }

template <typename T>
std::string case_name(const Shape& sh, Layout l) {
  return std::string("[") + type_name<T>() + " " + to_string(l) + " " + to_string(sh) + "]";
}

// The value T stores for v (test inputs must be representable to be exact).
template <typename T>
double round_to(double v) {
  T t;
  fused_preact::store(&t, compute_t<T>(v));
  return double(fused_preact::load(&t));
}

// splitmix64 + Box-Muller: the same sequence with every standard library.
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  uint64_t next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  double uniform(double lo, double hi) { return lo + (hi - lo) * double(next() >> 11) * 0x1p-53; }
  double normal() {
    const double u1 = uniform(0x1p-53, 1.0), u2 = uniform(0.0, 1.0);
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }

 private:
  uint64_t state_;
};

// Per-channel location and spread differ so a channel mix-up cannot pass.
template <typename T>
std::vector<double> random_activation(const Shape& sh, Rng& rng) {
  std::vector<double> x(sh.numel());
  for (int64_t c = 0; c < sh.c; ++c) {
    const double mean = rng.uniform(-2, 2), stddev = rng.uniform(0.5, 3);
    for (int64_t n = 0; n < sh.n; ++n)
      for (int64_t s = 0; s < sh.s(); ++s) x[sh.nchw(n, c, s)] = round_to<T>(mean + stddev * rng.normal());
  }
  return x;
}

template <typename T>
std::vector<double> random_gradient(const Shape& sh, Rng& rng) {
  std::vector<double> g(sh.numel());
  for (double& v : g) v = round_to<T>(rng.normal());
  return g;
}

// BN parameters as the binding derives them, in the statistics type.
template <typename T>
struct KernelParams {
  std::vector<stat_t<T>> mean, invstd, scale, shift;

  fused_preact::BnReluParams<stat_t<T>> view() const {
    return {mean.data(), invstd.data(), scale.data(), shift.data()};
  }
  RefParams ref() const {
    return {std::vector<double>(mean.begin(), mean.end()), std::vector<double>(invstd.begin(), invstd.end()),
            std::vector<double>(scale.begin(), scale.end()), std::vector<double>(shift.begin(), shift.end())};
  }
};

// gamma takes both signs: a negative scale flips which side the ReLU keeps.
template <typename T>
KernelParams<T> random_params(int64_t channels, Rng& rng) {
  using S = stat_t<T>;
  KernelParams<T> p;
  for (int64_t c = 0; c < channels; ++c) {
    const S mean = S(rng.uniform(-1, 1)), invstd = S(rng.uniform(0.5, 2));
    const S gamma = S((rng.uniform(0, 1) < 0.5 ? -1 : 1) * rng.uniform(0.5, 1.5)), beta = S(rng.uniform(-0.5, 0.5));
    p.mean.push_back(mean);
    p.invstd.push_back(invstd);
    p.scale.push_back(gamma * invstd);
    p.shift.push_back(beta - mean * (gamma * invstd));
  }
  return p;
}

// Keeps |z| >= 0.02 so fp32 and fp64 always agree on the ReLU mask; the mask
// edge itself (z == 0 exactly) is covered by a dedicated test.
template <typename T>
std::vector<double> random_input_off_relu_edge(const Shape& sh, const KernelParams<T>& p, Rng& rng) {
  const RefParams rp = p.ref();
  std::vector<double> x(sh.numel());
  for (int64_t n = 0; n < sh.n; ++n)
    for (int64_t c = 0; c < sh.c; ++c)
      for (int64_t s = 0; s < sh.s(); ++s) {
        double v;
        do {
          v = round_to<T>(rp.mean[c] + rng.normal() / rp.invstd[c]);
        } while (std::fabs(ref_z(rp, v, c)) < 0.02);
        x[sh.nchw(n, c, s)] = v;
      }
  return x;
}

}  // namespace fused_preact_test
