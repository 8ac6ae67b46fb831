"""The "triton" backend: every step of the op in fused Triton kernels
(fused_preact.triton_kernels), so relu(bn(x)) is never written to memory:

- forward: one implicit-GEMM convolution per group of convs that share kernel
  size, stride and padding (a bottleneck stage entry's 1x1 conv1 and 1x1
  projection are one GEMM),
  BN-affine + ReLU applied while loading x; the residual add and the next
  BatchNorm's statistics come from the epilogue;
- backward: dgrad whose epilogue recomputes the ReLU mask and reduces
  sum dz, sum dz*xhat; wgrad recomputing the activation in its operand
  loader; the fixed-order sums of both kernels' partials in one launch; one
  elementwise pass for dx.

Runs on CUDA, and on CPU tensors under the Triton interpreter
(TRITON_INTERPRET=1), which is how it is tested without a GPU. "auto" picks it
on CUDA for channels_last input.
"""
import functools
import importlib.util
import threading
from itertools import groupby
from typing import Optional

import torch

from .. import reference
from .dropout import Dropout
from ..triton_kernels import SUPPORTED_DTYPES, dense_format, interpreting, launches_on


@functools.cache
def _kernels():
    """The kernel modules, imported on first use: importing triton takes seconds."""
    from .. import triton_kernels
    from ..triton_kernels import (batch_stats, bn_relu_backward, common, conv_dgrad, conv_forward,  # noqa: F401
                                  conv_wgrad, partial_stats, row_sums)

    return triton_kernels


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


class TritonBackend:
    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        if dtype not in SUPPORTED_DTYPES or not _TRITON_INSTALLED:
            return False
        # The interpreter's bf16 tl.dot returns garbage (values ~1e9 off), so
        # bf16 is refused there rather than computed wrongly.
        return launches_on(device) and not (device.type == "cpu" and interpreting() and dtype == torch.bfloat16)

    def automatic(self, device: torch.device, channels_last: bool) -> bool:
        # Interpreted kernels are for testing, never a default. NCHW input
        # reaches the kernels' loads uncoalesced along channels, where cuDNN
        # (the native backend) has layouts of its own: auto takes Triton for
        # channels_last input only.
        return device.type == "cuda" and channels_last

    def missing_hint(self, device: torch.device, dtype: torch.dtype) -> str:
        if not _TRITON_INSTALLED:
            return " (triton is not installed)"
        if dtype not in SUPPORTED_DTYPES:
            return f" (its kernels take {', '.join(str(d) for d in SUPPORTED_DTYPES)})"
        if device.type == "cpu" and interpreting() and dtype == torch.bfloat16:
            return " (the Triton interpreter computes bf16 matrix products wrongly; use float32 or float16 on the " \
                   "CPU, bf16 on CUDA)"
        return " (CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton is imported)"

    epilogue_stats = True
    general_convs = False  # the kernels run undilated, ungrouped convs; others fall back per call

    def join(self, pieces):
        # Read in place: every kernel that reads x takes its pieces' table.
        from ..triton_kernels.pieces import Pieces

        return Pieces(pieces)

    def batch_norm_stats(self, x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                         x_stats=None):
        stats_op = triton_batch_norm_stats if torch.compiler.is_compiling() else _batch_norm_stats
        return stats_op(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                        *(x_stats or (None, None, None)))

    def deferred_batch_norm_stats(self, x, weight, bias, running_mean, running_var, num_batches_tracked, momentum,
                                  eps, x_stats=None):
        # A small x: left to forward's conv, whose loader merges the partials
        # (one launch less per layer) and fills these tensors in.
        if torch.compiler.is_compiling():  # traced: the op above, never deferred
            return self.batch_norm_stats(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum,
                                         eps, x_stats)
        stats, fold = _kernels().batch_stats.batch_norm_stats(x, weight, bias, running_mean, running_var,
                                                              num_batches_tracked, momentum, eps, x_stats, defer=True)
        _finish_pending()
        _pending.fold = fold
        return stats

    def forward(self, x, scale, shift, convs, residual=None, stats_eps=None, dropout=None):
        _check_plain(convs)
        # The hand-on statistics are the epilogue's merged (count, mean, M2):
        # the next layer's conv folds them with its BatchNorm's affine and
        # running update in its loader (stats_eps, the next BatchNorm's eps,
        # is applied there).
        conv_forward = _kernels().conv_forward.conv_forward
        fold = _deferred_fold(scale)
        outs, stats = [], None
        # convs[0] leads the first group, so the residual and the statistics
        # belong to that launch's first output.
        for index, (_, group) in enumerate(groupby(convs, key=_geometry)):
            group = list(group)
            results, group_stats = conv_forward(
                x, scale, shift, [c.weight for c in group], group[0].stride, group[0].padding,
                residual=residual if index == 0 else None, stats=stats_eps is not None and index == 0, raw_stats=True,
                fold=fold if index == 0 else None, dropout=dropout,
            )
            outs += results
            stats = stats or group_stats
        return outs, stats

    def stats_like(self, out):
        # The epilogue's merged (count, mean, M2) rows.
        return [out.new_empty((1, out.shape[1]), dtype=torch.float32) for _ in range(3)]

    def backward(self, grads, x, mean, invstd, scale, shift, convs, training: bool, needs_weight: list[bool],
                 needs_bn: bool, traceable: bool = False, activation=None, dropout=None):
        _check_plain(convs)
        # activation is always None: relu(bn(x)) never exists outside the kernels here.
        used = [(g, c) for g, c in zip(grads, convs) if g is not None]
        bn_grad = needs_bn and bool(used)
        # dgrad sums the convs in one GEMM, which needs one stride: true of every
        # stage entry of the CIFAR nets, not of an ImageNet unit whose projection
        # is strided and whose conv1 is not.
        one_gemm = len({c.stride for _, c in used}) <= 1
        wanted = [need and g is not None for g, need in zip(grads, needs_weight)]
        if traceable:
            # Called from the torch.library op's backward, which AOT autograd
            # traces with fake tensors: go through the ops below, one per step.
            grad_weights = [triton_weight_grad(g, x, scale, shift, c.weight, c.stride, c.padding, *_traced(dropout))
                            if want else None for g, c, want in zip(grads, convs, wanted)]
        elif bn_grad and one_gemm:
            return _eager_backward(grads, convs, wanted, used, x, mean, invstd, scale, shift, training, dropout)
        else:
            partials = _weight_grad_partials(grads, convs, wanted, x, scale, shift, dropout)
            grad_weights = _spread_over(wanted, _kernels().row_sums.sum_partials(partials))
        if not bn_grad:
            return None, grad_weights, None, None
        if not one_gemm:
            dx, sum_dz, sum_dz_xhat = _input_grad_per_conv(used, x, mean, invstd, scale, shift, training, dropout)
        else:
            dx, sum_dz, sum_dz_xhat = triton_input_grad(
                [g for g, _ in used], [c.weight for _, c in used], [i for _, c in used for i in c.stride],
                [i for _, c in used for i in c.padding], x, mean, invstd, scale, shift, training, *_traced(dropout))
        return dx, grad_weights, sum_dz, sum_dz_xhat


def _check_plain(convs) -> None:
    """resolve_backend never hands dilated or grouped convs here (general_convs is False)."""
    if not all(c.plain for c in convs):
        raise ValueError("the Triton backend runs undilated, ungrouped convs only, got "
                         f"{[(c.dilation, c.groups) for c in convs]} (dilation, groups)")


# The statistics pass that deferred_batch_norm_stats left to the next forward.
_pending = threading.local()


def _deferred_fold(scale):
    """The pending LoaderFold whose outputs `scale` is, taken off the slot (or None)."""
    fold = getattr(_pending, "fold", None)
    if fold is None or fold.fold.scale is not scale:
        _finish_pending()
        return None
    _pending.fold = None
    return fold


def _finish_pending():
    """A pending fold no forward took (deferred for a forward that never
    came): merged by a launch of its own, so that its statistics are right."""
    fold = getattr(_pending, "fold", None)
    _pending.fold = None
    if fold is not None:
        fold.finish()


def _traced(dropout) -> tuple:
    """dropout as the traceable ops take it: (p, seed), or (0.0, None)."""
    return (0.0, None) if dropout is None else (dropout.p, dropout.seed)


def _untraced(p: float, seed) -> Optional[Dropout]:
    return None if p == 0 else Dropout(p, seed)


def _weight_grad_partials(grads, convs, wanted: list[bool], x, scale, shift, dropout) -> list:
    """The wanted convs' wgrad launches: their partials, to sum (row_sums.Partials)."""
    wgrad = _kernels().conv_wgrad.conv_wgrad_partials
    return [wgrad(g, x, scale, shift, c.weight.shape, c.stride, c.padding, c.weight.dtype, dense_format(c.weight),
                  dropout) for g, c, want in zip(grads, convs, wanted) if want]


def _spread_over(wanted: list[bool], results: list) -> list:
    """results, one per wanted entry, as a list with None where not wanted."""
    it = iter(results)
    return [next(it) if want else None for want in wanted]


def _eager_backward(grads, convs, wanted: list[bool], used, x, mean, invstd, scale, shift, training, dropout):
    """(dx, [dW per conv or None], sum_dz, sum_dz_xhat) in three launches or
    four: the weight gradients' (one per conv), dgrad (its sums finished by
    its own last programs), and dx, whose launch also sums the weight
    gradients' partials."""
    kernels = _kernels()
    jobs = _weight_grad_partials(grads, convs, wanted, x, scale, shift, dropout)
    dz, sum_dz, sum_dz_xhat = kernels.conv_dgrad.conv_dgrad(
        [g for g, _ in used], [c.weight for _, c in used], [c.stride for _, c in used], [c.padding for _, c in used],
        x, mean, invstd, scale, shift, dropout)
    dx, grad_weights = kernels.bn_relu_backward.input_grad_and_sums(dz, x, mean, invstd, scale, sum_dz, sum_dz_xhat,
                                                                     training, jobs)
    return dx, _spread_over(wanted, grad_weights), sum_dz, sum_dz_xhat


def _input_grad_per_conv(used, x, mean, invstd, scale, shift, training, dropout):
    """(dx, sum dz, sum dz*xhat) when the convs' strides differ: each conv's
    input gradient from PyTorch, summed, then BN-ReLU backward in tensor ops."""
    if not isinstance(x, torch.Tensor):  # Pieces: this rare path (no DenseNet takes it) concatenates them
        x = x.joined()
    grad_act = sum(torch.ops.aten.convolution_backward(
        g, x, c.weight, None, c.stride, c.padding, (1, 1), False, (0, 0), 1, (True, False, False))[0]
        for g, c in used)
    if dropout is not None:  # through the dropout: forward's mask
        grad_act = grad_act * dropout.mask(grad_act)
    sums = reference.bn_relu_backward_reduce(grad_act, x, mean, invstd, scale, shift)
    dx = reference.bn_relu_backward_input(grad_act, x, mean, invstd, scale, shift,
                                          *(sums if training else (None, None)))
    return dx, *sums


def _batch_norm_stats(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, *partials):
    # partials: x's (count, mean, M2) from the epilogue that produced it, or three Nones
    return _kernels().batch_stats.batch_norm_stats(x, weight, bias, running_mean, running_var, num_batches_tracked,
                                                   momentum, eps, None if partials[0] is None else partials)


def _input_grad(grads, weights, strides, paddings, x, mean, invstd, scale, shift, training, dropout):
    kernels = _kernels()
    pairs = [(strides[i], strides[i + 1]) for i in range(0, len(strides), 2)]
    pads = [(paddings[i], paddings[i + 1]) for i in range(0, len(paddings), 2)]
    dz, sum_dz, sum_dz_xhat = kernels.conv_dgrad.conv_dgrad(grads, weights, pairs, pads, x, mean, invstd, scale, shift,
                                                            dropout)
    dx = kernels.bn_relu_backward.bn_relu_input_grad(dz, x, mean, invstd, scale, sum_dz, sum_dz_xhat, training)
    return dx, sum_dz, sum_dz_xhat


def _weight_grad(grad, x, scale, shift, weight, stride, padding, dropout):
    return _kernels().conv_wgrad.conv_wgrad(grad, x, scale, shift, weight.shape, tuple(stride), tuple(padding),
                                            weight.dtype, dense_format(weight), dropout)


# The same steps as torch.library ops with fake implementations, for graphs
# that torch.compile / AOT autograd trace with fake tensors (a Triton launch
# cannot run on those). Eager code calls the functions above directly: an op
# call costs more host time than the small kernels of a CIFAR layer take.

@torch.library.custom_op("fused_preact::triton_batch_norm_stats",
                          mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def triton_batch_norm_stats(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                            running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                            num_batches_tracked: Optional[torch.Tensor], momentum: float, eps: float,
                            count: Optional[torch.Tensor], mean: Optional[torch.Tensor], m2: Optional[torch.Tensor]
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-mode BatchNorm of x: (mean, invstd, scale, shift) in fp32, the
    running statistics updated in place (Backend.batch_norm_stats); count,
    mean, m2: x's statistics partials handed on from an epilogue, or None."""
    return _batch_norm_stats(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, count,
                             mean, m2)


@triton_batch_norm_stats.register_fake
def _(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, count, mean, m2):
    return tuple(x.new_empty((x.shape[1],), dtype=torch.float32) for _ in range(4))


@torch.library.custom_op("fused_preact::triton_input_grad", mutates_args=())
def triton_input_grad(grads: list[torch.Tensor], weights: list[torch.Tensor], strides: list[int],
                      paddings: list[int], x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                      scale: torch.Tensor, shift: torch.Tensor, training: bool, dropout_p: float = 0.0,
                      dropout_seed: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, sum dz, sum dz*xhat) of BN -> ReLU (-> dropout) -> the convs, from
    their output gradients: dgrad with the ReLU and dropout masks and the sums
    in its epilogue, then one elementwise pass for dx. strides/paddings are
    flat [h0, w0, h1, w1, ...]."""
    dx, sum_dz, sum_dz_xhat = _input_grad(grads, weights, strides, paddings, x, mean, invstd, scale, shift, training,
                                          _untraced(dropout_p, dropout_seed))
    # The two sums are views of one buffer; outputs of an op may not alias.
    return dx, sum_dz, sum_dz_xhat.clone()


@triton_input_grad.register_fake
def _(grads, weights, strides, paddings, x, mean, invstd, scale, shift, training, dropout_p=0.0, dropout_seed=None):
    return torch.empty_like(x), torch.empty_like(mean), torch.empty_like(mean)


@torch.library.custom_op("fused_preact::triton_weight_grad", mutates_args=())
def triton_weight_grad(grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                       weight: torch.Tensor, stride: list[int], padding: list[int], dropout_p: float = 0.0,
                       dropout_seed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dW of conv(relu(x * scale + shift) (dropped out), weight) from the
    output gradient, the activation recomputed in the GEMM's operand loader."""
    return _weight_grad(grad, x, scale, shift, weight, stride, padding, _untraced(dropout_p, dropout_seed))


@triton_weight_grad.register_fake
def _(grad, x, scale, shift, weight, stride, padding, dropout_p=0.0, dropout_seed=None):
    # The weight's own layout, which AccumulateGrad keeps without a copy.
    return torch.empty_like(weight, memory_format=dense_format(weight))


def _geometry(conv):
    """Convs with equal geometry (kernel size, stride, padding) share one GEMM."""
    return tuple(conv.weight.shape[2:]), conv.stride, conv.padding
