"""Ahead-of-time compile of every Triton kernel a training step launches, for a
GPU architecture, on a machine without a GPU:

    python -m fused_preact.aot --arch 90 --out benchmarks/results/triton_sm90.md

It drives the Triton backend's own forward, backward and statistics launchers
through the layers of the paper's CIFAR bottleneck nets (ResNet-164 and -1001
share their shapes) at batch 128, in fp32 (TF32 and IEEE), fp16 and bf16, with
and without the residual and statistics epilogues (and once more at batch 1,
where the conv merges its input's statistics itself and reads its weights in
place), on CPU tensors that are
never read: every launch compiles for the target instead of running, and every
autotune config that the kernel's pruner keeps for that shape is compiled.
What the interpreter cannot show comes out here: compile errors, shared memory
beyond the target's limit (an error), and per kernel and config the registers,
local memory (spills), and whether tensor-core instructions were emitted.
"""
import argparse
import contextlib
import multiprocessing
import os
import signal
import sys
import tempfile
import time

import torch
import triton

from .aot_layers import BATCH, NETS
from .ops.backends import Conv, get_backend
from .ops.dropout import Dropout
from .triton_kernels import batch_stats, conv_forward
from .triton_kernels.offline import _tool, compiling_for, resource_usage, tensor_cores
from .triton_kernels.pieces import Pieces

# Largest shared memory one block may opt in to (bytes): H100 227 KiB, A100 163 KiB.
SHARED_LIMIT = {90: 232448, 80: 166912}
# (name, dtype, TF32): the argument kinds a training step uses
MODES = [("fp32-tf32", torch.float32, True), ("fp32-ieee", torch.float32, False), ("fp16", torch.float16, False),
         ("bf16", torch.bfloat16, False)]
MODE_NAMES = [name for name, _, _ in MODES]


def loader_of(config: str) -> str:
    """How a launch reads its operand x: as pieces, dropping out (other
    loader code, compiled apart from the same tile's plain one)."""
    return " ".join(part for part in config.split() if part in ("PIECES=True", "DROPOUT=True"))


def tile_of(config: str) -> str:
    """The tile of a launch's config string: its block sizes, warps and stages."""
    return " ".join(part for part in config.split() if part.startswith(("BLOCK", "num_")))


def _drive_step(dtype: torch.dtype, layers, on_layer=lambda name: None) -> None:
    """The Triton backend's statistics, forward and backward launches for
    every layer; on_layer(name) before each layer's launches."""
    backend = get_backend("triton")

    def activation(c_in, batch, size):
        """x [batch, c_in, size, size] channels_last, or Pieces of such tensors for a tuple c_in."""
        parts = [torch.empty(batch, c, size, size, dtype=dtype).contiguous(memory_format=torch.channels_last)
                 for c in (c_in if isinstance(c_in, tuple) else (c_in,))]
        return Pieces(parts) if isinstance(c_in, tuple) else parts[0]

    for name, channels, size, convs, has_residual, *p in layers:
        on_layer(name)
        dropout = Dropout(p[0], torch.zeros(1, dtype=torch.int64)) if p else None
        x = activation(channels, BATCH, size)
        pieces = isinstance(x, Pieces)  # the op hands on no statistics partials for pieces
        c_in = x.shape[1]
        vec = torch.ones(c_in)
        weights = [torch.empty(k_out, c_in, k, k, dtype=dtype).contiguous(memory_format=torch.channels_last)
                   for k_out, k, _, _ in convs]
        specs = [Conv(w, (s, s), (p, p)) for w, (_, _, s, p) in zip(weights, convs)]
        out_size = (size + 2 * convs[0][3] - convs[0][1]) // convs[0][2] + 1
        grads = [torch.empty(BATCH, k_out, out_size, out_size, dtype=dtype)
                 .contiguous(memory_format=torch.channels_last) for k_out, _, _, _ in convs]
        running, counter = [torch.zeros(c_in), torch.ones(c_in)], torch.zeros((), dtype=torch.int64)
        partials = None if pieces else backend.stats_like(x)  # as a conv epilogue hands them on
        # A statistics pass, or the merge of an epilogue's partials.
        for handed_on in (None,) if pieces else (None, partials):
            backend.batch_norm_stats(x, vec, vec, *running, counter, 0.1, 1e-5, handed_on)
        for residual in ([None, grads[0]] if has_residual else [None]):
            for stats_eps in (None, 1e-5):
                backend.forward(x, vec, vec, specs, residual, stats_eps, dropout)
        backend.backward(grads, x, vec, vec, vec, vec, specs, True, [True] * len(specs), True, dropout=dropout)
        # The same layer small enough (batch 1, 32x32: the most partials and rows
        # it is done for) that the conv merges its input's statistics in its
        # loader (LoaderFold) and reads its weights in place; and in place alone.
        small = activation(channels, 1, 32)
        stats, fold = batch_stats.batch_norm_stats(small, vec, vec, *running, counter, 0.1, 1e-5,
                                                   None if pieces else tuple(backend.stats_like(small)), defer=True)
        assert fold is not None, "the small layer is past the loader merge's bounds"
        pads = [(p, p) for _, _, _, p in convs]
        conv_forward.conv_forward(small, stats[2], stats[3], weights, convs[0][2], pads, stats=True, raw_stats=True,
                                  fold=fold, dropout=dropout)
        conv_forward.conv_forward(small, vec, vec, weights, convs[0][2], pads, stats=True, raw_stats=True,
                                  dropout=dropout)


def compile_all(arch: int, items, once: bool = False) -> tuple[list[dict], list[str]]:
    """Compile the launches of `items`, (mode name, layer) pairs, for sm_<arch>:
    (a row per compiled kernel, the errors). With `once`, each kernel's tile
    (tile_of) is compiled once per mode and operand loader (loader_of), where
    first met, and not again for other layers or epilogue flags."""
    rows, errors, seen, tiles = [], [], set(), set()
    layer = [""]
    for mode, dtype, tf32 in MODES:
        layers = [spec for name, spec in items if name == mode]
        if not layers:
            continue
        torch.backends.cudnn.allow_tf32 = tf32  # dot_precision follows PyTorch's convolution setting

        def record(name, config, kernel, seconds, mode=mode):
            if kernel is None or kernel.hash in seen:
                return
            seen.add(kernel.hash)
            usage = resource_usage(kernel.asm["cubin"])
            rows.append({"kernel": name, "mode": mode, "layer": layer[0], "config": config,
                         "shared": kernel.metadata.shared, "regs": usage["REG"], "local": usage["LOCAL"],
                         "stack": usage["STACK"], "tensor_cores": tensor_cores(kernel.asm["ptx"]),
                         "seconds": seconds, "hash": kernel.hash})

        def skip(name, config, mode=mode):
            """With `once`: true for a tile this mode has compiled already."""
            if not once:
                return False
            key = (name, mode, tile_of(config), loader_of(config))
            if key in tiles:
                return True
            tiles.add(key)
            return False

        try:
            with compiling_for(arch, record, skip):
                _drive_step(dtype, layers, on_layer=lambda name: layer.__setitem__(0, name))
        except Exception as err:  # a compile error: report every one, fail at the end
            errors.append(f"{mode}: {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''}")
    over = [r for r in rows if r["shared"] > SHARED_LIMIT[arch]]
    errors += [f"{r['kernel']} {r['mode']} {r['config']}: {r['shared']} bytes of shared memory > the "
               f"{SHARED_LIMIT[arch]} of sm_{arch}" for r in over]
    return rows, errors


def _compile_chunk(job) -> tuple[list[dict], list[str]]:
    """compile_all of one (arch, cache directory, items, once) in a worker process."""
    arch, cache, items, once = job
    os.environ["TRITON_CACHE_DIR"] = cache
    return compile_all(arch, items, once)


def _ignore_interrupts():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the workers


def compile_in_parallel(arch: int, items, jobs: int, cache: str, rows: list, errors: list, once: bool = False) -> None:
    """compile_all spread over `jobs` processes, an item at a time (with
    `once`, a mode at a time), adding to rows and errors as they finish (a
    kernel two items share is listed once). On SIGINT the workers are stopped
    and KeyboardInterrupt raised, rows holding what they finished."""
    chunks = ([[item for item in items if item[0] == mode] for mode in dict.fromkeys(m for m, _ in items)]
              if once else [[item] for item in items])
    seen = {row["hash"] for row in rows}
    pool = multiprocessing.get_context("spawn").Pool(jobs, initializer=_ignore_interrupts)
    try:
        jobs_args = [(arch, cache, chunk, once) for chunk in chunks]
        for part_rows, part_errors in pool.imap_unordered(_compile_chunk, jobs_args):
            errors += part_errors
            rows += [row for row in part_rows if row["hash"] not in seen]
            seen.update(row["hash"] for row in part_rows)
    finally:
        pool.terminate()
        pool.join()


def table(rows: list[dict], arch: int, seconds: float, nets=("bottleneck",), jobs: int = 1, modes=None,
          once: bool = False) -> str:
    command = " ".join([f"python -m fused_preact.aot --arch {arch}",
                        *([f"--nets {' '.join(nets)}"] if list(nets) != ["bottleneck"] else []),
                        *([f"--modes {' '.join(modes)}"] if modes and list(modes) != MODE_NAMES else []),
                        *(["--once"] if once else []),
                        *([f"--jobs {jobs}"] if jobs > 1 else [])])
    scope = ("each kernel's tiles, once per mode, where first met" if once
             else "every autotune config its pruner keeps there")
    lines = [f"# Triton kernels compiled ahead of time for sm_{arch}",
             "",
             f"Generated by `{command}` (triton {triton.__version__}, torch {torch.__version__}) in {seconds:.0f} "
             f"s: every kernel a training step of the paper's CIFAR {' and '.join(nets)} nets launches at batch "
             f"{BATCH}, {scope}. Shared memory limit {SHARED_LIMIT[arch]} "
             f"bytes; LOCAL > 0 means register spills. Compile seconds: one kernel's cold compile on this machine "
             f"({jobs} at a time), what a GPU's first autotuning of a shape pays per config.",
             "",
             "| kernel | mode | layer | config | shared bytes | registers | local bytes | tensor cores | compile s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["kernel"], r["mode"], r["config"], r["layer"])):
        lines.append(f"| {r['kernel']} | {r['mode']} | {r['layer']} | {r['config']} | {r['shared']} | {r['regs']} | "
                     f"{r['local']} | {r['tensor_cores']} | {r['seconds']:.2f} |")
    lines += ["", "Cold compile seconds per layer (kernels compiled first for it, every config kept) and mode:", "",
              "| layer | " + " | ".join(m for m, _, _ in MODES) + " |", "|---|" + "---|" * len(MODES)]
    for layer in dict.fromkeys(r["layer"] for r in rows):
        cost = [sum(r["seconds"] for r in rows if r["layer"] == layer and r["mode"] == m) for m, _, _ in MODES]
        count = [sum(1 for r in rows if r["layer"] == layer and r["mode"] == m) for m, _, _ in MODES]
        lines.append(f"| {layer} | " + " | ".join(f"{c:.0f} ({n})" for c, n in zip(cost, count)) + " |")
    spills = sum(1 for r in rows if r["local"])
    at_max = sum(1 for r in rows if r["regs"] is not None and r["regs"] >= 255)
    total = sum(r["seconds"] for r in rows)
    lines += ["", f"{len(rows)} compiled kernels; {spills} with local memory (spills); {at_max} at 255 registers; "
              f"compile {total:.0f} s in all, {total / max(len(rows), 1):.2f} s per kernel."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused_preact.aot",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, choices=sorted(SHARED_LIMIT), required=True, help="90 (H100) or 80 (A100)")
    parser.add_argument("--out", help="write the markdown table here")
    parser.add_argument("--nets", nargs="+", choices=sorted(NETS), default=["bottleneck"],
                        help="whose layers to compile (default: bottleneck)")
    parser.add_argument("--modes", nargs="+", choices=MODE_NAMES, default=MODE_NAMES,
                        help="which dtypes/precisions to compile (default: all)")
    parser.add_argument("--once", action="store_true",
                        help="compile each kernel's tile once per mode, where first met (a quick check that "
                             "every config compiles, not every specialization)")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes (default 1)")
    parser.add_argument("--cache", help="compile into this Triton cache directory, kept for the kernels' later "
                                        "runs on this machine (default: a fresh one, removed after)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("TRITON_INTERPRET is set: the kernels would be interpreted, not compiled; unset it")
    if _tool("cuobjdump") is None:
        parser.error("cuobjdump not found (it ships with triton's NVIDIA backend)")
    items = [(mode, layer) for mode in args.modes for net in args.nets for layer in NETS[net]()]
    start = time.perf_counter()
    # By default an empty cache of its own: every compile is cold (its time is
    # the table's compile cost), and nothing of another architecture's run is
    # reused. A GPU machine compiles into the cache its runs read (--cache):
    # they then find the kernels of the paper's layers compiled.
    with contextlib.ExitStack() as stack:
        cache = args.cache or stack.enter_context(tempfile.TemporaryDirectory())
        os.makedirs(cache, exist_ok=True)
        os.environ["TRITON_CACHE_DIR"] = cache
        rows, errors, interrupted = [], [], False
        try:
            if args.jobs == 1:
                rows, errors = compile_all(args.arch, items, args.once)
            else:
                compile_in_parallel(args.arch, items, args.jobs, cache, rows, errors, args.once)
        except KeyboardInterrupt:  # a time limit: the table of what was compiled, exit 130
            interrupted = True
    text = table(rows, args.arch, time.perf_counter() - start, args.nets, args.jobs, args.modes, args.once)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text.splitlines()[-1])
    for err in errors:
        print(f"error: {err}", file=sys.stderr)
    if interrupted:
        print("interrupted: the table lists the kernels compiled before", file=sys.stderr)
        return 130
    return 1 if errors or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
