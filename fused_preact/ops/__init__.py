"""Public functional API: fused BatchNorm2d -> ReLU -> Conv2d(bias=False).

    y = bn_relu_conv2d(x, conv_weight, bn_weight, bn_bias, running_mean, running_var,
                       stride=1, padding=0, training=True, momentum=0.1, eps=1e-5)

returns what nn.BatchNorm2d -> nn.ReLU -> nn.Conv2d(bias=False) return, with the
same gradients and running-statistics updates, but autograd keeps only x, the
per-channel mean/invstd and the parameters (relu(bn(x)) is recomputed in
backward). Backends: backend_names() (see backends.py).

Layers, from the user down: `bn_relu_conv2d` (public, checked) and
`bn_relu_convs` (the checked entry the nn modules share: several convs of one
activation, BatchNorm statistics handed along) -> `bn_relu_conv.apply` (the
custom op / autograd.Function) -> a backend (backends.py) -> its kernels.
"""
from typing import Optional, Union

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

from .backends import backend_names, get_backend, register_backend, resolve_backend
from . import bn_relu_conv
from .bn_relu_conv import normalization_stats
from .dropout import draw_seed

__all__ = ["bn_relu_conv2d", "backend_names", "register_backend"]

IntOrPair = Union[int, tuple[int, int]]
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def bn_relu_conv2d(x: Union[Tensor, list[Tensor]], conv_weight: Tensor, bn_weight: Optional[Tensor],
                   bn_bias: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   stride: IntOrPair = 1, padding: IntOrPair = 0, training: bool = True, momentum: float = 0.1,
                   eps: float = 1e-5, backend: str = "auto", residual: Optional[Tensor] = None,
                   shortcut_weight: Optional[Tensor] = None, shortcut_padding: IntOrPair = 0, dilation: IntOrPair = 1,
                   groups: int = 1, dropout: float = 0.0):
    """conv2d(relu(batch_norm(x)), conv_weight, stride, padding) [+ residual]; see
    the module docstring.

    running_mean/running_var are updated in place in training mode (pass None
    for both to use batch statistics without tracking, like
    BatchNorm2d(track_running_stats=False)); eval mode normalises with them.
    residual (the output's shape) is added to the result in the convolution's
    epilogue where the backend fuses it (a ResNet unit's identity shortcut).
    shortcut_weight: the first unit of a ResNet stage, where a = relu(bn(x))
    also feeds the projection shortcut (same stride): returns (conv(a,
    conv_weight), conv(a, shortcut_weight)), a computed once and recomputed once.
    dilation and groups: conv_weight's, as nn.Conv2d takes them (the Triton
    backend runs undilated, ungrouped convs: such a call falls back to another).
    x may be a list of (N, C_i, H, W) tensors, read as torch.cat(x, 1) (a
    DenseNet layer's input): autograd keeps the pieces, never their
    concatenation, and each piece gets its own gradient. The Triton kernels
    read the pieces in place; the other backends concatenate them for the
    call's forward and again for its backward (transient copies).
    dropout: in training, relu(bn(x)) is dropped with this probability (and
    the rest scaled by 1 / (1 - dropout)) before the convs, as nn.Dropout
    there would; the mask is made again in backward from a seed, never kept
    (ops/dropout.py; every backend makes the same mask, the Triton kernels
    in their loaders and dgrad's epilogue).
    """
    convs = [(conv_weight, stride, padding, dilation, groups)]
    if shortcut_weight is not None:
        convs.append((shortcut_weight, stride, shortcut_padding))
    outs, _ = bn_relu_convs("bn_relu_conv2d", x, convs, bn_weight, bn_bias, running_mean, running_var, training,
                            momentum, eps, backend, residual=residual, dropout=dropout if training else 0.0)
    return outs[0] if shortcut_weight is None else tuple(outs)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _pair(name: str, fn: str, v: IntOrPair, minimum: int) -> tuple[int, int]:
    if type(v) is tuple and len(v) == 2 and type(v[0]) is int and type(v[1]) is int and min(v) >= minimum:
        return v  # nn.Conv2d's own form, on every layer call: no further checks
    pair = (v, v) if _is_int(v) else tuple(v) if isinstance(v, (tuple, list)) else ()
    if len(pair) != 2 or not all(_is_int(i) and i >= minimum for i in pair):
        raise ValueError(f"{fn}: {name} must be an int >= {minimum} or a pair of them, got {v!r}")
    return pair


def bn_relu_convs(fn, x, convs, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, backend,
                  residual=None, x_stats=None, stats_eps=None, num_batches_tracked=None, dropout=0.0):
    """Checked entry shared by the public functions and the nn modules: `convs`
    is a list of (weight, stride, padding[, dilation, groups]) reading
    relu(bn(x)); `fn` names the caller in error messages. Returns (outputs, stats):

    - residual: added to the first output (fused into the epilogue where the
      backend can);
    - x_stats: x's batch statistics as the epilogue of the op that produced x
      handed them on (the same backend's form; skips the statistics pass over
      x in training);
    - stats_eps: when given and the backend computes them in its epilogue,
      stats = the first output's statistics for a next BatchNorm with that
      eps, to hand on as its x_stats (else None: the next layer computes them);
    - num_batches_tracked: incremented with the running statistics' update
      (training with running statistics only);
    - dropout: the probability of dropping relu(bn(x)) before the convs, in
      any mode (the caller passes 0 where its dropout is off)."""
    if not torch.compiler.is_compiling():
        _refuse_transforms(fn)
    pieces = _pieces(fn, x)  # x as a list of pieces: checked below as their concatenation (a shape alone)
    if pieces is not None:
        x = _concatenation_shape(pieces)
    _check_inputs(fn, x, convs, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps)
    weights = [conv[0] for conv in convs]
    if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):  # meta has no autocast
        # Mirror autocast's conv2d policy inside the opaque op: float32
        # activations and weights run in the autocast dtype (float64 is left
        # alone); BN parameters and statistics stay float32. Unlike eager
        # autocast, the batch statistics are then those of the rounded x.
        dtype = torch.get_autocast_dtype(x.device.type)
        if pieces is not None:
            pieces = [p.to(dtype) if p.dtype == torch.float32 else p for p in pieces]
            x = _concatenation_shape(pieces)
        x, *weights = (t.to(dtype) if t.dtype == torch.float32 else t for t in (x, *weights))
    channels_last = x.is_contiguous(memory_format=torch.channels_last) if pieces is None else \
        all(p.is_contiguous(memory_format=torch.channels_last) for p in pieces)
    strides = [i for conv in convs for i in _pair("stride", fn, conv[1], 1)]
    paddings = [i for conv in convs for i in _pair("padding", fn, conv[2], 0)]
    dilations = [i for conv in convs for i in _pair("dilation", fn, conv[3] if len(conv) > 3 else 1, 1)]
    groups = [_groups(conv) for conv in convs]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{fn}: dropout must be a probability in [0, 1), got {dropout!r}")
    plain = bn_relu_conv.plain_convs(dilations, groups)  # what every backend takes
    backend = resolve_backend(backend, x.device, x.dtype, channels_last, plain_convs=plain)
    if not plain or pieces is not None:  # hand-on statistics: of one tensor, in one backend's form
        x_stats = stats_eps = None
    if residual is not None:
        _check_residual(fn, residual, x, weights[0], strides[:2], paddings[:2], dilations[:2])
        residual = residual.to(x.dtype)
    if num_batches_tracked is not None and not (training and running_mean is not None):
        raise ValueError(f"{fn}: num_batches_tracked is counted only with running statistics in training mode")
    if not get_backend(backend).epilogue_stats:
        stats_eps = None
    # apply() runs the backend's forward of x with these statistics next: they may be deferred to it.
    joined = None
    if pieces is not None:  # the statistics (and the op's forward) read the pieces as the backend joins them, once
        with torch.no_grad():
            x = joined = bn_relu_conv.join_pieces(pieces, backend)
    stats = normalization_stats(x, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, training,
                                momentum, eps, backend, x_stats, defer=True)
    seed = draw_seed(x.device, tuple(x.shape), bn_weight) if dropout > 0 else None
    return bn_relu_conv.apply(x if pieces is None else pieces, weights, bn_weight, bn_bias, *stats, residual, strides,
                              paddings, dilations, groups, training, backend, stats_eps, joined, float(dropout), seed)


def _pieces(fn: str, x) -> Optional[list[Tensor]]:
    """x's pieces when x is a list or tuple of tensors (read as their
    concatenation along channels), checked; None when x is one tensor."""
    if not isinstance(x, (list, tuple)):
        return None
    if not x or not all(isinstance(p, Tensor) and p.dim() == 4 for p in x):
        raise ValueError(f"{fn}: x must be a 4-D tensor or a non-empty list of 4-D (N, C_i, H, W) tensors, got "
                         f"{[tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__ for p in x]}")
    first = x[0]
    for i, p in enumerate(x):
        if (p.shape[0], *p.shape[2:]) != (first.shape[0], *first.shape[2:]) or p.dtype != first.dtype \
                or p.device != first.device:
            raise ValueError(f"{fn}: x's pieces must share N, H, W, dtype and device (they are read as one tensor "
                             f"concatenated along channels); x[{i}] is {tuple(p.shape)} {p.dtype} on {p.device}, "
                             f"x[0] {tuple(first.shape)} {first.dtype} on {first.device}")
    return list(x)


def _concatenation_shape(pieces: list[Tensor]) -> Tensor:
    """A tensor with the pieces' concatenation's shape, dtype and device and
    no memory of its own (a broadcast scalar), for the checks."""
    return pieces[0].new_empty(()).expand(bn_relu_conv.input_shape(pieces))


def _groups(conv) -> int:
    return conv[4] if len(conv) > 4 else 1


def _check_residual(fn, residual, x, weight, stride, padding, dilation):
    h, w = (((size + 2 * p - d * (k - 1) - 1) // s + 1)
            for size, p, k, s, d in zip(x.shape[2:], padding, weight.shape[2:], stride, dilation))
    expected = (x.shape[0], weight.shape[0], h, w)
    if not isinstance(residual, Tensor) or tuple(residual.shape) != expected:
        raise ValueError(f"{fn}: residual must be a tensor of the output's shape {expected}, got "
                         f"{tuple(residual.shape) if isinstance(residual, Tensor) else type(residual).__name__}")
    if residual.device != x.device or not residual.is_floating_point():
        raise ValueError(f"{fn}: residual must be a floating-point tensor on x's device {x.device}, got "
                         f"{residual.dtype} on {residual.device}")


def _refuse_transforms(fn: str) -> None:
    """What cannot trace or transform the op (its kernels are opaque and its
    backward is its own), as one line the same on every backend. A user of
    these runs the network with fused=False; torch.compile and
    torch.export take the op as it is."""
    if torch._C._are_functorch_transforms_active():
        raise NotImplementedError(f"{fn}: torch.func transforms (vmap, grad, jacrev, jvp, ...) cannot run the fused "
                                  f"op; build the network with fused=False to use them")
    if forward_ad._current_level >= 0:
        raise NotImplementedError(f"{fn}: forward-mode AD (torch.autograd.forward_ad) cannot run the fused op; build "
                                  f"the network with fused=False to use it")
    if torch.jit.is_tracing():
        raise NotImplementedError(f"{fn}: torch.jit.trace cannot record the fused op; use torch.compile or "
                                  f"torch.export, or build the network with fused=False")


def _check_inputs(fn, x, convs, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps):
    # Runs on every layer call: written for speed (one pass per tensor, x's
    # device read once), since ResNet-1001 makes some 3000 such calls a step.
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"{fn}: x must be a 4-D (N, C, H, W) tensor, got "
                         f"{x.dim() if isinstance(x, Tensor) else type(x).__name__}-D")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{fn}: x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    device = x.device
    if device.type not in ("cpu", "cuda", "meta"):  # meta: shapes only (the reference and native backends, host_cost)
        raise ValueError(f"{fn}: x must be a CPU, CUDA or meta tensor, got device {device}")
    c = x.shape[1]
    for conv, name in zip(convs, ("conv_weight", "shortcut_weight")):
        w, g = conv[0], _groups(conv)
        if not _is_int(g) or g < 1 or c % g:
            raise ValueError(f"{fn}: groups must be a positive int dividing x's {c} channels, got {g!r}")
        if not isinstance(w, Tensor) or w.dim() != 4 or w.shape[1] != c // g or w.shape[0] % g:
            raise ValueError(f"{fn}: {name} must be a 4-D (C_out, {c // g}, kH, kW) tensor matching x's {c} "
                             f"channels in {g} group(s) (C_out a multiple of {g}), got shape "
                             f"{tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__}")
        if w.dtype != x.dtype and not (device.type != "meta" and torch.is_autocast_enabled(device.type)):
            raise TypeError(f"{fn}: {name} must have x's dtype {x.dtype}, got {w.dtype}")
        if w.device != device:
            raise ValueError(f"{fn}: {name} must be on x's device {device}, got {w.device}")
    for name, v in (("bn_weight", bn_weight), ("bn_bias", bn_bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if v is None:
            continue
        if not isinstance(v, Tensor):
            raise TypeError(f"{fn}: {name} must be a tensor or None, got {type(v).__name__}")
        if v.dim() != 1 or v.shape[0] != c:
            raise ValueError(f"{fn}: {name} must have shape ({c},), one value per channel of x, got {tuple(v.shape)}")
        if not v.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {v.dtype}")
        if v.device != device:
            raise ValueError(f"{fn}: {name} must be on x's device {device}, got {v.device}")
        if name.startswith("running") and not v.is_contiguous():  # every backend updates them in place
            raise ValueError(f"{fn}: {name} must be contiguous (updated in place), got strides {v.stride()}")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{fn}: running_mean and running_var must be given together or both be None")
    if not training and running_mean is None:
        raise ValueError(f"{fn}: eval mode (training=False) needs running_mean and running_var")
    if training and x.numel() // max(c, 1) <= 1:
        raise ValueError(f"{fn}: training needs more than one value per channel to compute batch statistics, "
                         f"got x of shape {tuple(x.shape)}")
    if not isinstance(training, bool):
        raise TypeError(f"{fn}: training must be True or False, got {training!r}")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{fn}: momentum must be a number in [0, 1] (the module resolves momentum=None), "
                         f"got {momentum!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{fn}: eps must be a positive number, got {eps!r}")
