"""The conv forward's statistics epilogue: the next BatchNorm's (count, mean,
M2) per channel of outs[0] as stored, merged inside the conv's own launch.

Each program splits its BLOCK_M rows into groups of RPP
(tuning.sizing.rows_per_partial) and writes each group's moments (two_pass)
to a partial row m // RPP. RPP divides every BLOCK_M the autotuner may pick,
so which program writes which row is the same for every config. Then the
partial rows are merged in row order with Chan's formula (walk_partials, as
batch_stats' merge kernel does), by the programs that arrive last
(row_sums.last_to_arrive), per column tile:
- few rows (reduction_groups: None): the last of the column's row tiles
  walks every partial row;
- many: row tiles come in groups of reduction_group_rows partial rows (a
  multiple of every BLOCK_M // RPP); the last tile of a group walks the
  group's rows into a group row, and the last group walks the group rows.
The last one writes the merged (count, mean, M2) to three [1, K0] rows, which
the next layer's conv reads in its loader (batch_stats.LoaderFold): no launch
is spent on the statistics between two convs.

Buffers: one fp32 [3, rows, K0] (count, mean, M2 planes) of partial rows
[0, P) and group rows [P, P + G), and the three merged rows (separate
tensors: the op returns them, and an op's outputs may not alias). Counters:
the columns' first (one per column tile), then the groups' (G per column
tile), from the device's ring.
"""
import torch
import triton
import triton.language as tl

from . import tuning
from .batch_stats import walk_partials
from .common import cdiv, two_pass
from .row_sums import arrival_counters, last_to_arrive, reduction_groups

# Partial rows x channels a last program merges per step: the merge kernel's
# chunk (64 rows of 32 channels), whatever the tile width.
_WALK = tl.constexpr(2048)


@triton.jit
def _store_row(cnt_ptr, mean_ptr, m2_ptr, cols, col_ok, n, mean, m2):
    tl.store(cnt_ptr + cols, n, mask=col_ok)
    tl.store(mean_ptr + cols, mean, mask=col_ok)
    tl.store(m2_ptr + cols, m2, mask=col_ok)


@triton.jit
def _merge_rows(moments_ptr, plane, start, end, K0, cols, col_ok, BLOCK_N: tl.constexpr):
    """(count, mean, M2) of rows start..end-1 merged in order, read from L2
    (.cg): other programs wrote them."""
    return walk_partials(moments_ptr, moments_ptr + plane, moments_ptr + 2 * plane, start, end, K0, cols, col_ok,
                         _WALK // BLOCK_N, BLOCK_N, ".cg")


@triton.jit
def epilogue_moments(y0, row_ok, cols, col_ok, pid_m, tile_n, num_n0, M, K0, moments_ptr, rows, group_rows,
                     merged_cnt_ptr, merged_mean_ptr, merged_m2_ptr, counters_ptr, RPP: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Write this tile's partial rows of y0 [BLOCK_M, BLOCK_N] (outs[0] as
    stored; row_ok: rows < M, col_ok: its channels < K0), then arrive; the
    last to arrive merges (module docstring). group_rows: partial rows per
    group (all P where one group holds them)."""
    plane = rows * K0
    # Rows in groups of RPP: group g of this tile is partial pid_m * BLOCK_M // RPP + g.
    yq = tl.reshape(y0.to(tl.float32), (BLOCK_M // RPP, RPP, BLOCK_N))
    rf = tl.reshape(row_ok.to(tl.float32), (BLOCK_M // RPP, RPP))
    cnt = tl.sum(rf, axis=1)  # [G]; a group past M has 0 and is not stored
    ok3 = tl.expand_dims(rf, 2) > 0.0
    g_mean, g_m2 = two_pass(yq, ok3, tl.expand_dims(tl.maximum(cnt, 1.0), 1), axis=1)
    first_row = pid_m * (BLOCK_M // RPP)
    prow = first_row + tl.arange(0, BLOCK_M // RPP)
    pok = (cnt > 0.0)[:, None] & col_ok[None, :]
    poffs = prow[:, None] * K0 + cols[None, :]
    tl.store(moments_ptr + poffs, tl.broadcast_to(cnt[:, None], (BLOCK_M // RPP, BLOCK_N)), mask=pok)
    tl.store(moments_ptr + plane + poffs, g_mean, mask=pok)
    tl.store(moments_ptr + 2 * plane + poffs, g_m2, mask=pok)

    P = tl.cdiv(M, RPP)
    groups = tl.cdiv(P, group_rows)
    group = first_row // group_rows
    start = group * group_rows
    end = tl.minimum(start + group_rows, P)
    arrivals = tl.cdiv(end - start, BLOCK_M // RPP)  # the row tiles of this group
    if groups == 1:
        if last_to_arrive(counters_ptr + tile_n, arrivals):
            n, mean, m2 = _merge_rows(moments_ptr, plane, 0, P, K0, cols, col_ok, BLOCK_N)
            _store_row(merged_cnt_ptr, merged_mean_ptr, merged_m2_ptr, cols, col_ok, n, mean, m2)
    elif last_to_arrive(counters_ptr + num_n0 * (1 + group) + tile_n, arrivals):
        n, mean, m2 = _merge_rows(moments_ptr, plane, start, end, K0, cols, col_ok, BLOCK_N)
        at = (P + group) * K0
        _store_row(moments_ptr + at, moments_ptr + plane + at, moments_ptr + 2 * plane + at, cols, col_ok, n, mean,
                   m2)
        if last_to_arrive(counters_ptr + tile_n, groups):
            n, mean, m2 = _merge_rows(moments_ptr, plane, P, P + groups, K0, cols, col_ok, BLOCK_N)
            _store_row(merged_cnt_ptr, merged_mean_ptr, merged_m2_ptr, cols, col_ok, n, mean, m2)


# ----------------------------------------------------------------------------- host


class EpilogueMoments:
    """The buffers and counters of one conv launch's statistics epilogue for
    an output of M rows and K0 channels (the module docstring's layout)."""

    def __init__(self, M: int, K0: int, device: torch.device):
        partial_rows = cdiv(M, tuning.sizing.rows_per_partial)
        groups = reduction_groups(partial_rows)
        self.group_rows = partial_rows if groups is None else tuning.sizing.reduction_group_rows
        self.rows = partial_rows + (groups or 0)
        self.buffer = torch.empty((3, self.rows, K0), dtype=torch.float32, device=device)
        self.merged = tuple(torch.empty((1, K0), dtype=torch.float32, device=device) for _ in range(3))
        # Column tiles are at least 16 wide: counters for the narrowest.
        self.ring, self.counter_at = arrival_counters(device, ((groups or 0) + 1) * cdiv(K0, 16))

    def args(self) -> tuple:
        """The kernel's (moments_ptr, rows, group_rows, the merged rows' three
        pointers, counters_ptr, counter offset). `merged` holds the result
        once the launch has run."""
        return self.buffer, self.rows, self.group_rows, *self.merged, self.ring, self.counter_at
