"""Host work per training step, counted on the CPU: the kernel-launching ATen
ops a step dispatches (views, empties and metadata left out) and the Triton
launches, plus any host synchronisation among them.

On a GPU, eager ResNet-1001 is bound by launches, so this count is the proxy
for the host time a step costs there:

    with DispatchCounter() as counter:
        step()
    counter.total, counter.ops.most_common(5), counter.syncs

    python -m fused_preact.dispatch_count     # the table: eager nn vs each backend and recompute mode

Triton launches are counted in the interpreter (TRITON_INTERPRET=1), whose
own argument copies to and from the host are not counted as ATen ops.
"""
import collections
import contextlib
import os

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

# Ops that launch no kernel: views, allocation, metadata.
_FREE = {
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::view", "aten::_unsafe_view", "aten::reshape",
    "aten::as_strided", "aten::t", "aten::transpose", "aten::permute", "aten::expand", "aten::slice", "aten::select",
    "aten::unsqueeze", "aten::squeeze", "aten::alias", "aten::detach", "aten::lift_fresh", "aten::unbind",
    "aten::split", "aten::split_with_sizes", "aten::chunk", "aten::_reshape_alias", "aten::new_empty",
    "aten::new_empty_strided", "aten::set_", "aten::resize_", "aten::is_same_size", "aten::sym_size",
    "aten::sym_stride", "aten::sym_numel", "aten::sym_storage_offset", "aten::contiguous", "aten::_to_copy_noop",
}
# Ops that make the host wait for the device (on a GPU).
SYNCS = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::is_nonzero", "aten::equal",
         "aten::allclose"}


class DispatchCounter(TorchDispatchMode):
    """Counts kernel-launching ATen ops (`ops`, a Counter) and Triton launches
    (`triton`), and records host synchronisations (`syncs`) and device-to-host
    copies among them."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.triton: collections.Counter = collections.Counter()
        self.syncs: list[str] = []
        self._patched = None

    @property
    def total(self) -> int:
        return sum(self.ops.values()) + sum(self.triton.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in SYNCS:
            self.syncs.append(name)
        elif name in ("aten::_to_copy", "aten::copy_") and _device_to_host(func, args, kwargs):
            self.syncs.append(f"{name} (device to host)")
        if name not in _FREE and not name.startswith("aten::sym_"):
            self.ops[name.replace("aten::", "").replace("fused_preact::", "fused_preact.")] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        self._patch_triton()
        return super().__enter__()

    def __exit__(self, *exc):
        self._unpatch_triton()
        return super().__exit__(*exc)

    def _patch_triton(self):
        try:
            from triton.runtime.interpreter import InterpretedFunction
        except ImportError:
            return
        original = InterpretedFunction.run
        counter = self

        def run(fn, *args, **kwargs):
            counter.triton[getattr(fn.fn, "__name__", "kernel")] += 1
            # The interpreter's own tensor traffic is neither a launch nor
            # this mode's business: run it with the mode off.
            with _disable_current_modes():
                return original(fn, *args, **kwargs)

        InterpretedFunction.run = run
        self._patched = (InterpretedFunction, original)

    def _unpatch_triton(self):
        if self._patched is not None:
            cls, original = self._patched
            cls.run = original
            self._patched = None


def _device_to_host(func, args, kwargs) -> bool:
    src = args[0] if args else None
    if func._schema.name == "aten::copy_" and len(args) > 1:
        dst, src = args[0], args[1]
        return isinstance(src, torch.Tensor) and src.device.type == "cuda" and dst.device.type == "cpu"
    device = kwargs.get("device")
    return isinstance(src, torch.Tensor) and src.device.type == "cuda" and device is not None and \
        torch.device(device).type == "cpu"


def count_step(model, x, labels) -> DispatchCounter:
    """One forward + backward of cross-entropy, counted (after one uncounted
    step, so lazy initialisations are warm, and after the weights changed in
    place, as an optimizer step changes them)."""
    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), labels).backward()

    step()
    with torch.no_grad():  # what an optimizer step does to the weights: caches keyed on them must miss
        for p in model.parameters():
            p.add_(0.0)
    with DispatchCounter() as counter:
        step()
    return counter


def table(depth: int, batch: int, backends, modes) -> list[dict]:
    from .models import PreActResNet

    torch.manual_seed(0)
    memory = torch.channels_last if "triton" in backends else torch.contiguous_format
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=memory)
    labels = torch.randint(0, 10, (batch,))
    rows = []
    configs = [("eager nn", dict(fused=False))] + [(f"{b} {m}", dict(backend=b, recompute=m))
                                                   for b in backends for m in modes]
    base = None
    for name, options in configs:
        model = PreActResNet(depth, **options).to(memory_format=memory)
        c = count_step(model, x, labels)
        base = base or c.total
        rows.append({"config": name, "aten_ops": sum(c.ops.values()), "triton_launches": sum(c.triton.values()),
                     "total": c.total, "x_eager": c.total / base, "syncs": len(c.syncs),
                     "top": ", ".join(f"{k} {v}" for k, v in c.ops.most_common(4))})
    return rows


def main(argv=None):
    from .train.config import OneLineParser

    parser = OneLineParser(prog="python -m fused_preact.dispatch_count", description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=164)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--backends", nargs="+", default=["native", "reference"])
    parser.add_argument("--modes", nargs="+", default=["bn_relu", "unit", "segment"])
    args = parser.parse_args(argv)
    if "triton" in args.backends and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        parser.error("the Triton backend is counted in the interpreter: set TRITON_INTERPRET=1")
    print(f"ATen ops + Triton launches per forward+backward step, PreActResNet-{args.depth}, batch {args.batch}, CPU:")
    print(f"{'config':>18} {'aten ops':>9} {'triton':>7} {'total':>7} {'x eager':>8} {'syncs':>6}  top ops")
    with contextlib.suppress(BrokenPipeError):
        for r in table(args.depth, args.batch, args.backends, args.modes):
            print(f"{r['config']:>18} {r['aten_ops']:>9} {r['triton_launches']:>7} {r['total']:>7} "
                  f"{r['x_eager']:>8.2f} {r['syncs']:>6}  {r['top']}")


if __name__ == "__main__":
    main()
