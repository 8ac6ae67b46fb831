"""What the benchmarks compare, and at which sizes.

Providers build a runnable model (or one BN -> ReLU -> conv layer) on a device:
- eager: the plain torch.nn model (`fused=False, recompute="none"`), or for one
  layer `fused_preact.reference.bn_relu_conv2d_eager` (the tests' reference);
- checkpoint: torch.utils.checkpoint around each unit of the plain model. The
  reentrant variant keeps each unit's input through save_for_backward, so the
  CPU saved-bytes accounting sees it (the non-reentrant one keeps the same
  tensors, but out of the hooks' sight);
- compile: torch.compile (inductor) of the plain model / the eager layer;
- fused-<recompute>-<backend>: fused_preact in each recompute mode (models) and
  each backend available on the device (triton: CUDA only).
"""
import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from fused_preact import PreActBottleneck, PreActResNet, reference
from fused_preact.ops import bn_relu_conv2d
from fused_preact.ops.backends import get_backend

FUSED_MODES = ("bn_relu", "unit", "segment")


def available_backends(device: torch.device) -> list[str]:
    # Interpreted Triton (CPU) is for tests only, not worth timing.
    return [b for b in ("triton", "native", "reference")
            if get_backend(b).supports(device, torch.float32) and get_backend(b).automatic(device, channels_last=True)]


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one benchmark run: the paper's on a GPU, a subset on the CPU."""

    batch: int
    op_batch: int
    depths: tuple[int, ...]
    memory_depths: tuple[int, ...]
    max_compile_depth: int  # inductor compile time grows with depth
    op_shapes: tuple  # (in_channels, out_channels, kernel, size)
    unit_shapes: tuple  # (bottleneck width, size)
    dtypes: tuple[torch.dtype, ...]
    rounds: int


def _paper_op_shapes(widths=(16, 32, 64), sizes=(32, 16, 8), kernels=(1, 3, 1)):
    """Each bottleneck unit's three BN-ReLU-convs: 4w -> w (1x1), w -> w (3x3), w -> 4w (1x1)."""
    shapes = []
    for w, s in zip(widths, sizes):
        for k, (cin, cout) in zip(kernels, ((4 * w, w), (w, w), (w, 4 * w))):
            shapes.append((cin, cout, k, s))
    return tuple(shapes)


# The CPU subset: each stage's 3x3 layer and the first unit's 64 -> 16 1x1 layer.
_CPU_OP_SHAPES = tuple(s for s in _paper_op_shapes() if s[2] == 3 or s[:2] == (64, 16))


@functools.cache
def sizes_for(device_type: str) -> Sizes:
    if device_type == "cuda":
        return Sizes(batch=128, op_batch=128, depths=(110, 164, 1001), memory_depths=(110, 164, 290, 1001),
                     max_compile_depth=110, op_shapes=_paper_op_shapes(), unit_shapes=((16, 32), (32, 16), (64, 8)),
                     dtypes=(torch.float32, torch.bfloat16), rounds=5)
    if os.environ.get("FUSED_PREACT_BENCH_DRY", "0") not in ("", "0"):  # gpu_check.sh --dry-run: tiny, fast
        return Sizes(batch=2, op_batch=2, depths=(11,), memory_depths=(11,), max_compile_depth=0,
                     op_shapes=((16, 16, 3, 8),), unit_shapes=((16, 8),), dtypes=(torch.float32,), rounds=1)
    full = os.environ.get("FUSED_PREACT_BENCH_FULL", "0") not in ("", "0")
    return Sizes(batch=8 if full else 4, op_batch=16 if full else 8, depths=(110, 164, 1001) if full else (110, 164),
                 memory_depths=(110, 164, 290, 1001), max_compile_depth=1001 if full else 110,
                 op_shapes=_paper_op_shapes() if full else _CPU_OP_SHAPES,
                 unit_shapes=((16, 32), (32, 16), (64, 8)) if full else ((16, 32),), dtypes=(torch.float32,),
                 rounds=3)


def unit_providers(device: torch.device) -> list[str]:
    return ["eager", "compile", *(f"fused-{backend}" for backend in available_backends(device))]


def build_unit(provider: str, width: int, device: torch.device):
    """(unit, forward): a stage's identity bottleneck unit (4w -> w -> w -> 4w)."""
    torch.manual_seed(0)
    fused = provider.startswith("fused-")
    unit = PreActBottleneck(4 * width, width, fused=fused, backend=provider.split("-", 1)[1] if fused else "auto")
    unit = unit.to(device=device, memory_format=torch.channels_last)
    if provider == "compile":
        return unit, torch.compile(unit)
    if provider not in ("eager", *unit_providers(device)):
        raise ValueError(f"unknown unit provider {provider!r}")
    return unit, unit


def model_providers(device: torch.device) -> list[str]:
    fused = [f"fused-{mode}-{backend}" for backend in available_backends(device) for mode in FUSED_MODES]
    return ["eager", "checkpoint", "compile", *fused]


def op_providers(device: torch.device) -> list[str]:
    return ["eager", "compile", *(f"fused-{backend}" for backend in available_backends(device))]


def model_format(device: torch.device) -> torch.memory_format:
    """channels_last on a GPU: the fast layout of cuDNN and of the Triton kernels."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def build_model(provider: str, depth: int, device: torch.device):
    """(model, forward): the parameters live in `model`, `forward(x)` runs the provider."""
    torch.manual_seed(0)
    if provider.startswith("fused-"):
        _, mode, backend = provider.split("-")
        model = PreActResNet(depth, recompute=mode, backend=backend).to(device, memory_format=model_format(device))
        return model, model
    model = PreActResNet(depth, fused=False, recompute="none").to(device, memory_format=model_format(device))
    if provider == "eager":
        return model, model
    if provider == "compile":
        return model, torch.compile(model)
    if provider == "checkpoint":
        return model, functools.partial(_checkpoint_per_unit, model)
    raise ValueError(f"unknown model provider {provider!r}")


def _checkpoint_per_unit(model: PreActResNet, x: torch.Tensor) -> torch.Tensor:
    # Note: each unit's recompute updates BatchNorm running statistics again,
    # the known pitfall that fused_preact's own recompute avoids.
    x = model.conv1(x)
    for unit in model.units:
        x = torch.utils.checkpoint.checkpoint(unit, x, use_reentrant=True)
    x = F.relu(model.bn(x))
    return model.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@functools.cache
def _compiled_eager_op():
    # One compiled function for every layer shape: dynamo recompiles per new
    # shape (then marks sizes dynamic) instead of compiling afresh per test.
    return torch.compile(reference.bn_relu_conv2d_eager)


class OpLayer(torch.nn.Module):
    """One BN -> ReLU -> conv layer's parameters and statistics."""

    def __init__(self, cin, cout, kernel, device):
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(cin, device=device)
        self.conv = torch.nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False, device=device)

    def args(self):
        bn = self.bn
        return (self.conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)


def build_op(provider: str, cin: int, cout: int, kernel: int, device: torch.device):
    """(layer, forward): forward(x) = conv(relu(bn(x))) in training mode."""
    torch.manual_seed(0)
    layer = OpLayer(cin, cout, kernel, device)
    pad = kernel // 2
    if provider in ("eager", "compile"):
        eager = reference.bn_relu_conv2d_eager if provider == "eager" else _compiled_eager_op()
        return layer, lambda x: eager(x, *layer.args(), padding=pad)
    if provider.startswith("fused-"):
        backend = provider.split("-", 1)[1]
        return layer, lambda x: bn_relu_conv2d(x, *layer.args(), padding=pad, backend=backend)
    raise ValueError(f"unknown op provider {provider!r}")
