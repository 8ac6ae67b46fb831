"""What the benchmarks compare, and at which sizes.

Providers build a runnable model (or one BN -> ReLU -> conv layer) on a device:
- eager: the plain torch.nn model (`fused=False, recompute="none"`), or for one
  layer `fused_preact.reference.bn_relu_conv2d_eager` (the tests' reference);
- checkpoint: torch.utils.checkpoint around each unit of the plain model. The
  reentrant variant keeps each unit's input through save_for_backward, so the
  CPU saved-bytes accounting sees it (the non-reentrant one keeps the same
  tensors, but out of the hooks' sight);
- compile: torch.compile (inductor) of the plain model / the eager layer, at
  the default `torch._functorch.config.activation_memory_budget` of 1.0;
- compile-budget0.5, compile-budget0.1: the same with an activation memory
  budget of 0.5 / 0.1 (inductor's partitioner then recomputes in backward what
  it no longer saves). The budget is set while compiling and while running,
  and each compiled provider starts from `torch._dynamo.reset()`: Dynamo's
  guards do not look at the functorch config, so without the reset a second
  budget would reuse the first one's graphs. The tensors a compiled graph
  keeps go through save_for_backward too, so the CPU accounting sees them;
- fused+compile, fused-segment+compile: torch.compile (inductor) of the fused
  model in `bn_relu` / `segment` mode, on the device's first backend (native on
  the CPU, triton on CUDA);
- fused-<recompute>-<backend>: fused_preact in each recompute mode (models) and
  each backend available on the device (triton: CUDA only);
- eager-graphed, fused-graphed (training step only, CUDA only): the whole step
  of the plain / the fused `bn_relu` model (forward, backward, SGD) captured
  once in a CUDA graph by the trainer's StepGraphs and replayed each
  iteration (`graphed_training_step`).

Every training step uses `sgd`, the trainer's SGD, graphed or not.
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
from fused_preact.train.graphs import StepGraphs
from fused_preact.train.optim import PyTorchSGD

FUSED_MODES = ("bn_relu", "unit", "segment")
# Compiled plain-model providers and their activation memory budget.
COMPILE_BUDGETS = {"compile": 1.0, "compile-budget0.5": 0.5, "compile-budget0.1": 0.1}
# Compiled fused-model providers and their recompute mode.
FUSED_COMPILE = {"fused+compile": "bn_relu", "fused-segment+compile": "segment"}
GRAPHED = ("eager-graphed", "fused-graphed")


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
    max_compile_depth: int  # compile and fused(-segment)+compile; inductor compile time grows with depth
    max_budget_depth: int  # compile-budget0.5/0.1: their partitioner's solver adds to the compile time
    compiled: tuple[str, ...]  # the compiled model providers that run at all
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


# Every compiled model provider; the CPU subset leaves out fused-segment+compile
# (another cold inductor compile of over a minute on two cores).
_ALL_COMPILED = (*COMPILE_BUDGETS, *FUSED_COMPILE)
_CPU_COMPILED = (*COMPILE_BUDGETS, "fused+compile")


@functools.cache
def sizes_for(device_type: str) -> Sizes:
    if device_type == "cuda":
        return Sizes(batch=128, op_batch=128, depths=(110, 164, 1001), memory_depths=(110, 164, 290, 1001),
                     max_compile_depth=110, max_budget_depth=110, compiled=_ALL_COMPILED,
                     op_shapes=_paper_op_shapes(), unit_shapes=((16, 32), (32, 16), (64, 8)),
                     dtypes=(torch.float32, torch.bfloat16), rounds=5)
    if _flag("FUSED_PREACT_BENCH_DRY"):  # gpu_check.sh --dry-run: tiny, fast
        return Sizes(batch=2, op_batch=2, depths=(11,), memory_depths=(11,), max_compile_depth=0, max_budget_depth=0,
                     compiled=(), op_shapes=((16, 16, 3, 8),), unit_shapes=((16, 8),), dtypes=(torch.float32,),
                     rounds=1)
    full = _flag("FUSED_PREACT_BENCH_FULL")
    # A cold inductor compile of ResNet-110 takes 1-2 minutes on two cores, of
    # ResNet-164 about 2 (110 s at budget 1.0, 120-140 s at 0.5 / 0.1): the
    # four compiled providers at 164 too would add some 8 minutes to a suite
    # meant to take about 10, so the CPU subset compiles at depth 110 only.
    compile_depth = 1001 if full else 110
    depths = (110, 164, 1001) if full else (110, 164)
    # For a one-off measurement, FUSED_PREACT_BENCH_BATCH and
    # FUSED_PREACT_BENCH_DEPTHS (e.g. "164") set the training step's batch and
    # depths; the compiled providers of the CPU subset then run at those depths.
    batch = int(os.environ.get("FUSED_PREACT_BENCH_BATCH") or (8 if full else 4))
    if os.environ.get("FUSED_PREACT_BENCH_DEPTHS"):
        depths = tuple(int(d) for d in os.environ["FUSED_PREACT_BENCH_DEPTHS"].split(","))
        compile_depth = max(depths)
    return Sizes(batch=batch, op_batch=16 if full else 8, depths=depths,
                 memory_depths=(110, 164, 290, 1001), max_compile_depth=compile_depth, max_budget_depth=compile_depth,
                 compiled=_ALL_COMPILED if full else _CPU_COMPILED,
                 op_shapes=_paper_op_shapes() if full else _CPU_OP_SHAPES,
                 unit_shapes=((16, 32), (32, 16), (64, 8)) if full else ((16, 32),), dtypes=(torch.float32,),
                 rounds=3)


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


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
    """The model providers of the training-step and memory suites (not the graphed ones)."""
    fused = [f"fused-{mode}-{backend}" for backend in available_backends(device) for mode in FUSED_MODES]
    return ["eager", "checkpoint", *COMPILE_BUDGETS, *FUSED_COMPILE, *fused]


def graphed_providers() -> list[str]:
    """The CUDA-graph providers: training-step suite only (a step is what they capture)."""
    return list(GRAPHED)


def is_compiled(provider: str) -> bool:
    return provider in COMPILE_BUDGETS or provider in FUSED_COMPILE


def runs_at(provider: str, depth: int, sizes: Sizes) -> bool:
    """Whether a model provider runs at `depth`: compiled ones where the sizes
    take them, up to their depth limit."""
    if not is_compiled(provider):
        return True
    budget = COMPILE_BUDGETS.get(provider, 1.0) != 1.0
    return provider in sizes.compiled and depth <= (sizes.max_budget_depth if budget else sizes.max_compile_depth)


def op_providers(device: torch.device) -> list[str]:
    return ["eager", "compile", *(f"fused-{backend}" for backend in available_backends(device))]


def model_format(device: torch.device) -> torch.memory_format:
    """channels_last on a GPU: the fast layout of cuDNN and of the Triton kernels."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def best_backend(device: torch.device) -> str:
    """The fastest fused backend built for the device (triton on CUDA, native on the CPU)."""
    return available_backends(device)[0]


def build_model(provider: str, depth: int, device: torch.device):
    """(model, forward): the parameters live in `model`, `forward(x)` runs the provider
    (for the graphed providers: the model uncaptured; `graphed_training_step` captures it)."""
    torch.manual_seed(0)
    fmt = model_format(device)
    if provider in FUSED_COMPILE or provider == "fused-graphed":
        mode = FUSED_COMPILE.get(provider, "bn_relu")
        model = PreActResNet(depth, recompute=mode, backend=best_backend(device)).to(device, memory_format=fmt)
        return model, (_compiled(model) if provider in FUSED_COMPILE else model)
    if provider.startswith("fused-"):
        _, mode, backend = provider.split("-")
        model = PreActResNet(depth, recompute=mode, backend=backend).to(device, memory_format=fmt)
        return model, model
    model = PreActResNet(depth, fused=False, recompute="none").to(device, memory_format=fmt)
    if provider in ("eager", "eager-graphed"):
        return model, model
    if provider in COMPILE_BUDGETS:
        return model, _compiled(model, COMPILE_BUDGETS[provider])
    if provider == "checkpoint":
        return model, functools.partial(_checkpoint_per_unit, model)
    raise ValueError(f"unknown model provider {provider!r}")


def _compiled(model: torch.nn.Module, budget: float = 1.0):
    """torch.compile (inductor) of `model`, compiled and run under `budget`.

    Dynamo's guards do not look at the functorch config: without the reset, a
    model of the same structure compiled earlier under another budget would be
    reused. The partition into saved and recomputed tensors is made when the
    forward compiles; the budget is also set around every call so that a
    recompilation (a new guard failure) sees it too.
    """
    torch._dynamo.reset()
    compiled = torch.compile(model)

    def forward(x):
        with torch._functorch.config.patch(activation_memory_budget=budget):
            return compiled(x)

    return forward


def training_batch(batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels): a fixed random CIFAR-sized batch in the device's model layout."""
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, device=device, generator=gen).contiguous(memory_format=model_format(device))
    return x, torch.randint(0, 10, (batch,), device=device, generator=gen)


def sgd(model: torch.nn.Module) -> PyTorchSGD:
    """Every provider's optimizer: the trainer's SGD (PyTorchSGD, the update
    `python -m fused_preact.train` runs, eager or with --cuda-graphs), with
    momentum 0.9 and weight decay 1e-4."""
    return PyTorchSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)


def _one_step(forward, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(forward(x), y)
    loss.backward()
    opt.step()
    return loss


def training_step(model: torch.nn.Module, forward, x: torch.Tensor, y: torch.Tensor):
    """step() -> loss: one training step (forward, cross-entropy, backward,
    `sgd`), waited for on a GPU."""
    opt = sgd(model)

    def step():
        loss = _one_step(forward, opt, x, y)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        return loss

    return step


def provider_step(provider: str, model: torch.nn.Module, forward, x: torch.Tensor, y: torch.Tensor):
    """The provider's step() -> loss on batch (x, y): graphed_training_step
    for a graphed provider (CUDA only), else training_step."""
    if provider in GRAPHED:
        if not x.is_cuda:
            raise ValueError(f"{provider} captures a CUDA graph: it needs a CUDA device, got {x.device}")
        return graphed_training_step(model, x, y)
    return training_step(model, forward, x, y)


def graphed_training_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    """step() -> loss: training_step's step captured whole in a CUDA graph
    by the trainer's own StepGraphs (what --cuda-graphs runs: warm-up on a
    side stream, the rate a device tensor, velocities made before capture),
    captured at the first call and replayed from then on; each call copies
    the batch into the graph's static buffers, as the trainer does."""
    opt = sgd(model)
    graphs = StepGraphs(lambda xs, ys: (_one_step(model, opt, xs, ys).detach(),), model, opt, x.device)

    def step():
        loss, = graphs.run(x, y)
        torch.cuda.synchronize(x.device)
        return loss

    return step


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
