"""How the Triton kernels are sized and tuned, in one place.

Sizing. The numbers the host code plans launches with (rows per statistics
partial, the first level of the fixed-order sums, wgrad's split of its
reduction, the statistics pass's programs, dgrad's row tile) and the autotune
configs of every kernel come in two profiles:

- GPU: what a card runs (17 forward, 12 dgrad and 16 wgrad configs; rows
  grouped by 32, sums by 256);
- INTERPRETER: one small config per kernel and small groups, so that the
  tests' tiny problems under TRITON_INTERPRET=1 take every multi-level path
  and stay fast.

The profile follows TRITON_INTERPRET at import. `use(GPU)` switches to the
GPU's profile inside the interpreter: that is how the configs a card runs
are computed against the reference on the CPU.

Tuning. Every autotuned kernel is a `Tuned`: one jitted function behind two
triton autotuners. `timed` benchmarks each config its pruner keeps for a
shape, restoring the tensors the kernel updates in place between runs;
`pinned` takes the pruner's first config, without timing. Pinned runs when
FUSED_PREACT_TRITON_AUTOTUNE=0 or under torch.use_deterministic_algorithms(True):
a timed pick can differ between processes (timing noise), and a different
BLOCK_K or BLOCK_L adds in a different order, so only a pinned config gives
the same bits in every process.
"""
import contextlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import triton

from . import autotune_enabled, interpreting


@dataclass(frozen=True)
class Sizing:
    name: str
    rows_per_partial: int  # forward epilogue: output rows per statistics partial (divides every BLOCK_M)
    reduction_group_rows: int  # fixed-order sums: rows per group of the first level
    stats_programs: int  # statistics pass: programs it aims for
    dgrad_wide_rows: Optional[int]  # dgrad: BLOCK_M 128 from this many rows (None: always 64)
    wgrad_chunk_align: int  # wgrad: every chunk a multiple of this (>= any config's BLOCK_L)
    wgrad_min_chunk: int  # wgrad: the least positions per chunk
    wgrad_programs_per_sm: Optional[int]  # wgrad: programs aimed for per SM (None: 4 per output tile)
    sm_count: int  # SMs assumed where the tensors are not on a CUDA device (the interpreter)


GPU = Sizing("gpu", rows_per_partial=32, reduction_group_rows=256, stats_programs=1024, dgrad_wide_rows=4096,
             wgrad_chunk_align=128, wgrad_min_chunk=256, wgrad_programs_per_sm=4, sm_count=132)
INTERPRETER = Sizing("interpreter", rows_per_partial=16, reduction_group_rows=4, stats_programs=4,
                     dgrad_wide_rows=None, wgrad_chunk_align=64, wgrad_min_chunk=64, wgrad_programs_per_sm=None,
                     sm_count=132)

# The active profile; read it as `tuning.sizing` at call time (use() rebinds it).
sizing: Sizing = INTERPRETER if interpreting() else GPU

_TUNED: list["Tuned"] = []


@contextlib.contextmanager
def use(profile: Sizing):
    """Run with `profile`'s sizes and every Tuned kernel's configs for it
    (autotuner caches emptied on the way in and out)."""
    global sizing
    saved = sizing
    sizing = profile
    for kernel in _TUNED:
        kernel.set_configs(profile)
    try:
        yield profile
    finally:
        sizing = saved
        for kernel in _TUNED:
            kernel.set_configs(saved)


# FUSED_PREACT_TRITON_AUTOTUNE=0 pins every kernel's config, read once.
AUTOTUNE = autotune_enabled()


def pinned() -> bool:
    """Whether launches take the pinned config (see the module docstring)."""
    return not AUTOTUNE or torch.are_deterministic_algorithms_enabled()


class _Restore:
    """pre/post hooks for triton.autotune that put back the tensors a
    benchmarked run updates in place. Arguments that are None (absent) are
    skipped: triton 3.6's own restore_value hooks would call None.clone()."""

    def __init__(self, names: Sequence[str]):
        self.names = tuple(names)
        self.saved: dict = {}

    def pre_hook(self, kwargs, reset_only=False):
        if not reset_only:
            self.saved = {name: kwargs[name].clone() for name in self.names if kwargs[name] is not None}

    def post_hook(self, kwargs, exception):
        for name, value in self.saved.items():
            kwargs[name].copy_(value)
        self.saved = {}


def _not_timed(kernel_call, quantiles=None):
    """The pinned autotuner's benchmark: runs nothing (its single config wins)."""
    return [0.0, 0.0, 0.0]


class Tuned:
    """An autotuned kernel: `kernel[grid](...)` launches through the timed or
    the pinned autotuner (see the module docstring).

    fn: the @triton.jit function; configs: its configs per profile name
    ("gpu", "interpreter"); key: the arguments a pick depends on; prune:
    (configs, named_args) -> the configs that fit a problem, best default
    first; restore: arguments the kernel updates in place, put back after
    every benchmarked run.

    A launch whose key has had a config picked already goes straight to the
    jitted function with that config: triton's Autotuner.run would rebuild
    two dicts over all (up to ~80) arguments, and the str() of every
    tensor's dtype, to find the same entry of its cache, on every launch of
    a step. The picks are kept here under a key that names the dtypes
    themselves (`_pick_key`)."""

    def __init__(self, fn, configs: dict[str, list[triton.Config]], key: Sequence[str],
                 prune: Callable, restore: Sequence[str] = ()):
        self.fn = fn
        self.configs = configs
        self.prune = prune
        hooks = {}
        if restore:
            restorer = _Restore(restore)
            hooks = dict(pre_hook=restorer.pre_hook, post_hook=restorer.post_hook)
        current = configs[sizing.name]
        self.timed = triton.autotune(current, list(key), prune_configs_by={"early_config_prune": prune},
                                     **hooks)(fn)
        self.pinned = triton.autotune(current, list(key), prune_configs_by={"early_config_prune": self._first},
                                      do_bench=_not_timed)(fn)
        if any(c.pre_hook is not None for cs in configs.values() for c in cs):
            raise ValueError("a config's pre_hook would be skipped by the launch that bypasses the autotuner")
        self._names = set(fn.arg_names)
        self._key = [(fn.arg_names.index(k), k) for k in key]  # as Autotuner.run builds its cache key
        self._config_kwargs: dict = {}
        self._picks: dict = {}  # (pinned, _pick_key) -> the config its autotuner picked
        _TUNED.append(self)

    def _first(self, configs, named_args, **kwargs):
        return self.prune(configs, named_args, **kwargs)[:1]

    def set_configs(self, profile: Sizing) -> None:
        for autotuner in (self.timed, self.pinned):
            autotuner.configs = self.configs[profile.name]
        self.forget()

    def forget(self) -> None:
        """Every pick dropped, as in a fresh process: the next launch of each
        key is pruned and (timed) benchmarked again."""
        for autotuner in (self.timed, self.pinned):
            autotuner.cache = {}
        self._picks = {}

    def __getitem__(self, grid):
        autotuner = self.pinned if pinned() else self.timed
        return lambda *args, **kwargs: self._launch(autotuner, grid, args, kwargs)

    def _launch(self, autotuner, grid, args: tuple, kwargs: dict):
        if len(autotuner.configs) == 1:
            config = autotuner.configs[0]
        else:
            values, dtypes = self._pick_key(args, kwargs)
            key = (autotuner is self.pinned, values, dtypes)
            config = self._picks.get(key)
            if config is None:  # this key's first launch: pruned and benchmarked (timed) by triton, its pick kept
                launched = autotuner[grid](*args, **kwargs)
                # None where Autotuner.run is replaced and picks nothing (the ahead-of-time compile).
                picked = autotuner.cache.get((*values, *map(str, dtypes)))  # Autotuner.run's own key
                if picked is not None:
                    self._picks[key] = picked
                return launched
        extra = self._config_kwargs.get(config)
        if extra is None:
            extra = self._config_kwargs[config] = config.all_kwargs()
        return self.fn.run(*args, grid=grid, warmup=False, **kwargs, **extra)

    def _pick_key(self, args: tuple, kwargs: dict) -> tuple[tuple, tuple]:
        """What Autotuner.run's cache key holds (triton 3.6 and 3.8 alike),
        with the dtypes themselves for their str(): (the key arguments'
        values, the dtype of every argument that has one (among these
        kernels' arguments: the tensors), positional ones first)."""
        n = len(args)
        values = tuple([args[i] if i < n else kwargs[name] for i, name in self._key if i < n or name in kwargs])
        dtypes = [a.dtype for a in args if isinstance(a, torch.Tensor)]
        dtypes += [v.dtype for k, v in kwargs.items() if isinstance(v, torch.Tensor) and k in self._names]
        return values, tuple(dtypes)
