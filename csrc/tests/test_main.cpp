// Runs the registered test cases; exits non-zero if any check failed.
//
// Usage: fused_preact_core_tests [--file STEM]
//   --file STEM  run only the cases defined in STEM.cpp (one ctest entry per
//                test source, so ctest -j runs files in parallel).
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>

#include "check.h"

namespace {

// True when `path` names STEM.cpp (any directory).
bool defined_in(const char* path, const std::string& stem) {
  const std::string p(path);
  const std::string want = stem + ".cpp";
  if (p.size() < want.size() || p.compare(p.size() - want.size(), want.size(), want) != 0) return false;
  return p.size() == want.size() || p[p.size() - want.size() - 1] == '/' || p[p.size() - want.size() - 1] == '\\';
}

}  // namespace

int main(int argc, char** argv) {
  std::string only_file;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--file") == 0 && i + 1 < argc) {
      only_file = argv[++i];
    } else {
      std::fprintf(stderr, "usage: %s [--file STEM]\n", argv[0]);
      return 2;
    }
  }
  auto& counters = fused_preact_test::counters();
  int ran = 0, failed_cases = 0;
  for (const auto& test : fused_preact_test::registry()) {
    if (!only_file.empty() && !defined_in(test.file, only_file)) continue;
    const long failures_before = counters.failures;
    const auto start = std::chrono::steady_clock::now();
    test.fn();
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    const bool ok = counters.failures == failures_before;
    std::printf("[%s] %s (%.0f ms)\n", ok ? "  OK  " : "FAILED", test.name, ms);
    ++ran;
    failed_cases += ok ? 0 : 1;
  }
  // A filter that matches nothing is a build/registration mistake, not a pass.
  if (ran == 0) {
    std::printf("no test cases matched\n");
    return 1;
  }
  std::printf("%d test cases, %ld checks, %d failed cases, %ld failed checks\n", ran, counters.checks, failed_cases,
              counters.failures);
  return counters.failures == 0 ? 0 : 1;
}
