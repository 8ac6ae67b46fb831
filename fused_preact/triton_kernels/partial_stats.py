"""Step 1 of the batch statistics (batch_stats.py has the math and step 2,
the merge): each program's (count, mean, M2) per channel over one run of
rows of x, a tensor or Pieces.

Rows are addressed through x's strides. The host folds (N, H, W) into at most two
"outer" dimensions, indexed by a per-program scalar, and one inner dimension (the run a
program walks), so a program's loads are contiguous along C for channels_last and along
H*W for NCHW, and the compiler sees the unit stride (triton specialises arguments equal
to 1) and coalesces along it. Pieces are one run over (N, H, W), each channel's
address from their table.
"""
import torch
import triton
import triton.language as tl

from . import tuning
from .common import activation_args, cdiv, needs_int64, next_power_of_2, piece_offsets, two_pass


@triton.jit
def chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan's pairwise combination of two (count, mean, M2) triples; an empty side
    (count 0) leaves the other unchanged."""
    n = n_a + n_b
    frac = n_b / tl.maximum(n, 1.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * frac
    m2 = m2_a + m2_b + delta * delta * n_a * frac
    return n, mean, m2


@triton.jit
def _partial_stats_kernel(
    x_ptr, table_ptr, cnt_ptr, mean_ptr, m2_ptr,
    C, L, SEGS, SEG, OUTER1, H, W,
    s_outer0, s_outer1, s_inner, s_c,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, IDX64: tl.constexpr, PIECES: tl.constexpr,
):
    # Partial p = (outer index a, segment of the inner run); a = (a0, a1) with a1 < OUTER1.
    p = tl.program_id(0)
    pid_c = tl.program_id(1)
    a = p // SEGS
    seg = p % SEGS
    a0 = a // OUTER1
    a1 = a % OUTER1
    if IDX64:
        a0 = a0.to(tl.int64)
        a1 = a1.to(tl.int64)
    base = a0 * s_outer0 + a1 * s_outer1
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    if IDX64:
        cols = cols.to(tl.int64)
    start = seg * SEG
    end = tl.minimum(start + SEG, L)
    n = tl.zeros([BLOCK_C], tl.float32)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < end
        if IDX64:
            rows = rows.to(tl.int64)
        ok = row_ok[:, None] & col_ok[None, :]
        if PIECES:  # one run over (N, H, W); x's channels from their pieces, in place
            offs = piece_offsets(table_ptr, C, (rows // (H * W))[:, None], ((rows // W) % H)[:, None],
                                 (rows % W)[:, None], cols[None, :], col_ok[None, :], IDX64)
        else:
            offs = base + rows[:, None] * s_inner + cols[None, :] * s_c
        v = tl.load(x_ptr + offs, mask=ok, other=0.0)
        v = v.to(tl.float32)
        # This tile's (count, mean, M2) by the corrected two-pass method.
        n_b = tl.sum(row_ok.to(tl.float32), axis=0)
        mean_b, m2_b = two_pass(v, ok, n_b, axis=0)
        n, mean, m2 = chan_merge(n, mean, m2, n_b, mean_b, m2_b)
    offs = p * C + cols
    tl.store(cnt_ptr + offs, n, mask=col_ok)
    tl.store(mean_ptr + offs, mean, mask=col_ok)
    tl.store(m2_ptr + offs, m2, mask=col_ok)


# ----------------------------------------------------------------------------- host


def _row_view(x: torch.Tensor):
    """(N, H, W) folded into (outer0, outer1, inner) dims, as (sizes, strides): size-1
    dims dropped, adjacent dims merged where their strides chain, padded with size-1."""
    dims = [(s, st) for s, st in zip((x.shape[0], x.shape[2], x.shape[3]), (x.stride(0), x.stride(2), x.stride(3)))
            if s != 1]
    merged = []
    for size, stride in dims:
        if merged and merged[-1][1] == size * stride:
            merged[-1] = (merged[-1][0] * size, stride)
        else:
            merged.append((size, stride))
    merged = [(1, 0)] * (3 - len(merged)) + merged
    return merged


def partial_stats(x):
    """Launch the partial-statistics kernel on x (a tensor or Pieces);
    returns the three [P, C] buffers."""
    N, C, H, W = x.shape
    x_arg, table, pieces = activation_args(x)
    if pieces:  # one run; each channel's strides come from the table
        (o0, so0), (o1, so1), (L, s_inner) = (1, 0), (1, 0), (N * H * W, 0)
    else:
        (o0, so0), (o1, so1), (L, s_inner) = _row_view(x)
    s_c = x.stride(1)
    outer = o0 * o1
    # Tile: wide along whichever axis is contiguous in memory, ~2K elements.
    if s_c == 1 and C > 1:
        block_c = min(next_power_of_2(C), 64)
    else:
        block_c = min(next_power_of_2(C), 8)
    block_r = max(16, min(next_power_of_2(L), 2048 // block_c))
    cblocks = cdiv(C, block_c)
    # Enough programs to fill a GPU (~1K), each walking several tiles of one run.
    target = tuning.sizing.stats_programs
    tiles = cdiv(L, block_r)
    segs_wanted = max(1, cdiv(target, outer * cblocks))
    seg = cdiv(tiles, min(segs_wanted, tiles)) * block_r
    segs = cdiv(L, seg)
    P = outer * segs
    cnt, mean, m2 = (torch.empty((P, C), dtype=torch.float32, device=x.device) for _ in range(3))
    _partial_stats_kernel[(P, cblocks)](
        x_arg, table, cnt, mean, m2, C, L, segs, seg, o1, H, W, so0, so1, s_inner, s_c,
        BLOCK_R=block_r, BLOCK_C=block_c, IDX64=needs_int64(x), PIECES=pieces, num_warps=4,
    )
    return cnt, mean, m2
