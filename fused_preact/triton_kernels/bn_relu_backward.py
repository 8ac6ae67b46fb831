"""The last, elementwise step of the BN -> ReLU backward: dx from dz.

With dz = da * [z > 0] (from conv_dgrad), xhat = (x - mean) * invstd,
scale = gamma * invstd and m = N*H*W per channel:

    training (batch statistics):  dx = scale / m * (m * dz - sum_dz - xhat * sum_dz_xhat)
                                     = scale * (dz - (sum_dz + xhat * sum_dz_xhat) / m)
    eval (constant statistics):   dx = scale * dz

computed in fp32, stored in x's dtype.

The kernel walks dx in its memory order (dx = empty_activation(x) is dense in x's
layout); the channel of flat offset i is (i // stride_c) % C in any dense layout.
Operands laid out like dx are read at offset i directly; others (a strided x
or dz) at offsets rebuilt from i's coordinates.

The same launch may also sum other kernels' partial rows in programs of its
own (row_sums.sum_slots): a layer's weight gradients, so that its backward
spends no launch on them.
"""
from typing import Sequence

import torch
import triton
import triton.language as tl

from .common import (activation_args, cdiv, channel_vector, check_activation, device_of, empty_activation, launcher,
                     piece_offsets, sm_count)
from .row_sums import SUM_BLOCKS, Partials, launch_sums, plan_sums, sum_slots


@triton.jit
def _offsets(i, N, C, H, W, so_n, so_c, so_h, so_w, s_n, s_c, s_h, s_w, SAME: tl.constexpr):
    """Offsets in a tensor of strides s_* of the elements at dx's flat offsets i."""
    if SAME:
        off = i
    else:
        off = (((i // so_n) % N) * s_n + ((i // so_c) % C) * s_c
               + ((i // so_h) % H) * s_h + ((i // so_w) % W) * s_w)
    return off


@triton.jit
def _input_grad_kernel(
    dz_ptr, x_ptr, table_ptr, dx_ptr, mean_ptr, invstd_ptr, scale_ptr, sum_dz_ptr, sum_dz_xhat_ptr,
    numel, N, C, H, W, inv_m,
    so_n, so_c, so_h, so_w, s_zn, s_zc, s_zh, s_zw, s_xn, s_xc, s_xh, s_xw, dx_programs,
    counters, src0, dst0, scratch0, at0, T0, P0, G0, src1, dst1, scratch1, at1, T1, P1, G1,
    src2, dst2, scratch2, at2, T2, P2, G2, col_blocks, groups,
    TRAINING: tl.constexpr, DZ_SAME: tl.constexpr, X_SAME: tl.constexpr, PIECES: tl.constexpr,
    INT64: tl.constexpr, BLOCK: tl.constexpr, SUMS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # Programs past dx's (SUMS): row_sums.sum_slots of the given slots.
    pid = tl.program_id(0)
    if SUMS and pid >= dx_programs:
        sum_slots(pid - dx_programs, counters, src0, dst0, scratch0, at0, T0, P0, G0, src1, dst1, scratch1, at1, T1,
                  P1, G1, src2, dst2, scratch2, at2, T2, P2, G2, col_blocks, groups, BLOCK_T, BLOCK_P)
    else:
        _input_grad(pid, dz_ptr, x_ptr, table_ptr, dx_ptr, mean_ptr, invstd_ptr, scale_ptr, sum_dz_ptr,
                    sum_dz_xhat_ptr, numel, N, C, H, W, inv_m, so_n, so_c, so_h, so_w, s_zn, s_zc, s_zh, s_zw, s_xn,
                    s_xc, s_xh, s_xw, TRAINING, DZ_SAME, X_SAME, PIECES, INT64, BLOCK)


@triton.jit
def _input_grad(pid, dz_ptr, x_ptr, table_ptr, dx_ptr, mean_ptr, invstd_ptr, scale_ptr, sum_dz_ptr, sum_dz_xhat_ptr,
                numel, N, C, H, W, inv_m, so_n, so_c, so_h, so_w, s_zn, s_zc, s_zh, s_zw, s_xn, s_xc, s_xh, s_xw,
                TRAINING: tl.constexpr, DZ_SAME: tl.constexpr, X_SAME: tl.constexpr, PIECES: tl.constexpr,
                INT64: tl.constexpr, BLOCK: tl.constexpr):
    if INT64:  # only tensors of 2**31 elements or more pay for 64-bit index arithmetic
        pid = pid.to(tl.int64)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    ok = i < numel
    c = (i // so_c) % C
    scale = tl.load(scale_ptr + c, mask=ok, other=0.0)
    dz = tl.load(dz_ptr + _offsets(i, N, C, H, W, so_n, so_c, so_h, so_w, s_zn, s_zc, s_zh, s_zw, DZ_SAME),
                 mask=ok, other=0.0).to(tl.float32)
    if TRAINING:
        # The batch statistics depend on x: subtract dz's projection on 1 and xhat.
        if PIECES:  # x's channels from their pieces, in place
            x_offs = piece_offsets(table_ptr, C, (i // so_n) % N, (i // so_h) % H, (i // so_w) % W, c, ok, INT64)
        else:
            x_offs = _offsets(i, N, C, H, W, so_n, so_c, so_h, so_w, s_xn, s_xc, s_xh, s_xw, X_SAME)
        xv = tl.load(x_ptr + x_offs, mask=ok, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + c, mask=ok, other=0.0)
        invstd = tl.load(invstd_ptr + c, mask=ok, other=0.0)
        sum_dz = tl.load(sum_dz_ptr + c, mask=ok, other=0.0)
        sum_dz_xhat = tl.load(sum_dz_xhat_ptr + c, mask=ok, other=0.0)
        xhat = (xv - mean) * invstd
        dz = dz - (sum_dz + xhat * sum_dz_xhat) * inv_m
    dx = dz * scale
    tl.store(dx_ptr + i, dx.to(dx_ptr.dtype.element_ty), mask=ok)


# An elementwise pass is bound by memory: it wants many loads in flight on
# every SM, which a few large programs per SM do not give (512 of 1024
# elements on 132 SMs at an 8x8 stage). Programs per SM aimed for, each of 4 warps.
ELEMENTWISE_PROGRAMS_PER_SM = 8


def _block(numel: int, device: torch.device) -> int:
    """Elements per program: the largest of 1024, 512, 256 that still gives
    ELEMENTWISE_PROGRAMS_PER_SM programs per SM (256 where none does)."""
    target = ELEMENTWISE_PROGRAMS_PER_SM * sm_count(device)
    return next((b for b in (1024, 512) if cdiv(numel, b) >= target), 256)


def bn_relu_input_grad(dz: torch.Tensor, x, mean: torch.Tensor, invstd: torch.Tensor,
                       scale: torch.Tensor, sum_dz, sum_dz_xhat, training: bool) -> torch.Tensor:
    """dx of BN -> ReLU given dz (see the module docstring), in x's dtype and
    layout; x may be Pieces (dx is then their concatenation's gradient).

    training: mean/invstd are x's batch statistics (sum_dz and sum_dz_xhat, fp32
    [C], are then required); otherwise they are constants and the sums are
    ignored (may be None)."""
    return input_grad_and_sums(dz, x, mean, invstd, scale, sum_dz, sum_dz_xhat, training, ())[0]


@launcher(lambda dz, x, *args, **kwargs: device_of(x))
def input_grad_and_sums(dz: torch.Tensor, x, mean: torch.Tensor, invstd: torch.Tensor, scale: torch.Tensor, sum_dz,
                        sum_dz_xhat, training: bool, jobs: Sequence[Partials]) -> tuple[torch.Tensor, list]:
    """(bn_relu_input_grad's dx, each job's finished sum as
    row_sums.sum_partials gives it): up to three jobs' sums run in dx's
    launch, in programs of their own."""
    check_activation(x)
    if not isinstance(dz, torch.Tensor):
        raise TypeError(f"dz must be a torch.Tensor, got {type(dz).__name__}")
    if dz.shape != x.shape:
        raise ValueError(f"dz must have x's shape {tuple(x.shape)}, got {tuple(dz.shape)}")
    if not dz.is_floating_point() or dz.dtype == torch.float64:
        raise TypeError(f"dz must be float32, float16 or bfloat16, got {dz.dtype}")
    if dz.device != x.device:
        raise ValueError(f"dz must be on x's device {x.device}, got {dz.device}")
    scale = channel_vector(scale, "scale", x)
    if training:
        mean, invstd = channel_vector(mean, "mean", x), channel_vector(invstd, "invstd", x)
        sum_dz, sum_dz_xhat = channel_vector(sum_dz, "sum_dz", x), channel_vector(sum_dz_xhat, "sum_dz_xhat", x)
    else:  # unused by the kernel: any pointer will do
        mean = invstd = sum_dz = sum_dz_xhat = scale

    dx = empty_activation(x)  # dense, in x's memory format (preserve_format)
    sums, plans = plan_sums(jobs)
    for plan in plans[1:]:  # more than a launch's slots: the rest in launches of their own
        launch_sums(plan)
    n, c, h, w = x.shape
    numel = x.numel()
    if numel == 0:
        if plans:
            launch_sums(plans[0])
        return dx, [job.finish(total) for job, total in zip(jobs, sums)]
    # Size-1 dimensions' strides are arbitrary: compare only the others.
    same = [all(t.stride(d) == dx.stride(d) for d in range(4) if x.shape[d] > 1) for t in (dz, x)]
    block = _block(numel, x.device)
    programs = cdiv(numel, block)
    # Without slots, any pointers and sizes (SUMS is off).
    carried = plans[0] if plans else None
    slot_args = carried.args if carried else (scale,) + (scale, scale, scale, 0, 1, 1, 1) * 3 + (1, 1)
    x_arg, table, pieces = activation_args(x)
    _input_grad_kernel[(programs + (carried.programs if carried else 0),)](
        dz, x_arg, table, dx, mean, invstd, scale, sum_dz, sum_dz_xhat,
        numel, n, c, h, w, 1.0 / (numel // c),
        *dx.stride(), *dz.stride(), *x.stride(), programs, *slot_args,
        TRAINING=bool(training), DZ_SAME=same[0], X_SAME=same[1] and not pieces, PIECES=pieces,
        INT64=numel >= 2**31, BLOCK=block, SUMS=carried is not None, **SUM_BLOCKS, num_warps=4,
    )
    return dx, [job.finish(total) for job, total in zip(jobs, sums)]
