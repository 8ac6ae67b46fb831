"""Shared fixtures of the benchmark suites, and the post-processing that turns
pytest-benchmark's JSON into ratios against eager measured in the same run.

Every benchmark records in extra_info: `group` (what is compared), `provider`,
`images` per call, and a memory figure `memory_bytes_per_image` with its
`memory_kind` ("saved" = exact bytes autograd keeps, on the CPU; "peak" =
torch.cuda.max_memory_allocated above the parameters and optimizer state, or
for a step replayed from a CUDA graph the private pool its capture made);
the launch suite records op counts (`fwd_bwd_ops`, `step_ops`) instead.
"""
import datetime
import platform

import pytest
import torch

import fused_preact
from fused_preact.memory import saved_activation_bytes
from providers import sizes_for


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZES = sizes_for(DEVICE.type)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_per_image(device, model, run, batch: int) -> tuple[str, float]:
    """(kind, bytes per image) of one call of `run` (a forward, or a whole step)."""
    if device.type == "cpu":
        return "saved", saved_activation_bytes(run, model) / batch
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    out = run()
    if out is not None and out.requires_grad:
        out.sum().backward()
    del out
    synchronize(device)
    return "peak", (torch.cuda.max_memory_allocated(device) - baseline) / batch


def graph_pool_bytes(device) -> int:
    """Bytes the caching allocator holds in CUDA-graph private memory pools
    on `device`: its segments outside the default pool (id (0, 0))."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return sum(seg["total_size"] for seg in torch.cuda.memory_snapshot()
               if seg["device"] == index and tuple(seg["segment_pool_id"]) != (0, 0))


def record(benchmark, group: str, provider: str, images: int, memory: tuple[str, float] | None, **extra):
    """memory=None for records without a memory figure (the launch counts)."""
    benchmark.extra_info.update(group=group, provider=provider, images=images, **extra)
    if memory is not None:
        benchmark.extra_info.update(memory_kind=memory[0], memory_bytes_per_image=memory[1])


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def _peak_bandwidth():
    """The card's DRAM bandwidth in bytes/s (double data rate x bus width), or None."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties()
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """Drops the benchmarks with no timed round before pytest-benchmark's own
    sessionfinish writes the JSON. It registers a benchmark before its warm-up,
    and its JSON writer fails on one with no times (min() of nothing), writing
    no file at all: a run stopped during a benchmark's warm-up (gpu_check.sh
    stops a step with SIGINT at its time limit; a cold first step is all
    warm-up) would lose every finished benchmark with it."""
    benchmarks = getattr(session.config, "_benchmarksession", None)
    if benchmarks is not None:
        benchmarks.benchmarks[:] = [b for b in benchmarks.benchmarks if b]  # a benchmark is falsy without times
    yield


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Ratios to eager of the same group and run, and the software versions."""
    # A benchmark that failed after timing has no record(); leave it as it is.
    rows = [r for r in output_json["benchmarks"] if "group" in r["extra_info"]]
    eager = {r["extra_info"]["group"]: r for r in rows if r["extra_info"]["provider"] == "eager"}
    peak = _peak_bandwidth()
    for r in rows:
        info, base = r["extra_info"], eager.get(r["extra_info"]["group"])
        info["images_per_s"] = info["images"] / r["stats"]["median"]
        if "ideal_bytes" in info:
            info["bytes_per_s"] = info["ideal_bytes"] / r["stats"]["median"]
            if peak:
                info["bandwidth_fraction"] = info["bytes_per_s"] / peak
        if base is not None:
            info["time_ratio_to_eager"] = r["stats"]["median"] / base["stats"]["median"]
            # Memory figures, and the launch suite's op counts, against eager's.
            for key, ratio in (("memory_bytes_per_image", "memory_ratio_to_eager"),
                               ("fwd_bwd_ops", "fwd_bwd_ops_ratio_to_eager"), ("step_ops", "step_ops_ratio_to_eager")):
                if key in info and base["extra_info"].get(key):
                    info[ratio] = info[key] / base["extra_info"][key]
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    output_json["fused_preact"] = {
        "device": torch.cuda.get_device_name() if cuda else _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None, "triton": triton_version,
        "python": platform.python_version(), "version": fused_preact.__version__,
        "peak_bandwidth_bytes_per_s": _peak_bandwidth(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def time_training_step(benchmark, model, forward, size: int, batch: int, classes: int, group: str, provider: str,
                       rounds: int, warmup_rounds: int) -> None:
    """Time an SGD step of `model` (run by `forward`) on a random batch of
    size x size images, and record it with its memory per image."""
    from providers import sgd

    gen = torch.Generator(device=DEVICE).manual_seed(1)
    x = torch.randn(batch, 3, size, size, device=DEVICE, generator=gen).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device=DEVICE, generator=gen)
    opt = sgd(model)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(forward(x), y).backward()
        opt.step()
        synchronize(DEVICE)

    benchmark.pedantic(step, rounds=rounds, warmup_rounds=warmup_rounds)
    record(benchmark, group, provider, batch, memory_per_image(DEVICE, model, lambda: forward(x), batch))
