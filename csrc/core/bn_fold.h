// The per-channel end of a training-mode BatchNorm statistics pass (torch-free,
// shared by the CPU kernels and the CUDA merge kernel):
//   scale = gamma * invstd,  shift = beta - mean * scale       (z = x * scale + shift)
//   running_mean += momentum * (mean - running_mean)
//   running_var  += momentum * (var * m / (m - 1) - running_var)   (unbiased, as nn.BatchNorm2d)
//   num_batches_tracked += 1
// Done where the statistics are produced, so a BatchNorm costs one launch for
// statistics, affine fold and running update together instead of a chain of
// small per-channel ops. The running average is taken in double and rounded
// once to the statistics type.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FUSED_PREACT_HOST_DEVICE __host__ __device__
#else
#define FUSED_PREACT_HOST_DEVICE
#endif

namespace fused_preact {

template <typename S>
struct BnFold {
  const S* weight = nullptr;  // gamma, or null (affine=False: 1)
  const S* bias = nullptr;    // beta, or null (0)
  S* scale = nullptr;         // outputs; null: no fold wanted
  S* shift = nullptr;
  S* running_mean = nullptr;  // updated in place; null: nothing to track
  S* running_var = nullptr;
  int64_t* num_batches_tracked = nullptr;  // incremented once per call, or null
  double momentum = 0;
  double count = 0;  // m = N*H*W, for the unbiased running variance

  FUSED_PREACT_HOST_DEVICE bool wanted() const { return scale != nullptr; }

  // Channel c's fold from its batch statistics (var biased; invstd as stored,
  // so scale is the product the reference forms from the same rounded value).
  FUSED_PREACT_HOST_DEVICE void operator()(int64_t c, double mean, double var, S invstd) const {
    const S sc = weight != nullptr ? S(weight[c] * invstd) : invstd;
    scale[c] = sc;
    shift[c] = S((bias != nullptr ? double(bias[c]) : 0.0) - mean * double(sc));
    if (running_mean != nullptr) {
      const double rm = running_mean[c], rv = running_var[c];
      running_mean[c] = S(rm + momentum * (mean - rm));
      running_var[c] = S(rv + momentum * (var * (count / (count - 1)) - rv));
    }
    if (c == 0 && num_batches_tracked != nullptr) *num_batches_tracked += 1;
  }
};

}  // namespace fused_preact
