"""Forward of the fused op: implicit-GEMM convolution of relu(x * scale + shift),
with the activation computed in the operand loader and never written to memory.

Math. a[n, c, h, w] = relu(x[n, c, h, w] * scale[c] + shift[c]), zero-padded (a padded
position is 0, not relu(shift)); for each weight W_i [K_i, C, R, S]:
    out_i[n, k, oh, ow] = sum_{c, r, s} a[n, c, oh*sh - ph + r, ow*sw - pw + s] * W_i[k, c, r, s].
As a GEMM: rows m = (n, oh, ow) (M = N*Ho*Wo), columns = output channels, reduction
over (r, s, c). Weights that read the same activation with the same kernel size and
padding (conv1 and the projection shortcut of a bottleneck stage's first unit, both
1x1; not a basic unit's 3x3 conv1) are one launch: its column tiles cover the first
output's channels, then the second's, each tile reading its own weight.

Operands: a is rounded to x's dtype before tl.dot, as eager PyTorch stores
relu(bn(x)) in x's dtype; accumulation is fp32; fp32 operands use dot_precision (TF32
exactly when cuDNN would).

Epilogue of outs[0]: optional residual add (y = conv + residual, rounded once) and
optional statistics of y as stored (rounded to the output dtype) for the next
BatchNorm, merged to one (count, mean, M2) row per channel by the programs that
arrive last (stats_epilogue.py): the next conv reads that row in its loader.

Layout: loads and stores go through strides (x given as Pieces: through their
table). channels_last x is the fast layout: the reduction tile is contiguous along C.
A GEMM of few rows or few outputs reads its weights in place where they are
contiguous along C; a large one copies them into a matrix contiguous along the
outputs (_weight_operands). Outputs take the layout PyTorch's convolution gives
(channels_last when x or a weight is), as the op's fake implementation promises.
"""
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from . import SUPPORTED_DTYPES, tuning
from .batch_stats import LoaderFold, loader_fold, loader_fold_args, merge_partials, store_fold
from .common import (activation_args, bn_relu, cdiv, channel_vector, check_activation, check_dropout,
                     conv_output_format, device_of, dot_precision, dropout_args, dropped, filling_first, launcher,
                     needs_int64, next_power_of_2, per_weight, piece_offsets, sm_count, PROGRAMS_PER_SM)
from .stats_epilogue import EpilogueMoments, epilogue_moments


def _configs(shapes):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per profile. GPU: channels
# 16..256, M = N*Ho*Wo large; _prune keeps the few that fit a problem's channel
# counts, so tuning compiles little. The interpreter runs one small config.
CONFIGS = {
    "gpu": _configs([
        (64, 16, 16, 2, 4), (128, 16, 16, 4, 4), (128, 32, 16, 4, 4), (64, 64, 16, 4, 4),
        (128, 64, 16, 4, 4), (128, 128, 16, 8, 3),
        (64, 16, 32, 4, 4), (128, 16, 32, 4, 4), (64, 32, 32, 4, 4), (128, 32, 32, 4, 4), (128, 64, 32, 4, 3),
        (64, 128, 32, 4, 3), (128, 128, 32, 8, 3),
        (128, 16, 64, 4, 3), (128, 32, 64, 4, 3), (128, 64, 64, 8, 3), (128, 128, 64, 8, 3),
    ]),
    "interpreter": _configs([(64, 32, 32, 4, 1)]),
}
# Every row tile holds several whole statistics partials of its profile, and
# a group of partials whole row tiles (stats_epilogue.py): the partials'
# layout, and which program writes and merges which row, is the same whatever
# config runs.
for _profile in (tuning.GPU, tuning.INTERPRETER):
    assert all(c.kwargs["BLOCK_M"] % _profile.rows_per_partial == 0 and c.kwargs["BLOCK_M"] > _profile.rows_per_partial
               and _profile.reduction_group_rows % (c.kwargs["BLOCK_M"] // _profile.rows_per_partial) == 0
               for c in CONFIGS[_profile.name])


def _prune(configs, named_args, **kwargs):
    """Keep tiles that fit the channel counts: BLOCK_K in {16} for C <= 16, {16, 32}
    for C <= 32, else {32, 64}; BLOCK_N no wider than an output's channels and, past
    16 of them, at least 32 wide (narrow tiles re-read x once per column tile).
    16-wide tiles are kept too where 32-wide ones under-fill the GPU (few
    rows: an 8x8 stage), and tiles that fill it come first (filling_first);
    the first kept is the pinned config."""
    c = next_power_of_2(named_args["C"])
    k_ok = {16} if c <= 16 else {16, 32} if c <= 32 else {32, 64}
    m, k0, k1, device = named_args["M"], named_args["K0"], named_args["K1"], named_args["x_ptr"].device
    programs = lambda bm, bn: cdiv(m, bm) * (cdiv(k0, bn) + cdiv(k1, bn))  # noqa: E731
    n = next_power_of_2(max(k0, k1))
    n_lo, n_hi = min(max(n, 16), 32), max(n, 16)
    if programs(64, 32) < PROGRAMS_PER_SM * sm_count(device):
        n_lo = 16
    kept = [cfg for cfg in configs
            if cfg.kwargs["BLOCK_K"] in k_ok and n_lo <= cfg.kwargs["BLOCK_N"] <= n_hi]
    return filling_first(kept, lambda cf: programs(cf.kwargs["BLOCK_M"], cf.kwargs["BLOCK_N"]), device) or configs[:1]


@triton.jit
def _conv_fwd_kernel(
    x_ptr, table_ptr, scale_ptr, shift_ptr, w0_ptr, w1_ptr, out0_ptr, out1_ptr, res_ptr,
    moments_ptr, moment_rows, group_rows, merged_cnt_ptr, merged_mean_ptr, merged_m2_ptr, counters_ptr, counter_at,
    M, C, H, W, HO, WO, K0, K1,
    sxn, sxc, sxh, sxw, swk, swc, swr, sws, s0n, s0c, s0h, s0w, s1n, s1c, s1h, s1w, srn, src, srh, srw,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W,
    xcnt_ptr, xmean_ptr, xm2_ptr, P_X, bn_w_ptr, bn_b_ptr, bn_mean_ptr, bn_invstd_ptr, rm_ptr, rv_ptr, nbt_ptr,
    eps, momentum, unbias, drop_seed_ptr, drop_threshold, drop_scale,
    R: tl.constexpr, S: tl.constexpr, HAS_OUT1: tl.constexpr, HAS_RES: tl.constexpr, STATS: tl.constexpr,
    RPP: tl.constexpr, IDX64: tl.constexpr, PIECES: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    MERGE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RUNNING: tl.constexpr,
    HAS_COUNTER: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Column tiles of one row tile are neighbours in launch order: they read the same
    # x rows, which then come from L2. The first cdiv(K0, BLOCK_N) column tiles are
    # outs[0]'s channels, the rest outs[1]'s: a tile reads one weight, writes one output.
    pid = tl.program_id(0)
    num_n0 = tl.cdiv(K0, BLOCK_N)
    num_n = num_n0 + tl.cdiv(K1, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    if HAS_OUT1:
        first = pid_n < num_n0
        w_ptr = tl.where(first, w0_ptr, w1_ptr)
        k_out = tl.where(first, K0, K1)
        tile_n = tl.where(first, pid_n, pid_n - num_n0)
    else:
        first = True
        w_ptr = w0_ptr
        k_out = K0
        tile_n = pid_n

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    ow = rows % WO
    oh = (rows // WO) % HO
    n = rows // (WO * HO)
    if IDX64:  # offsets past 2**31: widen before they meet the strides
        n = n.to(tl.int64)
        oh = oh.to(tl.int64)
        ow = ow.to(tl.int64)
    ih0 = oh * STRIDE_H - PAD_H
    iw0 = ow * STRIDE_W - PAD_W
    x_row = n * sxn
    ks = tl.arange(0, BLOCK_K)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < k_out
    if IDX64:  # channel offsets too (an NCHW image alone may pass 2**31 elements)
        ks = ks.to(tl.int64)
        cols = cols.to(tl.int64)
    w_cols = w_ptr + cols[None, :] * swk

    cblocks = tl.cdiv(C, BLOCK_K)
    if MERGE:
        # x's BatchNorm statistics from its P_X partials (loader_fold), merged by
        # every program for the channels it loads instead of by a launch of their
        # own; program 0 also writes them, the fold and the running update.
        if pid == 0:
            for cb in range(0, cblocks):
                cc = cb * BLOCK_K + ks
                cc_ok = cc < C
                mu, var, invstd, _, _ = loader_fold(xcnt_ptr, xmean_ptr, xm2_ptr, P_X, C, cc, cc_ok, eps, bn_w_ptr,
                                                    bn_b_ptr, HAS_WEIGHT, HAS_BIAS, BLOCK_P)
                tl.store(bn_mean_ptr + cc, mu, mask=cc_ok)
                tl.store(bn_invstd_ptr + cc, invstd, mask=cc_ok)
                store_fold(cc, cc_ok, mu, var, invstd, bn_w_ptr, bn_b_ptr, scale_ptr, shift_ptr, rm_ptr, rv_ptr,
                            momentum, unbias, HAS_WEIGHT, HAS_BIAS, HAS_RUNNING)
            if HAS_COUNTER:
                tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)
        # One channel block (C <= BLOCK_K): the fold is the same every tap.
        _, _, _, sc_first, sh_first = loader_fold(xcnt_ptr, xmean_ptr, xm2_ptr, P_X, C, ks, ks < C, eps, bn_w_ptr,
                                                  bn_b_ptr, HAS_WEIGHT, HAS_BIAS, BLOCK_P)

    # One flat loop over (r, s, channel block): with few channels the (r, s) taps
    # still give the software pipeline several iterations to overlap.
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for t in range(0, R * S * cblocks):
        rs = t // cblocks
        r = rs // S
        s = rs % S
        c = (t % cblocks) * BLOCK_K + ks
        ih = ih0 + r
        iw = iw0 + s
        pos_ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        c_ok = c < C
        ok = pos_ok[:, None] & c_ok[None, :]
        if PIECES:  # x's channels from their pieces, in place
            x_offs = piece_offsets(table_ptr, C, n[:, None], ih[:, None], iw[:, None], c[None, :], c_ok[None, :],
                                   IDX64)
        else:
            x_offs = (x_row + ih * sxh + iw * sxw)[:, None] + c[None, :] * sxc
        xv = tl.load(x_ptr + x_offs, mask=ok, other=0.0)
        if MERGE:
            if cblocks == 1:
                sc, sh = sc_first, sh_first
            else:
                _, _, _, sc, sh = loader_fold(xcnt_ptr, xmean_ptr, xm2_ptr, P_X, C, c, c_ok, eps, bn_w_ptr,
                                              bn_b_ptr, HAS_WEIGHT, HAS_BIAS, BLOCK_P)
        else:
            sc = tl.load(scale_ptr + c, mask=c_ok, other=0.0)
            sh = tl.load(shift_ptr + c, mask=c_ok, other=0.0)
        # Padding and out-of-range lanes are zeros of the activation (`ok`).
        a = bn_relu(xv, sc[None, :], sh[None, :], ok)
        a = dropped(a, n[:, None], c[None, :], ih[:, None], iw[:, None], C, H, W, drop_seed_ptr, drop_threshold,
                    drop_scale, DROPOUT).to(x_ptr.dtype.element_ty)
        # The weight tile [BLOCK_K channels, BLOCK_N outputs] of tap (r, s), through
        # strides: a weight in place, or the copied matrix (_weight_operands).
        b = tl.load(w_cols + (r * swr + s * sws + c * swc)[:, None], mask=c_ok[:, None] & col_ok[None, :],
                    other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    y = acc
    ok_out = row_ok[:, None] & col_ok[None, :]
    if first:
        # Epilogue of outs[0]: the residual, and the next BatchNorm's statistics.
        if HAS_RES:
            res = tl.load(res_ptr + (n * srn + oh * srh + ow * srw)[:, None] + cols[None, :] * src, mask=ok_out,
                          other=0.0)
            y += res.to(tl.float32)
        y0 = y.to(out0_ptr.dtype.element_ty)
        tl.store(out0_ptr + (n * s0n + oh * s0h + ow * s0w)[:, None] + cols[None, :] * s0c, y0, mask=ok_out)
        if STATS:
            epilogue_moments(y0, row_ok, cols, col_ok, pid_m, tile_n, num_n0, M, K0, moments_ptr, moment_rows,
                             group_rows, merged_cnt_ptr, merged_mean_ptr, merged_m2_ptr, counters_ptr + counter_at, RPP,
                             BLOCK_M, BLOCK_N)
    elif HAS_OUT1:
        y1 = y.to(out1_ptr.dtype.element_ty)
        tl.store(out1_ptr + (n * s1n + oh * s1h + ow * s1w)[:, None] + cols[None, :] * s1c, y1, mask=ok_out)


# Benchmarking runs each config many times: the running-statistics update and
# the batch count (MERGE) must take effect once, in the real run.
_conv_fwd = tuning.Tuned(_conv_fwd_kernel, CONFIGS,
                         key=["M", "C", "K0", "K1", "R", "S", "STRIDE_H", "STRIDE_W", "sxc", "swc", "MERGE",
                              "PIECES", "DROPOUT"],
                         prune=_prune, restore=["rm_ptr", "rv_ptr", "nbt_ptr"])


# ----------------------------------------------------------------------------- host


@launcher(lambda x, *args, **kwargs: device_of(x))
def conv_forward(
    x,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weights: Sequence[torch.Tensor],
    stride=(1, 1),
    padding=(0, 0),
    residual: Optional[torch.Tensor] = None,
    stats: bool = False,
    raw_stats: bool = False,
    fold: Optional[LoaderFold] = None,
    dropout: Optional[tuple[float, torch.Tensor]] = None,
) -> tuple[list[torch.Tensor], Optional[tuple[torch.Tensor, ...]]]:
    """outs[i] = conv2d(relu(x * scale + shift), weights[i], stride, padding), fused.

    x [N, C, H, W] fp32/fp16/bf16, any strides, or Pieces; scale, shift fp32 [C]; weights[i]
    [K_i, C, R_i, S_i] in x's dtype. stride/padding: an int or (h, w) pair shared by all
    weights, or a list with one pair per weight (paddings may differ, strides may not).
    residual (outs[0]'s shape, any strides) is added to outs[0]. stats=True also returns
    (mean, biased var) fp32 [K_0] of outs[0] as stored; with raw_stats, its merged
    (count, mean, M2), each [1, K_0], as batch_norm_stats takes partials, instead. Outputs
    are channels_last when x is, else NCHW-contiguous. No host synchronisation.
    fold: x's BatchNorm statistics pass left to this call (batch_norm_stats with
    defer=True): scale and shift are then its empty outputs, which the first
    launch computes from x's partials in its loader and writes, with mean,
    invstd and the running update, before any later launch reads them.
    dropout: (p, seed: int64 [1] on x's device): relu(...) dropped out
    before the convs, the mask hashed from (seed, element) in the loader
    (common.dropout_kept, ops/dropout.py's mask bit for bit).
    """
    check_activation(x)
    check_dropout(dropout, x)
    N, C, H, W = x.shape
    scale, shift = channel_vector(scale, "scale", x), channel_vector(shift, "shift", x)
    weights = list(weights)
    if not weights:
        raise ValueError("weights must hold at least one weight tensor")
    for i, w in enumerate(weights):
        if not isinstance(w, torch.Tensor) or w.dim() != 4 or w.shape[1] != C or w.shape[0] == 0:
            raise ValueError(f"weights[{i}] must be a tensor [K, {C}, R, S] (C = x's channels, groups=1), got "
                             f"{tuple(getattr(w, 'shape', ())) or type(w).__name__}")
        if w.dtype != x.dtype:
            raise TypeError(f"weights[{i}] must have x's dtype {x.dtype}, got {w.dtype}")
        if w.device != x.device:
            raise ValueError(f"weights[{i}] must be on x's device {x.device}, got {w.device}")
    strides = per_weight(stride, len(weights), "stride", 1)
    if len(set(strides)) != 1:
        raise ValueError(f"stride must be the same for all weights (they share one GEMM's rows), got {strides}")
    (st_h, st_w) = strides[0]
    pads = per_weight(padding, len(weights), "padding", 0)

    shapes = []
    for i, (w, (ph, pw)) in enumerate(zip(weights, pads)):
        ho, wo = (H + 2 * ph - w.shape[2]) // st_h + 1, (W + 2 * pw - w.shape[3]) // st_w + 1
        if ho <= 0 or wo <= 0 or N == 0:
            raise ValueError(f"weights[{i}] of size {tuple(w.shape[2:])} with padding {(ph, pw)} and stride "
                             f"{(st_h, st_w)} gives an empty output for x of shape {tuple(x.shape)}")
        shapes.append((N, w.shape[0], ho, wo))
    fmt = conv_output_format(x, weights)
    outs = [torch.empty(s, dtype=x.dtype, device=x.device, memory_format=fmt) for s in shapes]
    if residual is not None:
        if not isinstance(residual, torch.Tensor) or residual.shape != outs[0].shape:
            raise ValueError(f"residual must have outs[0]'s shape {tuple(outs[0].shape)}, got "
                             f"{tuple(getattr(residual, 'shape', ())) or type(residual).__name__}")
        if residual.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"residual must be float32, float16 or bfloat16, got {residual.dtype}")
        if residual.device != x.device:
            raise ValueError(f"residual must be on x's device {x.device}, got {residual.device}")

    # Launches: weights with the same (R, S, padding) share a GEMM, two outputs per launch;
    # weights[0] leads the first launch, which carries the residual and the statistics.
    groups: dict = {}
    for i, w in enumerate(weights):
        groups.setdefault((w.shape[2], w.shape[3], pads[i]), []).append(i)
    launches = [idx[j:j + 2] for idx in groups.values() for j in range(0, len(idx), 2)]
    if fold is not None and (fold.fold.scale is not scale or fold.fold.shift is not shift
                             or fold.partials[0].shape[1] != C):
        raise ValueError("fold must be the LoaderFold whose outputs are scale and shift, of x's channels")
    moments = None
    for n_launch, idx in enumerate(launches):
        first = idx[0] == 0
        moments_i = _launch(x, scale, shift, [weights[i] for i in idx], [outs[i] for i in idx],
                            (st_h, st_w), pads[idx[0]], residual if first else None, stats and first, raw_stats,
                            fold if n_launch == 0 else None, dropout)
        if first:
            moments = moments_i
    return outs, moments


# Where the weights are read in place, not copied (one launch less a layer):
# GEMMs of few rows (few row tiles: occupancy is beside the point) or few
# outputs (tiles at most 64 wide, where the in-place read costs about the
# copy's registers on sm_90, -18%..+25%; 128-wide tiles cost up to 73% more).
IN_PLACE_WEIGHT_MAX_ROWS = 4096
IN_PLACE_WEIGHT_MAX_OUTPUTS = 64


def _weight_operands(ws: Sequence[torch.Tensor], rows: int) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """(first weight, second weight (or the first again), their (k, c, r, s)
    element strides) as the kernel reads them. A GEMM of few rows or few
    outputs (IN_PLACE_WEIGHT_MAX_ROWS, _OUTPUTS) reads a weight contiguous
    along its input channels (channels_last, or any 1x1) in place, K-major.
    Otherwise the weights are copied into one [R*S*C, sum K_i] matrix,
    contiguous along the outputs, which wide tiles feed to the tensor cores
    with fewer registers (sm_90). Never cached: a weight also changes where
    no version counter sees it (a CUDA-graph replay of an optimizer step),
    and a stale copy would be a silently wrong conv."""
    k_total = sum(w.shape[0] for w in ws)
    if ((rows <= IN_PLACE_WEIGHT_MAX_ROWS or k_total <= IN_PLACE_WEIGHT_MAX_OUTPUTS)
            and all(w.stride(1) == 1 for w in ws) and ws[0].stride() == ws[-1].stride()):
        return ws[0], ws[-1], ws[0].stride()
    R, S, C = ws[0].shape[2], ws[0].shape[3], ws[0].shape[1]
    # One op whatever the weights' layouts: cat of their [R, S, C, K_i] views
    # (outside autograd: the kernel's output is no function of it to autograd).
    matrix = torch.empty((R, S, C, k_total), dtype=ws[0].dtype, device=ws[0].device)
    with torch.no_grad():
        torch.cat([w.permute(2, 3, 1, 0) for w in ws], 3, out=matrix)
    return matrix, matrix[..., ws[0].shape[0]:], (1, k_total, S * C * k_total, C * k_total)


def _launch(x, scale, shift, ws, outs, stride, pad, residual, stats, raw_stats, fold, dropout):
    N, C, H, W = x.shape
    _, K0, HO, WO = outs[0].shape
    R, S = ws[0].shape[2:]
    K1 = ws[1].shape[0] if len(ws) > 1 else 0
    M = N * HO * WO
    w0, w1, w_strides = _weight_operands(ws, M)
    out1 = outs[1] if len(outs) > 1 else outs[0]  # placeholder pointers when unused
    res = residual if residual is not None else outs[0]
    moments = EpilogueMoments(M, K0, x.device) if stats else None
    # Without STATS nothing is touched: any pointers will do.
    moment_args = moments.args() if stats else (scale, 1, 1, scale, scale, scale, scale, 0)
    idx64 = needs_int64(x, *outs, res)
    merge_args, merge_flags = loader_fold_args(fold)
    x_arg, table, pieces = activation_args(x)
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"])  # noqa: E731
                         * (cdiv(K0, meta["BLOCK_N"]) + cdiv(K1, meta["BLOCK_N"])),)
    _conv_fwd[grid](
        x_arg, table, scale, shift, w0, w1, outs[0], out1, res, *moment_args,
        M, C, H, W, HO, WO, K0, K1,
        *x.stride(), *w_strides, *outs[0].stride(), *out1.stride(), *res.stride(),
        stride[0], stride[1], pad[0], pad[1], *merge_args, *dropout_args(dropout, scale),
        R=R, S=S, HAS_OUT1=len(outs) > 1, HAS_RES=residual is not None, STATS=stats,
        RPP=tuning.sizing.rows_per_partial, IDX64=idx64, PIECES=pieces, PRECISION=dot_precision(x.dtype),
        MERGE=fold is not None, DROPOUT=dropout is not None, **merge_flags,
    )
    if not stats:
        return None
    return moments.merged if raw_stats else merge_partials(*moments.merged)
