// CUDA kernels for the BatchNorm -> ReLU part of BN -> ReLU -> conv (torch-free).
//
// The same formulas, arguments and semantics as the CPU twins in
// core/bn_relu_cpu.h (see there), but not the same summation: the CPU
// kernels take corrected two-pass moments per chunk and the GPU ones Welford
// updates per thread, both merged with Chan's formula in a fixed order, so
// each device is bit-reproducible by itself and the two agree to rounding
// (the tests hold both to the same per-dtype tolerance). Storage types are float, double, __half and
// __nv_bfloat16, computing in fp32 (fp64 for double), with statistics typed
// stat_t<T>.
//
// Per-channel reductions (batch_stats, bn_relu_backward_reduce) run in two
// kernels: one partial per (block of rows, channel) written to a caller-owned
// workspace, then a merge of each channel's partials in a fixed order. The
// split depends only on the view, so results are bit-identical run to run and
// GPU to GPU, and nothing synchronises with the host (CUDA-graph capturable).
//
// Every function launches on `stream` and leaves launch errors for the caller
// to collect (cudaGetLastError / C10_CUDA_KERNEL_LAUNCH_CHECK).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "core/bn_fold.h"  // BnFold: the statistics' affine fold and running update, shared with the CPU
#include "core/view.h"     // ActView, stat_t, BnReluParams: one definition for both devices

namespace fused_preact {
namespace gpu {

// How a per-channel reduction tiles the [rows = N*S, C] element space.
struct ReductionGrid {
  int tile_c = 1;              // channels per block: a power of two <= 32, 1 for planar layouts
  int64_t blocks_c = 0;        // grid.x
  int64_t blocks_rows = 0;     // grid.y, also the number of partials per channel
  int64_t rows_per_block = 0;  // the last block may get fewer
};

ReductionGrid reduction_grid(const ActView& v);

// Bytes of workspace the reductions need for x's view (0 for an empty one).
template <typename T>
size_t reduction_workspace_bytes(const ActView& vx);

// Precondition: vx.rows() > 0 (the binding answers NaN statistics for empty x).
// A wanted `fold` is applied by the merge kernel, per channel: no extra launch.
template <typename T>
void batch_stats(const T* x, const ActView& vx, double eps, stat_t<T>* mean, stat_t<T>* invstd,
                 const BnFold<stat_t<T>>& fold, void* workspace, cudaStream_t stream);

template <typename T>
void bn_relu_apply(const T* x, const ActView& vx, const stat_t<T>* scale, const stat_t<T>* shift, T* out,
                   const ActView& vout, cudaStream_t stream);

template <typename T>
void bn_relu_backward_reduce(const T* grad, const ActView& vg, const T* x, const ActView& vx,
                             BnReluParams<stat_t<T>> p, stat_t<T>* sum_dz, stat_t<T>* sum_dz_xhat,
                             void* workspace, cudaStream_t stream);

// sum_dz == nullptr selects the eval-mode gradient (statistics are constants).
template <typename T>
void bn_relu_backward_input(const T* grad, const ActView& vg, const T* x, const ActView& vx,
                            BnReluParams<stat_t<T>> p, const stat_t<T>* sum_dz, const stat_t<T>* sum_dz_xhat,
                            T* dx, const ActView& vdx, cudaStream_t stream);

}  // namespace gpu
}  // namespace fused_preact
