"""`fused_preact::bn_relu_conv2d`: BatchNorm2d -> ReLU -> Conv2d(bias=False) as one
torch.library op that keeps for backward only x, the per-channel mean/invstd
and the parameters; relu(bn(x)) is recomputed in backward (like mamba's
LayerNormLinearFn recomputes its normalised input).

One op serves one or two convolutions of the same activation: the first unit
of a ResNet stage feeds relu(bn(x)) to both conv1 and the projection shortcut,
so that activation is computed once in forward and once in backward.

`bn_relu_convs_autograd` is the entry point. Under torch.compile it calls the
torch.library op (opaque to the compiler, with a fake implementation and a
registered autograd formula); in eager mode it calls `_BnReluConvFunction`, an
autograd.Function around the same forward and backward, because torch.library's
Python autograd wrapper costs about 0.2 ms a call, more than the kernels of a
small layer, and ResNet-1001 has some 3000 such layers.
"""
from typing import Optional

import torch
from torch import Tensor

from ..reference import stats_dtype
from .backends import Conv, get_backend

_OP = "fused_preact::bn_relu_conv2d"


def bn_affine(mean: Tensor, invstd: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor]):
    """Fold BN into z = x * scale + shift (per channel, statistics dtype)."""
    scale = invstd if bn_weight is None else bn_weight.to(invstd.dtype) * invstd
    if bn_bias is None:
        return scale, -mean * scale
    return scale, torch.addcmul(bn_bias.to(invstd.dtype), mean, scale, value=-1)


def _convs(weights: list[Tensor], strides: list[int], paddings: list[int]) -> list[Conv]:
    # strides/paddings are flat [h0, w0, h1, w1, ...] (custom ops take flat int lists)
    return [Conv(w, (strides[2 * i], strides[2 * i + 1]), (paddings[2 * i], paddings[2 * i + 1]))
            for i, w in enumerate(weights)]


def normalization_stats(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool,
                        momentum: float, eps: float, backend: str,
                        batch_stats: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
    """(mean, invstd) that normalise x: batch statistics in training (updating the
    running ones in place), running statistics in eval. They are constants to
    autograd: the op's backward differentiates through them itself.

    batch_stats: x's (mean, invstd) for this eps when the op that produced x
    already computed them in its epilogue; then no statistics pass reads x."""
    stats = stats_dtype(x)
    if not training:
        return running_mean.to(stats), torch.rsqrt(running_var.to(stats) + eps)
    mean, invstd = batch_stats if batch_stats is not None else get_backend(backend).batch_stats(x.detach(), eps)
    if running_mean is not None:
        # Same update as nn.BatchNorm2d: the running variance is the unbiased
        # one, averaged in the statistics dtype and rounded once (an fp16
        # batch variance above 65504 must not become inf before averaging).
        m = x.numel() // x.shape[1]
        var = invstd.pow(-2).sub_(eps).clamp_(min=0).mul_(m / (m - 1))
        with torch.no_grad():
            for running, batch in ((running_mean, mean), (running_var, var)):
                running.copy_(torch.lerp(running.to(stats), batch, momentum))
    return mean, invstd


def refuse_double_backward(what: str) -> None:
    """Raise when a backward runs with create_graph=True (autograd enables grad
    mode in backward only then): these backwards are not differentiable
    themselves, and a silently missing second-order term would be wrong."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(f"{what}: double backward (create_graph=True, e.g. a gradient penalty or a "
                           f"Hessian-vector product) is not supported; build the network with fused=False (plain "
                           f"torch.nn modules) for it")


@torch.library.custom_op(_OP, mutates_args=())
def bn_relu_conv2d_op(
    x: Tensor, conv_weights: list[Tensor], bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], mean: Tensor,
    invstd: Tensor, residual: Optional[Tensor], strides: list[int], paddings: list[int], training: bool,
    backend: str, stats_eps: Optional[float],
) -> list[Tensor]:
    """[conv(relu((x - mean) * invstd * bn_weight + bn_bias), w) for w in conv_weights],
    with `residual` added to the first output; when stats_eps is given, followed
    by that output's per-channel (mean, invstd) for a next BatchNorm with that eps.

    `training` says whether mean/invstd are x's own batch statistics (so the
    gradient of x flows through them) or constants (running statistics)."""
    outs, stats = _forward(x, conv_weights, bn_weight, bn_bias, mean, invstd, residual, strides, paddings, backend,
                           stats_eps)
    return [*outs, *(stats or ())]


def _forward(x, conv_weights, bn_weight, bn_bias, mean, invstd, residual, strides, paddings, backend, stats_eps):
    scale, shift = bn_affine(mean, invstd, bn_weight, bn_bias)
    return get_backend(backend).forward(x, scale, shift, _convs(conv_weights, strides, paddings), residual,
                                        stats_eps)


@bn_relu_conv2d_op.register_fake
def _(x, conv_weights, bn_weight, bn_bias, mean, invstd, residual, strides, paddings, training, backend, stats_eps):
    a = torch.empty_like(x)
    outs = [torch.nn.functional.conv2d(a, c.weight, None, c.stride, c.padding)
            for c in _convs(conv_weights, strides, paddings)]
    if stats_eps is not None:
        outs += [outs[0].new_empty((outs[0].shape[1],), dtype=mean.dtype) for _ in range(2)]
    return outs


def _save(ctx, x, conv_weights, bn_weight, bn_bias, mean, invstd, strides, paddings, training, backend):
    # Everything backward needs goes through save_for_backward, so
    # saved_tensors_hooks (and save_on_cpu) see and may offload all of it.
    # The residual is only added: its gradient is the first output's, and
    # nothing of it is kept.
    ctx.save_for_backward(x, mean, invstd, bn_weight, bn_bias, *conv_weights)
    ctx.conf = (strides, paddings, training, backend)


def _grads(ctx, grad_outputs, needs_weight: list[bool], needs_bn: bool, traceable: bool):
    """(dx, [dW per conv], d_gamma, d_beta) from what `_save` kept; needs_bn says
    whether x, gamma or beta wants a gradient."""
    x, mean, invstd, bn_weight, bn_bias, *conv_weights = ctx.saved_tensors
    strides, paddings, training, backend = ctx.conf
    scale, shift = bn_affine(mean, invstd, bn_weight, bn_bias)
    dx, d_weights, sum_dz, sum_dz_xhat = get_backend(backend).backward(
        list(grad_outputs[:len(conv_weights)]), x, mean, invstd, scale, shift,
        _convs(conv_weights, strides, paddings), training, needs_weight, needs_bn, traceable,
    )
    # d beta = sum dz and d gamma = sum dz * xhat, in training and eval alike.
    d_gamma = None if bn_weight is None or sum_dz_xhat is None else sum_dz_xhat.to(bn_weight.dtype)
    d_beta = None if bn_bias is None or sum_dz is None else sum_dz.to(bn_bias.dtype)
    return dx, d_weights, d_gamma, d_beta


def _setup_context(ctx, inputs, output):
    x, conv_weights, bn_weight, bn_bias, mean, invstd, residual, strides, paddings, training, backend, _ = inputs
    _save(ctx, x, conv_weights, bn_weight, bn_bias, mean, invstd, strides, paddings, training, backend)


def _op_backward(ctx, grad_outputs):
    refuse_double_backward("bn_relu_conv2d")
    needs = ctx.needs_input_grad
    n = len(ctx.conf[0]) // 2
    needs_weight = list(needs[1]) if isinstance(needs[1], (list, tuple)) else [needs[1]] * n
    dx, d_weights, d_gamma, d_beta = _grads(ctx, grad_outputs, needs_weight, any((needs[0], needs[2], needs[3])),
                                            traceable=True)
    d_residual = grad_outputs[0] if needs[6] else None
    return dx, d_weights, d_gamma, d_beta, None, None, d_residual, None, None, None, None, None


bn_relu_conv2d_op.register_autograd(_op_backward, setup_context=_setup_context)


class _BnReluConvFunction(torch.autograd.Function):
    """bn_relu_conv2d_op's forward and backward for eager mode (see module docstring)."""

    @staticmethod
    def forward(ctx, x, bn_weight, bn_bias, mean, invstd, residual, conf, *conv_weights):
        strides, paddings, training, backend, stats_eps = conf
        weights = list(conv_weights)
        outs, stats = _forward(x, weights, bn_weight, bn_bias, mean, invstd, residual, strides, paddings, backend,
                               stats_eps)
        _save(ctx, x, weights, bn_weight, bn_bias, mean, invstd, strides, paddings, training, backend)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: its conv backward is skipped
        if stats is not None:
            ctx.mark_non_differentiable(*stats)
        return (*outs, *(stats or ()))

    @staticmethod
    def backward(ctx, *grad_outputs):
        refuse_double_backward("bn_relu_conv2d")
        needs = ctx.needs_input_grad  # (x, bn_weight, bn_bias, mean, invstd, residual, conf, *conv_weights)
        dx, d_weights, d_gamma, d_beta = _grads(ctx, grad_outputs, list(needs[7:]), any(needs[:3]), traceable=False)
        d_residual = grad_outputs[0] if needs[5] else None
        return dx, d_gamma, d_beta, None, None, d_residual, None, *d_weights


def bn_relu_convs_autograd(x, conv_weights, bn_weight, bn_bias, mean, invstd, residual, strides, paddings, training,
                           backend, stats_eps=None) -> tuple[list[Tensor], Optional[tuple[Tensor, Tensor]]]:
    """([conv(relu(bn(x)), w) for w in conv_weights] with `residual` added to the
    first, and that output's (mean, invstd) for eps=stats_eps or None),
    differentiable in x, the weights, gamma/beta and the residual; mean/invstd
    are x's batch statistics when training."""
    if torch.compiler.is_compiling():
        outs = bn_relu_conv2d_op(x, conv_weights, bn_weight, bn_bias, mean, invstd, residual, strides, paddings,
                                 training, backend, stats_eps)
    else:
        conf = (strides, paddings, training, backend, stats_eps)
        outs = list(_BnReluConvFunction.apply(x, bn_weight, bn_bias, mean, invstd, residual, conf, *conv_weights))
    n = len(conv_weights)
    return outs[:n], (tuple(outs[n:]) if stats_eps is not None else None)
