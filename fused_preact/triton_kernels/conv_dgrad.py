"""Input gradient of BN -> ReLU -> conv(s), up to the BN sums, in one kernel.

Forward was y_i = conv2d(a, W_i, stride, padding_i), a = relu(z), z = x * scale + shift
(per channel c; scale = gamma * invstd, shift = beta - mean * scale), for one conv or
two (a stage's first unit: conv1 and the projection shortcut, same stride). Backward:

    da[n, c, h, w] = sum_i sum_{k, r, s} dy_i[n, k, ho, wo] * W_i[k, c, r, s]
                     where ho = (h + p_h - r) / stride_h and wo = (w + p_w - s) / stride_w
                     are integers inside dy_i (the transposed convolution);
    dz  = da * [z > 0]
    sum_dz      = sum_{n,h,w} dz          (= d beta)
    sum_dz_xhat = sum_{n,h,w} dz * xhat   (= d gamma), xhat = (x - mean) * invstd

`conv_dgrad` computes da as an implicit GEMM (rows: the N*H*W positions of x,
columns: its C channels, reduction: K*R*S of each conv) whose epilogue recomputes
z from x, so neither a nor da is ever written: only dz (x's dtype, x's layout),
and per-row-tile partial sums, which the programs that finish last add in a
fixed order (row_sums.last_to_arrive; groups of row tiles first where there
are thousands): deterministic, no atomic additions, no host synchronisation
(CUDA-graph capturable), no launch of their own.
`bn_relu_backward.bn_relu_input_grad` then finishes dx.

Strided convolutions: a position h only receives taps r with (h + p_h - r) divisible
by the stride. Rather than masking the other taps (3 of 4 wasted at stride 2), the
rows are split into stride_h * stride_w phases (h % stride_h, w % stride_w); in one
phase the valid taps are r = r0, r0 + stride_h, ... with r0 = (phase_h + p_h) % stride_h,
and ho = i + (phase_h + p_h - r) / stride_h for the i-th row of the phase. Each
program works on one phase, so it visits only valid taps and does dense GEMM steps.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from . import tuning
from .common import (activation_args, cdiv, channel_vector, check_activation, check_dropout, conv_out_size,
                     device_of, dot_precision, dropout_args, dropped, empty_activation, filling_first, launcher,
                     needs_int64, next_power_of_2, pair, piece_offsets, sm_count, PROGRAMS_PER_SM)
from .row_sums import arrival_counters, column_sums, last_to_arrive, reduction_groups

# Partial rows x channels a last program sums per step.
_SUM_TILE = tl.constexpr(2048)



# ----------------------------------------------------------------------------- kernels


@triton.jit
def _accumulate_conv(acc, dy_ptr, w_ptr, n64, i, j, row_ok, offs_c, c_ok, qh, qw, sh, sw,
                     K, R, S, ph, pw, Ho, Wo,
                     s_dyn, s_dyk, s_dyh, s_dyw, s_wk, s_wc, s_wr, s_ws,
                     PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc[rows, channels] += the rows' da from one conv: dy tap tiles [BLOCK_M, BLOCK_K]
    times W tiles [BLOCK_K, BLOCK_N], over the taps valid in this phase."""
    offs_k = tl.arange(0, BLOCK_K)
    # First valid tap of the phase; the rest follow every `stride` taps.
    r0 = (qh + ph) % sh
    s0 = (qw + pw) % sw
    for r in range(r0, R, sh):
        # qh + ph - r is an exact multiple of sh, so truncating division is exact.
        ho = i + (qh + ph - r) // sh
        h_ok = row_ok & (ho >= 0) & (ho < Ho)
        for s in range(s0, S, sw):
            wo = j + (qw + pw - s) // sw
            ok = h_ok & (wo >= 0) & (wo < Wo)
            dy_rows = dy_ptr + n64 * s_dyn + ho * s_dyh + wo * s_dyw
            w_tap = w_ptr + r * s_wr + s * s_ws + offs_c[None, :] * s_wc
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + offs_k
                k_ok = kk < K
                g = tl.load(dy_rows[:, None] + kk[None, :] * s_dyk, mask=ok[:, None] & k_ok[None, :], other=0.0)
                wt = tl.load(w_tap + kk[:, None] * s_wk, mask=k_ok[:, None] & c_ok[None, :], other=0.0)
                # The weight is cast to dy's dtype, as autocast casts it for the conv.
                acc = tl.dot(g, wt.to(g.dtype), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _dgrad_kernel(
    dy1_ptr, w1_ptr, dy2_ptr, w2_ptr, x_ptr, table_ptr, dz_ptr, drop_seed_ptr, drop_threshold, drop_scale,
    part_ptr, scratch_ptr, sums_ptr, counters_ptr, counter_at, group_rows, mean_ptr, invstd_ptr, scale_ptr, shift_ptr,
    N, C, H, W, Hq, Wq, sh, sw, num_m_tiles,
    K1, R1, S1, ph1, pw1, Ho1, Wo1, s_dy1n, s_dy1k, s_dy1h, s_dy1w, s_w1k, s_w1c, s_w1r, s_w1s,
    K2, R2, S2, ph2, pw2, Ho2, Wo2, s_dy2n, s_dy2k, s_dy2h, s_dy2w, s_w2k, s_w2c, s_w2r, s_w2s,
    s_xn, s_xc, s_xh, s_xw, s_zn, s_zc, s_zh, s_zw,
    HAS_SECOND: tl.constexpr, PIECES: tl.constexpr, PIECES_IDX64: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Channel tiles of one row tile are neighbouring programs: they share the dy rows in L2.
    pid = tl.program_id(0)
    num_c_tiles = tl.cdiv(C, BLOCK_N)
    pid_c = pid % num_c_tiles
    tile = pid // num_c_tiles  # row tile over all phases: the partial-sum row it writes
    phase = tile // num_m_tiles
    qh = phase // sw
    qw = phase % sw

    rows = (tile % num_m_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = rows // (Hq * Wq)
    i = (rows // Wq) % Hq
    j = rows % Wq
    h = qh + i * sh
    w = qw + j * sw
    row_ok = (n < N) & (h < H) & (w < W)
    n64 = n.to(tl.int64)  # whole-tensor offsets may pass 2**31; per-image ones do not
    offs_c = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = offs_c < C

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _accumulate_conv(acc, dy1_ptr, w1_ptr, n64, i, j, row_ok, offs_c, c_ok, qh, qw, sh, sw,
                           K1, R1, S1, ph1, pw1, Ho1, Wo1,
                           s_dy1n, s_dy1k, s_dy1h, s_dy1w, s_w1k, s_w1c, s_w1r, s_w1s, PRECISION, BLOCK_K)
    if HAS_SECOND:  # the projection shortcut: summed into the same da, one epilogue
        acc = _accumulate_conv(acc, dy2_ptr, w2_ptr, n64, i, j, row_ok, offs_c, c_ok, qh, qw, sh, sw,
                               K2, R2, S2, ph2, pw2, Ho2, Wo2,
                               s_dy2n, s_dy2k, s_dy2h, s_dy2w, s_w2k, s_w2c, s_w2r, s_w2s, PRECISION, BLOCK_K)

    # Epilogue: the ReLU mask (and dropout's) and xhat recomputed from x.
    mask = row_ok[:, None] & c_ok[None, :]
    if PIECES:  # x's channels from their pieces, in place
        x_offs = piece_offsets(table_ptr, C, n64[:, None], h[:, None], w[:, None], offs_c[None, :], c_ok[None, :],
                               PIECES_IDX64)
    else:
        x_offs = (n64 * s_xn + h * s_xh + w * s_xw)[:, None] + offs_c[None, :] * s_xc
    xv = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + offs_c, mask=c_ok, other=0.0)
    shift = tl.load(shift_ptr + offs_c, mask=c_ok, other=0.0)
    mean = tl.load(mean_ptr + offs_c, mask=c_ok, other=0.0)
    invstd = tl.load(invstd_ptr + offs_c, mask=c_ok, other=0.0)
    z = xv * scale[None, :] + shift[None, :]
    # dz is stored in x's dtype (as eager stores the conv's input gradient) and
    # the sums are taken of that rounded value, so that dx's correction terms
    # are exactly the sums of the dz that dx reads.
    dz = tl.where(mask & (z > 0.0), acc, 0.0)
    dz = dropped(dz, n64[:, None], offs_c[None, :], h[:, None], w[:, None], C, H, W, drop_seed_ptr, drop_threshold,
                 drop_scale, DROPOUT).to(dz_ptr.dtype.element_ty)
    tl.store(dz_ptr + (n64 * s_zn + h * s_zh + w * s_zw)[:, None] + offs_c[None, :] * s_zc, dz, mask=mask)
    dzf = dz.to(tl.float32)
    xhat = (xv - mean[None, :]) * invstd[None, :]
    part = part_ptr + tile * (2 * C) + offs_c
    tl.store(part, tl.sum(dzf, axis=0), mask=c_ok)
    tl.store(part + C, tl.sum(dzf * xhat, axis=0), mask=c_ok)
    _sums_on_arrival(part_ptr, scratch_ptr, sums_ptr, counters_ptr + counter_at, sh * sw * num_m_tiles, tile, pid_c,
                     num_c_tiles, group_rows, C, offs_c, c_ok, BLOCK_N)


@triton.jit
def _store_sums(src_ptr, start, end, C, offs_c, c_ok, out_ptr, BLOCK_N: tl.constexpr):
    """out[c] and out[C + c], channels offs_c: the sums over rows
    start..end-1 of a [rows, 2C] fp32 src that other programs wrote (read
    from L2)."""
    for half in tl.static_range(2):
        cols = half * C + offs_c
        tl.store(out_ptr + cols, column_sums(src_ptr, start, end, 2 * C, cols, c_ok, _SUM_TILE // BLOCK_N, BLOCK_N,
                                             ".cg"), mask=c_ok)


@triton.jit
def _sums_on_arrival(part_ptr, scratch_ptr, sums_ptr, counters_ptr, tiles, tile, pid_c, num_c_tiles, group_rows, C,
                     offs_c, c_ok, BLOCK_N: tl.constexpr):
    """After this program's partial row: the last of the channel tile's row
    tiles to arrive sums the rows into sums [2C]; with several groups of
    group_rows row tiles, the last of each group sums its rows into
    scratch[group], and the last group the group rows. Counters: the channel
    tiles' first, then each group's."""
    groups = tl.cdiv(tiles, group_rows)
    group = tile // group_rows
    start = group * group_rows
    end = tl.minimum(start + group_rows, tiles)
    if groups == 1:
        if last_to_arrive(counters_ptr + pid_c, tiles):
            _store_sums(part_ptr, 0, tiles, C, offs_c, c_ok, sums_ptr, BLOCK_N)
    elif last_to_arrive(counters_ptr + num_c_tiles * (1 + group) + pid_c, end - start):
        _store_sums(part_ptr, start, end, C, offs_c, c_ok, scratch_ptr + group * (2 * C), BLOCK_N)
        if last_to_arrive(counters_ptr + pid_c, groups):
            _store_sums(scratch_ptr, 0, groups, C, offs_c, c_ok, sums_ptr, BLOCK_N)


# ------------------------------------------------------------------------------ host

def _check_conv(i: int, grad, weight, stride, padding, x):
    """Validated (grad, weight, stride, padding) of conv i."""
    stride, padding = pair(stride, f"strides[{i}]", 1), pair(padding, f"paddings[{i}]")
    n, c, h, w = x.shape
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or weight.shape[1] != c:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weights[{i}] must be a (K, {c}, R, S) tensor (C = x's channels), got {got}")
    k, _, r, s = weight.shape
    ho, wo = conv_out_size(h, r, stride[0], padding[0]), conv_out_size(w, s, stride[1], padding[1])
    if ho < 1 or wo < 1:
        raise ValueError(f"weights[{i}] ({r}x{s} with padding {padding}) does not fit x's {h}x{w} image")
    if tuple(grad.shape) != (n, k, ho, wo):
        raise ValueError(f"grads[{i}] must have the conv's output shape {(n, k, ho, wo)}, got {tuple(grad.shape)}")
    if grad.dtype != x.dtype:
        raise TypeError(f"grads[{i}] must have x's dtype {x.dtype}, got {grad.dtype}")
    if grad.device != x.device or weight.device != x.device:
        raise ValueError(f"grads[{i}] and weights[{i}] must be on x's device {x.device}")
    return grad, weight, stride, padding


def _configs(pairs, warps_and_stages):
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bn, bk in pairs for w, s in [warps_and_stages(bn)]]


# BLOCK_N (channel tile) x BLOCK_K (reduction step) per profile. GPU: channel
# counts 16-256, pruned to the problem below; the interpreter runs one small
# config. BLOCK_M (64 or 128 rows) is not tuned: it fixes the number of
# partial-sum rows, which the host must know to size that buffer and to group
# their sums (no device -> host sync).
CONFIGS = {
    "gpu": _configs([(bn, bk) for bn in (16, 32, 64, 128) for bk in (16, 32, 64)],
                    lambda bn: (4 if bn <= 64 else 8, 3)),
    "interpreter": _configs([(32, 32)], lambda bn: (4, 1)),
}


def _prune_dgrad(configs, named_args, **kwargs):
    """Tiles much wider than the channel counts only compute zeros; channel
    tiles under 32 are slower when there are more channels, unless 32-wide
    ones leave the GPU under-filled (few rows: an 8x8 stage). Tiles that
    fill it come first (filling_first); the first kept is the pinned config."""
    c, row_tiles = named_args["C"], named_args["sh"] * named_args["sw"] * named_args["num_m_tiles"]
    device = named_args["x_ptr"].device
    c_cap = max(16, next_power_of_2(c))
    k_cap = max(16, next_power_of_2(max(named_args["K1"], named_args["K2"])))
    narrow_ok = row_tiles * cdiv(c, 32) < PROGRAMS_PER_SM * sm_count(device)
    kept = [cf for cf in configs if (16 if narrow_ok else min(c_cap, 32)) <= cf.kwargs["BLOCK_N"] <= c_cap
            and cf.kwargs["BLOCK_K"] <= k_cap]
    return filling_first(kept, lambda cf: row_tiles * cdiv(c, cf.kwargs["BLOCK_N"]), device) or configs[:1]


_dgrad = tuning.Tuned(_dgrad_kernel, CONFIGS,
                      key=["N", "C", "H", "W", "sh", "sw", "K1", "R1", "K2", "R2", "PIECES", "DROPOUT"],
                      prune=_prune_dgrad)


def _block_m(rows: int, phases: int, c: int, device: torch.device) -> int:
    """Rows per program: 128 on a large problem (from dgrad_wide_rows rows),
    where that still gives every SM PROGRAMS_PER_SM programs at 32 channels a
    tile; else 64, twice the programs (the 8x8 and 16x16 stages at batch 128)."""
    wide_rows = tuning.sizing.dgrad_wide_rows
    if wide_rows is None or rows < wide_rows:
        return 64
    programs = phases * cdiv(rows, 128) * cdiv(c, 32)
    return 128 if programs >= PROGRAMS_PER_SM * sm_count(device) else 64


@launcher(lambda grads, weights, strides, paddings, x, *args, **kwargs: device_of(x))
def conv_dgrad(grads: list[Optional[torch.Tensor]], weights: list[torch.Tensor], strides: list[tuple[int, int]],
               paddings: list[tuple[int, int]], x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
               scale: torch.Tensor, shift: torch.Tensor, dropout=None):
    """(dz, sum_dz, sum_dz_xhat) of BN -> ReLU -> conv_i (see the module
    docstring), in one launch.

    grads[i] is dy of conv i (weights[i], strides[i], paddings[i]), or None when
    that output has no gradient; at most two convs, which must share the stride.
    dz has x's shape, dtype and layout (empty_activation); the sums are fp32 [C].
    dropout: forward's (p, seed), whose mask the epilogue makes again."""
    check_activation(x)
    check_dropout(dropout, x)
    if not (len(grads) == len(weights) == len(strides) == len(paddings)) or not 1 <= len(grads) <= 2:
        raise ValueError(f"grads, weights, strides and paddings must be lists of one or two entries each, got "
                         f"lengths {len(grads)}, {len(weights)}, {len(strides)}, {len(paddings)}")
    convs = [_check_conv(i, g, wt, st, p, x) for i, (g, wt, st, p) in enumerate(zip(grads, weights, strides, paddings))
             if g is not None]
    if not convs:
        raise ValueError("grads: at least one conv output must have a gradient, got only None")
    if len(convs) == 2 and convs[0][2] != convs[1][2]:
        raise ValueError(f"strides must be equal for two convs (they share one GEMM's rows), got "
                         f"{convs[0][2]} and {convs[1][2]}")
    mean, invstd, scale, shift = (channel_vector(v, nm, x) for v, nm in
                                  ((mean, "mean"), (invstd, "invstd"), (scale, "scale"), (shift, "shift")))

    n, c, h, w = x.shape
    if x.numel() == 0:  # nothing to launch
        return empty_activation(x).zero_(), *torch.zeros((2, c), device=x.device)
    sh, sw = convs[0][2]
    hq, wq = cdiv(h, sh), cdiv(w, sw)  # rows of the largest phase
    rows = n * hq * wq
    block_m = _block_m(rows, sh * sw, c, x.device)
    num_m_tiles = cdiv(rows, block_m)
    tiles = sh * sw * num_m_tiles
    dz = empty_activation(x)  # x's layout; for Pieces, their concatenation's
    partials = torch.empty((tiles, 2 * c), dtype=torch.float32, device=x.device)
    sums = torch.empty(2 * c, dtype=torch.float32, device=x.device)
    groups = reduction_groups(tiles)
    scratch = partials if groups is None else torch.empty((groups, 2 * c), dtype=torch.float32, device=x.device)
    # Channel tiles are at least 16 wide: counters for the narrowest.
    ring, at = arrival_counters(x.device, ((groups or 0) + 1) * cdiv(c, 16))

    def conv_args(grad, weight, stride, padding):
        k, _, r, s = weight.shape
        return (k, r, s, padding[0], padding[1], grad.shape[2], grad.shape[3], *grad.stride(), *weight.stride())

    first = convs[0]
    second = convs[1] if len(convs) == 2 else convs[0]  # unused unless HAS_SECOND
    x_arg, table, pieces = activation_args(x)
    _dgrad[lambda meta: (tiles * cdiv(c, meta["BLOCK_N"]),)](
        first[0], first[1], second[0], second[1], x_arg, table, dz, *dropout_args(dropout, scale), partials, scratch,
        sums, ring, at, tiles if groups is None else tuning.sizing.reduction_group_rows, mean, invstd, scale, shift,
        n, c, h, w, hq, wq, sh, sw, num_m_tiles,
        *conv_args(*first), *conv_args(*second),
        *x.stride(), *dz.stride(),
        HAS_SECOND=len(convs) == 2, PIECES=pieces, PIECES_IDX64=pieces and needs_int64(x),
        DROPOUT=dropout is not None,
        PRECISION=dot_precision(x.dtype), BLOCK_M=block_m,
    )
    return dz, sums[:c], sums[c:]
