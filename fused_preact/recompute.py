"""Unit- and segment-level recompute: keep a block's input (and its layers'
per-channel statistics) for backward and run the block again inside backward.

Unlike torch.utils.checkpoint, the kept input (and the parameters) go through
ctx.save_for_backward, so saved_tensors_hooks see exactly what is kept, and the
second run never updates BatchNorm running statistics again: it runs under
`frozen_running_stats()`, which the BN-ReLU-conv layers obey. The first run
records each fused layer's batch statistics (4 per-channel vectors, saved
beside the input) and the second run normalises with them (StatsTape), so it
makes no statistics pass of its own.
"""
import contextlib
import threading
from typing import Callable

import torch
from torch import Tensor

from .ops.bn_relu_conv import StatsTape, keep_activations, refuse_double_backward

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
        with torch.no_grad(), StatsTape().recording() as tape:
            out = run(x)
        # The layers' statistics, saved beside the input, are the second run's.
        ctx.save_for_backward(x, *params, *tape.tensors)
        ctx.num_params, ctx.layers = len(params), tape.layers
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        refuse_double_backward("recompute='unit'/'segment'")
        x, *saved = ctx.saved_tensors
        params, tape = saved[:ctx.num_params], StatsTape(saved[ctx.num_params:], ctx.layers)
        x = x.detach().requires_grad_(ctx.needs_input_grad[1])
        device, autocast_on, autocast_dtype = ctx.autocast
        # The second run keeps relu(bn(x)) per layer rather than recomputing it
        # a third time: it lives only until this block's backward returns. It
        # normalises with the first run's statistics (the tape): no statistics
        # pass, and the running statistics are left alone.
        with torch.enable_grad(), frozen_running_stats(), keep_activations(), tape.replaying(), \
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
