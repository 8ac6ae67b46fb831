"""Whole-step CUDA graphs (on by default where they work; --no-cuda-graphs
opts out): an iteration's forward, backward and
SGD step recorded once in a torch.cuda.CUDAGraph and replayed every
iteration, so the host launches one graph instead of the hundreds of kernels
that bound an eager ResNet-1001 step.

A replay is the eager step's computation because
- each iteration's batch, augmented on the device outside the graph, is copied
  into the input and label tensors the graph was recorded with;
- the learning rate is a device tensor that the optimizer reads
  (optim.capturable_lr) and the schedule overwrites in place before each
  replay: a new rate needs no recapture;
- the optimizer's velocities exist before the capture (init_state), so the
  step recorded is the ordinary one, not a first step that creates them;
- BatchNorm's running statistics and num_batches_tracked are in-place updates
  of the network's buffers, recorded like any other kernel;
- the loss and error count come out as device tensors that the loop adds to
  its device-side sums: nothing is read back per iteration.

A graph has fixed shapes: an epoch's partial last batch gets a second graph,
captured the first time it comes, rather than an eager step, so every
iteration runs the same way.

Before each capture, a few warm-up iterations on a side stream (the torch
docs' whole-network recipe) let Triton autotune, cuDNN and cuBLAS choose
their algorithms and create their per-stream handles and workspaces, outside
the graph. They run on the real batch; the network, optimizer state and
random number generator are then put back as they were, so they leave no
trace on the run (and a resumed run captures the same way).

Left off, with one line saying why (refused, when --cuda-graphs asks for
it): the CPU, several processes (DistributedDataParallel's gradient
all-reduce is not captured here), the fp16 loss scaler (it reads an overflow
flag on the host every step) and --compile.
"""
import contextlib
import dataclasses
from typing import Callable, Sequence

import torch
from torch import Tensor

from .config import ConfigError, TrainConfig
from .optim import capturable_lr

# Iterations run before each capture (torch.cuda.make_graphed_callables' default).
WARMUP_ITERS = 3

# step(x, y) -> device tensors: forward, backward and optimizer step on one batch.
Step = Callable[[Tensor, Tensor], Sequence[Tensor]]


def check_support(c: TrainConfig, procs) -> None:
    """Settles c.cuda_graphs for this run. Left to the default (None): on
    wherever a capture works, else off with one line saying why. Asked for
    (True) where it cannot work: refused in one line (--device cpu, --amp
    fp16 and --compile are refused earlier, by config.validate)."""
    if c.cuda_graphs is False:
        return
    why = _why_not(c, procs)
    if why is None:
        c.cuda_graphs = True
    elif c.cuda_graphs:
        raise ConfigError(f"--cuda-graphs {why}; drop --cuda-graphs" +
                          (" or train on one GPU" if procs.distributed else " to train on the CPU"))
    else:
        c.cuda_graphs = False
        if procs.rank == 0:
            print(f"note: CUDA graphs off: whole-step capture {why} (--no-cuda-graphs silences this)", flush=True)


def _why_not(c: TrainConfig, procs):
    """Why this run cannot capture its step, or None."""
    if procs.device.type != "cuda":
        return (f"needs a CUDA device, but --device {c.device} picked {procs.device}"
                + (" (no CUDA device is visible)" if c.device == "auto" else ""))
    if procs.distributed:
        return (f"runs one process, got {procs.world_size} (torchrun): DistributedDataParallel's gradient all-reduce "
                f"is not captured")
    if c.amp == "fp16":
        return "does not work with --amp fp16 (its loss scaler reads an overflow flag on the host every step)"
    if c.compile:
        return "is not combined with --compile (a compiled network is not captured by hand here)"
    return None


def training_tensors(net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """Every tensor a training step changes in place: parameters, buffers
    (running statistics, num_batches_tracked) and the optimizer's state."""
    state = [t for per_param in optimizer.state.values() for t in per_param.values() if isinstance(t, Tensor)]
    return [*net.parameters(), *net.buffers(), *state]


def _rng_state(device: torch.device) -> Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state: Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


@contextlib.contextmanager
def state_put_back(tensors: list[Tensor], device: torch.device):
    """Run the body, then copy `tensors` back to their values before it, in
    place (a graph holds their addresses), and restore the random number
    generator of `device` (networks with dropout draw from it)."""
    saved = [t.detach().clone() for t in tensors]
    rng = _rng_state(device)
    yield
    with torch.no_grad():
        for tensor, value in zip(tensors, saved):
            tensor.copy_(value)
    _set_rng_state(device, rng)


@dataclasses.dataclass
class _Graph:
    replay: Callable[[], None]
    x: Tensor  # the static input the batch is copied into
    y: Tensor  # the static labels
    outputs: Sequence[Tensor]  # the step's outputs, rewritten by every replay


class StepGraphs:
    """The training step `step(x, y)` as CUDA graphs, one per batch shape (an
    epoch's full batches and its partial last one), each captured the first
    time its shape comes and replayed from then on (module docstring)."""

    def __init__(self, step: Step, net: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device):
        self.step, self.net, self.optimizer, self.device = step, net, optimizer, device
        self.graphs: dict[tuple, _Graph] = {}
        self._stream = None
        capturable_lr(optimizer)

    def run(self, x: Tensor, y: Tensor) -> Sequence[Tensor]:
        """One iteration on batch (x, y). The outputs are the graph's own
        tensors: use them before the next iteration overwrites them."""
        key = (tuple(x.shape), x.stride(), tuple(y.shape))
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._capture(x, y)
        graph.x.copy_(x)
        graph.y.copy_(y)
        graph.replay()
        return graph.outputs

    def _capture(self, x: Tensor, y: Tensor) -> _Graph:
        static_x, static_y = x.clone(), y.clone()  # clone keeps the memory format
        self.optimizer.init_state()
        with state_put_back(training_tensors(self.net, self.optimizer), self.device):
            self._warm_up(static_x, static_y)
        # No gradients at capture: backward then allocates them from the
        # graph's private memory pool, where every replay rewrites them.
        self.optimizer.zero_grad(set_to_none=True)
        replay, outputs = self._record(static_x, static_y)
        return _Graph(replay, static_x, static_y, outputs)

    def _side_stream(self) -> torch.cuda.Stream:
        # One stream for warm-ups and captures, so what cuBLAS and cuDNN set up
        # per stream during the warm-up is there for the capture.
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def _warm_up(self, x: Tensor, y: Tensor) -> None:
        side, current = self._side_stream(), torch.cuda.current_stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(WARMUP_ITERS):
                self.step(x, y)
        current.wait_stream(side)

    def _record(self, x: Tensor, y: Tensor) -> tuple[Callable[[], None], Sequence[Tensor]]:
        """Capture one step on (x, y); nothing runs until a replay."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(self.device), torch.cuda.graph(graph, stream=self._side_stream()):
            outputs = self.step(x, y)

        device = self.device  # not self: a closure over self would make StepGraphs a reference cycle

        def replay() -> None:
            with torch.cuda.device(device):  # the current stream of the graph's device
                graph.replay()

        return replay, outputs
