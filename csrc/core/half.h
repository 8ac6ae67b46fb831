// 16-bit float storage types for the CPU kernels, without a torch dependency.
//
// The kernels load every element into float (statistics and reductions are
// always accumulated in fp32 or wider) and round once on store, so all a
// 16-bit type needs is a bit-exact conversion to and from float. The layouts
// match at::Half and at::BFloat16, so the bindings reinterpret pointers.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "view.h"  // compute_t

namespace fused_preact {

struct bf16_t {
  uint16_t bits;
};
struct fp16_t {
  uint16_t bits;
};

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float to_float(bf16_t v) { return bits_to_float(uint32_t(v.bits) << 16); }

inline bf16_t bf16_from_float(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{uint16_t((u >> 16) | 0x40)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return bf16_t{uint16_t(u >> 16)};
}

inline float to_float(fp16_t v) {
  const uint32_t sign = uint32_t(v.bits & 0x8000u) << 16;
  const uint32_t exp = (v.bits >> 10) & 0x1fu;
  uint32_t mant = v.bits & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (mant << 13));  // inf / nan
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return bits_to_float(sign);
  // Subnormal half: normalise the mantissa into a float exponent.
  int e = -1;
  do {
    mant <<= 1;
    ++e;
  } while ((mant & 0x400u) == 0);
  return bits_to_float(sign | uint32_t(112 - e) << 23 | ((mant & 0x3ffu) << 13));
}

inline fp16_t fp16_from_float(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return fp16_t{uint16_t(sign | 0x7e00u)};  // nan
  if (abs >= 0x477ff000u) return fp16_t{uint16_t(sign | 0x7c00u)};  // rounds to inf
  if (abs < 0x38800000u) {
    // Result is subnormal (or zero): scaling by 2^24 is exact, and rounding to
    // an integer (nearest even) lands on the half-subnormal quantum.
    const float scaled = bits_to_float(abs) * 16777216.0f;
    return fp16_t{uint16_t(sign | uint16_t(std::nearbyint(scaled)))};
  }
  uint32_t r = abs + 0xfffu + ((abs >> 13) & 1u) - (112u << 23);  // rebias, round to even
  return fp16_t{uint16_t(sign | (r >> 13))};
}

// Uniform load/store so kernels are written once for every storage type.
inline float load(const float* p) { return *p; }
inline double load(const double* p) { return *p; }
inline float load(const bf16_t* p) { return to_float(*p); }
inline float load(const fp16_t* p) { return to_float(*p); }

inline void store(float* p, float v) { *p = v; }
inline void store(double* p, double v) { *p = v; }
inline void store(bf16_t* p, float v) { *p = bf16_from_float(v); }
inline void store(fp16_t* p, float v) { *p = fp16_from_float(v); }

}  // namespace fused_preact
