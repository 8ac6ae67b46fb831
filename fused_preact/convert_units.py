"""What convert(model, recompute="unit" / "segment") recomputes in backward,
in a network nobody here wrote.

A unit is a network's repeated block: an element of a container
(nn.Sequential, nn.ModuleList, nn.ModuleDict, or a subclass, such as
torchvision's _DenseBlock) that holds a BatchNorm2d and a Conv2d and holds
no such container of its own. So torchvision's dense and transition layers,
timm's PreActBottleneck and pytorchcv's PreResUnit are units; a stem, or a
final BatchNorm outside any block, is not.

"unit" keeps each unit's inputs (and its fused layers' statistics) and runs
the unit again in backward; "segment" does so for runs of `segment_size`
consecutive units of an nn.Sequential that holds units alone (default: the
square root of the number of units), and for each other unit alone. Chains
inside a unit are fused as under "bn_relu"; the second run keeps
relu(bn(x)) only while the unit's backward runs. Buffers (the running statistics of a BatchNorm the op
does not compute) are put back after the second run, so they are updated
once. A dropout fused into a chain is the op's, whose seed the second run
replays; a unit that draws random numbers outside the op (an unfused
dropout, RReLU, Tensor.bernoulli_) is not recomputed: a second run would
draw others; the report names it.
"""
import functools
from typing import Callable, NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .chains import DROPOUT_FUNCTIONS, concatenated_pieces, concatenates_channels, dropout_probability, join_path
from .models.net_utils import default_segment_size
from .recompute import recompute

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_RANDOM_MODULES = (nn.modules.dropout._DropoutNd, nn.RReLU)
_RANDOM_FUNCTIONS = {*DROPOUT_FUNCTIONS, F.rrelu, torch.bernoulli, torch.rand, torch.rand_like, torch.randn,
                     torch.randn_like, torch.randint, torch.randint_like, torch.randperm, torch.multinomial,
                     torch.normal, torch.poisson}
_RANDOM_METHODS = {"bernoulli", "bernoulli_", "uniform_", "normal_", "random_", "exponential_", "geometric_",
                   "cauchy_", "log_normal_"}


class UnitPlan(NamedTuple):
    units: set[str]  # paths of the units recomputed one by one
    segments: dict[str, list[str]]  # an nn.Sequential's path: the names of its children that are units
    segment_size: int


def plan_units(model: nn.Module, mode: str, segment_size) -> UnitPlan:
    """The units of `model` (module docstring) and, under "segment", the
    nn.Sequential containers whose units are recomputed in runs."""
    units = _units(model, "")
    size = segment_size or default_segment_size(len(units))
    if mode == "unit":
        return UnitPlan(set(units), {}, size)
    by_parent: dict[str, list[str]] = {}
    for path in units:
        parent, _, name = path.rpartition(".")
        by_parent.setdefault(parent, []).append(name)
    # Only a container of units alone runs as segments: untraced, it could
    # not fuse a chain that crossed from one of its other children to the next.
    segments = {parent: names for parent, names in by_parent.items()
                if type(container := model.get_submodule(parent)).forward is nn.Sequential.forward
                and len(names) == len(container)}
    alone = {path for path in units if path.rpartition(".")[0] not in segments}
    return UnitPlan(alone, segments, size)


def _units(module: nn.Module, path: str) -> list[str]:
    found = []
    for name, child in module.named_children():
        if _holds_chain(child):
            inner = _units(child, join_path(path, name))
            found += inner if inner else [join_path(path, name)] if isinstance(module, CONTAINERS) else []
    return found


def _holds_chain(module: nn.Module) -> bool:
    kinds = [type(m) for m in module.modules()]
    return any(issubclass(k, nn.BatchNorm2d) for k in kinds) and any(issubclass(k, nn.Conv2d) for k in kinds)


def draws_random(module: nn.Module, graphs: list[fx.Graph]) -> bool:
    """Whether `module`'s forward (its traced graphs; where it did not trace,
    its submodules) may draw random numbers in training."""
    if not graphs:
        return any(isinstance(m, _RANDOM_MODULES) and getattr(m, "p", 1) != 0 for m in module.modules())
    for graph in graphs:
        for node in graph.nodes:
            if node.op == "call_module" and isinstance(m := module.get_submodule(node.target), _RANDOM_MODULES):
                if getattr(m, "p", 1) != 0:
                    return True
            elif node.op == "call_function" and node.target in _RANDOM_FUNCTIONS:
                if node.target not in DROPOUT_FUNCTIONS or dropout_probability(node) > 0:
                    return True
            elif node.op == "call_method" and node.target in _RANDOM_METHODS:
                return True
    return False


def recomputed_forward(forward: Callable) -> Callable:
    """A unit's forward that keeps its inputs alone and runs again in backward."""
    def recomputed(self, *args, **kwargs):
        return recompute(lambda a: forward(self, *a[0], **a[1]), (args, kwargs), self, restore_buffers=True)
    recomputed.once = forward
    return recomputed


def unit_on_pieces(unit: nn.Module, pieces):
    """unit(torch.cat(pieces, 1)), the concatenation made inside the
    recomputed unit (in both of its runs): the unit keeps the pieces,
    which the network keeps anyway (a DenseNet block's outputs), not it."""
    once = type(unit).forward.once
    return recompute(lambda p: once(unit, torch.cat(p, 1)), list(pieces), unit, restore_buffers=True)


torch.fx.wrap("unit_on_pieces")


def concatenate_inside_units(graph: fx.Graph, root: nn.Module) -> None:
    """Each call of a recomputed unit on torch.cat(pieces, 1) that nothing
    else reads (a DenseNet transition on its block's output) made a call of
    unit_on_pieces, so the concatenation is never kept (in place)."""
    for node in list(graph.nodes):
        if node.op != "call_module" or not hasattr(type(root.get_submodule(node.target)).forward, "once") \
                or len(node.args) != 1 or node.kwargs or not concatenates_channels(node.args[0], node):
            continue
        cat = node.args[0]
        with graph.inserting_before(node):
            call = graph.call_function(unit_on_pieces, (graph.get_attr(node.target), concatenated_pieces(cat)))
        node.replace_all_uses_with(call)
        graph.erase_node(node)
        graph.erase_node(cat)


def segment_steps(container: nn.Sequential, units: list[str], random: set[str], size: int) -> list:
    """The container's children in order, as steps: a child that runs as it
    is, or a ModuleList of up to `size` consecutive units recomputed together."""
    steps, run = [], []

    def close_run():
        if run:
            steps.append(nn.ModuleList(run))
            run.clear()

    for name, child in container.named_children():
        if name in units and name not in random:
            run.append(child)
            if len(run) == size:
                close_run()
        else:
            close_run()
            steps.append(child)
    close_run()
    return steps


def run_segments(self, x):
    """A converted nn.Sequential under "segment": its steps (segment_steps) in order."""
    for step in self._fused_preact_steps:
        if isinstance(step, nn.ModuleList):
            x = _run_recomputed(step, x)
        else:
            x = step(x)
    return x


def _run_in_order(units: nn.ModuleList, x):
    for unit in units:
        x = unit(x)
    return x


def _run_recomputed(units: nn.ModuleList, x):
    return recompute(functools.partial(_run_in_order, units), x, units, restore_buffers=True)
