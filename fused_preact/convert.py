"""convert(model): the fused op for every BatchNorm2d -> ReLU -> Conv2d chain of
any network (torchvision's DenseNet, timm's ResNetV2, Wide ResNets, ...).

    from fused_preact import convert
    fast = convert(model)            # shares model's parameters and buffers
    print(fast.fused_preact_report)  # "fused 119 of 121 chains; left: ..."

    compiled = torch.compile(model, backend="fused_preact")  # the same rewrite under torch.compile

How: the model is traced with torch.fx, BatchNorm2d modules (and subclasses,
such as timm's BatchNormAct2d) kept as leaves, and each chain the graph
holds (fused_preact.chains: which ones, and which are left) is replaced by
a call of the fused op.

The converted model keeps the original's containers (the traced forward
addresses the same submodules by the same paths), so state_dict keys,
values and order are the model's, and a state dict loads either way. A
model that fx cannot trace is converted child by child: each child that
traces is converted, the others are left and named in the report ("not
traced: path (why)"), and chains that cross a child boundary stay unfused.
A forward that fx specialises on `self.training` (a functional
F.batch_norm(..., training=self.training)) is traced in both modes, and the
converted forward picks the one for the module's mode at each call. The
converted module is an instance of a subclass of the model's class that
holds the generated forward; torch.save and deepcopy store it as the
unconverted model and convert it again when loaded.

Under torch.compile (`compile_backend`, registered as "fused_preact"),
dynamo's graph holds F.batch_norm / relu / conv2d calls on lifted
parameters: the functional chains, rewritten the same way before inductor
compiles the graph.
"""
import copy
from typing import Callable, NamedTuple, Optional

import torch.fx as fx
from torch import nn

from .chains import ConversionReport, Left, join_path, rewrite
from .convert_units import (UnitPlan, concatenate_inside_units, draws_random, plan_units, recomputed_forward,
                            run_segments, segment_steps)

__all__ = ["convert", "compile_backend", "ConversionReport"]

RECOMPUTE_MODES = ("bn_relu", "unit", "segment")


class _Options(NamedTuple):
    """How a converted module was made, kept on it: pickling stores the
    unconverted module, and loading converts it again with these."""
    recompute: str
    backend: str
    segment_size: Optional[int]
    role: str  # "model", or "unit" / "segments" for a part that convert recomputes


class _Tracer(fx.Tracer):
    """BatchNorm2d modules (and subclasses) are leaves: the chain is read
    off call_module nodes, and the module decides its mode at run time. So
    are parts converted already (the units under recompute="unit"/"segment")."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, nn.BatchNorm2d) or _is_converted(m) or super().is_leaf_module(m, qualname)


def convert(model: nn.Module, recompute: str = "bn_relu", backend: str = "auto", inplace: bool = False,
            segment_size: Optional[int] = None) -> nn.Module:
    """`model` with every BatchNorm2d -> ReLU -> Conv2d chain computed by the
    fused op (see the module docstring); `.fused_preact_report` says which.

    recompute: "bn_relu" (the op keeps x and per-channel statistics, and
    recomputes relu(bn(x)) in backward); "unit" (also each of the network's
    repeated blocks keeps only its inputs and runs again in backward) or
    "segment" (runs of `segment_size` blocks do): see
    fused_preact.convert_units. backend: the op's ("auto", "triton",
    "native", "reference"). inplace=False returns a new module that shares
    model's parameters, buffers and submodules; inplace=True changes model's
    own forward (and those of the submodules it converts) and returns it."""
    from .ops import backend_names

    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be an nn.Module, got {type(model).__name__}")
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"convert: recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}")
    if backend != "auto" and backend not in backend_names():
        raise ValueError(f"convert: backend must be 'auto' or one of {backend_names()}, got {backend!r}")
    if not isinstance(inplace, bool):
        raise TypeError(f"convert: inplace must be True or False, got {inplace!r}")
    if segment_size is not None and (recompute != "segment" or isinstance(segment_size, bool)
                                     or not isinstance(segment_size, int) or segment_size < 1):
        raise ValueError(f"convert: segment_size must be a positive int and needs recompute='segment', "
                         f"got {segment_size!r} with recompute={recompute!r}")
    if any(_is_converted(m) for m in model.modules()):
        raise ValueError("convert: model is converted already (in whole or in part); convert the original model")
    plan = UnitPlan(set(), {}, 1) if recompute == "bn_relu" else plan_units(model, recompute, segment_size)
    return _convert_root(model, _Options(recompute, backend, segment_size, "model"), plan, inplace)


def _convert_root(model: nn.Module, options: _Options, plan: UnitPlan, inplace: bool) -> nn.Module:
    conversion = _Conversion(options, plan, inplace)
    converted = conversion.convert(model, "")
    converted.fused_preact_report = conversion.report
    return converted


class _Conversion:
    """One convert call: the options, the units' plan, and the report."""

    def __init__(self, options: _Options, plan: UnitPlan, inplace: bool):
        self.options, self.plan, self.inplace = options, plan, inplace
        self.report = ConversionReport()
        self.report.recompute = options.recompute
        self.random: set[str] = set()  # the units that draw random numbers: not recomputed

    def _is_unit(self, path: str) -> bool:
        parent, _, name = path.rpartition(".")
        return path in self.plan.units or name in self.plan.segments.get(parent, ())

    def convert(self, module: nn.Module, path: str) -> nn.Module:
        """module (at `path` in the model) converted: its planned units
        first, then its own forward traced with them as leaves."""
        target = module if self.inplace else _shallow_copy(module)
        if path in self.plan.segments:
            return self._segments(target, path)
        self._convert_planned(target, path)
        try:
            graphs = _trace_both_modes(target)
        except Exception as error:  # fx cannot trace it: its children, one by one
            self.report.untraced.append(Left(path or type(module).__name__, _first_line(error)))
            for name, child in target.named_children():
                if not _is_converted(child):
                    target._modules[name] = self.convert(child, join_path(path, name))
            graphs, forward = [], type(module).forward
        else:
            for graph in graphs:
                concatenate_inside_units(graph, target)
            forwards = [type(rewrite(graph, target, path, self.options.backend, self.report if i == 0 else None))
                        .forward for i, graph in enumerate(graphs)]
            forward = forwards[0] if len(forwards) == 1 else _by_mode(*forwards)
        role = "model"
        if self._is_unit(path) and draws_random(target, graphs):
            self.report.not_recomputed.append(Left(path, _RANDOM))
            self.random.add(path)
        elif path in self.plan.units:
            role, forward = "unit", recomputed_forward(forward)
            self.report.recomputed.append([path])
        if not graphs and role == "model":
            return target  # its class's forward, over converted children
        return _with_forward(target, forward, self.options._replace(role=role))

    def _convert_planned(self, target: nn.Module, path: str) -> None:
        """target's planned units (and segments) converted in its tree, each
        module on the way to one copied (unless inplace)."""
        for name, child in target.named_children():
            where = join_path(path, name)
            if _is_converted(child):
                continue
            if where in self.plan.units or where in self.plan.segments:
                target._modules[name] = self.convert(child, where)
            elif any(p.startswith(where + ".") for p in (*self.plan.units, *self.plan.segments)):
                target._modules[name] = copied = child if self.inplace else _shallow_copy(child)
                self._convert_planned(copied, where)

    def _segments(self, target: nn.Module, path: str) -> nn.Module:
        """An nn.Sequential whose units run again in backward in runs of segment_size."""
        for name, child in target.named_children():
            target._modules[name] = self.convert(child, join_path(path, name))
        random = {name for name, _ in target.named_children() if join_path(path, name) in self.random}
        steps = segment_steps(target, self.plan.segments[path], random, self.plan.segment_size)
        names = {id(m): n for n, m in target.named_children()}
        for step in steps:
            if isinstance(step, nn.ModuleList):
                self.report.recomputed.append([join_path(path, names[id(m)]) for m in step])
        converted = _with_forward(target, run_segments, self.options._replace(
            role="segments", segment_size=self.plan.segment_size))
        converted._fused_preact_steps = steps
        return converted


_RANDOM = "draws random numbers: a second run would draw others"


def _is_converted(module: nn.Module) -> bool:
    return type(module).__reduce_ex__ is _reduce_converted


def _trace_both_modes(module: nn.Module) -> list[fx.Graph]:
    """The forward traced in train and in eval mode: one graph where they
    agree, else [train, eval] (fx bakes `self.training` into the graph).
    A constant the graph reads (a tensor literal in forward) is set on
    module by the trace."""
    modes = {m: m.training for m in module.modules()}
    try:
        graphs = []
        for training in (True, False):
            module.train(training)
            graphs.append(_Tracer().trace(module))
    finally:
        for m, training in modes.items():
            m.training = training
    return graphs[:1] if _same_code(module, *graphs) else graphs


def _same_code(module: nn.Module, a: fx.Graph, b: fx.Graph) -> bool:
    return fx.GraphModule(module, a).code == fx.GraphModule(module, b).code


def _with_forward(target: nn.Module, forward: Callable, options: _Options) -> nn.Module:
    """target (its children, parameters and buffers unchanged) as an
    instance of a subclass of its class, made for it, whose forward is
    `forward` (see _converted_class)."""
    target.__class__ = _converted_class(type(target), forward)
    target._fused_preact_options = options
    return target


def _converted_class(cls: type, forward: Callable) -> type:
    """cls with the converted forward. It pickles (torch.save, deepcopy) as
    the unconverted module, converted again when loaded: the generated
    forward is code, not state, and a loaded copy must not silently run
    the unfused forward of its class."""
    return type(cls.__name__, (cls,), {"forward": forward, "__reduce_ex__": _reduce_converted,
                                       "__module__": cls.__module__, "__qualname__": cls.__qualname__})


def _reduce_converted(self, protocol):
    return _reconverted, (_unconverted(self), self._fused_preact_options)


def _unconverted(module: nn.Module) -> nn.Module:
    """A module of the original class, sharing module's state, with its
    converted descendants unconverted the same way."""
    cls = type(module).__bases__[0] if _is_converted(module) else type(module)
    plain = object.__new__(cls)
    plain.__dict__.update({k: v for k, v in module.__dict__.items()
                           if k not in ("fused_preact_report", "_fused_preact_options", "_fused_preact_steps")})
    plain._modules = type(module._modules)(
        (name, None if child is None else _unconverted(child)) for name, child in module._modules.items())
    return plain


def _reconverted(module: nn.Module, options: _Options) -> nn.Module:
    if options.role == "model":
        return convert(module, options.recompute, options.backend, True, options.segment_size)
    if options.role == "unit":
        plan = UnitPlan({""}, {}, 1)
    else:  # "segments": an nn.Sequential of units alone
        plan = UnitPlan(set(), {"": [name for name, _ in module.named_children()]}, options.segment_size)
    return _convert_root(module, options._replace(role="model"), plan, True)


def _by_mode(train: Callable, evaluate: Callable) -> Callable:
    def forward(self, *args, **kwargs):
        return (train if self.training else evaluate)(self, *args, **kwargs)
    return forward


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object of module's class sharing its parameters, buffers
    and children (its own dicts of them, so that replacing one leaves module alone)."""
    new = copy.copy(module)
    new._modules = type(module._modules)(module._modules)
    new._parameters = type(module._parameters)(module._parameters)
    new._buffers = type(module._buffers)(module._buffers)
    return new


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:120]}" if text else type(error).__name__


def compile_backend(gm: fx.GraphModule, example_inputs):
    """A torch.compile backend: dynamo's graph with its chains rewritten to
    the fused op (backend "auto"), then compiled by inductor.

        torch.compile(model, backend="fused_preact")  # or backend=compile_backend
    """
    from torch._inductor.compile_fx import compile_fx

    report = ConversionReport()
    rewrite(gm.graph, gm, "", "auto", report)
    gm.recompile()
    gm.fused_preact_report = report
    return compile_fx(gm, example_inputs)
