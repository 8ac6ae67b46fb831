"""Unit- and segment-level recompute: keep a block's input (and its layers'
per-channel statistics) for backward and run the block again inside backward.

Unlike torch.utils.checkpoint, the kept input (and the parameters) go through
ctx.save_for_backward, so saved_tensors_hooks see exactly what is kept, and the
second run never updates BatchNorm running statistics again: it runs under
`frozen_running_stats()`, which the BN-ReLU-conv layers obey. The first run
records each fused layer's batch statistics (4 per-channel vectors, saved
beside the input) and the second run normalises with them (StatsTape), so it
makes no statistics pass of its own.

The second run binds the block's parameter slots to the tensors the first
run used (saved with the input), not to whatever the module holds when
backward runs: under torch.func.functional_call the first run sees the
substituted tensors, which are gone from the module by then, and their
gradients must reach them.
"""
import contextlib
import threading
from typing import Callable

import torch
from torch import Tensor, nn

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


def _trainable_slots(module: nn.Module) -> list[tuple[nn.Module, str]]:
    """(owner, name) of each distinct parameter of `module` that requires grad."""
    slots, seen = [], set()
    for owner in module.modules():
        for name, p in owner._parameters.items():
            if p is not None and p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                slots.append((owner, name))
    return slots


@contextlib.contextmanager
def _bound(slots: list[tuple[nn.Module, str]], tensors):
    """Inside, each slot holds the matching tensor (as functional_call binds them)."""
    previous = [owner._parameters[name] for owner, name in slots]
    for (owner, name), t in zip(slots, tensors):
        owner._parameters[name] = t
    try:
        yield
    finally:
        for (owner, name), p in zip(slots, previous):
            owner._parameters[name] = p


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: Callable[[Tensor], Tensor], slots, x: Tensor, *params: Tensor) -> Tensor:
        ctx.run, ctx.slots = run, slots
        device = x.device.type
        # meta tensors (shapes only: host_cost) have no autocast to record or restore
        ctx.autocast = None if device == "meta" else \
            (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        with torch.no_grad(), StatsTape().recording() as tape:
            out = run(x)
        # The layers' statistics, saved beside the input, are the second run's.
        ctx.save_for_backward(x, *params, *tape.tensors)
        ctx.num_params, ctx.layers = len(params), tape.layers
        ctx.param_ids = [id(p) for p in params]  # the tape names a layer by its BatchNorm weight's id
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        refuse_double_backward("recompute='unit'/'segment'")
        x, *saved = ctx.saved_tensors
        params = [p.detach().requires_grad_(need) for p, need in zip(saved[:ctx.num_params], ctx.needs_input_grad[3:])]
        # The second run's layers hold `params`, new tensors: the tape's record of each layer follows them.
        renamed = {old: id(new) for old, new in zip(ctx.param_ids, params)}
        layers = [(shape, renamed.get(weight, weight)) for shape, weight in ctx.layers]
        tape = StatsTape(saved[ctx.num_params:], layers)
        x = x.detach().requires_grad_(ctx.needs_input_grad[2])
        autocast = contextlib.nullcontext() if ctx.autocast is None else \
            torch.autocast(ctx.autocast[0], dtype=ctx.autocast[2], enabled=ctx.autocast[1])
        # The second run keeps relu(bn(x)) per layer rather than recomputing it
        # a third time: it lives only until this block's backward returns. It
        # normalises with the first run's statistics (the tape): no statistics
        # pass, and the running statistics are left alone.
        with torch.enable_grad(), frozen_running_stats(), keep_activations(), tape.replaying(), \
                autocast, _bound(ctx.slots, params):
            out = ctx.run(x)
        wanted = [t for t, need in zip([x, *params], ctx.needs_input_grad[2:]) if need]
        grads = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True))
        return (None, None, *(next(grads) if need else None for need in ctx.needs_input_grad[2:]))


def recompute(run: Callable[[Tensor], Tensor], x: Tensor, module: nn.Module) -> Tensor:
    """run(x), keeping only x (and the layers' statistics) for backward and
    running `run` again there. `run` may use, besides x, the parameters of
    `module`: their gradients are computed in the second run, for the
    tensors the first run found in the module's parameter slots."""
    if not torch.is_grad_enabled():
        return run(x)
    slots = _trainable_slots(module)
    return _Recompute.apply(run, slots, x, *(owner._parameters[name] for owner, name in slots))
