"""The three BN-ReLU kernels, as one table per implementation.

`REFERENCE` computes them with plain tensor ops (any device, any dtype);
`native()` returns the compiled `torch.ops.fused_preact.*` kernels (C++ on the
CPU, CUDA on the GPU), whose fake (meta) implementations, needed by
torch.compile and opcheck, are registered here when the extension imports.
"""
from typing import Callable, NamedTuple

import torch
from torch._prims_common import suggest_memory_format

from .. import _extension, reference


class BnReluKernels(NamedTuple):
    # (x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps)
    #   -> (mean, invstd, scale, shift), the running statistics updated in place
    batch_norm_stats: Callable
    bn_relu_apply: Callable  # (x, scale, shift) -> relu(x * scale + shift)
    # (grad_act, x, mean, invstd, scale, shift, training) -> (dx, sum_dz, sum_dz_xhat)
    bn_relu_backward: Callable


REFERENCE = BnReluKernels(reference.batch_norm_stats, reference.bn_relu_apply, reference.bn_relu_backward)


def _kernel_output_like(x: torch.Tensor) -> torch.Tensor:
    """The layout the compiled kernels give their activation-shaped outputs:
    empty_like of their operand, which is x itself when H and W merge into one
    axis and otherwise a dense copy of x in its suggested memory format."""
    h, w = x.shape[2], x.shape[3]
    if h == 1 or w == 1 or x.stride(2) == w * x.stride(3):
        return torch.empty_like(x)
    return torch.empty_like(x, memory_format=suggest_memory_format(x))


def _channel_vector(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[1],), dtype=reference.stats_dtype(x))


def _register_fakes():
    lib = "fused_preact::"
    torch.library.register_fake(lib + "batch_norm_stats")(
        lambda x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps:
        tuple(_channel_vector(x) for _ in range(4))
    )
    torch.library.register_fake(lib + "bn_relu_apply")(lambda x, scale, shift: _kernel_output_like(x))
    torch.library.register_fake(lib + "bn_relu_backward")(
        lambda grad_act, x, mean, invstd, scale, shift, training:
        (_kernel_output_like(x), _channel_vector(x), _channel_vector(x))
    )


def _native_table():
    if not _extension.available():
        return None
    _register_fakes()
    ops = torch.ops.fused_preact
    return BnReluKernels(ops.batch_norm_stats, ops.bn_relu_apply, ops.bn_relu_backward)


_NATIVE = _native_table()


def native() -> BnReluKernels:
    """The compiled kernels; raises ExtensionNotBuiltError when they are not built."""
    if _NATIVE is None:
        _extension.load()
    return _NATIVE
