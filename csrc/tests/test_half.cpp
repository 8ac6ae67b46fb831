// fp16 / bf16 conversions of core/half.h: exhaustive round trips, rounding at
// every midpoint between neighbouring 16-bit values, and selected edge cases
// (ties to even, overflow, subnormals, signed zero, NaN). Where gcc offers
// _Float16 its conversion is a second, independent reference.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>

#include "check.h"
#include "core/half.h"

using fused_preact::bf16_from_float;
using fused_preact::bf16_t;
using fused_preact::bits_to_float;
using fused_preact::float_to_bits;
using fused_preact::fp16_from_float;
using fused_preact::fp16_t;
using fused_preact::to_float;

namespace {

#if defined(__FLT16_MAX__)
__extension__ typedef _Float16 gcc_half;  // __extension__: silences -Wpedantic

uint16_t gcc_fp16_bits(float f) {
  const gcc_half h = static_cast<gcc_half>(f);
  uint16_t bits;
  std::memcpy(&bits, &h, sizeof bits);
  return bits;
}
#endif

bool is_fp16_nan(uint16_t b) { return (b & 0x7c00u) == 0x7c00u && (b & 0x3ffu) != 0; }
bool is_bf16_nan(uint16_t b) { return (b & 0x7f80u) == 0x7f80u && (b & 0x7fu) != 0; }

// Value of a finite fp16 pattern straight from the IEEE 754 definition.
double fp16_value(uint16_t b) {
  const double sign = (b & 0x8000u) ? -1.0 : 1.0;
  const int exp = (b >> 10) & 0x1f;
  const int mant = b & 0x3ff;
  return sign * (exp == 0 ? std::ldexp(mant, -24) : std::ldexp(1024 + mant, exp - 25));
}

std::string hex_case(const char* what, float in, unsigned got, unsigned want) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "%s: input %.9g (0x%08x) -> 0x%04x, want 0x%04x", what, double(in),
                float_to_bits(in), got, want);
  return buf;
}

void expect_fp16(float in, uint16_t want, const char* what) {
  const uint16_t got = fp16_from_float(in).bits;
  CHECK_MSG(got == want, hex_case(what, in, got, want));
#if defined(__FLT16_MAX__)
  const uint16_t gcc = gcc_fp16_bits(in);
  CHECK_MSG(got == gcc, hex_case(what, in, got, gcc) + " (gcc _Float16)");
#endif
}

void expect_bf16(float in, uint16_t want, const char* what) {
  const uint16_t got = bf16_from_float(in).bits;
  CHECK_MSG(got == want, hex_case(what, in, got, want));
}

}  // namespace

TEST_CASE(fp16_every_bit_pattern_round_trips) {
  for (uint32_t b = 0; b <= 0xffffu; ++b) {
    const uint16_t bits = uint16_t(b);
    const float f = to_float(fp16_t{bits});
    if (is_fp16_nan(bits)) {
      CHECK_MSG(std::isnan(f), hex_case("fp16 NaN widens to NaN", f, bits, bits));
      CHECK_MSG(is_fp16_nan(fp16_from_float(f).bits), hex_case("NaN stays NaN", f, fp16_from_float(f).bits, bits));
      continue;
    }
    const bool is_inf = (bits & 0x7fffu) == 0x7c00u;
    const double want = is_inf ? ((bits & 0x8000u) ? -HUGE_VAL : HUGE_VAL) : fp16_value(bits);
    // Compare bit patterns so -0.0 != +0.0.
    CHECK_MSG(float_to_bits(f) == float_to_bits(float(want)), hex_case("fp16 -> float exact", f, bits, bits));
    CHECK_MSG(fp16_from_float(f).bits == bits, hex_case("float -> fp16 identity", f, fp16_from_float(f).bits, bits));
#if defined(__FLT16_MAX__)
    gcc_half h;
    std::memcpy(&h, &bits, sizeof bits);
    CHECK_MSG(float_to_bits(f) == float_to_bits(static_cast<float>(h)), hex_case("vs gcc _Float16", f, bits, bits));
#endif
  }
}

TEST_CASE(bf16_every_bit_pattern_round_trips) {
  for (uint32_t b = 0; b <= 0xffffu; ++b) {
    const uint16_t bits = uint16_t(b);
    const float f = to_float(bf16_t{bits});
    // bf16 is the top half of a float, payload and sign included.
    CHECK_MSG(float_to_bits(f) == b << 16, hex_case("bf16 -> float exact", f, bits, bits));
    if (is_bf16_nan(bits)) {
      CHECK_MSG(is_bf16_nan(bf16_from_float(f).bits), hex_case("NaN stays NaN", f, bf16_from_float(f).bits, bits));
    } else {
      CHECK_MSG(bf16_from_float(f).bits == bits, hex_case("float -> bf16 identity", f, bf16_from_float(f).bits, bits));
    }
  }
}

TEST_CASE(fp16_rounds_selected_values) {
  expect_fp16(1.0f, 0x3c00, "one");
  expect_fp16(1.0f + 0x1p-11f, 0x3c00, "tie between 1 and 1+2^-10 goes to even 1");
  expect_fp16(1.0f + 3 * 0x1p-11f, 0x3c02, "tie between 0x3c01 and 0x3c02 goes to even");
  expect_fp16(1.0f + 0x1p-11f + 0x1p-20f, 0x3c01, "just above a tie rounds up");
  expect_fp16(2.0f - 0x1p-12f, 0x4000, "rounding carries into the exponent");
  expect_fp16(65504.0f, 0x7bff, "largest finite");
  expect_fp16(std::nextafter(65520.0f, 0.0f), 0x7bff, "just below 65520 stays finite");
  expect_fp16(65520.0f, 0x7c00, "65520 ties to even: +inf");
  expect_fp16(-65520.0f, 0xfc00, "-65520: -inf");
  expect_fp16(1e6f, 0x7c00, "overflow");
  expect_fp16(std::numeric_limits<float>::infinity(), 0x7c00, "+inf");
  expect_fp16(-std::numeric_limits<float>::infinity(), 0xfc00, "-inf");
  expect_fp16(0x1p-14f, 0x0400, "smallest normal");
  expect_fp16(0x1p-14f - 0x1p-24f, 0x03ff, "largest subnormal");
  expect_fp16(0x1p-14f - 0x1p-25f, 0x0400, "tie between largest subnormal and smallest normal");
  expect_fp16(0x1p-24f, 0x0001, "smallest subnormal");
  expect_fp16(0x1p-25f, 0x0000, "half the smallest subnormal ties to even zero");
  expect_fp16(0x1p-25f + 0x1p-40f, 0x0001, "just above that tie");
  expect_fp16(3 * 0x1p-25f, 0x0002, "tie between subnormals 1 and 2 goes to 2");
  expect_fp16(5 * 0x1p-25f, 0x0002, "tie between subnormals 2 and 3 goes to 2");
  expect_fp16(1e-10f, 0x0000, "underflow to zero");
  expect_fp16(1e-40f, 0x0000, "float subnormal underflows to zero");
  expect_fp16(0.0f, 0x0000, "+0");
  expect_fp16(-0.0f, 0x8000, "-0 keeps its sign");
  expect_fp16(-0x1p-26f, 0x8000, "negative underflow gives -0");
  expect_fp16(-3 * 0x1p-25f, 0x8002, "negative subnormal tie");
  expect_fp16(-1.0f - 0x1p-11f, 0xbc00, "negative tie to even");
  expect_fp16(0.1f, 0x2e66, "0.1");
  expect_fp16(3.14159265f, 0x4248, "pi");
  const float nan = std::numeric_limits<float>::quiet_NaN();
  CHECK(is_fp16_nan(fp16_from_float(nan).bits));
  CHECK(is_fp16_nan(fp16_from_float(-nan).bits));
  CHECK(is_fp16_nan(fp16_from_float(bits_to_float(0x7f800001u)).bits));  // payload only in dropped bits
}

// For every pair of neighbouring finite fp16 values (both signs), the float
// exactly halfway must go to the even one, and its float neighbours to the
// nearer one. Includes 65504 vs 65536 (= inf) and the subnormal range.
TEST_CASE(fp16_rounds_at_every_midpoint) {
  for (uint16_t lower = 0; lower < 0x7c00u; ++lower) {
    const uint16_t upper = uint16_t(lower + 1);
    const double hi_value = upper == 0x7c00u ? 65536.0 : fp16_value(upper);
    const double mid_d = (fp16_value(lower) + hi_value) / 2;
    const float mid = float(mid_d);
    if (!CHECK(double(mid) == mid_d)) continue;  // float holds every fp16 midpoint exactly
    const uint16_t even = (lower & 1u) ? upper : lower;
    for (const float sign : {1.0f, -1.0f}) {
      const uint16_t sign_bit = sign < 0 ? 0x8000u : 0;
      expect_fp16(sign * std::nextafter(mid, 0.0f), uint16_t(lower | sign_bit), "below midpoint");
      expect_fp16(sign * mid, uint16_t(even | sign_bit), "midpoint");
      expect_fp16(sign * std::nextafter(mid, HUGE_VALF), uint16_t(upper | sign_bit), "above midpoint");
    }
  }
}

#if defined(__FLT16_MAX__)
TEST_CASE(fp16_matches_gcc_Float16_on_random_floats) {
  uint32_t state = 12345;
  for (int i = 0; i < 1 << 21; ++i) {
    state = state * 1664525u + 1013904223u;  // full 32-bit LCG: random sign/exponent/mantissa
    // Bias half the samples into fp16's range, where the rounding logic lives.
    const uint32_t bits = (i & 1) ? state : (state & 0x87ffffffu) | 0x30000000u;
    const float f = bits_to_float(bits);
    if (std::isnan(f)) continue;
    const uint16_t got = fp16_from_float(f).bits, want = gcc_fp16_bits(f);
    CHECK_MSG(got == want, hex_case("vs gcc _Float16", f, got, want));
  }
}
#endif

TEST_CASE(bf16_rounds_selected_values) {
  expect_bf16(1.0f, 0x3f80, "one");
  expect_bf16(1.0f + 0x1p-8f, 0x3f80, "tie between 1 and 1+2^-7 goes to even 1");
  expect_bf16(1.0f + 3 * 0x1p-8f, 0x3f82, "tie between 0x3f81 and 0x3f82 goes to even");
  expect_bf16(1.0f + 0x1p-8f + 0x1p-20f, 0x3f81, "just above a tie rounds up");
  expect_bf16(-1.0f - 3 * 0x1p-8f, 0xbf82, "negative tie to even");
  expect_bf16(2.0f - 0x1p-9f, 0x4000, "rounding carries into the exponent");
  expect_bf16(std::numeric_limits<float>::max(), 0x7f80, "FLT_MAX rounds to inf");
  expect_bf16(bits_to_float(0x7f7f7fffu), 0x7f7f, "just below the overflow tie");
  expect_bf16(std::numeric_limits<float>::infinity(), 0x7f80, "+inf");
  expect_bf16(-0.0f, 0x8000, "-0 keeps its sign");
  expect_bf16(bits_to_float(0x00008000u), 0x0000, "subnormal tie to even zero");
  expect_bf16(bits_to_float(0x00018000u), 0x0002, "subnormal tie to even 2");
  expect_bf16(bits_to_float(0x00010001u), 0x0001, "subnormal below a tie");
  CHECK(is_bf16_nan(bf16_from_float(std::numeric_limits<float>::quiet_NaN()).bits));
  // Truncating this NaN would give inf; the conversion must keep it a NaN.
  CHECK(is_bf16_nan(bf16_from_float(bits_to_float(0x7f800001u)).bits));
  CHECK(is_bf16_nan(bf16_from_float(bits_to_float(0xff800001u)).bits));
}

// bf16 values are float bit patterns with 16 low zero bits, so the midpoint
// between neighbours `b` and `b+1` is the float with bits (b << 16) | 0x8000.
TEST_CASE(bf16_rounds_at_every_midpoint) {
  for (uint32_t lower = 0; lower < 0x7f80u; ++lower) {
    const uint32_t mid = (lower << 16) | 0x8000u;
    const uint16_t even = uint16_t((lower & 1u) ? lower + 1 : lower);
    for (const uint32_t sign_bit : {0u, 0x80000000u}) {
      const uint16_t s16 = uint16_t(sign_bit >> 16);
      expect_bf16(bits_to_float(sign_bit | (mid - 1)), uint16_t(lower | s16), "below midpoint");
      expect_bf16(bits_to_float(sign_bit | mid), uint16_t(even | s16), "midpoint");
      expect_bf16(bits_to_float(sign_bit | (mid + 1)), uint16_t((lower + 1) | s16), "above midpoint");
    }
  }
}
