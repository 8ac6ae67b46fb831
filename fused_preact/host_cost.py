"""Host cost of a training step at any size, measured without a GPU: the ATen
ops and Triton launches a forward + backward step issues, and the host time
it takes with no kernel run.

On an H100, pre-activation ResNets at CIFAR sizes are bound by what the host
spends per kernel, so these are the numbers that decide whether the Triton
path can win there:

    python -m fused_preact.host_cost --depth 164 1001 --batch 128

How nothing runs:
- Triton: every launch goes through the real launchers, triton's autotuner
  and its binder (JITFunction.run: argument specialisation, the cache key),
  with the GPU's sizes and configs (tuning.GPU), and is cut where the
  compiled kernel would be called: a `_CutKernel` stands in for triton's
  CompiledKernel and records the launch (kernel, grid, config) instead.
  Its tensors are on the meta device (shapes only), so the few ATen ops of
  the Triton path cost their dispatch and no compute; but meta runs some of
  them (empty_like, cat, add) as Python reference kernels, far slower than
  a CUDA op's C++ host side, so the time spent inside ATen ops is also
  measured (a dispatch mode timing each op) and shown beside the total.
- eager nn and native: their ATen ops on meta tensors run PyTorch's Python
  meta kernels (a BatchNorm decomposes into dozens of prims), far slower than
  the C++ host side of a CUDA op, and some torch releases add copies there
  that no device runs (torch 2.11: one per residual unit). So they run on
  CPU tensors: counted at batch 2 and the full image size (the batch changes
  none of their ops), and timed at batch 2, 4x4 (`host_shape`), where the
  CPU kernels are tiny. Their host work per layer does not depend on the
  size; the head's pooling has 3 ops fewer in its backward on a 1x1 map.

Every config's steps are timed in turns (a round of one step each, repeated),
so that a machine that slows down part way slows them all alike, and each
config's fastest step is kept: a step's host work is the same every time, and
what a shared machine adds (other processes, a slower clock) only adds time.

Left out on every side: the driver's own launch call (cudaLaunchKernel /
cuLaunchKernel, a few µs each and the same per launch on both sides: it is
what the launch count measures) and the caching allocator.
"""
import contextlib
import functools
import os
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from .dispatch_count import DispatchCounter


class Launch(tuple):
    """(kernel name, grid (x, y, z), config: constexprs and num_warps/num_stages
    as a sorted tuple of pairs, the _CutKernel of its specialisation)."""

    __slots__ = ()

    kernel = property(lambda self: self[0])
    grid = property(lambda self: self[1])
    config = property(lambda self: self[2])
    specialisation = property(lambda self: self[3])

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


class _CutKernel:
    """Stands in for the CompiledKernel of one specialisation: JITFunction.run
    calls `run` with the grid where the real one would launch the cubin.
    `source` and `options` are what triton.compile was given, kept so that
    the occupancy table can compile exactly this specialisation."""

    function = None
    packed_metadata = None

    def __init__(self, source, options: dict, log: list):
        self.name = source.name
        self.source, self.options, self.log = source, options, log
        names = source.fn.arg_names
        constants = {names[path[0]]: value for path, value in source.constants.items() if len(path) == 1}
        constants.update(num_warps=options.get("num_warps"), num_stages=options.get("num_stages"))
        self.config = tuple(sorted((k, v) for k, v in constants.items() if isinstance(v, (int, bool, str))))

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, grid_0, grid_1, grid_2, stream, function, packed_metadata, launch_metadata, enter_hook, exit_hook,
            *args):
        self.log.append(Launch((self.name, (grid_0, grid_1, grid_2), self.config, self)))


@contextlib.contextmanager
def cut_launches(arch: int = 90):
    """Inside, every Triton launch runs the host code up to the compiled
    kernel and appends a `Launch` to the yielded list instead of running;
    the launchers take meta (and CPU) tensors as if they were on a GPU of
    sm_<arch>. Needs triton's real JIT: TRITON_INTERPRET unset or 0 before
    triton is imported (the interpreter has no compiled kernel to cut at)."""
    from . import triton_kernels

    if triton_kernels.interpreting():
        raise RuntimeError("host_cost cuts Triton launches at the compiled kernel, which the interpreter has none "
                           "of: run it with TRITON_INTERPRET unset or 0")
    import triton.compiler
    from triton.runtime import driver

    from .triton_kernels.offline import OfflineDriver

    log: list = []
    saved_driver, saved_compile = driver._active, triton.compiler.compile  # not .active: that needs a GPU
    jit_functions = _jit_functions()
    saved_caches = [(fn, fn.device_caches) for fn in jit_functions]

    def compile(source, target=None, options=None, **kwargs):
        return _CutKernel(source, dict(options or {}), log)

    driver.set_active(OfflineDriver(arch))
    triton.compiler.compile = compile  # JITFunction.create_binder imports it from there
    added = {"meta", "cpu"} - triton_kernels.HOST_ONLY_DEVICES
    triton_kernels.HOST_ONLY_DEVICES.update(added)
    for fn in jit_functions:  # fresh binders, made with this driver's target and compile
        fn.device_caches = type(fn.device_caches)(fn.create_binder)
    try:
        yield log
    finally:
        driver._active = saved_driver
        triton.compiler.compile = saved_compile
        triton_kernels.HOST_ONLY_DEVICES.difference_update(added)
        for fn, caches in saved_caches:
            fn.device_caches = caches


def _jit_functions() -> list:
    """Every @triton.jit function of the package's kernel modules."""
    from triton.runtime.jit import JITFunction

    from .ops.triton_backend import _kernels

    package = _kernels()
    modules = [getattr(package, name) for name in ("batch_stats", "bn_relu_backward", "common", "conv_dgrad",
                                                   "conv_forward", "conv_wgrad", "partial_stats", "row_sums")]
    return [v for m in modules for v in vars(m).values() if isinstance(v, JITFunction)]


def training_step(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    """A forward + cross-entropy backward of `model` (no optimizer: its
    foreach update is a handful of launches whatever the net)."""
    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), labels).backward()
    return step


def _inputs(batch: int, size: int, device: str, classes: int = 10):
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, classes, (batch,), device=device)


class _AtenClock(TorchDispatchMode):
    """The seconds a step spends inside its ATen ops (each op's own call,
    not this mode's work around it)."""

    def __init__(self):
        super().__init__()
        self.seconds = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.seconds += time.perf_counter() - start
        return out


def _aten_seconds(step: Callable[[], None]) -> float:
    """The seconds one run of `step` spends inside its ATen ops."""
    with _AtenClock() as clock:
        step()
    return clock.seconds


class _Prepared:
    """One config's step, warmed up (autotuning, compiles) and counted."""

    def __init__(self, make_model, batch: int, size: int, device: str, log: list):
        torch.manual_seed(0)
        model = make_model().to(device=device, memory_format=torch.channels_last)
        self.step, self.device = training_step(model, *_inputs(batch, size, device)), device
        self.step()
        del log[:]
        with DispatchCounter() as self.counter:
            self.step()
        self.launches = list(log)
        self.times: list = []
        self.aten_times: list = []


def measure_all(specs: list, repeats: int = 5, cut: bool = False, arch: int = 90) -> list[dict]:
    """Counts and host time per step of each spec (make_model, batch, size,
    device): make_model() (on the CPU) moved to `device`, channels_last, a
    batch of `batch` size x size images. With `cut`, all run inside
    cut_launches(arch) (Triton launches recorded in "launches"). The first
    step warms caches and is not measured; then the specs' steps are timed
    in turns, `repeats` rounds (so a machine that slows down slows them
    all), the fastest kept, and so is the time in ATen ops of a meta
    spec's clocked step in each round; repeats=0 counts without timing."""
    with cut_launches(arch) if cut else contextlib.nullcontext([]) as log:
        prepared = [_Prepared(*spec, log) for spec in specs]
        for _ in range(repeats):
            for p in prepared:
                start = time.perf_counter()
                p.step()
                p.times.append(time.perf_counter() - start)
                if p.device == "meta":  # and a step of its own for the time in ATen ops (the clock adds to the total)
                    p.aten_times.append(_aten_seconds(p.step))
        results = []
        for p in prepared:
            aten_us = min(p.aten_times) * 1e6 if p.aten_times else None
            results.append({"aten_ops": sum(p.counter.ops.values()), "triton_launches": len(p.launches),
                            "syncs": len(p.counter.syncs),
                            "host_us": min(p.times) * 1e6 if p.times else None, "aten_us": aten_us,
                            "launches": p.launches, "ops": p.counter.ops})
    return results


def measure(make_model: Callable[[], torch.nn.Module], batch: int, size: int, device: str, repeats: int = 5,
            cut: bool = False, arch: int = 90) -> dict:
    """measure_all of one config."""
    return measure_all([(make_model, batch, size, device)], repeats, cut, arch)[0]


# config: (ops + launches, host time) per step as a fraction of eager nn's, at most.
TARGETS = {"triton bn_relu": (0.75, 1.0), "native bn_relu": (0.9, 0.9)}


# (label, model options) of the configs a table compares; eager nn first: the baseline.
def configs(backends, modes) -> list[tuple[str, dict]]:
    return [("eager nn", dict(fused=False))] + [(f"{b} {m}", dict(backend=b, recompute=m))
                                                for b in backends for m in modes]


def table(depth: int, batch: int, size: int, backends=("native", "triton"), modes=("bn_relu", "unit", "segment"),
          host_shape=(2, 4), repeats: int = 5) -> list[dict]:
    """A row per config of PreActResNet-`depth`: counts at batch x size^2, and
    host time per step (see the module docstring for where each is taken),
    every config's steps timed in turns."""
    from .models import PreActResNet

    specs, counted_only = [], []
    for label, options in configs(backends, modes):
        make = functools.partial(PreActResNet, depth, **options)
        specs.append((make, *host_shape, "cpu"))
        # Triton's launches depend on the batch and size (reduction levels,
        # splits): counted and timed at `batch` x `size`. The others: see the
        # module docstring.
        if options.get("backend") == "triton":
            specs.append((make, batch, size, "meta"))
        else:
            counted_only.append((make, host_shape[0], size, "cpu"))
    timed = iter(measure_all(specs, repeats, cut="triton" in backends))
    counts = iter(measure_all(counted_only, 0))
    rows = []
    for label, options in configs(backends, modes):
        small = next(timed)
        if options.get("backend") == "triton":
            counted = full = next(timed)
        else:
            counted, full = next(counts), small
        rows.append({"config": label, "aten_ops": counted["aten_ops"], "triton_launches": counted["triton_launches"],
                     "total": counted["aten_ops"] + counted["triton_launches"], "syncs": counted["syncs"],
                     "host_us": full["host_us"], "aten_us": full["aten_us"],
                     "small_total": small["aten_ops"] + small["triton_launches"], "small_host_us": small["host_us"],
                     "launches": counted["launches"]})
    base = rows[0]
    for r in rows:
        r["x_eager_total"] = r["total"] / base["total"]
        r["x_eager_host"] = r["host_us"] / base["host_us"]
    return rows


def markdown(rows: list[dict], depth: int, batch: int, size: int, host_shape) -> str:
    b, s = host_shape
    lines = [f"PreActResNet-{depth}, forward + backward at batch {batch}, {size}x{size}, channels_last, fp32 "
             f"(eager and native on the CPU: counted at batch {b}, {size}x{size}, timed at {b}x{s}x{s}; Triton "
             f"counted and timed at the full size on meta tensors, launches cut at the compiled kernel):",
             "",
             f"| config | ATen ops | Triton launches | total | x eager | syncs | host ms/step | x eager | "
             f"of which in ATen ops on meta, ms | total at {b}x{s}x{s} | host ms at {b}x{s}x{s} (CPU) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        aten = "" if r["aten_us"] is None else f"{r['aten_us'] / 1e3:.1f}"
        lines.append(f"| {r['config']} | {r['aten_ops']} | {r['triton_launches']} | {r['total']} | "
                     f"{r['x_eager_total']:.2f} | {r['syncs']} | {r['host_us'] / 1e3:.1f} | "
                     f"{r['x_eager_host']:.2f} | {aten} | {r['small_total']} | {r['small_host_us'] / 1e3:.1f} |")
    by_config = {r["config"]: r for r in rows}
    base_us = rows[0]["host_us"]
    lines.append("")
    for config, (total, host) in TARGETS.items():
        if config in by_config:
            r = by_config[config]
            verdict = lambda ratio, target: "met" if ratio <= target else "missed"  # noqa: E731
            without = ("" if r["aten_us"] is None else
                       f"; {(r['host_us'] - r['aten_us']) / base_us:.2f}x less the time in ATen ops on meta")
            lines.append(f"- {config}: ops + launches {r['x_eager_total']:.2f}x eager (target <= {total}: "
                         f"{verdict(r['x_eager_total'], total)}), host time {r['x_eager_host']:.2f}x (target <= "
                         f"{host}: {verdict(r['x_eager_host'], host)}{without})")
    return "\n".join(lines)


def write_tables(module: str, argv, tables: list[str], out) -> None:
    """`tables` (markdown) to the file `out` (if given), after a line naming
    the command and the versions they were made with."""
    import platform

    import triton

    if not out:
        return
    command = f"python -m fused_preact.{module} " + " ".join(argv if argv is not None else sys.argv[1:])
    head = (f"Generated by `{command}` (torch {torch.__version__}, triton {triton.__version__}, Python "
            f"{platform.python_version()}, on the CPU: no kernel runs).")
    with open(out, "w") as f:
        f.write("\n\n".join([head, *tables]) + "\n")


def main(argv=None) -> int:
    from .train.config import OneLineParser

    parser = OneLineParser(prog="python -m fused_preact.host_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, nargs="+", default=[164])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--backends", nargs="+", default=["native", "triton"])
    parser.add_argument("--modes", nargs="+", default=["bn_relu", "unit", "segment"])
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per config (the fastest is shown)")
    parser.add_argument("--out", help="also write the tables (markdown) to this file")
    args = parser.parse_args(argv)
    if "triton" in args.backends and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("Triton launches are cut at the compiled kernel, which the interpreter has none of: unset "
                     "TRITON_INTERPRET")
    torch.set_num_threads(1)  # one host thread issues a GPU's launches
    tables = []
    for depth in args.depth:
        rows = table(depth, args.batch, args.size, args.backends, args.modes, repeats=args.repeats)
        tables.append(markdown(rows, depth, args.batch, args.size, (2, 4)))
        print(tables[-1] + "\n", flush=True)
    write_tables("host_cost", argv, tables, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
