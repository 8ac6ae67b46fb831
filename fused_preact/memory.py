"""Exact accounting of what autograd keeps for backward, shared by tests and
benchmarks; `python -m fused_preact.memory` prints the per-image table.

`saved_activation_bytes` runs a forward pass under saved_tensors_hooks and sums
the sizes of the distinct storages that autograd saved, leaving out the
model's own parameters and buffers (they are in memory anyway and do not grow
with the batch). Views of one storage count once, as they cost memory once.
The table splits what is kept per image (activations) from what is kept per
step whatever the batch (per-channel statistics).
"""
import time
from typing import Callable

import torch
from torch import nn

from .models import RECOMPUTE_MODES, PreActResNet
from .train.config import OneLineParser, int_argument

MiB = 2**20


def saved_activation_bytes(forward: Callable[[], torch.Tensor], model: nn.Module) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps after forward()."""
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out  # the graph (and what it saved) is freed here
    return sum(kept.values())


# (fused, recompute) of each configuration compared, the plain eager model first.
CONFIGS = {"eager": (False, "none"), **{m: (True, m) for m in RECOMPUTE_MODES if m != "none"}}


def per_image_table(depths, batch: int = 2, size: int = 32, dtype=torch.float32) -> list[dict]:
    """Saved bytes of every configuration, split into what grows with the
    batch (per image: the activations) and what does not (per step: the
    per-channel statistics every layer keeps), from a forward at `batch` and
    one at twice that; and the per-image ratio to eager."""
    rows = []
    for depth in depths:
        base = None
        for name, (fused, mode) in CONFIGS.items():
            torch.manual_seed(0)
            model = PreActResNet(depth, fused=fused, recompute=mode).to(dtype).train()
            kept = []
            for n in (batch, 2 * batch):
                x = torch.randn(n, 3, size, size, dtype=dtype)
                kept.append(saved_activation_bytes(lambda: model(x), model))
            per_image = (kept[1] - kept[0]) / batch
            base = per_image if base is None else base
            rows.append({"depth": depth, "config": name, "mib_per_image": per_image / MiB,
                         "mib_per_step": (kept[0] - batch * per_image) / MiB, "ratio_to_eager": per_image / base})
    return rows


_depth = int_argument(lambda d: d >= 8 and ((d - 2) % 6 == 0 or (d - 2) % 9 == 0),
                      "a CIFAR pre-activation ResNet depth, 6n+2 (basic units) or 9n+2 (bottleneck units) with n >= 1")
_batch = int_argument(lambda b: b >= 2, "an integer >= 2 (BatchNorm needs two images)")


def main(argv=None):
    parser = OneLineParser(prog="python -m fused_preact.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=_depth, nargs="+", default=[110, 164, 1001])
    parser.add_argument("--batch", type=_batch, default=2)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = per_image_table(args.depths, args.batch)
    print(f"Saved for backward, fp32, 32x32 CIFAR input (batches {args.batch} and {2 * args.batch}, measured on "
          f"the CPU):")
    print(f"{'depth':>6} {'config':>8} {'MiB/image':>10} {'x eager':>8} {'MiB/step':>9} {'GiB @ batch 128':>16}")
    for r in rows:
        print(f"{r['depth']:>6} {r['config']:>8} {r['mib_per_image']:>10.2f} {r['ratio_to_eager']:>8.3f} "
              f"{r['mib_per_step']:>9.2f} {(r['mib_per_image'] * 128 + r['mib_per_step']) / 1024:>16.2f}")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
