"""SGD with momentum in the two forms the paper's two recipes used.

PyTorch (and Torch7's optim.sgd, which fb.resnet.torch's train.lua calls with
dampening 0) keeps the velocity in gradient units and applies the learning
rate afterwards:

    v = m * v + (g + wd * w);   w -= lr * v

Caffe's SGDSolver (the paper's recipe: sgd_solver.cpp, Regularize then
ComputeUpdateValue) keeps the velocity in weight units, the learning rate
already folded in:

    v = m * v + lr * (g + wd * w);   w -= v

At a constant learning rate the two are the same (Caffe's v is lr times
PyTorch's). They differ for the few dozen iterations after the rate changes:
after a x10 step PyTorch's update is at once 10x as large, while Caffe's
velocity still holds the old rate's steps, which decay with m. The paper's
recipe changes it three times (0.01 -> 0.1 after the 400 warm-up iterations,
then /10 at 32k and 48k).

Both are written out here with torch._foreach ops (PyTorchSGD is
torch.optim.SGD's form) so that the learning rate may also be a 0-dim tensor
on the device, changed in place by the schedule: the form a CUDA graph
captures (--cuda-graphs, graphs.py), with no read of the device from the host.
A float rate and a tensor rate give the same bits.
"""
from typing import Iterable

import torch
from torch import Tensor

from .config import TrainConfig


def _state_zeros(state: dict, key: str, like: Tensor) -> Tensor:
    """state[key], created as zeros like `like` the first time (not allocated on every call, as setdefault would)."""
    if key not in state:
        state[key] = torch.zeros_like(like, memory_format=torch.preserve_format)
    return state[key]


def _times_lr(tensors: list[Tensor], lr) -> list[Tensor]:
    # The rate enters by its own multiply, never as an `alpha=`: a float and a
    # tensor rate then give the same bits (alpha= may fuse it into a
    # multiply-add, and a tensor alpha is read on the host, which a CUDA graph
    # cannot hold).
    return torch._foreach_mul(tensors, lr)


class _CapturableStep:
    """What a captured step needs of the two SGD forms: the rate may be a
    0-dim tensor on the parameters' device (group["lr"], see capturable_lr),
    read by the device, and the velocity can be created before the first step
    (init_state), so that the step recorded is the ordinary one."""

    VELOCITY: str

    def init_state(self) -> None:
        """Every parameter's velocity, zero, now instead of at its first step."""
        for group in self.param_groups:
            if self._keeps_velocity(group):
                for p in group["params"]:
                    _state_zeros(self.state[p], self.VELOCITY, p)

    def _keeps_velocity(self, group: dict) -> bool:
        return True  # Caffe's form, also without momentum: its velocity is the update

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            self._update(group, params, grads)
        return loss

    def _update(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> None:
        """One group's update from its gradients (weight decay added)."""
        raise NotImplementedError

    def _velocities(self, params: list[Tensor]) -> list[Tensor]:
        # A zero velocity makes the first step the same computation as every
        # later one: m * 0 + d is d.
        return [_state_zeros(self.state[p], self.VELOCITY, p) for p in params]


class CaffeSGD(_CapturableStep, torch.optim.Optimizer):
    """SGD with momentum as Caffe's SGDSolver computes it (module docstring).
    Its state is `velocity`, the last update, in weight units. The rate may be
    a float or a 0-dim tensor (the same bits either way)."""

    VELOCITY = "velocity"

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        for name, value, ok in (("lr", lr, lr > 0), ("momentum", momentum, 0 <= momentum < 1),
                                ("weight_decay", weight_decay, weight_decay >= 0)):
            if not ok:
                raise ValueError(f"CaffeSGD: {name} out of range, got {value!r}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    def _update(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> None:
        velocity = self._velocities(params)
        torch._foreach_mul_(velocity, group["momentum"])
        torch._foreach_add_(velocity, _times_lr(grads, group["lr"]))
        torch._foreach_sub_(params, velocity)


class PyTorchSGD(_CapturableStep, torch.optim.SGD):
    """torch.optim.SGD's momentum form (dampening 0), written out like CaffeSGD
    so that the rate may be a 0-dim tensor on the device: torch's own step
    reads a tensor rate on the host. Its state and options are torch.optim.SGD's
    (`momentum_buffer`), so checkpoints of either load into the other. It
    differs from torch's step in rounding (w -= lr * v rounds lr * v first,
    where torch fuses it) and in taking no dampening, maximize or foreach
    option: a loaded group's values for those are ignored."""

    VELOCITY = "momentum_buffer"

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False):
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)

    def _keeps_velocity(self, group: dict) -> bool:
        return group["momentum"] != 0  # plain SGD keeps none, as torch's

    def _update(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> None:
        if self._keeps_velocity(group):
            velocity = self._velocities(params)
            torch._foreach_mul_(velocity, group["momentum"])
            torch._foreach_add_(velocity, grads)
            grads = torch._foreach_add(grads, velocity, alpha=group["momentum"]) if group["nesterov"] else velocity
        torch._foreach_sub_(params, _times_lr(grads, group["lr"]))


def make_optimizer(c: TrainConfig, params: Iterable) -> torch.optim.Optimizer:
    """The configuration's SGD: c.sgd "pytorch" (PyTorchSGD) or "caffe" (CaffeSGD)."""
    if c.sgd == "caffe":
        return CaffeSGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
    return PyTorchSGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay, nesterov=c.nesterov)


def capturable_lr(optimizer: torch.optim.Optimizer) -> None:
    """Each group's rate as a 0-dim tensor on its parameters' device and in
    their dtype (for fp32 parameters, which the trainer keeps, a float rate
    enters the update rounded to fp32, so the tensor gives the same bits; for
    fp16/bf16 ones it is rounded further), from now on changed in place by set_lr: a
    captured step reads the current rate from it, so the schedule needs no
    recapture."""
    for group in optimizer.param_groups:
        p, lr = group["params"][0], group["lr"]
        rate = lr.detach().clone() if isinstance(lr, Tensor) else torch.tensor(lr, dtype=torch.float64)
        group["lr"] = rate.to(device=p.device, dtype=p.dtype)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's rate: in place where it is a tensor (a captured step holds that tensor)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
