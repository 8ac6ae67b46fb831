"""BatchNorm2d -> ReLU -> Conv2d chains in an fx graph, and their rewrite
into the fused op: what `convert` (a model traced by torch.fx) and the
torch.compile backend (dynamo's graph) share.

A chain is a BatchNorm whose only reader is a ReLU (an nn.ReLU module,
F.relu, torch.relu, Tensor.relu, in place or not; or the ReLU inside a
BatchNormAct2d-style module), and whose ReLU is read by convolutions alone:
one, or several (fan-out: the op's multi-conv form computes relu(bn(x)) once
for all of them); or by an element-wise dropout (nn.Dropout, F.dropout) that
convolutions alone read, which the op then applies (a Wide ResNet's). Two forms:
- modules: an nn.BatchNorm2d (or BatchNormAct2d-style) call_module, and
  nn.Conv2d modules; it runs as `bn_relu_conv_modules` of those modules, so
  nn.BatchNorm2d's semantics (training and eval, momentum=None,
  track_running_stats=False) are read from the module at every call;
- functional: F.batch_norm with a constant training flag, momentum and eps,
  and F.conv2d of weights (and biases) read off the module (get_attr) or
  passed in (placeholders, as dynamo lifts parameters); it runs as the op.
A chain that cannot be proven exact is left as it was, with the reason: an
intermediate read elsewhere, another activation, a conv padded otherwise
than with zeros, an unknown BatchNorm2d subclass. A conv's bias is added after the
op (one add, which keeps nothing for backward).
"""
import operator
from typing import NamedTuple, Optional, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .modules import add_biases, bn_relu_conv_modules

_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
_RELU_METHODS = {"relu", "relu_"}


class Left(NamedTuple):
    where: str  # the BatchNorm's path in the model
    why: str


class ConversionReport:
    """What convert did: `fused` (the BatchNorms whose chains run fused, with
    their convs), `left` (chains left as they were, with the reason),
    `untraced` (submodules fx could not trace, with the reason), and under
    recompute="unit"/"segment", `recomputed` (the units run again in
    backward, in the groups that run together) and `not_recomputed` (units
    left to keep what they keep, with the reason)."""

    def __init__(self):
        self.fused: list[tuple[str, list[str]]] = []
        self.left: list[Left] = []
        self.untraced: list[Left] = []
        self.recomputed: list[list[str]] = []
        self.not_recomputed: list[Left] = []
        self.recompute = "bn_relu"  # the mode convert was asked for

    @property
    def chains(self) -> int:
        return len(self.fused) + len(self.left)

    def __str__(self) -> str:
        text = f"fused {len(self.fused)} of {self.chains} chains"
        if self.left:
            text += "; left: " + ", ".join(f"{w} ({why})" for w, why in self.left)
        if self.untraced:
            text += "; not traced: " + ", ".join(f"{w} ({why})" for w, why in self.untraced)
        if self.recompute in ("unit", "segment"):
            units = sum(map(len, self.recomputed))
            text += f"; {units} units recomputed in backward"
            if units != len(self.recomputed):
                text += f", in {len(self.recomputed)} segments"
        if self.not_recomputed:
            text += "; not recomputed: " + ", ".join(f"{w} ({why})" for w, why in self.not_recomputed)
        return text

    __repr__ = __str__


def fused_chain(x: torch.Tensor, bn: nn.BatchNorm2d, convs: list, backend: str,
                dropout: Union[nn.Dropout, float, None] = None) -> list:
    """The converted graph's call for one chain: [conv(dropout(relu(bn(x))))
    for conv in convs]; dropout: an nn.Dropout (its mode read now), or a
    functional dropout's probability as traced."""
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else \
        dropout if isinstance(dropout, float) else 0.0
    return bn_relu_conv_modules(x, bn, convs, True, backend, dropout=p)[0]


def fused_functional_chain(x: torch.Tensor, running_mean, running_var, weight, bias, training: bool, momentum: float,
                           eps: float, convs: list, backend: str, dropout: float = 0.0) -> list:
    """The converted graph's call for a functional chain (F.batch_norm ->
    relu [-> F.dropout] -> F.conv2d): [conv2d(dropout(relu(batch_norm(x))),
    w, b, stride, padding, dilation, groups) for (w, stride, padding,
    dilation, groups, b) in convs]; dropout: the probability as traced (0
    where the dropout is off)."""
    from .ops import bn_relu_convs

    outs = bn_relu_convs("convert", x, [tuple(c[:5]) for c in convs], weight, bias, running_mean, running_var,
                         training, momentum, eps, backend, dropout=dropout)[0]
    return add_biases(outs, [c[5] for c in convs])


torch.fx.wrap("fused_chain")
torch.fx.wrap("fused_functional_chain")


def rewrite(graph: fx.Graph, root: nn.Module, path: str, backend: str,
            report: Optional[ConversionReport]) -> fx.GraphModule:
    """Each provable chain of `graph` (in place) replaced by a fused_chain or
    fused_functional_chain call; the GraphModule of `root` running it. Chains
    are reported (fused or left, with the reason) where `report` is given;
    `path` is root's own path in the model."""
    functional = 0
    starts = [n for n in graph.nodes if _module(root, n, nn.BatchNorm2d) is not None or _is_call(n, F.batch_norm)]
    for bn_node in starts:
        if bn_node.op == "call_module":
            where = join_path(path, bn_node.target)
            chain = _chain(root, bn_node)
        else:
            functional += 1
            where = join_path(path, f"F.batch_norm #{functional}")
            chain = _functional_chain(root, bn_node)
        if isinstance(chain, str):
            if report is not None:
                report.left.append(Left(where, chain))
            continue
        relu_node, conv_nodes, drop_node = chain
        x = bn_node.args[0] if bn_node.op == "call_module" else _arguments(bn_node, _BATCH_NORM_ARGS)["input"]
        cat = x if concatenates_channels(x, bn_node) else None
        x = x if cat is None else concatenated_pieces(cat)  # the op reads the pieces
        with graph.inserting_before(conv_nodes[0]):
            if bn_node.op == "call_module":
                bn_ref = graph.get_attr(bn_node.target)
                conv_refs = [graph.get_attr(c.target) for c in conv_nodes]
                drop = None if drop_node is None else graph.get_attr(drop_node.target) \
                    if drop_node.op == "call_module" else dropout_probability(drop_node)
                fused = graph.call_function(fused_chain, (x, bn_ref, conv_refs, backend, drop))
            else:
                for c in conv_nodes[1:]:  # a later conv's weight and bias, read off the module before the first
                    for name in ("weight", "bias"):
                        tensor = _arguments(c, _CONV_ARGS)[name]
                        if isinstance(tensor, fx.Node) and tensor.op == "get_attr":
                            conv_nodes[0].prepend(tensor)
                bn_args = _arguments(bn_node, _BATCH_NORM_ARGS)
                convs = [[_arguments(c, _CONV_ARGS)[name] for name in ("weight", "stride", "padding", "dilation",
                                                                       "groups", "bias")] for c in conv_nodes]
                fused = graph.call_function(fused_functional_chain, (
                    x, *(bn_args[name] for name in _BATCH_NORM_ARGS[1:]), convs, backend,
                    0.0 if drop_node is None else dropout_probability(drop_node)))
            outs = [graph.call_function(operator.getitem, (fused, i)) for i in range(len(conv_nodes))]
        for conv, out in zip(conv_nodes, outs):
            conv.replace_all_uses_with(out)
            graph.erase_node(conv)
        if drop_node is not None:
            graph.erase_node(drop_node)
        if relu_node is not None:
            graph.erase_node(relu_node)
        graph.erase_node(bn_node)
        if cat is not None:
            graph.erase_node(cat)
        if report is not None:
            report.fused.append((where, [join_path(path, c.target if c.op == "call_module" else c.name)
                                         for c in conv_nodes]))
    graph.lint()
    return fx.GraphModule(root, graph)


_CATS = {torch.cat, torch.concat, torch.concatenate}


def concatenates_channels(node, reader: fx.Node) -> bool:
    """Whether `node` (the input of `reader`: a BatchNorm, a unit) is
    torch.cat(pieces, 1) that `reader` alone reads: the op then reads the
    pieces and the concatenation is never made (a DenseNet layer's input)."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in _CATS:
        return False
    args = {**dict(zip(("tensors", "dim"), node.args)), **node.kwargs}
    return args.get("dim", args.get("axis", 0)) in (1, -3) and list(node.users) == [reader]


def concatenated_pieces(cat: fx.Node):
    """The tensors argument of a torch.cat node (a list of nodes, or one node holding a list)."""
    return cat.args[0] if cat.args else cat.kwargs["tensors"]


def _chain(root: nn.Module, bn_node: fx.Node):
    """(the ReLU node or None when inside the BatchNorm module, [conv nodes])
    of the chain that starts at bn_node, or why there is none (a string)."""
    bn = root.get_submodule(bn_node.target)
    act = getattr(bn, "act", None)
    relu_node = None
    if type(bn) is nn.BatchNorm2d:
        act = None
    elif act is not None:  # a BatchNorm2d with its activation inside (timm's BatchNormAct2d)
        if not isinstance(act, nn.ReLU):
            return f"{type(act).__name__} inside {type(bn).__name__}, not ReLU"
        drop = getattr(bn, "drop", None)
        if drop is not None and not isinstance(drop, nn.Identity):
            return f"{type(drop).__name__} inside {type(bn).__name__}"
    else:
        return f"{type(bn).__name__} is not nn.BatchNorm2d"
    if len(bn_node.args) != 1 or bn_node.kwargs:
        return "called with more than its input"
    users = list(bn_node.users)
    if act is None:
        if len(users) != 1:
            return _read_elsewhere(root, users, "its output")
        relu_node = users[0]
        if not _is_relu(root, relu_node):
            return f"{_describe(root, relu_node)} follows, not ReLU"
        users = list(relu_node.users)
    drop_node = users[0] if len(users) == 1 and _is_dropout(root, users[0]) else None
    users = users if drop_node is None else list(drop_node.users)
    if not users:
        return "no conv follows"
    for node in users:
        conv = _module(root, node, nn.Conv2d)
        if conv is None:
            return _read_elsewhere(root, users, "its activation") if len(users) > 1 else \
                f"{_describe(root, node)} follows, not a Conv2d"
        why = _unsupported_conv(conv)
        if why:
            return f"{node.target} has {why}"
        if len(node.args) != 1 or node.kwargs:
            return f"{node.target} is called with more than its input"
    return relu_node, users, drop_node


# F.batch_norm's and F.conv2d's arguments in order, with their defaults.
_BATCH_NORM_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_BATCH_NORM_DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def _arguments(node: fx.Node, names: tuple) -> dict:
    defaults = _BATCH_NORM_DEFAULTS if names is _BATCH_NORM_ARGS else _CONV_DEFAULTS
    return {**defaults, **dict(zip(names, node.args)), **node.kwargs}


def _is_call(node: fx.Node, function) -> bool:
    return node.op == "call_function" and node.target is function


def _functional_chain(root: nn.Module, bn_node: fx.Node):
    """_chain for F.batch_norm -> relu -> F.conv2d."""
    args = _arguments(bn_node, _BATCH_NORM_ARGS)
    if set(args) != set(_BATCH_NORM_ARGS):
        return "F.batch_norm called with arguments it does not take here"
    if not isinstance(args["training"], bool) or not isinstance(args["momentum"], (int, float)) \
            or not isinstance(args["eps"], (int, float)):
        return "F.batch_norm's training, momentum or eps is not a constant"
    users = list(bn_node.users)
    if len(users) != 1:
        return _read_elsewhere(root, users, "its output")
    if not _is_relu(root, users[0]):
        return f"{_describe(root, users[0])} follows, not ReLU"
    relu_node, convs = users[0], list(users[0].users)
    drop_node = convs[0] if len(convs) == 1 and _is_dropout(root, convs[0]) else None
    convs = convs if drop_node is None else list(drop_node.users)
    if not convs:
        return "no conv follows"
    for node in convs:
        if not _is_call(node, F.conv2d):
            return _read_elsewhere(root, convs, "its activation") if len(convs) > 1 else \
                f"{_describe(root, node)} follows, not F.conv2d"
        conv = _arguments(node, _CONV_ARGS)
        if set(conv) != set(_CONV_ARGS) or conv["input"] is not (drop_node or relu_node):
            return "F.conv2d called with arguments it does not take here"
        for name in ("weight", "bias"):
            tensor = conv[name]
            if (name == "weight" or tensor is not None) and (not isinstance(tensor, fx.Node)
                                                              or tensor.op not in ("get_attr", "placeholder")):
                return f"F.conv2d's {name} is computed in forward"
        if isinstance(conv["padding"], str):
            return f"F.conv2d with padding={conv['padding']!r}"
    return relu_node, convs, drop_node


# Functional dropouts and their arguments in order; the chain takes the element-wise ones.
DROPOUT_FUNCTIONS = {**{f: ("input", "p", "training", "inplace") for f in (
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)},
    torch.dropout: ("input", "p", "train")}
_ELEMENTWISE_DROPOUTS = (F.dropout, torch.dropout)
_DROPOUT_DEFAULTS = {"p": 0.5, "training": True, "inplace": False}


def _is_dropout(root: nn.Module, node: fx.Node) -> bool:
    """Whether node is an element-wise dropout the op can take: an
    nn.Dropout module (its mode read at each call), or F.dropout /
    torch.dropout with a constant probability and mode."""
    if node.op == "call_module":
        return type(root.get_submodule(node.target)) is nn.Dropout and len(node.args) == 1 and not node.kwargs
    if node.op != "call_function" or node.target not in _ELEMENTWISE_DROPOUTS:
        return False
    args = _dropout_arguments(node)
    return set(args) <= {"input", "p", "training", "inplace"} and isinstance(args["p"], (int, float)) \
        and 0 <= args["p"] < 1 and isinstance(args["training"], bool)


def _dropout_arguments(node: fx.Node) -> dict:
    args = {**_DROPOUT_DEFAULTS, **dict(zip(DROPOUT_FUNCTIONS[node.target], node.args)), **node.kwargs}
    if "train" in args:
        args["training"] = args.pop("train")
    return args


def dropout_probability(node: fx.Node) -> float:
    """A functional dropout's probability (of DROPOUT_FUNCTIONS) as traced: 0 where it is off."""
    args = _dropout_arguments(node)
    return float(args["p"]) if args["training"] else 0.0


def _is_relu(root: nn.Module, node: fx.Node) -> bool:
    if node.op == "call_module":
        return type(root.get_submodule(node.target)) is nn.ReLU
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:  # F.relu(x, inplace) too
        return len(node.args) in (1, 2) and all(isinstance(a, bool) for a in node.args[1:]) \
            and set(node.kwargs) <= {"inplace"}
    return node.op == "call_method" and node.target in _RELU_METHODS and len(node.args) == 1 and not node.kwargs


def _unsupported_conv(conv: nn.Conv2d) -> str:
    for what, bad in ((f"padding_mode={conv.padding_mode!r}", conv.padding_mode != "zeros"),
                      (f"padding={conv.padding!r} with more padding after than before", isinstance(conv.padding, str)
                       and conv.padding == "same"
                       and any(d * (k - 1) % 2 for k, d in zip(conv.kernel_size, conv.dilation)))):
        if bad:
            return what
    return ""


def _read_elsewhere(root: nn.Module, users: list, what: str) -> str:
    return f"{what} is read by " + ", ".join(_describe(root, u) for u in users)


def _describe(root: nn.Module, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(root.get_submodule(node.target)).__name__})"
    if node.op == "output":
        return "the output"
    return getattr(node.target, "__name__", str(node.target))


def _module(root: nn.Module, node: fx.Node, kind: type) -> Optional[nn.Module]:
    if node.op != "call_module":
        return None
    module = root.get_submodule(node.target)
    return module if isinstance(module, kind) else None


def join_path(path: str, name: str) -> str:
    """A submodule's qualified name."""
    return f"{path}.{name}" if path else name
