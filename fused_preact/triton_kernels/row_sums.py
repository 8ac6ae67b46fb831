"""Fixed-order reductions over partial rows, in one launch.

Kernels leave their reductions over N*H*W as rows of per-program partials
(wgrad's dW, dgrad's BatchNorm sums, the statistics epilogue's moments); a
row count that reaches thousands at the paper's sizes is reduced in two
levels: groups of rows in parallel, then the groups. Both levels run in one
launch. Each program of the first level writes its group's row, then
arrives at a counter of its column block (last_to_arrive); the program that
arrives last, which has seen every other program's row, reduces the group
rows in their order. The order depends on the shape alone, whichever program
is last: results are bit-identical run to run, as with a launch per level.

The counters come from a per-device ring (arrival_counters) and are put back
to zero by the last program, so no launch zeroes them.
"""
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl

from . import tuning
from .common import cdiv, device_of, launcher


@triton.jit
def last_to_arrive(counter_ptr, arrivals):
    """Whether this program is the last of the `arrivals` programs sharing
    the int32 counter at counter_ptr to call this, after storing what the
    others will read; that one also resets the counter to 0. The barrier
    orders every thread's stores before the arrival (an atomic made by one
    thread of the program), and the arrival's acq_rel makes them visible to
    the last program, whose reads of them follow its own arrival (they load
    with .cg: from L2, where the other SMs' stores are)."""
    tl.debug_barrier()
    last = tl.atomic_add(counter_ptr, 1, sem="acq_rel") == arrivals - 1
    if last:
        tl.atomic_xchg(counter_ptr, 0)
    return last


@triton.jit
def column_sums(src_ptr, start, end, P, cols, col_ok, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
                CACHE: tl.constexpr):
    """Sums of rows start..end-1 of a contiguous fp32 [T, P] at the BLOCK_P
    columns `cols`, BLOCK_T rows at a time, in a fixed order."""
    acc = tl.zeros((BLOCK_T, BLOCK_P), dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        acc += tl.load(src_ptr + t.to(tl.int64)[:, None] * P + cols[None, :],
                       mask=(t < end)[:, None] & col_ok[None, :], other=0.0, cache_modifier=CACHE)
    return tl.sum(acc, axis=0)


@triton.jit
def _sum_rows(src_ptr, dst_ptr, scratch_ptr, counter_ptr, T, P, rows_per_group, col_block, group,
              BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr):
    """dst[p] = the sum of src[t, p] over t (a contiguous fp32 [T, P]), in
    dst's dtype, for column block `col_block`: alone where one group holds
    every row; else group `group` of rows_per_group rows into
    scratch[group], and the last of the groups to arrive sums scratch."""
    cols = col_block * BLOCK_P + tl.arange(0, BLOCK_P)
    col_ok = cols < P
    groups = tl.cdiv(T, rows_per_group)
    if group < groups:  # the grid covers the largest buffer of the launch
        start = group * rows_per_group
        acc = column_sums(src_ptr, start, tl.minimum(start + rows_per_group, T), P, cols, col_ok, BLOCK_T, BLOCK_P,
                          "")
        if groups == 1:
            tl.store(dst_ptr + cols, acc.to(dst_ptr.dtype.element_ty), mask=col_ok)
        else:
            tl.store(scratch_ptr + group * P + cols, acc, mask=col_ok)
            if last_to_arrive(counter_ptr + col_block, groups):
                total = column_sums(scratch_ptr, 0, groups, P, cols, col_ok, BLOCK_T, BLOCK_P, ".cg")
                tl.store(dst_ptr + cols, total.to(dst_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def sum_slots(program, counters, src0, dst0, scratch0, at0, T0, P0, G0, src1, dst1, scratch1, at1, T1, P1, G1,
              src2, dst2, scratch2, at2, T2, P2, G2, col_blocks, groups, BLOCK_T: tl.constexpr,
              BLOCK_P: tl.constexpr):
    """Program `program` (0 .. 3 * col_blocks * groups - 1) of the sums of
    up to three buffers (slots; slot i's counters at counters + at_i), each
    slot col_blocks x groups programs (the largest buffer's). Unused slots
    repeat slot 0 and are never selected. _sum_rows_kernel runs these
    programs alone; the dx pass (bn_relu_backward.input_grad_and_sums) runs
    them beside its own, to sum the weight gradients' partials in its launch."""
    per_slot = col_blocks * groups
    slot = program // per_slot
    col_block = program % col_blocks
    group = (program % per_slot) // col_blocks
    if slot == 0:
        _sum_rows(src0, dst0, scratch0, counters + at0, T0, P0, G0, col_block, group, BLOCK_T, BLOCK_P)
    elif slot == 1:
        _sum_rows(src1, dst1, scratch1, counters + at1, T1, P1, G1, col_block, group, BLOCK_T, BLOCK_P)
    else:
        _sum_rows(src2, dst2, scratch2, counters + at2, T2, P2, G2, col_block, group, BLOCK_T, BLOCK_P)


@triton.jit
def _sum_rows_kernel(counters, src0, dst0, scratch0, at0, T0, P0, G0, src1, dst1, scratch1, at1, T1, P1, G1,
                     src2, dst2, scratch2, at2, T2, P2, G2, col_blocks, groups, BLOCK_T: tl.constexpr,
                     BLOCK_P: tl.constexpr):
    """SumSlots alone: a layer's backward sums its weight gradients' partials
    together where no input-gradient pass carries them."""
    sum_slots(tl.program_id(0), counters, src0, dst0, scratch0, at0, T0, P0, G0, src1, dst1, scratch1, at1, T1, P1,
              G1, src2, dst2, scratch2, at2, T2, P2, G2, col_blocks, groups, BLOCK_T, BLOCK_P)


# ----------------------------------------------------------------------------- host

# Counters in each device's ring. A launch takes the next of them, rounded to
# 16 (one specialisation of the offset argument); the ring wraps long before
# a launch could still be using its counters (they are back at 0 when it
# ends), unless two streams run launches that far apart at the same time.
_RING = 1 << 16
_rings: dict = {}


def arrival_counters(device: torch.device, n: int) -> tuple[torch.Tensor, int]:
    """(the ring of int32 counters of `device`, the offset of n of them, a
    multiple of 16) for one launch's last_to_arrive. The ring is made (zeroed)
    at the device's first reduction launch, which must come before a CUDA
    graph captures one: a zeroing captured in a graph would only run when
    the graph replays."""
    entry = _rings.get(device)
    if entry is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the Triton backend's first training step on a device must run before a CUDA graph "
                               "captures one (warm up once; autotuning needs it too)")
        entry = _rings[device] = [torch.zeros(_RING, dtype=torch.int32, device=device), 0]
    ring, at = entry
    n = cdiv(n, 16) * 16
    if at + n > _RING:
        at = 0
    entry[1] = at + n
    return ring, at


def reduction_groups(rows: int) -> Optional[int]:
    """How a fixed-order reduction over `rows` partial rows runs: None, one
    program per column block walks them all; else this many groups of
    tuning.sizing.reduction_group_rows rows are reduced in parallel first
    (thousands of row tiles over few channels at the paper's shapes), then
    the groups, by the last group to finish. (The interpreter's groups are
    small, so that the tests' small problems take the two-level path too.)"""
    group = tuning.sizing.reduction_group_rows
    return cdiv(rows, group) if rows > 2 * group else None


class Partials(NamedTuple):
    """A kernel's fp32 partial sums, [T, P] contiguous, still to be summed over
    T into `out_dtype`; `finish` turns that [P] sum into the kernel's result."""

    buffer: torch.Tensor
    out_dtype: torch.dtype
    finish: Callable[[torch.Tensor], object]


_SUMS_PER_LAUNCH = 3  # the slots of sum_slots
SUM_BLOCKS = {"BLOCK_T": 32, "BLOCK_P": 64}  # sum_slots' tile, for every kernel that runs its programs


class SumSlots(NamedTuple):
    """Up to _SUMS_PER_LAUNCH buffers' sums as one launch's programs: the
    arguments of sum_slots after `program`, and how many programs they take."""

    args: tuple
    programs: int


def plan_sums(jobs: Sequence[Partials]) -> tuple[list, list[SumSlots]]:
    """(each job's [P] sum tensor, the SumSlots to launch, _SUMS_PER_LAUNCH
    buffers each, that fill them). A single fp32 partial row is its own sum:
    a view, no slot."""
    sums: list = [None] * len(jobs)
    pending = []
    for i, job in enumerate(jobs):
        t, p = job.buffer.shape
        if t == 1 and job.out_dtype == torch.float32:
            sums[i] = job.buffer.view(p)
        else:
            pending.append(i)
    plans = []
    for start in range(0, len(pending), _SUMS_PER_LAUNCH):
        slots = []
        for i in pending[start:start + _SUMS_PER_LAUNCH]:
            src = jobs[i].buffer
            (t, p), groups = src.shape, reduction_groups(src.shape[0])
            dst = sums[i] = torch.empty(p, dtype=jobs[i].out_dtype, device=src.device)
            scratch = src if groups is None else torch.empty((groups, p), dtype=torch.float32, device=src.device)
            slots.append((src, dst, scratch, t, p, t if groups is None else tuning.sizing.reduction_group_rows))
        plans.append(_slots(slots))
    return sums, plans


def _slots(slots: list) -> SumSlots:
    """SumSlots of `slots` (src, dst, scratch, T, P, rows_per_group), with its counters."""
    col_blocks = max(cdiv(p, SUM_BLOCKS["BLOCK_P"]) for _, _, _, _, p, _ in slots)
    groups = max(cdiv(t, g) for _, _, _, t, _, g in slots)
    per_slot = cdiv(col_blocks, 16) * 16  # every slot's counters at a multiple of 16, as the ring's offset
    ring, at = arrival_counters(slots[0][0].device, per_slot * len(slots))
    args = [ring]
    for j, (src, dst, scratch, t, p, g) in enumerate(slots + [slots[0]] * (_SUMS_PER_LAUNCH - len(slots))):
        args += [src, dst, scratch, at + (j % len(slots)) * per_slot, t, p, g]
    return SumSlots((*args, col_blocks, groups), len(slots) * col_blocks * groups)


def launch_sums(plan: SumSlots) -> None:
    """One _sum_rows_kernel launch of `plan`."""
    _sum_rows_kernel[(plan.programs,)](*plan.args, **SUM_BLOCKS)


@launcher(lambda jobs: device_of(jobs[0].buffer) if jobs else None)
def sum_partials(jobs: Sequence[Partials]) -> list:
    """Each job's finished result: its buffer summed over T in a fixed order
    (reduction_groups), without atomic additions. Buffers are summed
    together, up to three per launch, each in one launch whatever its rows;
    a single fp32 partial row is its own sum (a view, no launch)."""
    sums, plans = plan_sums(jobs)
    for plan in plans:
        launch_sums(plan)
    return [job.finish(total) for job, total in zip(jobs, sums)]
