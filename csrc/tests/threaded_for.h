// A pfor that really runs sub-ranges on separate std::threads, with uneven
// piece sizes (weights 1, 2, 3, ...), to show results do not depend on how the
// caller (at::parallel_for in production) splits the work.
#pragma once

#include <cstdint>
#include <thread>
#include <vector>

namespace fused_preact_test {

struct ThreadedFor {
  int pieces;

  template <typename F>
  void operator()(int64_t begin, int64_t end, int64_t /*work*/, F&& fn) const {
    const int64_t total = end - begin;
    if (total <= 0) return;
    const int64_t weight_sum = int64_t(pieces) * (pieces + 1) / 2;
    std::vector<std::thread> threads;
    int64_t lo = begin, weight_before = 0;
    for (int k = 1; k <= pieces; ++k) {
      weight_before += k;
      const int64_t hi = begin + total * weight_before / weight_sum;  // last piece ends at `end`
      if (hi > lo) threads.emplace_back([&fn, lo, hi] { fn(lo, hi); });
      lo = hi;
    }
    for (auto& t : threads) t.join();
  }
};

}  // namespace fused_preact_test
