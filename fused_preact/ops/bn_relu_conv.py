"""`fused_preact::bn_relu_conv2d`: BatchNorm2d -> ReLU -> Conv2d(bias=False) as one
torch.library op that keeps for backward only x, the per-channel mean/invstd
and the parameters; relu(bn(x)) is recomputed in backward (like mamba's
LayerNormLinearFn recomputes its normalised input).

One op serves one or two convolutions of the same activation: the first unit
of a ResNet stage feeds relu(bn(x)) to both conv1 and the projection shortcut,
so that activation is computed once in forward and once in backward.

The op is defined once, by `_op` (its signature is the schema) and the
`_forward`, `_setup_context` and `_gradients` below. From that one definition
come the torch.library op `bn_relu_conv2d_op` (opaque to torch.compile, with a
fake implementation and a registered autograd formula) and `_EagerFunction`,
an autograd.Function taking the same arguments, which eager mode calls because
torch.library's Python autograd wrapper costs about 0.2 ms a call, more than
the kernels of a small layer, and ResNet-1001 has some 3000 such layers. For
the native backend, eager mode calls `fused_preact::bn_relu_conv` instead:
the same steps as one C++ autograd function (csrc/bn_relu_conv_autograd.cpp),
so the layer's autograd node and its backward run no Python (the argument
checks and the statistics call before it still do). `apply` picks among them.
"""
import inspect

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ..reference import stats_dtype
from .backends import Conv, get_backend
from .dropout import Dropout
from .recompute_state import current_tape, keeping_activations

_OP = "fused_preact::bn_relu_conv2d"


def plain_convs(dilations: list[int], groups: list[int]) -> bool:
    """Whether every conv is undilated and ungrouped: what every backend and
    the native C++ autograd node take (see Backend.general_convs)."""
    return all(d == 1 for d in dilations) and all(g == 1 for g in groups)


def _convs(weights: list[Tensor], strides: list[int], paddings: list[int], dilations: list[int],
           groups: list[int]) -> list[Conv]:
    # strides/paddings/dilations are flat [h0, w0, h1, w1, ...] (custom ops take flat int lists)
    return [Conv(w, (strides[2 * i], strides[2 * i + 1]), (paddings[2 * i], paddings[2 * i + 1]),
                 (dilations[2 * i], dilations[2 * i + 1]), groups[i]) for i, w in enumerate(weights)]


def normalization_stats(x: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                        running_mean: Optional[Tensor], running_var: Optional[Tensor],
                        num_batches_tracked: Optional[Tensor], training: bool, momentum: float, eps: float,
                        backend: str, x_stats: Optional[tuple[Tensor, ...]] = None, defer: bool = False
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mean, invstd, scale, shift) that normalise x, relu(bn(x)) = relu(x * scale
    + shift): batch statistics in training (updating the running ones and
    num_batches_tracked in place, in the statistics pass itself), running
    statistics in eval. They are constants to autograd: the op's backward
    differentiates through them itself.

    x_stats: x's statistics as the backend's forward handed them on (its
    epilogue computed them); then no statistics pass reads x.

    defer: the caller's next step is the backend's forward of x with these
    statistics (bn_relu_conv.apply), and nothing reads them before; the
    backend may then leave their computation to that forward (its
    deferred_batch_norm_stats, where it has one).

    Under a StatsTape: recorded in order, or, replaying, the recorded ones
    handed back without any pass over x (and so without any update)."""
    args = (x, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, training, momentum, eps, backend,
            x_stats, defer)
    tape = current_tape()
    if tape is None:
        return _normalization_stats(*args)
    # The layer is its input's shape and its BatchNorm's weight (None: affine-free).
    return tape.stats(("stats", tuple(x.shape), id(bn_weight)), lambda: _normalization_stats(*args))


def input_shape(x) -> tuple[int, ...]:
    """x's shape; for a list of pieces, that of their concatenation along channels."""
    if isinstance(x, Tensor):
        return tuple(x.shape)
    n, _, h, w = x[0].shape
    return (n, sum(p.shape[1] for p in x), h, w)


def concatenated(x) -> Tensor:
    """x, or its pieces concatenated along channels (a transient copy)."""
    return x if isinstance(x, Tensor) else torch.cat(x, 1)


def join_pieces(pieces: list[Tensor], backend: str):
    """x's pieces as `backend` reads them (Backend.join: their concatenation,
    or a form its kernels read in place; a concatenation for a backend
    without join)."""
    join = getattr(get_backend(backend), "join", None)
    return torch.cat(pieces, 1) if join is None else join(pieces)


def _normalization_stats(x, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, training, momentum,
                         eps, backend, x_stats, defer):
    stats = stats_dtype(x)
    with torch.no_grad():
        if not training:
            mean, invstd = running_mean.to(stats), torch.rsqrt(running_var.to(stats) + eps)
            return mean, invstd, *reference.bn_fold(mean, None, invstd, 0, bn_weight, bn_bias, None, None, None, 0.0)
        params = (bn_weight, bn_bias, running_mean, running_var)
        if all(p is None or p.dtype == stats for p in params):
            impl = get_backend(backend)
            stats_of = impl.deferred_batch_norm_stats if defer and hasattr(impl, "deferred_batch_norm_stats") \
                else impl.batch_norm_stats
            return stats_of(x.detach(), *params, num_batches_tracked, momentum, eps, x_stats)
        # Parameters of another dtype (a .half() network): the kernels take
        # statistics-dtype vectors, so the fold runs in tensor ops.
        mean, invstd = get_backend(backend).batch_norm_stats(x.detach(), None, None, None, None, None, momentum, eps,
                                                             x_stats)[:2]
        return mean, invstd, *reference.bn_fold_from_invstd(mean, invstd, eps, x.numel() // x.shape[1], *params,
                                                            num_batches_tracked, momentum)


def refuse_double_backward(what: str) -> None:
    """Raise when a backward runs with create_graph=True (autograd enables grad
    mode in backward only then): these backwards are not differentiable
    themselves, and a silently missing second-order term would be wrong."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(f"{what}: double backward (create_graph=True, e.g. a gradient penalty or a "
                           f"Hessian-vector product) is not supported; build the network with fused=False (plain "
                           f"torch.nn modules) for it")


def _op(
    x: Tensor, conv_weights: list[Tensor], bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], mean: Tensor,
    invstd: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor], strides: list[int],
    paddings: list[int], dilations: list[int], groups: list[int], training: bool, backend: str,
    stats_eps: Optional[float], dropout: float = 0.0, dropout_seed: Optional[Tensor] = None,
) -> list[Tensor]:
    """[conv(relu((x - mean) * invstd * bn_weight + bn_bias), w) for w in conv_weights],
    the BatchNorm given folded as (scale, shift) too (normalization_stats),
    with `residual` added to the first output; when stats_eps is given, followed
    by that output's statistics for a next BatchNorm with that eps, in the
    backend's hand-on form (Backend.forward).

    `training` says whether mean/invstd are x's own batch statistics (so the
    gradient of x flows through them) or constants (running statistics).
    dropout > 0: relu(...) is dropped with that probability before the convs,
    the mask made from dropout_seed (ops/dropout.py)."""
    outs, stats = get_backend(backend).forward(x, scale, shift,
                                               _convs(conv_weights, strides, paddings, dilations, groups), residual,
                                               stats_eps, _dropout(dropout, dropout_seed))
    return [*outs, *(stats or ())]


def _op_keeping_activation(x, conv_weights, bn_weight, bn_bias, mean, invstd, scale, shift, residual, strides,
                           paddings, dilations, groups, training, backend, stats_eps, dropout=0.0,
                           dropout_seed=None) -> tuple[list[Tensor], Optional[Tensor]]:
    """_op's outputs and relu(bn(x)) (dropped out, where dropout; None where
    the backend never materialises it)."""
    impl = get_backend(backend)
    if not hasattr(impl, "forward_keeping_activation"):
        return _op(x, conv_weights, bn_weight, bn_bias, mean, invstd, scale, shift, residual, strides, paddings,
                   dilations, groups, training, backend, stats_eps, dropout, dropout_seed), None
    outs, stats, activation = impl.forward_keeping_activation(
        x, scale, shift, _convs(conv_weights, strides, paddings, dilations, groups), residual, stats_eps,
        _dropout(dropout, dropout_seed))
    return [*outs, *(stats or ())], activation


ARG_NAMES = tuple(inspect.signature(_op).parameters)
# The trailing arguments' defaults: a caller (or torch.library, which may drop
# arguments equal to their defaults) may leave them out.
_DEFAULTS = {name: p.default for name, p in inspect.signature(_op).parameters.items()
             if p.default is not inspect.Parameter.empty}


def _dropout(p: float, seed: Optional[Tensor]) -> Optional[Dropout]:
    return Dropout(p, seed) if p > 0 else None


def _setup_context(ctx, inputs, output, activation: Optional[Tensor] = None) -> None:
    # Everything backward needs goes through save_for_backward, so
    # saved_tensors_hooks (and save_on_cpu) see and may offload all of it.
    # The residual is only added: its gradient is the first output's, and
    # nothing of it is kept. activation: relu(bn(x)), kept (keep_activations).
    # x given as pieces is kept as its pieces, never concatenated.
    a = {**_DEFAULTS, **dict(zip(ARG_NAMES, inputs))}
    kept = () if activation is None else (activation,)
    pieces = a["x"] if isinstance(a["x"], list) else [a["x"]]
    ctx.num_pieces = len(pieces) if isinstance(a["x"], list) else 0
    # A dropout keeps its seed (8 bytes): backward makes the same mask again.
    seed = (a["dropout_seed"],) if a["dropout"] > 0 else ()
    ctx.save_for_backward(*pieces, a["mean"], a["invstd"], a["scale"], a["shift"], a["bn_weight"], a["bn_bias"],
                          *kept, *seed, *a["conv_weights"])
    ctx.conf = (a["strides"], a["paddings"], a["training"], a["backend"], bool(kept), a["dilations"], a["groups"],
                a["dropout"])


def _as_dtype(t: Tensor, like: Tensor) -> Tensor:
    return t if t.dtype == like.dtype else t.to(like.dtype)  # a no-op .to() still costs a dispatch


def _gradients(ctx, grad_outputs, needs: dict, traceable: bool) -> tuple:
    """The gradients of the op's arguments, in ARG_NAMES order; `needs` maps
    each name to whether it wants one (a list for conv_weights)."""
    refuse_double_backward("bn_relu_conv2d")
    saved = ctx.saved_tensors
    pieces, num_pieces = saved[:max(ctx.num_pieces, 1)], ctx.num_pieces
    mean, invstd, scale, shift, bn_weight, bn_bias, *conv_weights = saved[len(pieces):]
    strides, paddings, training, backend, kept, dilations, groups, p = ctx.conf
    x = join_pieces(list(pieces), backend) if num_pieces else pieces[0]  # pieces: joined again, for this backward alone
    activation = conv_weights.pop(0) if kept else None
    dropout = _dropout(p, conv_weights.pop(0) if p > 0 else None)
    needs_x = any(needs["x"]) if num_pieces else needs["x"]
    needs_bn = needs_x or needs["bn_weight"] or needs["bn_bias"]
    dx, d_weights, sum_dz, sum_dz_xhat = get_backend(backend).backward(
        list(grad_outputs[:len(conv_weights)]), x, mean, invstd, scale, shift,
        _convs(conv_weights, strides, paddings, dilations, groups), training, needs["conv_weights"], needs_bn,
        traceable, activation, dropout,
    )
    if num_pieces and dx is not None:  # each piece's gradient: its channels of dx
        dx = list(dx.split([p.shape[1] for p in pieces], 1))
    # d beta = sum dz and d gamma = sum dz * xhat, in training and eval alike.
    grads = {"x": dx, "conv_weights": d_weights,
             "bn_weight": None if bn_weight is None or sum_dz_xhat is None else _as_dtype(sum_dz_xhat, bn_weight),
             "bn_bias": None if bn_bias is None or sum_dz is None else _as_dtype(sum_dz, bn_bias),
             "residual": grad_outputs[0] if needs["residual"] else None}
    return tuple(grads.get(name) for name in ARG_NAMES)


# ---- the torch.library op (torch.compile)

bn_relu_conv2d_op = torch.library.custom_op(_OP, mutates_args=())(_op)


@bn_relu_conv2d_op.register_fake
def _(x, conv_weights, bn_weight, bn_bias, mean, invstd, scale, shift, residual, strides, paddings, dilations, groups,
      training, backend, stats_eps, dropout=0.0, dropout_seed=None):
    a = torch.empty_like(x)
    outs = [torch.nn.functional.conv2d(a, c.weight, None, c.stride, c.padding, c.dilation, c.groups)
            for c in _convs(conv_weights, strides, paddings, dilations, groups)]
    if stats_eps is not None:
        outs += get_backend(backend).stats_like(outs[0])
    return outs


def _op_backward(ctx, grad_outputs):
    needs = dict(zip(ARG_NAMES, ctx.needs_input_grad))
    n = len(ctx.conf[0]) // 2  # strides: a pair per conv
    if not isinstance(needs["conv_weights"], (list, tuple)):
        needs["conv_weights"] = [needs["conv_weights"]] * n
    # One gradient per input the op was called with (defaulted ones may be left out).
    return _gradients(ctx, grad_outputs, needs, traceable=True)[:len(ctx.needs_input_grad)]


bn_relu_conv2d_op.register_autograd(_op_backward, setup_context=_setup_context)


# ---- the same op as an autograd.Function (eager mode)

_WEIGHTS = ARG_NAMES.index("conv_weights")


def _spread(args: tuple, joined=None) -> tuple:
    """The op's arguments flat, so autograd.Function tracks every tensor:
    (the number of x's pieces (0: x is one tensor), the pieces joined for
    the forward, untracked), x's pieces (or x), the other arguments, and the
    conv weights, one argument each."""
    x, pieces = args[0], args[0] if isinstance(args[0], list) else [args[0]]
    return ((len(pieces) if isinstance(x, list) else 0, joined), *pieces, *args[1:_WEIGHTS], *args[_WEIGHTS + 1:],
            *args[_WEIGHTS])


def _gather(flat: tuple) -> tuple:
    """The inverse of _spread (less the concatenation)."""
    first = 1 + max(flat[0][0], 1)
    x = list(flat[1:first]) if flat[0][0] else flat[1]
    rest = first + len(ARG_NAMES) - 2
    others = flat[first:rest]
    return (x, *others[:_WEIGHTS - 1], list(flat[rest:]), *others[_WEIGHTS - 1:])


class _EagerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *flat):
        args = _gather(flat)
        # Pieces: their concatenation (made for the statistics) serves this forward alone.
        run = (flat[0][1], *args[1:]) if flat[0][0] else args
        if keeping_activations():
            outs, activation = _op_keeping_activation(*run)
        else:
            outs, activation = _op(*run), None
        _setup_context(ctx, args, outs, activation)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: its conv backward is skipped
        n = len(args[_WEIGHTS])
        if len(outs) > n:  # the next BatchNorm's statistics
            ctx.mark_non_differentiable(*outs[n:])
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        needs = dict(zip(ARG_NAMES, _gather(((ctx.num_pieces, None), *ctx.needs_input_grad[1:]))))
        grads = _gradients(ctx, grad_outputs, needs, traceable=False)
        if ctx.num_pieces and grads[0] is None:
            grads = ([None] * ctx.num_pieces, *grads[1:])
        return (None, *_spread(grads)[1:])


def apply(x, conv_weights, bn_weight, bn_bias, mean, invstd, scale, shift, residual, strides, paddings, dilations,
          groups, training, backend, stats_eps=None, joined=None, dropout=0.0, dropout_seed=None
          ) -> tuple[list[Tensor], Optional[tuple[Tensor, Tensor]]]:
    """([conv(relu(bn(x)), w) for w in conv_weights] with `residual` added to the
    first, and that output's hand-on statistics for eps=stats_eps or None),
    differentiable in x, the weights, gamma/beta and the residual; mean/invstd
    are x's batch statistics when training.

    x may be a list of pieces, read as their concatenation along channels
    (`joined`: the pieces as the backend reads them, join_pieces, made
    without autograd for the statistics): in eager mode the op keeps the
    pieces alone, runs its forward on `joined` and joins the pieces again
    for its backward (transient copies, except on the Triton backend, whose
    kernels read the pieces in place); under torch.compile the graph
    concatenates them (a cat the partitioner may recompute in backward)."""
    if isinstance(x, list) and torch.compiler.is_compiling():
        x = concatenated(x)
    elif isinstance(x, list) and not torch.is_grad_enabled():
        x = joined
    args = (x, conv_weights, bn_weight, bn_bias, mean, invstd, scale, shift, residual, strides, paddings, dilations,
            groups, training, backend, stats_eps, dropout, dropout_seed)
    if torch.compiler.is_compiling():
        outs = bn_relu_conv2d_op(*args)
    elif not torch.is_grad_enabled():  # nothing to record (unit/segment recompute's first run)
        outs = _op(*args)
    elif backend == "native" and stats_eps is None and plain_convs(dilations, groups) and isinstance(x, Tensor) \
            and dropout == 0:
        # The same steps in one C++ autograd function (no Python in its
        # forward or backward): csrc/bn_relu_conv_autograd.cpp.
        outs = torch.ops.fused_preact.bn_relu_conv(x, conv_weights, bn_weight, bn_bias, mean, invstd, scale, shift,
                                                   residual, strides, paddings, training, keeping_activations())
    else:
        outs = list(_EagerFunction.apply(*_spread(args, joined)))
    n = len(conv_weights)
    return outs[:n], (tuple(outs[n:]) if stats_eps is not None else None)
