"""Unit- and segment-level recompute: keep only a block's input for backward and
run the block again inside backward.

Unlike torch.utils.checkpoint, the kept input (and the parameters) go through
ctx.save_for_backward, so saved_tensors_hooks see exactly what is kept, and the
second run never updates BatchNorm running statistics again: it runs under
`frozen_running_stats()`, which the BN-ReLU-conv layers obey.
"""
import contextlib
import threading
from typing import Callable

import torch
from torch import Tensor

from .ops.bn_relu_conv import keep_activations, refuse_double_backward

_state = threading.local()


def running_stats_frozen() -> bool:
    return getattr(_state, "frozen", False)


@contextlib.contextmanager
def frozen_running_stats():
    """Inside, training-mode BatchNorm layers of this package normalise with batch
    statistics as usual but leave running_mean/var and num_batches_tracked alone."""
    previous = running_stats_frozen()
    _state.frozen = True
    try:
        yield
    finally:
        _state.frozen = previous


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: Callable[[Tensor], Tensor], x: Tensor, *params: Tensor) -> Tensor:
        ctx.run = run
        device = x.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(x, *params)
        with torch.no_grad():
            return run(x)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        refuse_double_backward("recompute='unit'/'segment'")
        x, *params = ctx.saved_tensors
        x = x.detach().requires_grad_(ctx.needs_input_grad[1])
        device, autocast_on, autocast_dtype = ctx.autocast
        # The second run keeps relu(bn(x)) per layer rather than recomputing it
        # a third time: it lives only until this block's backward returns.
        with torch.enable_grad(), frozen_running_stats(), keep_activations(), \
                torch.autocast(device, dtype=autocast_dtype, enabled=autocast_on):
            out = ctx.run(x)
        wanted = [t for t, need in zip([x, *params], ctx.needs_input_grad[1:]) if need]
        grads = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True))
        return (None, *(next(grads) if need else None for need in ctx.needs_input_grad[1:]))


def recompute(run: Callable[[Tensor], Tensor], x: Tensor, params: list[Tensor]) -> Tensor:
    """run(x), keeping only x for backward and running `run` again there.

    `params` must list every tensor requiring grad that `run` uses besides x
    (the block's parameters): their gradients are computed in the second run.
    """
    if not torch.is_grad_enabled():
        return run(x)
    return _Recompute.apply(run, x, *params)
