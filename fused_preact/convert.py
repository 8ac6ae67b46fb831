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
from typing import Callable

import torch.fx as fx
from torch import nn

from .chains import ConversionReport, Left, join_path, rewrite

__all__ = ["convert", "compile_backend", "ConversionReport"]

RECOMPUTE_MODES = ("bn_relu",)


class _Tracer(fx.Tracer):
    """BatchNorm2d modules (and subclasses) are leaves: the chain is read
    off call_module nodes, and the module decides its mode at run time."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, nn.BatchNorm2d) or super().is_leaf_module(m, qualname)


def convert(model: nn.Module, recompute: str = "bn_relu", backend: str = "auto", inplace: bool = False) -> nn.Module:
    """`model` with every BatchNorm2d -> ReLU -> Conv2d chain computed by the
    fused op (see the module docstring); `.fused_preact_report` says which.

    recompute: "bn_relu" (the op keeps x and per-channel statistics, and
    recomputes relu(bn(x)) in backward). backend: the op's ("auto", "triton",
    "native", "reference"). inplace=False returns a new module that shares
    model's parameters, buffers and submodules; inplace=True changes model's
    own forward (and any untraceable parent's children) and returns it."""
    from .ops import backend_names

    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be an nn.Module, got {type(model).__name__}")
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"convert: recompute must be one of {RECOMPUTE_MODES} for a converted model (unit and "
                         f"segment recompute need the package's own nets), got {recompute!r}")
    if backend != "auto" and backend not in backend_names():
        raise ValueError(f"convert: backend must be 'auto' or one of {backend_names()}, got {backend!r}")
    if not isinstance(inplace, bool):
        raise TypeError(f"convert: inplace must be True or False, got {inplace!r}")
    if any(type(m).__reduce_ex__ is _reduce_converted for m in model.modules()):
        raise ValueError("convert: model is converted already (in whole or in part); convert the original model")
    report = ConversionReport()
    converted = _convert(model, "", backend, inplace, report)
    converted.fused_preact_report = report
    return converted


def _convert(module: nn.Module, path: str, backend: str, inplace: bool, report: ConversionReport) -> nn.Module:
    try:
        graphs = _trace_both_modes(module)
    except Exception as error:  # fx cannot trace it: its children, one by one
        report.untraced.append(Left(path or type(module).__name__, _first_line(error)))
        parent = module if inplace else _shallow_copy(module)
        for name, child in module.named_children():
            parent._modules[name] = _convert(child, join_path(path, name), backend, inplace, report)
        return parent
    forwards = [rewrite(graph, module, path, backend, report if i == 0 else None) for i, graph in enumerate(graphs)]
    return _with_forward(module, forwards, inplace, backend)


def _trace_both_modes(module: nn.Module) -> list[fx.Graph]:
    """The forward traced in train and in eval mode: one graph where they
    agree, else [train, eval] (fx bakes `self.training` into the graph)."""
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


def _with_forward(module: nn.Module, forwards: list[fx.GraphModule], inplace: bool, backend: str) -> nn.Module:
    """A module with `module`'s children, parameters and buffers (the same
    objects, in the same order) whose forward is the converted graph's (the
    first in training, the second, if any, in eval mode): an instance of a
    subclass of module's class made for it (see _converted_class)."""
    # A constant the graph reads (a tensor literal in forward) was set on
    # module itself by the trace, so the copy made after it has it too.
    target = module if inplace else _shallow_copy(module)
    code = [type(gm).forward for gm in forwards]
    target.__class__ = _converted_class(type(module), code[0] if len(code) == 1 else _by_mode(*code))
    target._fused_preact_backend = backend
    return target


def _converted_class(cls: type, forward: Callable) -> type:
    """cls with the converted forward. It pickles (torch.save, deepcopy) as
    the unconverted module, converted again when loaded: the generated
    forward is code, not state, and a loaded copy must not silently run
    the unfused forward of its class."""
    return type(cls.__name__, (cls,), {"forward": forward, "__reduce_ex__": _reduce_converted,
                                       "__module__": cls.__module__, "__qualname__": cls.__qualname__})


def _reduce_converted(self, protocol):
    plain = object.__new__(type(self).__bases__[0])
    plain.__dict__.update({k: v for k, v in self.__dict__.items()
                           if k not in ("fused_preact_report", "_fused_preact_backend")})
    return _reconverted, (plain, self._fused_preact_backend)


def _reconverted(module: nn.Module, backend: str) -> nn.Module:
    return convert(module, backend=backend, inplace=True)


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
