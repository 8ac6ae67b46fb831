"""Per-channel batch statistics of x [N, C, H, W] over (N, H, W), in two passes
that never synchronise with the host.

Math. For channel c and the m = N*H*W values x_i:
    mean = sum(x_i) / m,   var = M2 / m  with  M2 = sum((x_i - mean)^2)   (biased),
    invstd = 1 / sqrt(var + eps).
A raw sum of squares (E[x^2] - E[x]^2) cancels catastrophically when |mean| >> std
(mean 1e4, std 1 in fp32 loses every digit), so nothing here forms one:

1. `_partial_stats_kernel` (partial_stats.py): each program owns one run of rows (a "partial") for a block
   of channels. It walks its rows one tile at a time; for each tile it computes the
   tile's own (count, mean, M2) exactly (two passes over registers: mean, then the
   squared deviations from it) and folds it into its running triple with Chan's
   pairwise formula
       n = n_a + n_b,  d = mean_b - mean_a,
       mean = mean_a + d * n_b / n,   M2 = M2_a + M2_b + d^2 * n_a * n_b / n.
   (The first mean is refined by the mean deviation from it, the "corrected two-pass"
   of Chan, Golub & LeVeque, so 1e4-sized values do not cost digits in the mean.)
   The triple is stored in row p of three [P, C] fp32 buffers.
2. `_merge_partials_kernel` combines the P partials per channel in a FIXED order: chunks
   of BLOCK_P partials, each chunk combined exactly (n_b = sum n_i,
   mean_b = sum n_i mean_i / n_b, M2_b = sum M2_i + n_i (mean_i - mean_b)^2) and folded
   into the running triple with the same Chan step. No atomics: results are bit-identical
   from run to run. (What remains is the fp32 rounding of each stored partial mean:
   a variance error of about ulp(|mean|) / (sqrt(m) * std) relative, 3e-5 for mean 1e4,
   std 1, m = 1e3.) The conv forward epilogue (stats_epilogue.py) merges its own
   partials the same way, with walk_partials, in its own launch.

Step 1 is partial_stats.py; step 2, the merge, is here.
"""
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from . import tuning
from .common import cdiv, check_activation, device_of, launcher, next_power_of_2
from .partial_stats import chan_merge, partial_stats
from .row_sums import arrival_counters, last_to_arrive, reduction_groups


@triton.jit
def _affine(cols, col_ok, mean, invstd, w_ptr, b_ptr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The BatchNorm's affine folded: (scale, shift) = (gamma * invstd, beta - mean * scale)."""
    scale = invstd
    if HAS_WEIGHT:
        scale = tl.load(w_ptr + cols, mask=col_ok, other=0.0) * invstd
    shift = -mean * scale
    if HAS_BIAS:
        shift = tl.load(b_ptr + cols, mask=col_ok, other=0.0) - mean * scale
    return scale, shift


@triton.jit
def store_fold(cols, col_ok, mean, var, invstd, w_ptr, b_ptr, scale_ptr, shift_ptr, rm_ptr, rv_ptr, momentum,
                unbias, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RUNNING: tl.constexpr):
    """The end of a training-mode BatchNorm statistics pass, per channel: the
    affine fold stored, and the running update (unbiased variance: var *
    unbias). The caller counts the batch (num_batches_tracked), once."""
    scale, shift = _affine(cols, col_ok, mean, invstd, w_ptr, b_ptr, HAS_WEIGHT, HAS_BIAS)
    tl.store(scale_ptr + cols, scale, mask=col_ok)
    tl.store(shift_ptr + cols, shift, mask=col_ok)
    if HAS_RUNNING:
        rm = tl.load(rm_ptr + cols, mask=col_ok, other=0.0)
        rv = tl.load(rv_ptr + cols, mask=col_ok, other=0.0)
        tl.store(rm_ptr + cols, rm + momentum * (mean - rm), mask=col_ok)
        tl.store(rv_ptr + cols, rv + momentum * (var * unbias - rv), mask=col_ok)


@triton.jit
def _combine(n_i, mean_i, m2_i):
    """Exact (count, mean, M2) per column of a chunk of partials [rows, C]:
    weighted mean (corrected as in two_pass), then the within-partial M2 plus
    the spread of the means about it. A partial of count 0 contributes nothing
    whatever its mean/M2 slots hold."""
    has = n_i > 0.0
    mean_i = tl.where(has, mean_i, 0.0)
    m2_i = tl.where(has, m2_i, 0.0)
    n_b = tl.sum(n_i, axis=0)
    inv_n = 1.0 / tl.maximum(n_b, 1.0)
    mean_b = tl.sum(n_i * mean_i, axis=0) * inv_n
    d = tl.where(has, mean_i - mean_b[None, :], 0.0)
    sum_d = tl.sum(n_i * d, axis=0)
    mean_b += sum_d * inv_n
    m2_b = tl.sum(m2_i + n_i * d * d, axis=0) - sum_d * sum_d * inv_n
    return n_b, mean_b, m2_b


@triton.jit
def _variance(n, m2, col_ok):
    # n == 0 (a channel with no data) gives nan, as torch.var_mean of nothing does;
    # lanes past C divide by 1 only to keep the interpreter free of 0/0 warnings.
    return m2 / tl.where(col_ok, n, 1.0)


@triton.jit
def loader_fold(cnt_ptr, mean_ptr, m2_ptr, P, C, cols, col_ok, eps, w_ptr, b_ptr, HAS_WEIGHT: tl.constexpr,
                HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr):
    """(mean, var, invstd, scale, shift) of channels `cols` from P <= BLOCK_P
    (count, mean, M2) partials [P, C], merged as one chunk: what
    _merge_partials_kernel's final pass makes of them, for a kernel that
    merges the few partials of its own input while loading it. BLOCK_P 1:
    the single row a conv epilogue hands on, taken as it is (the loader's
    registers are the conv's: no [rows, channels] tiles)."""
    if BLOCK_P == 1:
        n = tl.load(cnt_ptr + cols, mask=col_ok, other=0.0)
        mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0)
        m2 = tl.load(m2_ptr + cols, mask=col_ok, other=0.0)
    else:
        rows = tl.arange(0, BLOCK_P)
        ok = (rows < P)[:, None] & col_ok[None, :]
        offs = rows[:, None] * C + cols[None, :]
        n, mean, m2 = _combine(tl.load(cnt_ptr + offs, mask=ok, other=0.0),
                               tl.load(mean_ptr + offs, mask=ok, other=0.0), tl.load(m2_ptr + offs, mask=ok, other=0.0))
    var = _variance(n, m2, col_ok)
    invstd = 1.0 / tl.sqrt_rn(var + eps)
    scale, shift = _affine(cols, col_ok, mean, invstd, w_ptr, b_ptr, HAS_WEIGHT, HAS_BIAS)
    return mean, var, invstd, scale, shift


@triton.jit
def walk_partials(cnt_ptr, mean_ptr, m2_ptr, start, end, C, cols, col_ok, BLOCK_P: tl.constexpr,
                   BLOCK_C: tl.constexpr, CACHE: tl.constexpr):
    """(count, mean, M2) of channels `cols` merged from partial rows
    start..end-1 of [P, C] buffers, BLOCK_P rows at a time, in order."""
    n = tl.zeros([BLOCK_C], tl.float32)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for p0 in range(start, end, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        ok = (rows < end)[:, None] & col_ok[None, :]
        offs = rows[:, None] * C + cols[None, :]
        n_b, mean_b, m2_b = _combine(tl.load(cnt_ptr + offs, mask=ok, other=0.0, cache_modifier=CACHE),
                                     tl.load(mean_ptr + offs, mask=ok, other=0.0, cache_modifier=CACHE),
                                     tl.load(m2_ptr + offs, mask=ok, other=0.0, cache_modifier=CACHE))
        n, mean, m2 = chan_merge(n, mean, m2, n_b, mean_b, m2_b)
    return n, mean, m2


@triton.jit
def _store_merged(n, mean, m2, cols, col_ok, out_mean_ptr, out_second_ptr, eps, w_ptr, b_ptr, scale_ptr, shift_ptr,
                  rm_ptr, rv_ptr, nbt_ptr, momentum, unbias, INVSTD: tl.constexpr, FOLD: tl.constexpr,
                  HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RUNNING: tl.constexpr,
                  HAS_COUNTER: tl.constexpr):
    """Write the merged statistics of channels `cols`: the mean and the
    variance (or invstd), and with FOLD the BatchNorm's fold, the running
    update (store_fold) and, from channel block 0, num_batches_tracked + 1."""
    var = _variance(n, m2, col_ok)
    tl.store(out_mean_ptr + cols, mean, mask=col_ok)
    if INVSTD:
        invstd = 1.0 / tl.sqrt_rn(var + eps)
        tl.store(out_second_ptr + cols, invstd, mask=col_ok)
        if FOLD:
            store_fold(cols, col_ok, mean, var, invstd, w_ptr, b_ptr, scale_ptr, shift_ptr, rm_ptr, rv_ptr,
                       momentum, unbias, HAS_WEIGHT, HAS_BIAS, HAS_RUNNING)
            if HAS_COUNTER:
                if tl.program_id(0) == 0:
                    tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)
    else:
        tl.store(out_second_ptr + cols, var, mask=col_ok)


@triton.jit
def _merge_partials_kernel(
    cnt_ptr, mean_ptr, m2_ptr, out_mean_ptr, out_second_ptr, group_cnt_ptr, group_mean_ptr, group_m2_ptr,
    counters_ptr, counter_at, P, C, rows_per_group, eps, w_ptr, b_ptr, scale_ptr, shift_ptr, rm_ptr, rv_ptr, nbt_ptr,
    momentum, unbias, INVSTD: tl.constexpr, FOLD: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RUNNING: tl.constexpr, HAS_COUNTER: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # Program (block of channels, group of rows_per_group partials) walks
    # its partials in order. One group: it writes the statistics (the mean,
    # var or invstd, the fold and running update with FOLD). Several: it
    # writes its group's (count, mean, M2) to row `group` of the group
    # buffers, and the last group of the channel block to arrive merges
    # those rows in order and writes the statistics: one launch, and the
    # same order (so the same bits) whichever group is last.
    pid = tl.program_id(0)
    group = tl.program_id(1)
    groups = tl.cdiv(P, rows_per_group)
    start = group * rows_per_group
    cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    n, mean, m2 = walk_partials(cnt_ptr, mean_ptr, m2_ptr, start, tl.minimum(start + rows_per_group, P), C, cols,
                                 col_ok, BLOCK_P, BLOCK_C, "")
    if groups == 1:
        _store_merged(n, mean, m2, cols, col_ok, out_mean_ptr, out_second_ptr, eps, w_ptr, b_ptr, scale_ptr,
                      shift_ptr, rm_ptr, rv_ptr, nbt_ptr, momentum, unbias, INVSTD, FOLD, HAS_WEIGHT, HAS_BIAS,
                      HAS_RUNNING, HAS_COUNTER)
    else:
        offs = group * C + cols
        tl.store(group_cnt_ptr + offs, n, mask=col_ok)
        tl.store(group_mean_ptr + offs, mean, mask=col_ok)
        tl.store(group_m2_ptr + offs, m2, mask=col_ok)
        if last_to_arrive(counters_ptr + counter_at + pid, groups):
            n, mean, m2 = walk_partials(group_cnt_ptr, group_mean_ptr, group_m2_ptr, 0, groups, C, cols, col_ok,
                                         BLOCK_G, BLOCK_C, ".cg")
            _store_merged(n, mean, m2, cols, col_ok, out_mean_ptr, out_second_ptr, eps, w_ptr, b_ptr, scale_ptr,
                          shift_ptr, rm_ptr, rv_ptr, nbt_ptr, momentum, unbias, INVSTD, FOLD, HAS_WEIGHT, HAS_BIAS,
                          HAS_RUNNING, HAS_COUNTER)


# ----------------------------------------------------------------------------- host


def _check_partials(count, mean, m2):
    for name, t in (("count", count), ("mean", mean), ("m2", m2)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            raise TypeError(f"{name} must be a float32 tensor [num_partials, C], got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [num_partials, C], got shape {tuple(t.shape)}")
        if t.shape != count.shape or t.device != count.device:
            raise ValueError(f"{name} must have count's shape {tuple(count.shape)} and device {count.device}, "
                             f"got {tuple(t.shape)} on {t.device}")
    P, C = count.shape
    if P == 0 or C == 0:
        raise ValueError(f"count must hold at least one partial and one channel, got shape {(P, C)}")


def _merge(count, mean, m2, eps, invstd, fold=None, out=None):
    _check_partials(count, mean, m2)
    P, C = count.shape
    count, mean, m2 = count.contiguous(), mean.contiguous(), m2.contiguous()
    block_c = min(next_power_of_2(C), 32)
    grid_c = cdiv(C, block_c)
    groups = reduction_groups(P)
    out_mean, out_second = out or (torch.empty(C, dtype=torch.float32, device=count.device) for _ in range(2))
    if groups is None:  # one group of every partial: no group rows, no counters
        group_rows, grouped = P, (out_mean,) * 3
    else:
        group_rows = tuning.sizing.reduction_group_rows
        grouped = [torch.empty((groups, C), dtype=torch.float32, device=count.device) for _ in range(3)]
    ring, at = arrival_counters(count.device, grid_c if groups else 0)
    fold = fold or _NO_FOLD
    _merge_partials_kernel[(grid_c, groups or 1)](
        count, mean, m2, out_mean, out_second, *grouped, ring, at, P, C, group_rows,
        float(eps), *fold.args(out_mean), INVSTD=invstd, FOLD=fold.scale is not None, **fold.flags(),
        BLOCK_P=_merge_block_p(group_rows, block_c), BLOCK_G=_merge_block_p(groups or 1, block_c), BLOCK_C=block_c,
        num_warps=4,
    )
    return out_mean, out_second


def _merge_block_p(rows: int, block_c: int) -> int:
    return min(next_power_of_2(rows), 128 if block_c <= 16 else 64)


@launcher(lambda count, *args, **kwargs: device_of(count))
def merge_partials(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor):
    """(mean, biased var) per channel, fp32 [C], from partial statistics: three
    [num_partials, C] fp32 buffers holding each partial's count, mean and M2 (sum of
    squared deviations from its own mean). Partials with count 0 are ignored. Merged in
    a fixed order (deterministic), on the device, without host synchronisation."""
    return _merge(count, mean, m2, 0.0, invstd=False)


class _Fold(NamedTuple):
    """The kernels' arguments for _fold: what to read and update (None: absent)."""
    weight: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    scale: Optional[torch.Tensor] = None
    shift: Optional[torch.Tensor] = None
    running_mean: Optional[torch.Tensor] = None
    running_var: Optional[torch.Tensor] = None
    num_batches_tracked: Optional[torch.Tensor] = None
    momentum: float = 0.0
    count: int = 2

    def args(self, dummy: torch.Tensor) -> tuple:
        # An absent tensor's pointer is never dereferenced (its HAS_ flag is off).
        ptrs = tuple(dummy if t is None else t for t in self[:7])
        return (*ptrs, *self.scalars())

    def scalars(self) -> tuple[float, float]:
        """(momentum, unbias): the running update's factor and var's to the unbiased variance."""
        return float(self.momentum), self.count / (self.count - 1) if self.count > 1 else 0.0

    def flags(self) -> dict:
        return dict(HAS_WEIGHT=self.weight is not None, HAS_BIAS=self.bias is not None,
                    HAS_RUNNING=self.running_mean is not None, HAS_COUNTER=self.num_batches_tracked is not None)


_NO_FOLD = _Fold()


def _fold_of(c, device, weight, bias, running_mean, running_var, num_batches_tracked, momentum, count) -> _Fold:
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and (t.dtype != torch.float32 or t.shape != (c,) or t.device != device
                              or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous float32 tensor of shape ({c},) on {device}, got "
                             f"{t.dtype} of shape {tuple(t.shape)} on {t.device}")
    if num_batches_tracked is not None and (num_batches_tracked.dtype != torch.int64
                                            or num_batches_tracked.numel() != 1):
        raise ValueError(f"num_batches_tracked must be a one-element int64 tensor, got {num_batches_tracked.dtype} "
                         f"of shape {tuple(num_batches_tracked.shape)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together or both be None")
    scale, shift = (torch.empty(c, dtype=torch.float32, device=device) for _ in range(2))
    return _Fold(weight, bias, scale, shift, running_mean, running_var, num_batches_tracked, momentum, count)


# Largest layer whose conv merges its input's statistics in its own loader
# (LoaderFold): every program of it merges its channels' partials again, a
# cost that grows with the partials (per program) and the rows (programs),
# against the launch it saves, which only counts where the layer is small
# (host-bound). A statistics pass over an NCHW x can give few partials of
# many rows, hence both bounds. A single row (what a conv epilogue hands on,
# merged) costs each program a load per channel, as scale and shift would:
# always folded.
LOADER_MERGE_MAX_PARTIALS = 32
LOADER_MERGE_MAX_ROWS = 1024


def _loader_merges(partials: int, rows: int) -> bool:
    return partials == 1 or (partials <= LOADER_MERGE_MAX_PARTIALS and rows <= LOADER_MERGE_MAX_ROWS)


class LoaderFold(NamedTuple):
    """A training-mode BatchNorm statistics pass left to the conv that reads x
    next (conv_forward's `fold`): that conv's loader merges x's few partials
    for the channels it loads, and its program 0 writes `mean`, `invstd`, the
    fold (`fold.scale`, `fold.shift`) and the running update, so no launch of
    its own is spent on them."""

    partials: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    fold: _Fold
    mean: torch.Tensor
    invstd: torch.Tensor
    eps: float

    @launcher(lambda self: device_of(self.partials[0]))
    def finish(self) -> None:
        """Fill the outputs with a merge launch instead (for a conv that cannot take the fold)."""
        _merge(*self.partials, self.eps, invstd=True, fold=self.fold, out=(self.mean, self.invstd))


def loader_fold_args(fold: Optional[LoaderFold]) -> tuple[tuple, dict]:
    """The conv kernel's loader-merge arguments (partials, P, gamma, beta,
    mean, invstd, running mean/var, count, eps, momentum, unbias) and flags
    for `fold`; for None, absent ones (None: nothing for the autotuner to
    restore either) with MERGE's flags off."""
    if fold is None:
        return (None,) * 3 + (1,) + (None,) * 7 + (0.0,) * 3, dict(_NO_FOLD.flags(), BLOCK_P=2)
    f = fold.fold
    args = (*fold.partials, fold.partials[0].shape[0], f.weight, f.bias, fold.mean, fold.invstd, f.running_mean,
            f.running_var, f.num_batches_tracked, float(fold.eps), *f.scalars())
    partials = fold.partials[0].shape[0]
    return args, dict(f.flags(), BLOCK_P=1 if partials == 1 else max(2, next_power_of_2(partials)))


@launcher(lambda x, *args, **kwargs: device_of(x))
def batch_norm_stats(x: torch.Tensor, weight, bias, running_mean, running_var, num_batches_tracked, momentum: float,
                     eps: float, partials: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
                     defer: bool = False):
    """Training-mode BatchNorm of x [N, C, H, W]: (mean, invstd, scale, shift), fp32
    [C], with relu(bn(x)) = relu(x * scale + shift); running_mean/var (unbiased
    variance) and num_batches_tracked updated in place where given (fp32 / int64
    tensors or None). The merge kernel does the fold and the update too.
    partials: x's (count, mean, M2) partials [P, C], as the conv forward
    epilogue that produced x hands them on (one merged row); then no pass
    reads x, and the merge (one launch, also over thousands of partials) is
    all that runs, or, deferred, nothing.

    defer: returns ((mean, invstd, scale, shift), LoaderFold or None). With a
    LoaderFold (one partial, or x is small: at most LOADER_MERGE_MAX_PARTIALS
    partials and LOADER_MERGE_MAX_ROWS rows), nothing is merged yet: the four tensors are
    empty until the conv reading x next runs with it (conv_forward's `fold`),
    and nothing may read them before."""
    check_activation(x)
    _check_eps(eps)
    fold = _fold_of(x.shape[1], x.device, weight, bias, running_mean, running_var, num_batches_tracked, momentum,
                    x.numel() // max(x.shape[1], 1))
    partials = partials if partials is not None else partial_stats(x)
    if defer and _loader_merges(partials[0].shape[0], x.numel() // x.shape[1]):
        _check_partials(*partials)
        partials = tuple(t.contiguous() for t in partials)
        mean, invstd = (torch.empty(x.shape[1], dtype=torch.float32, device=x.device) for _ in range(2))
        return (mean, invstd, fold.scale, fold.shift), LoaderFold(partials, fold, mean, invstd, eps)
    mean, invstd = _merge(*partials, eps, invstd=True, fold=fold)
    stats = (mean, invstd, fold.scale, fold.shift)
    return (stats, None) if defer else stats


def _check_eps(eps):
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")


@launcher(lambda x, *args, **kwargs: device_of(x))
def batch_stats(x: torch.Tensor, eps: float):
    """(mean, invstd) of x [N, C, H, W] per channel, fp32 [C]: invstd = 1/sqrt(var + eps)
    with the biased variance, as BatchNorm2d's training forward uses them."""
    check_activation(x)
    _check_eps(eps)
    return _merge(*partial_stats(x), eps, invstd=True)
