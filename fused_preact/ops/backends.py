"""Backends of bn_relu_conv2d: who computes the statistics, the fused forward and
the recomputing backward.

A backend sees the BN affine already folded into per-channel `scale` and
`shift` (z = x * scale + shift), so training and eval mode, running statistics
and the gamma/beta gradients stay in one place (bn_relu_conv.py); what a
backend provides is the `Backend` protocol. "reference" and "native" are
`KernelBackend`s (BN-ReLU kernels from a table, PyTorch's convolutions),
"triton" is `TritonBackend` (triton_backend.py); `register_backend` adds more.
"""
from typing import Callable, NamedTuple, Optional, Protocol

import torch

from .. import _extension, reference
from .dropout import Dropout
from .kernel_tables import REFERENCE, BnReluKernels, native
from .triton_backend import TritonBackend


class Conv(NamedTuple):
    weight: torch.Tensor
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    @property
    def plain(self) -> bool:
        """Undilated and ungrouped: what every backend takes (see Backend.general_convs)."""
        return self.dilation == (1, 1) and self.groups == 1


class Backend(Protocol):
    """What bn_relu_conv2d asks of a backend. `convs` are `Conv`s all reading
    the same activation relu(z): one conv normally, two for a stage's first
    unit (conv1 and the projection shortcut)."""

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether it has kernels for `dtype` tensors on `device` here."""

    def automatic(self, device: torch.device, channels_last: bool) -> bool:
        """Whether "auto" may pick it for an input on `device` in (or not in)
        the channels_last layout."""

    def missing_hint(self, device: torch.device, dtype: torch.dtype) -> str:
        """Why supports() is False, for the error message ("" if nothing to add)."""

    # Whether it takes dilated and grouped convs; "auto" and an explicit
    # choice fall back to one that does, for that call (chain) alone. Every
    # backend takes dropout (forward's and backward's `dropout`).
    general_convs: bool

    # Whether forward() computes an output's batch statistics in its epilogue
    # (stats_eps); a backend that would need an extra pass for them leaves
    # them to the next layer's batch_norm_stats instead.
    epilogue_stats: bool

    def join(self, pieces: list[torch.Tensor]):
        """x given as pieces along channels (same N, H, W), in the form this
        backend's batch_norm_stats, forward and backward take it: their
        concatenation (a transient copy), or what its kernels read the pieces
        through in place."""

    def batch_norm_stats(self, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                         running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                         num_batches_tracked: Optional[torch.Tensor], momentum: float, eps: float,
                         x_stats: Optional[tuple[torch.Tensor, ...]] = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training-mode BatchNorm of x: (mean, invstd, scale, shift), fp32 (fp64
        for fp64 x), with relu(bn(x)) = relu(x * scale + shift); updates the
        running statistics (unbiased variance) and num_batches_tracked in place
        where given. weight/bias/running tensors are None or of the statistics
        dtype. x_stats: x's statistics as this backend's forward handed them on
        (its epilogue; opaque to callers), so no pass reads x for them."""

    def forward(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, convs: list["Conv"],
                residual: Optional[torch.Tensor] = None, stats_eps: Optional[float] = None,
                dropout: Optional[Dropout] = None
                ) -> tuple[list[torch.Tensor], Optional[tuple[torch.Tensor, torch.Tensor]]]:
        """(one output per conv, conv(relu(z)), `residual` added to the first;
        the first output's statistics for a next BatchNorm with eps=stats_eps,
        in the backend's own hand-on form (a list of tensors shaped as
        stats_like says, for batch_norm_stats' x_stats), or None when stats_eps
        is None). dropout: relu(z) times dropout.mask(relu(z)) feeds the convs."""

    def stats_like(self, out: torch.Tensor) -> list[torch.Tensor]:
        """Empty tensors shaped like forward's hand-on statistics of output
        `out` (the op's fake implementation, for torch.compile)."""

    def backward(self, grads: list[Optional[torch.Tensor]], x: torch.Tensor, mean: torch.Tensor,
                 invstd: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, convs: list["Conv"],
                 training: bool, needs_weight: list[bool], needs_bn: bool, traceable: bool = False,
                 activation: Optional[torch.Tensor] = None, dropout: Optional[Dropout] = None
                 ) -> tuple[Optional[torch.Tensor], list[Optional[torch.Tensor]], Optional[torch.Tensor],
                            Optional[torch.Tensor]]:
        """(dx, [dW per conv], sum_dz, sum_dz_xhat). needs_bn: x, gamma or beta
        wants a gradient (else dx and the sums are None); traceable: the call is
        traced with fake tensors (torch.compile), so only ops with fake
        implementations may run; activation: relu(z) when forward kept it
        (else recomputed where needed; with forward's dropout applied);
        dropout: forward's, whose mask backward makes again.

    A backend that materialises relu(z) in forward may also offer
    `forward_keeping_activation(x, scale, shift, convs, residual, stats_eps)
    -> (outs, stats, relu(z))`, which the op uses inside keep_activations().

    A backend may also offer `deferred_batch_norm_stats(...)`, with
    batch_norm_stats' arguments and results, whose four tensors may stay
    unfilled until this backend's next forward(x, scale, shift, ...) with them
    fills them (Triton, for a small x: that conv merges x's partials while
    loading x, one launch less). The op calls it only where that forward is
    its next step and nothing reads the statistics before it."""


class KernelBackend:
    """BN-ReLU kernels from a table, convolutions from PyTorch (cuDNN, oneDNN).

    relu(bn(x)) is materialised only transiently: once in forward to feed the
    convolutions, and once more in backward to feed their weight gradient; it
    is never kept between the two.
    """

    epilogue_stats = False
    general_convs = True

    def join(self, pieces):
        return torch.cat(pieces, 1)

    def __init__(self, kernels: Callable[[], BnReluKernels], devices: Callable[[torch.device], bool]):
        self._kernels = kernels
        self._supports = devices

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        return self._supports(device)

    def automatic(self, device: torch.device, channels_last: bool) -> bool:
        return True

    def missing_hint(self, device: torch.device, dtype: torch.dtype) -> str:
        return ""

    def batch_norm_stats(self, x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                         x_stats=None):
        if x_stats is not None:  # (mean, invstd) from forward(stats_eps=eps), which the models never ask for
            return *x_stats, *reference.bn_fold_from_invstd(*x_stats, eps, x.numel() // x.shape[1], weight, bias,
                                                            running_mean, running_var, num_batches_tracked, momentum)
        return self._kernels().batch_norm_stats(x, weight, bias, running_mean, running_var, num_batches_tracked,
                                                momentum, eps)

    def stats_like(self, out):
        return [out.new_empty((out.shape[1],), dtype=reference.stats_dtype(out)) for _ in range(2)]

    def forward(self, x, scale, shift, convs: list[Conv], residual=None, stats_eps=None, dropout=None):
        return self.forward_keeping_activation(x, scale, shift, convs, residual, stats_eps, dropout)[:2]

    def forward_keeping_activation(self, x, scale, shift, convs: list[Conv], residual=None, stats_eps=None,
                                   dropout=None):
        k = self._kernels()
        a = _masked(k.bn_relu_apply(x, scale, shift), None if dropout is None else dropout.mask(x))
        outs = [torch.nn.functional.conv2d(a, c.weight, None, c.stride, c.padding, c.dilation, c.groups)
                for c in convs]
        if residual is not None:
            outs[0] += residual
        if stats_eps is None:
            return outs, None, a
        # Asked for all the same (the models do not ask: epilogue_stats is False): a separate pass.
        return outs, tuple(k.batch_norm_stats(outs[0], None, None, None, None, None, 0.0, stats_eps)[:2]), a

    def backward(self, grads: list[Optional[torch.Tensor]], x, mean, invstd, scale, shift, convs: list[Conv],
                 training: bool, needs_weight: list[bool], needs_bn: bool, traceable: bool = False, activation=None,
                 dropout=None):
        k = self._kernels()
        # The conv weight gradient needs relu(bn(x)) (kept, or recomputed and
        # freed on return); the input gradient reads only its input's shape.
        wanted = [need_w and grad is not None for grad, need_w in zip(grads, needs_weight)]
        mask = None if dropout is None else dropout.mask(x)  # made once: for relu(z) and for its gradient
        a = x if not any(wanted) else activation if activation is not None else \
            _masked(k.bn_relu_apply(x, scale, shift), mask)
        grad_act, grad_weights = None, []
        for grad, conv, need_w in zip(grads, convs, wanted):
            if grad is None:
                grad_weights.append(None)
                continue
            da, dw, _ = torch.ops.aten.convolution_backward(
                grad, a, conv.weight, None, conv.stride, conv.padding, conv.dilation, False, (0, 0), conv.groups,
                (needs_bn, need_w, False),
            )
            if needs_bn:
                grad_act = da if grad_act is None else grad_act + da
            grad_weights.append(dw)
        if grad_act is None:  # nothing upstream of the convolutions wants a gradient
            return None, grad_weights, None, None
        grad_act = _masked(grad_act, mask)  # through the dropout: the same mask
        dx, sum_dz, sum_dz_xhat = k.bn_relu_backward(grad_act, x, mean, invstd, scale, shift, training)
        return dx, grad_weights, sum_dz, sum_dz_xhat


def _masked(t: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    return t if mask is None else t * mask


def _native_supports(device: torch.device) -> bool:
    if device.type in ("cpu", "meta"):  # meta: the ops' fake (shape) implementations
        return _extension.available()
    return device.type == "cuda" and _extension.has_cuda_kernels()


_BACKENDS: dict[str, Backend] = {
    "reference": KernelBackend(lambda: REFERENCE, lambda device: True),
    "native": KernelBackend(native, _native_supports),
    "triton": TritonBackend(),
}
# "auto" tries these in order and takes the first that supports the device and
# dtype and allows automatic use there (Triton: CUDA, channels_last input).
_AUTO_ORDER = ["triton", "native", "reference"]


def register_backend(name: str, backend: Backend, auto_priority: Optional[int] = None) -> None:
    """Add a backend; with auto_priority it joins "auto"'s preference list there."""
    _BACKENDS[name] = backend
    if auto_priority is not None:
        _AUTO_ORDER.insert(auto_priority, name)


def backend_names() -> list[str]:
    return ["auto", *_BACKENDS]


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype, channels_last: bool = True,
                    plain_convs: bool = True) -> str:
    """The concrete backend name for `name` and an input of `dtype` on `device`
    (channels_last: whether it is in that layout), or a clear error. Where
    some conv is dilated or grouped (plain_convs False) and `name` does not
    take such convs, the first automatic choice that does, for this call."""
    if name != "auto" and name in _BACKENDS and not plain_convs and not _BACKENDS[name].general_convs:
        name = "auto"
    if name == "auto":
        return next(b for b in _AUTO_ORDER
                    if _BACKENDS[b].supports(device, dtype) and _BACKENDS[b].automatic(device, channels_last)
                    and (plain_convs or _BACKENDS[b].general_convs))
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {backend_names()}, got {name!r}")
    if not _BACKENDS[name].supports(device, dtype):
        if name == "native":
            _extension.load()  # raises the build error when the extension is missing altogether
        raise RuntimeError(f"backend={name!r} has no kernels for {dtype} tensors on device {device} in this "
                           f"environment" + _BACKENDS[name].missing_hint(device, dtype))
    return name


def get_backend(name: str) -> Backend:
    return _BACKENDS[name]
