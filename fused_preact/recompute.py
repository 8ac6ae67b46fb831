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
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .ops.bn_relu_conv import refuse_double_backward
from .ops.recompute_state import StatsTape, keep_activations

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
    def forward(ctx, run: Callable, slots, call: "_Call", *tensors: Tensor):
        inputs, params = tensors[:call.num_inputs], tensors[call.num_inputs:]
        ctx.run, ctx.slots, ctx.call = run, slots, call
        device = tensors[0].device.type
        # meta tensors (shapes only: host_cost) have no autocast to record or restore
        ctx.autocast = None if device == "meta" else \
            (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        with torch.no_grad(), StatsTape().recording() as tape:
            outs = call.outputs(run(*inputs))
        # The layers' statistics, saved beside the inputs, are the second run's.
        ctx.save_for_backward(*inputs, *params, *tape.tensors)
        ctx.num_params, ctx.layers = len(params), tape.layers
        ctx.param_ids = [id(p) for p in params]  # the tape names a layer by its BatchNorm weight's id
        return outs

    @staticmethod
    def backward(ctx, *grad_outs: Tensor):
        refuse_double_backward("recompute='unit'/'segment'")
        n, saved = ctx.call.num_inputs, ctx.saved_tensors
        needs = ctx.needs_input_grad[3:]
        inputs = [x.detach().requires_grad_(need) for x, need in zip(saved[:n], needs)]
        params = [p.detach().requires_grad_(need) for p, need in zip(saved[n:n + ctx.num_params], needs[n:])]
        # The second run's layers hold `params`, new tensors: the tape's record of each layer follows them.
        renamed = {old: id(new) for old, new in zip(ctx.param_ids, params)}
        layers = [(kind, shape, renamed.get(weight, weight)) for kind, shape, weight in ctx.layers]
        tape = StatsTape(saved[n + ctx.num_params:], layers)
        autocast = contextlib.nullcontext() if ctx.autocast is None else \
            torch.autocast(ctx.autocast[0], dtype=ctx.autocast[2], enabled=ctx.autocast[1])
        # The second run keeps relu(bn(x)) per layer rather than recomputing it
        # a third time: it lives only until this block's backward returns. It
        # normalises with the first run's statistics (the tape): no statistics
        # pass, and the running statistics are left alone.
        # Buffers are put back after the gradients: the second run's graph may hold them.
        with ctx.call.buffers_restored():
            with torch.enable_grad(), frozen_running_stats(), keep_activations(), tape.replaying(), \
                    autocast, _bound(ctx.slots, params):
                outs = ctx.call.outputs(ctx.run(*inputs))
            differentiable = [(o, g) for o, g in zip(outs, grad_outs) if o.requires_grad]
            wanted = [t for t, need in zip([*inputs, *params], needs) if need]
            grads = iter(torch.autograd.grad([o for o, _ in differentiable], wanted,
                                             [g for _, g in differentiable], allow_unused=True))
        return (None, None, None, *(next(grads) if need else None for need in needs))


class _Call:
    """How a recomputed call's pytree of arguments and results maps to the
    flat tensors an autograd.Function takes and returns; and, where asked,
    the module's buffers, which the second run must leave as the first run
    left them (a BatchNorm that is not this package's updates its running
    statistics in every run)."""

    def __init__(self, leaves: list, spec, module: nn.Module, restore_buffers: bool):
        self.slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
        # The tensors themselves go through save_for_backward, never into ctx.
        self.leaves = [None if isinstance(leaf, Tensor) else leaf for leaf in leaves]
        self.spec, self.num_inputs = spec, len(self.slots)
        self.module = module if restore_buffers else None
        self.out_spec = None

    def args(self, tensors):
        leaves = list(self.leaves)
        for i, t in zip(self.slots, tensors):
            leaves[i] = t
        return tree_unflatten(leaves, self.spec)

    def outputs(self, result) -> tuple[Tensor, ...]:
        leaves, self.out_spec = tree_flatten(result)
        if not leaves or not all(isinstance(t, Tensor) for t in leaves):
            raise TypeError(f"recompute: the recomputed call must return tensors (a tensor, or a list, tuple or dict "
                            f"of them), got {type(result).__name__}")
        return tuple(leaves)

    def result(self, outs):
        return tree_unflatten(list(outs), self.out_spec)

    @contextlib.contextmanager
    def buffers_restored(self):
        buffers = [] if self.module is None else [b for b in self.module.buffers()]
        kept = [b.clone() for b in buffers]
        try:
            yield
        finally:
            for b, value in zip(buffers, kept):
                b.copy_(value)


def recompute(run: Callable, x, module: nn.Module, restore_buffers: bool = False):
    """run(x), keeping only x (and the layers' statistics) for backward and
    running `run` again there. x is a tensor or a pytree of them (a list,
    tuple or dict, other leaves passed as they are); so is run's result.
    `run` may use, besides x, the parameters of `module`: their gradients
    are computed in the second run, for the tensors the first run found in
    the module's parameter slots. restore_buffers: put module's buffers back
    after the second run (needed where it holds BatchNorms, or other
    buffer-updating layers, that do not obey frozen_running_stats).

    Under torch.compile it is torch.utils.checkpoint, which dynamo traces
    (not an autograd.Function that reruns Python in backward): the compiled
    backward recomputes the values from the kept inputs, and buffer updates
    (running statistics), being mutations, stay in the forward graph: once."""
    if not torch.is_grad_enabled():
        return run(x)
    if torch.compiler.is_compiling():
        return torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False)
    leaves, spec = tree_flatten(x)
    inputs = [leaf for leaf in leaves if isinstance(leaf, Tensor)]
    if not inputs:
        raise TypeError(f"recompute: x must be a tensor or hold tensors, got {type(x).__name__}")
    slots = _trainable_slots(module)
    call = _Call(leaves, spec, module, restore_buffers)
    outs = _Recompute.apply(lambda *tensors: run(call.args(tensors)), slots, call, *inputs,
                            *(owner._parameters[name] for owner, name in slots))
    return call.result((outs,) if isinstance(outs, Tensor) else outs)
