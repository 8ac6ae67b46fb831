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
import contextlib
import inspect
import threading

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ..reference import stats_dtype
from .backends import Conv, get_backend

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
    tape = getattr(_state, "tape", None)
    if tape is None:
        return _normalization_stats(*args)
    # The layer is its input's shape and its BatchNorm's weight (None: affine-free).
    return tape.stats((tuple(x.shape), id(bn_weight)), lambda: _normalization_stats(*args))


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


_state = threading.local()


class StatsTape:
    """The (mean, invstd, scale, shift) of every normalization_stats call of a
    run, in call order: `recording()` appends them, `replaying()` hands them
    back in the same order instead of computing them. A unit/segment
    recompute's second run thus normalises with exactly the first run's
    statistics and makes no statistics pass over its layers' inputs (4
    per-channel vectors per layer kept, against a pass over each layer's input).

    A tape recording inside another (a recompute nested in a recomputed
    block: the inner one records during the outer one's replay) takes each
    call's statistics from the enclosing tape, so both stay in step."""

    def __init__(self, tensors=(), layers=()):
        self.tensors: list[Tensor] = list(tensors)  # 4 per call
        self.layers: list[tuple] = list(layers)  # per call: which layer made it (normalization_stats' key)
        self.replay = False
        self._next = 0
        self._enclosing: Optional["StatsTape"] = None

    @contextlib.contextmanager
    def recording(self):
        with self._installed(replay=False):
            yield self

    @contextlib.contextmanager
    def replaying(self):
        self._next = 0
        with self._installed(replay=True):
            yield self
        if self._next != len(self.layers):
            raise RuntimeError(f"StatsTape: the replayed run normalised {self._next} layers, the recorded one "
                               f"{len(self.layers)}: a recomputed block must run the same layers again")

    @contextlib.contextmanager
    def _installed(self, replay: bool):
        previous = getattr(_state, "tape", None)
        self.replay, self._enclosing, _state.tape = replay, previous, self
        try:
            yield
        finally:
            _state.tape = previous

    def stats(self, layer: tuple, compute) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The statistics of this call of `layer`: replaying, the next recorded
        ones (which `layer` must have made); recording, the enclosing tape's
        (if any) or compute()'s, recorded."""
        if self.replay:
            return self._take(layer)
        result = compute() if self._enclosing is None else self._enclosing.stats(layer, compute)
        self.tensors += result
        self.layers.append(layer)
        return result

    def _take(self, layer: tuple) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        i = self._next
        recorded = self.layers[i] if i < len(self.layers) else None
        if recorded != layer:
            what = ("the recorded run has no such layer" if recorded is None else
                    f"its input shape {layer[0]} is not the recorded {recorded[0]}" if recorded[0] != layer[0] else
                    f"its BatchNorm is not the recorded run's (same input shape {layer[0]})")
            raise RuntimeError(f"StatsTape: layer {i} of the replayed run differs from the recorded run's: {what}; "
                               f"a recomputed block must run the same layers again")
        self._next += 1
        return tuple(self.tensors[4 * i:4 * i + 4])


def replaying_stats() -> bool:
    """Whether normalization_stats hands back recorded statistics now (a recompute's second run)."""
    tape = getattr(_state, "tape", None)
    return tape is not None and tape.replay


def keeping_activations() -> bool:
    return getattr(_state, "keep", False)


@contextlib.contextmanager
def keep_activations():
    """Inside (eager mode), the op keeps relu(bn(x)) for backward where its
    backend materialises it anyway, instead of recomputing it there. For
    recomputations that run inside backward (unit/segment recompute), where
    what is kept lives only until that block's backward returns: one pass
    less per layer, no lasting memory."""
    previous = keeping_activations()
    _state.keep = True
    try:
        yield
    finally:
        _state.keep = previous


def _op(
    x: Tensor, conv_weights: list[Tensor], bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], mean: Tensor,
    invstd: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor], strides: list[int],
    paddings: list[int], dilations: list[int], groups: list[int], training: bool, backend: str,
    stats_eps: Optional[float],
) -> list[Tensor]:
    """[conv(relu((x - mean) * invstd * bn_weight + bn_bias), w) for w in conv_weights],
    the BatchNorm given folded as (scale, shift) too (normalization_stats),
    with `residual` added to the first output; when stats_eps is given, followed
    by that output's statistics for a next BatchNorm with that eps, in the
    backend's hand-on form (Backend.forward).

    `training` says whether mean/invstd are x's own batch statistics (so the
    gradient of x flows through them) or constants (running statistics)."""
    outs, stats = get_backend(backend).forward(x, scale, shift,
                                               _convs(conv_weights, strides, paddings, dilations, groups), residual,
                                               stats_eps)
    return [*outs, *(stats or ())]


def _op_keeping_activation(x, conv_weights, bn_weight, bn_bias, mean, invstd, scale, shift, residual, strides,
                           paddings, dilations, groups, training, backend,
                           stats_eps) -> tuple[list[Tensor], Optional[Tensor]]:
    """_op's outputs and relu(bn(x)) (None where the backend never materialises it)."""
    impl = get_backend(backend)
    if not hasattr(impl, "forward_keeping_activation"):
        return _op(x, conv_weights, bn_weight, bn_bias, mean, invstd, scale, shift, residual, strides, paddings,
                   dilations, groups, training, backend, stats_eps), None
    outs, stats, activation = impl.forward_keeping_activation(
        x, scale, shift, _convs(conv_weights, strides, paddings, dilations, groups), residual, stats_eps)
    return [*outs, *(stats or ())], activation


ARG_NAMES = tuple(inspect.signature(_op).parameters)


def _setup_context(ctx, inputs, output, activation: Optional[Tensor] = None) -> None:
    # Everything backward needs goes through save_for_backward, so
    # saved_tensors_hooks (and save_on_cpu) see and may offload all of it.
    # The residual is only added: its gradient is the first output's, and
    # nothing of it is kept. activation: relu(bn(x)), kept (keep_activations).
    a = dict(zip(ARG_NAMES, inputs))
    kept = () if activation is None else (activation,)
    ctx.save_for_backward(a["x"], a["mean"], a["invstd"], a["scale"], a["shift"], a["bn_weight"], a["bn_bias"],
                          *kept, *a["conv_weights"])
    ctx.conf = (a["strides"], a["paddings"], a["training"], a["backend"], bool(kept), a["dilations"], a["groups"])


def _as_dtype(t: Tensor, like: Tensor) -> Tensor:
    return t if t.dtype == like.dtype else t.to(like.dtype)  # a no-op .to() still costs a dispatch


def _gradients(ctx, grad_outputs, needs: dict, traceable: bool) -> tuple:
    """The gradients of the op's arguments, in ARG_NAMES order; `needs` maps
    each name to whether it wants one (a list for conv_weights)."""
    refuse_double_backward("bn_relu_conv2d")
    x, mean, invstd, scale, shift, bn_weight, bn_bias, *conv_weights = ctx.saved_tensors
    strides, paddings, training, backend, kept, dilations, groups = ctx.conf
    activation = conv_weights.pop(0) if kept else None
    needs_bn = needs["x"] or needs["bn_weight"] or needs["bn_bias"]
    dx, d_weights, sum_dz, sum_dz_xhat = get_backend(backend).backward(
        list(grad_outputs[:len(conv_weights)]), x, mean, invstd, scale, shift,
        _convs(conv_weights, strides, paddings, dilations, groups), training, needs["conv_weights"], needs_bn,
        traceable, activation,
    )
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
      training, backend, stats_eps):
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
    return _gradients(ctx, grad_outputs, needs, traceable=True)


bn_relu_conv2d_op.register_autograd(_op_backward, setup_context=_setup_context)


# ---- the same op as an autograd.Function (eager mode)

_WEIGHTS = ARG_NAMES.index("conv_weights")


def _spread(args: tuple) -> tuple:
    """The op's arguments with the conv_weights list moved to the end, one
    argument per weight, so autograd.Function tracks each weight."""
    return (*args[:_WEIGHTS], *args[_WEIGHTS + 1:], *args[_WEIGHTS])


def _gather(flat: tuple) -> tuple:
    """The inverse of _spread."""
    rest = len(ARG_NAMES) - 1
    return (*flat[:_WEIGHTS], list(flat[rest:]), *flat[_WEIGHTS:rest])


class _EagerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *flat):
        args = _gather(flat)
        if keeping_activations():
            outs, activation = _op_keeping_activation(*args)
        else:
            outs, activation = _op(*args), None
        _setup_context(ctx, args, outs, activation)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: its conv backward is skipped
        n = len(args[_WEIGHTS])
        if len(outs) > n:  # the next BatchNorm's statistics
            ctx.mark_non_differentiable(*outs[n:])
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        needs = dict(zip(ARG_NAMES, _gather(ctx.needs_input_grad)))
        return _spread(_gradients(ctx, grad_outputs, needs, traceable=False))


def apply(x, conv_weights, bn_weight, bn_bias, mean, invstd, scale, shift, residual, strides, paddings, dilations,
          groups, training, backend, stats_eps=None) -> tuple[list[Tensor], Optional[tuple[Tensor, Tensor]]]:
    """([conv(relu(bn(x)), w) for w in conv_weights] with `residual` added to the
    first, and that output's hand-on statistics for eps=stats_eps or None),
    differentiable in x, the weights, gamma/beta and the residual; mean/invstd
    are x's batch statistics when training."""
    args = (x, conv_weights, bn_weight, bn_bias, mean, invstd, scale, shift, residual, strides, paddings, dilations,
            groups, training, backend, stats_eps)
    if torch.compiler.is_compiling():
        outs = bn_relu_conv2d_op(*args)
    elif not torch.is_grad_enabled():  # nothing to record (unit/segment recompute's first run)
        outs = _op(*args)
    elif backend == "native" and stats_eps is None and plain_convs(dilations, groups):
        # The same steps in one C++ autograd function (no Python in its
        # forward or backward): csrc/bn_relu_conv_autograd.cpp.
        outs = torch.ops.fused_preact.bn_relu_conv(x, conv_weights, bn_weight, bn_bias, mean, invstd, scale, shift,
                                                   residual, strides, paddings, training, keeping_activations())
    else:
        outs = list(_EagerFunction.apply(*_spread(args)))
    n = len(conv_weights)
    return outs[:n], (tuple(outs[n:]) if stats_eps is not None else None)
