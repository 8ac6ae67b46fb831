"""Forward of the fused op: implicit-GEMM convolution of relu(x * scale + shift),
with the activation computed in the operand loader and never written to memory.

Math. a[n, c, h, w] = relu(x[n, c, h, w] * scale[c] + shift[c]), zero-padded (a padded
position is 0, not relu(shift)); for each weight W_i [K_i, C, R, S]:
    out_i[n, k, oh, ow] = sum_{c, r, s} a[n, c, oh*sh - ph + r, ow*sw - pw + s] * W_i[k, c, r, s].
As a GEMM: rows m = (n, oh, ow) (M = N*Ho*Wo), columns = output channels, reduction
over (r, s, c). Weights that read the same activation with the same kernel size and
padding (conv1 and the projection shortcut of a bottleneck stage's first unit, both
1x1; not a basic unit's 3x3 conv1) are one GEMM over their concatenated output
channels; the epilogue routes column j to its output.

Operands: a is rounded to x's dtype before tl.dot, as eager PyTorch stores
relu(bn(x)) in x's dtype; accumulation is fp32; fp32 operands use dot_precision (TF32
exactly when cuDNN would).

Epilogue of outs[0]: optional residual add (y = conv + residual, rounded once) and
optional statistics of y as stored (rounded to the output dtype) for the next
BatchNorm: every tile splits its rows into groups of ROWS_PER_PARTIAL and writes each
group's (count, mean, M2) per channel to row m // ROWS_PER_PARTIAL of three
[cdiv(M, ROWS_PER_PARTIAL), K_0] buffers; batch_stats.merge_partials combines them with
Chan's formula in a fixed order. ROWS_PER_PARTIAL divides every BLOCK_M the autotuner
may pick, so the buffer layout, and which kernel writes which row, is the same for
every config: no row is left stale by a benchmark run of another config, and nothing
needs zeroing or restoring.

Layout: loads and stores go through strides. For channels_last x the reduction tile is
contiguous along C (coalesced, vectorised: triton specialises the unit stride). NCHW
x works but its loads are not coalesced along C: channels_last is the fast layout.
Outputs take the layout PyTorch's convolution gives (channels_last when x or a weight
is), which is what the op's fake implementation promises torch.compile.
"""
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from . import SUPPORTED_DTYPES, autotune_enabled, interpreting
from .batch_stats import merge_partials
from .common import (bn_relu, channel_vector, check_activation, conv_output_format, dot_precision, needs_int64, pair,
                     two_pass)

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): channels 16..256, M = N*Ho*Wo large.
# _prune keeps the few that fit a problem's channel counts, so tuning compiles little.
_GPU_CONFIGS = [
    (64, 16, 16, 2, 4), (128, 16, 16, 4, 4), (128, 32, 16, 4, 4), (64, 64, 16, 4, 4),
    (128, 64, 16, 4, 4), (128, 128, 16, 8, 3),
    (64, 16, 32, 4, 4), (128, 16, 32, 4, 4), (64, 32, 32, 4, 4), (128, 32, 32, 4, 4), (128, 64, 32, 4, 3),
    (64, 128, 32, 4, 3), (128, 128, 32, 8, 3),
    (128, 16, 64, 4, 3), (128, 32, 64, 4, 3), (128, 64, 64, 8, 3), (128, 128, 64, 8, 3),
]
# The interpreter runs one small config, and groups rows by 16 so that a tile holds
# several stats groups (the path every GPU config takes).
_INTERP_CONFIGS = [(32, 16, 16, 4, 1)]
_UNTUNED_CONFIGS = [(128, 32, 32, 4, 4)]  # FUSED_PREACT_TRITON_AUTOTUNE=0: one of the above
_CONFIGS = _INTERP_CONFIGS if interpreting() else _GPU_CONFIGS if autotune_enabled() else _UNTUNED_CONFIGS
ROWS_PER_PARTIAL = 16 if interpreting() else 32
assert all(c[0] % ROWS_PER_PARTIAL == 0 and c[0] > ROWS_PER_PARTIAL for c in _CONFIGS)


def _prune(configs, named_args, **kwargs):
    """Keep tiles that fit the channel counts: BLOCK_K in {16} for C <= 16, {16, 32}
    for C <= 32, else {32, 64}; BLOCK_N no wider than the output channels and, past
    16 of them, at least 32 wide (narrow tiles re-read x once per column tile)."""
    c = triton.next_power_of_2(named_args["C"])
    k_ok = {16} if c <= 16 else {16, 32} if c <= 32 else {32, 64}
    n = triton.next_power_of_2(named_args["KTOT"])
    n_lo, n_hi = min(max(n, 16), 32), max(n, 16)
    kept = [cfg for cfg in configs
            if cfg.kwargs["BLOCK_K"] in k_ok and n_lo <= cfg.kwargs["BLOCK_N"] <= n_hi]
    return kept or configs[:1]


@triton.autotune(
    configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
             for m, n, k, w, s in _CONFIGS],
    key=["M", "C", "KTOT", "R", "S", "STRIDE_H", "STRIDE_W", "sxc"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _conv_fwd_kernel(
    x_ptr, scale_ptr, shift_ptr, w_ptr, out0_ptr, out1_ptr, res_ptr, cnt_ptr, mean_ptr, m2_ptr,
    M, C, H, W, HO, WO, K0, KTOT,
    sxn, sxc, sxh, sxw, s0n, s0c, s0h, s0w, s1n, s1c, s1h, s1w, srn, src, srh, srw,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W,
    R: tl.constexpr, S: tl.constexpr, HAS_OUT1: tl.constexpr, HAS_RES: tl.constexpr, STATS: tl.constexpr,
    RPP: tl.constexpr, IDX64: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Column tiles of one row tile are neighbours in launch order: they read the same
    # x rows, which then come from L2.
    pid = tl.program_id(0)
    num_n = tl.cdiv(KTOT, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n

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
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < KTOT
    if IDX64:  # channel offsets too (an NCHW image alone may pass 2**31 elements)
        ks = ks.to(tl.int64)
        cols = cols.to(tl.int64)

    # One flat loop over (r, s, channel block): with few channels the (r, s) taps
    # still give the software pipeline several iterations to overlap.
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    cblocks = tl.cdiv(C, BLOCK_K)
    for t in range(0, R * S * cblocks):
        rs = t // cblocks
        c = (t % cblocks) * BLOCK_K + ks
        ih = ih0 + rs // S
        iw = iw0 + rs % S
        pos_ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        c_ok = c < C
        ok = pos_ok[:, None] & c_ok[None, :]
        xv = tl.load(x_ptr + (x_row + ih * sxh + iw * sxw)[:, None] + c[None, :] * sxc, mask=ok, other=0.0)
        sc = tl.load(scale_ptr + c, mask=c_ok, other=0.0)
        sh = tl.load(shift_ptr + c, mask=c_ok, other=0.0)
        # Padding and out-of-range lanes are zeros of the activation (`ok`).
        a = bn_relu(xv, sc[None, :], sh[None, :], ok).to(x_ptr.dtype.element_ty)
        b = tl.load(w_ptr + (rs * C + c)[:, None] * KTOT + cols[None, :],
                    mask=c_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    # Epilogue: columns [0, K0) are outs[0], [K0, KTOT) outs[1].
    in0 = col_ok & (cols < K0)
    ok0 = row_ok[:, None] & in0[None, :]
    y = acc
    if HAS_RES:
        res = tl.load(res_ptr + (n * srn + oh * srh + ow * srw)[:, None] + cols[None, :] * src, mask=ok0, other=0.0)
        y += res.to(tl.float32)
    y = y.to(out0_ptr.dtype.element_ty)
    tl.store(out0_ptr + (n * s0n + oh * s0h + ow * s0w)[:, None] + cols[None, :] * s0c, y, mask=ok0)
    if HAS_OUT1:
        ok1 = row_ok[:, None] & (col_ok & (cols >= K0))[None, :]
        tl.store(out1_ptr + (n * s1n + oh * s1h + ow * s1w)[:, None] + (cols - K0)[None, :] * s1c, y, mask=ok1)

    if STATS:
        if pid_n * BLOCK_N < K0:  # the tile holds channels of outs[0]
            # Rows in groups of RPP: group g of this tile is partial pid_m * BLOCK_M // RPP + g.
            yq = tl.reshape(y.to(tl.float32), (BLOCK_M // RPP, RPP, BLOCK_N))
            rf = tl.reshape(row_ok.to(tl.float32), (BLOCK_M // RPP, RPP))
            cnt = tl.sum(rf, axis=1)  # [G]; a group past M has 0 and is not stored
            ok3 = tl.expand_dims(rf, 2) > 0.0
            g_mean, g_m2 = two_pass(yq, ok3, tl.expand_dims(tl.maximum(cnt, 1.0), 1), axis=1)
            prow = pid_m * (BLOCK_M // RPP) + tl.arange(0, BLOCK_M // RPP)
            pok = (cnt > 0.0)[:, None] & in0[None, :]
            poffs = prow[:, None] * K0 + cols[None, :]
            tl.store(cnt_ptr + poffs, tl.broadcast_to(cnt[:, None], (BLOCK_M // RPP, BLOCK_N)), mask=pok)
            tl.store(mean_ptr + poffs, g_mean, mask=pok)
            tl.store(m2_ptr + poffs, g_m2, mask=pok)


# ----------------------------------------------------------------------------- host


def _per_weight(v, count: int, name: str, minimum: int) -> list[tuple[int, int]]:
    """One (h, w) pair per weight: a shared pair/int, or a list with one per weight."""
    if isinstance(v, (tuple, list)) and len(v) == count and all(isinstance(i, (tuple, list)) for i in v):
        return [pair(p, f"{name}[{i}]", minimum) for i, p in enumerate(v)]
    return [pair(v, name, minimum)] * count


def conv_forward(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weights: Sequence[torch.Tensor],
    stride=(1, 1),
    padding=(0, 0),
    residual: Optional[torch.Tensor] = None,
    stats: bool = False,
    raw_stats: bool = False,
) -> tuple[list[torch.Tensor], Optional[tuple[torch.Tensor, ...]]]:
    """outs[i] = conv2d(relu(x * scale + shift), weights[i], stride, padding), fused.

    x [N, C, H, W] fp32/fp16/bf16, any strides; scale, shift fp32 [C]; weights[i]
    [K_i, C, R_i, S_i] in x's dtype. stride/padding: an int or (h, w) pair shared by all
    weights, or a list with one pair per weight (paddings may differ, strides may not).
    residual (outs[0]'s shape, any strides) is added to outs[0]. stats=True also returns
    (mean, biased var) fp32 [K_0] of outs[0] as stored; with raw_stats, the
    unmerged partials instead (count, mean, M2, each [stats_partials(outs[0]), K_0],
    for merge_partials or batch_norm_stats' handed-on path: no merge launch here). Outputs are channels_last when x
    is, else NCHW-contiguous. No host synchronisation: capturable in a CUDA graph once
    the autotuner has seen the shape (its first call benchmarks configs).
    """
    check_activation(x)
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
    strides = _per_weight(stride, len(weights), "stride", 1)
    if len(set(strides)) != 1:
        raise ValueError(f"stride must be the same for all weights (they share one GEMM's rows), got {strides}")
    (st_h, st_w) = strides[0]
    pads = _per_weight(padding, len(weights), "padding", 0)

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
    moments = None
    for idx in launches:
        first = idx[0] == 0
        moments_i = _launch(x, scale, shift, [weights[i] for i in idx], [outs[i] for i in idx],
                            (st_h, st_w), pads[idx[0]], residual if first else None, stats and first, raw_stats)
        if first:
            moments = moments_i
    return outs, moments


def weight_matrix(ws: Sequence[torch.Tensor]) -> torch.Tensor:
    """The weights as one [R*S*C, sum K_i] matrix, columns = the outputs'
    channels in order, made afresh on every call. Not cached: a weight also
    changes where no version counter sees it (a CUDA-graph replay of an
    optimizer step, writes through .data), and a stale matrix would be a
    silently wrong convolution; the copy is small next to the GEMM."""
    R, S, C = ws[0].shape[2], ws[0].shape[3], ws[0].shape[1]
    # [R*S*C, K] of a channels_last weight (a channels_last model's) is a view,
    # so one copy makes the matrix: .contiguous() of one weight, cat of two.
    views = [w.permute(2, 3, 1, 0).reshape(R * S * C, -1) for w in ws]
    return (torch.cat(views, 1) if len(views) > 1 else views[0]).contiguous()


def stats_partials(out: torch.Tensor) -> int:
    """Rows of the statistics partials the epilogue writes for `out` [N, K, Ho, Wo]."""
    return triton.cdiv(out.shape[0] * out.shape[2] * out.shape[3], ROWS_PER_PARTIAL)


def _launch(x, scale, shift, ws, outs, stride, pad, residual, stats, raw_stats):
    N, C, H, W = x.shape
    _, K0, HO, WO = outs[0].shape
    R, S = ws[0].shape[2:]
    w_mat = weight_matrix(ws)
    KTOT = w_mat.shape[1]
    M = N * HO * WO
    out1 = outs[1] if len(outs) > 1 else outs[0]
    res = residual if residual is not None else outs[0]  # placeholder pointer when unused
    if stats:
        P = stats_partials(outs[0])
        cnt, mean, m2 = (torch.empty((P, K0), dtype=torch.float32, device=x.device) for _ in range(3))
    else:
        cnt = mean = m2 = scale  # never touched: STATS is off
    idx64 = needs_int64(x, *outs, res)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(KTOT, meta["BLOCK_N"]),)  # noqa: E731
    _conv_fwd_kernel[grid](
        x, scale, shift, w_mat, outs[0], out1, res, cnt, mean, m2,
        M, C, H, W, HO, WO, K0, KTOT,
        *x.stride(), *outs[0].stride(), *out1.stride(), *res.stride(),
        stride[0], stride[1], pad[0], pad[1],
        R=R, S=S, HAS_OUT1=len(outs) > 1, HAS_RES=residual is not None, STATS=stats,
        RPP=ROWS_PER_PARTIAL, IDX64=idx64, PRECISION=dot_precision(x.dtype),
    )
    if not stats:
        return None
    return (cnt, mean, m2) if raw_stats else merge_partials(cnt, mean, m2)
