"""Occupancy of every Triton launch of a training step, computed without a GPU:

    python -m fused_preact.occupancy --depth 164 1001 --arch 90 80

Each launch comes from fused_preact.host_cost (a step at the paper's size run
with its launches cut at the compiled kernel: kernel, grid, config). Each
distinct specialisation is then compiled for the GPU, which gives its
registers per thread (cuobjdump) and shared memory per program. From those,
the programs one SM holds at once (CTAs per SM: limited by registers,
shared memory, warps and the 32-CTA cap), and the launch's waves: programs
/ (SMs x CTAs per SM). A launch under one wave leaves SMs idle; one of a
fraction over a whole number of waves leaves a tail. Programs per SM shows
the worse case: under PROGRAMS_PER_SM (2), SMs sit idle or run a single
program whose loads nothing overlaps, which the tile choices avoid where
the shape allows (triton_kernels.common.filling_first).
"""
import collections
import contextlib
import math

import torch

from .triton_kernels.common import PROGRAMS_PER_SM

# Per SM: registers, warps, CTAs, shared memory (bytes; 1 KiB more is reserved per CTA), and SMs per card.
GPUS = {
    90: dict(name="H100/H200 (sm_90)", sms=132, regs=65536, warps=64, ctas=32, shared=233472),
    80: dict(name="A100 (sm_80)", sms=108, regs=65536, warps=64, ctas=32, shared=167936),
}
_RESERVED_SHARED = 1024


def ctas_per_sm(arch: int, regs: int, shared: int, num_warps: int) -> tuple[int, str]:
    """(programs resident per SM, what limits them) for a kernel of `regs`
    registers per thread, `shared` bytes of shared memory and `num_warps`."""
    gpu = GPUS[arch]
    # Registers are allocated per warp, per thread rounded up to a multiple of 8.
    per_warp = 32 * 8 * math.ceil(max(regs, 1) / 8)
    limits = {"CTA cap": gpu["ctas"], "warps": gpu["warps"] // num_warps,
              "registers": (gpu["regs"] // per_warp) // num_warps,
              "shared memory": gpu["shared"] // (shared + _RESERVED_SHARED)}
    limit = min(limits, key=limits.get)
    return limits[limit], limit


def launches_of_step(depth: int, batch: int, size: int, arch: int, mode: str = "bn_relu") -> list:
    """Every Triton launch (host_cost.Launch) of a training step of
    PreActResNet-`depth`, specialised for sm_<arch>."""
    from .host_cost import measure
    from .models import PreActResNet

    return measure(lambda: PreActResNet(depth, backend="triton", recompute=mode), batch, size, "meta", repeats=0,
                   cut=True, arch=arch)["launches"]


def resources(specialisation, arch: int) -> tuple[int, int]:
    """(registers per thread, shared bytes) of a cut launch's specialisation, compiled for sm_<arch>."""
    import triton.compiler
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    from .triton_kernels.offline import OfflineDriver, resource_usage

    saved = driver._active
    driver.set_active(OfflineDriver(arch))
    try:
        kernel = triton.compiler.compile(specialisation.source, target=GPUTarget("cuda", arch, 32),
                                         options=specialisation.options)
    finally:
        driver._active = saved
    return resource_usage(kernel.asm["cubin"])["REG"], kernel.metadata.shared


def table(launch_lists: dict, arch: int) -> list[dict]:
    """A row per distinct (kernel, grid, config) among `launch_lists` ({net: [Launch]}),
    with its launches per step in each net and its occupancy on sm_<arch>."""
    gpu = GPUS[arch]
    counts = {net: collections.Counter(launch[:3] for launch in launches) for net, launches in launch_lists.items()}
    first = {}
    for launches in launch_lists.values():
        for launch in launches:
            first.setdefault(launch[:3], launch)
    compiled = {}
    rows = []
    for key, launch in first.items():
        config = dict(launch.config)
        spec = launch.specialisation
        if spec.source not in compiled:
            compiled[spec.source] = resources(spec, arch)
        regs, shared = compiled[spec.source]
        per_sm, limit = ctas_per_sm(arch, regs, shared, config["num_warps"])
        programs = launch.programs
        waves = programs / (gpu["sms"] * per_sm)
        rows.append({"kernel": launch.kernel, "grid": launch.grid, "programs": programs,
                     "tile": " ".join(f"{k}={v}" for k, v in sorted(config.items())
                                      if k.startswith("BLOCK") or k in ("num_warps", "num_stages")),
                     "regs": regs, "shared": shared, "ctas_per_sm": per_sm, "limit": limit, "waves": waves,
                     "per_step": {net: c[key] for net, c in counts.items()}})
    rows.sort(key=lambda r: (r["kernel"], r["programs"]))
    return rows


def markdown(rows: list[dict], arch: int, batch: int, size: int) -> str:
    gpu = GPUS[arch]
    nets = list(rows[0]["per_step"]) if rows else []
    lines = [f"{gpu['name']}, {gpu['sms']} SMs: every Triton launch of a training step at batch {batch}, "
             f"{size}x{size}, fp32 (TF32), recompute='bn_relu'.", "",
             "| kernel | grid | programs | programs/SM | tile | registers | shared bytes | CTAs/SM (limit) | waves | "
             + " | ".join(f"per step, {n}" for n in nets) + " |",
             "|---|---|---|---|---|---|---|---|---|" + "---|" * len(nets)]
    for r in rows:
        lines.append(f"| {r['kernel']} | {'x'.join(map(str, r['grid']))} | {r['programs']} | "
                     f"{r['programs'] / gpu['sms']:.1f} | {r['tile']} | {r['regs']} | {r['shared']} | "
                     f"{r['ctas_per_sm']} ({r['limit']}) | {r['waves']:.2f} | "
                     + " | ".join(str(r["per_step"][n]) for n in nets) + " |")
    few = PROGRAMS_PER_SM * gpu["sms"]
    for net in nets:
        launched = [(r["per_step"][net], r) for r in rows if r["per_step"][net]]
        total = sum(n for n, _ in launched)
        under = sum(n for n, r in launched if r["waves"] < 1)
        sparse = [(n, r) for n, r in launched if r["programs"] < few]
        by_kernel = collections.Counter()
        for n, r in sparse:
            by_kernel[r["kernel"]] += n
        lines.append(f"\n{net}: {total} launches per step, {under} of them ({under / max(total, 1):.0%}) "
                     f"under one wave; {sum(by_kernel.values())} under {PROGRAMS_PER_SM} programs per SM ("
                     + (", ".join(f"{k} {n}" for k, n in sorted(by_kernel.items())) or "none") + ").")
    return "\n".join(lines)


def main(argv=None) -> int:
    from .host_cost import write_tables
    from .train.config import OneLineParser

    parser = OneLineParser(prog="python -m fused_preact.occupancy", description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, nargs="+", default=[164, 1001])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(GPUS))
    parser.add_argument("--out", help="also write the tables (markdown) to this file")
    args = parser.parse_args(argv)
    torch.backends.cudnn.allow_tf32 = True  # fp32 as a GPU runs it by default: TF32 tensor cores
    tables = []
    for arch in args.arch:
        launch_lists = {f"ResNet-{d}": launches_of_step(d, args.batch, args.size, arch) for d in args.depth}
        tables.append(markdown(table(launch_lists, arch), arch, args.batch, args.size))
        with contextlib.suppress(BrokenPipeError):
            print(tables[-1] + "\n", flush=True)
    write_tables("occupancy", argv, tables, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
