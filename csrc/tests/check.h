// Minimal self-registering test harness (no external framework).
//
// TEST_CASE(name) defines a function that test_main.cpp runs. CHECK-style
// macros record a failure with file:line and the values involved, and keep
// going so one run shows every broken case; any failure makes the executable
// exit non-zero. They do not depend on NDEBUG, so release builds check too.
#pragma once

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

namespace fused_preact_test {

struct TestCase {
  const char* name;
  const char* file;  // lets ctest run the cases of one source file (--file)
  void (*fn)();
};

inline std::vector<TestCase>& registry() {
  static std::vector<TestCase> tests;
  return tests;
}

struct Registrar {
  Registrar(const char* name, const char* file, void (*fn)()) { registry().push_back({name, file, fn}); }
};

struct Counters {
  long checks = 0;
  long failures = 0;
};

inline Counters& counters() {
  static Counters c;
  return c;
}

// Stops a flood of identical messages when a whole tensor is wrong.
constexpr long kMaxReportedFailures = 30;

// `detail` is built by the macros only when the check failed, so passing
// checks cost no string formatting (the half tests run millions of them).
inline bool record(bool ok, const char* file, int line, const char* expr, const std::string& detail) {
  Counters& c = counters();
  ++c.checks;
  if (!ok) {
    if (++c.failures <= kMaxReportedFailures) std::printf("  FAILED %s:%d: %s %s\n", file, line, expr, detail.c_str());
    if (c.failures == kMaxReportedFailures) std::printf("  (further failures not printed)\n");
  }
  return ok;
}

// |actual - expected| <= tol, with NaN anywhere counting as a failure.
inline bool near(double actual, double expected, double tol) {
  return std::fabs(actual - expected) <= tol;
}

inline std::string describe_near(const char* a_expr, double a, const char* e_expr, double e, double tol,
                                 const std::string& context) {
  char buf[512];
  std::snprintf(buf, sizeof buf, "%s = %.17g vs %s = %.17g (|diff| %.3g > tol %.3g) %s", a_expr, a, e_expr, e,
                std::fabs(a - e), tol, context.c_str());
  return buf;
}

}  // namespace fused_preact_test

#define FP_TEST_CONCAT2(a, b) a##b
#define FP_TEST_CONCAT(a, b) FP_TEST_CONCAT2(a, b)

#define TEST_CASE(name)                                                                       \
  static void name();                                                                         \
  static const ::fused_preact_test::Registrar FP_TEST_CONCAT(registrar_, name)(#name, __FILE__, \
                                                                              &name);         \
  static void name()

// Each macro evaluates to the check's result so callers can stop early.
#define CHECK(cond) ::fused_preact_test::record(bool(cond), __FILE__, __LINE__, "CHECK(" #cond ")", std::string())

#define CHECK_MSG(cond, msg)                                                                               \
  [&] {                                                                                                    \
    const bool ok_ = bool(cond);                                                                           \
    return ::fused_preact_test::record(ok_, __FILE__, __LINE__, "CHECK(" #cond ")", ok_ ? std::string() : (msg)); \
  }()

#define CHECK_NEAR(actual, expected, tol, context)                                                        \
  [&] {                                                                                                   \
    const double a_ = double(actual), e_ = double(expected), t_ = double(tol);                             \
    const bool ok_ = ::fused_preact_test::near(a_, e_, t_);                                               \
    return ::fused_preact_test::record(                                                                   \
        ok_, __FILE__, __LINE__, "CHECK_NEAR",                                                            \
        ok_ ? std::string() : ::fused_preact_test::describe_near(#actual, a_, #expected, e_, t_, context)); \
  }()
