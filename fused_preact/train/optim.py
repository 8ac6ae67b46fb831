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
"""
from typing import Iterable

import torch

from .config import TrainConfig


class CaffeSGD(torch.optim.Optimizer):
    """SGD with momentum as Caffe's SGDSolver computes it (module docstring).
    Its state is `velocity`, the last update, in weight units."""

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        for name, value, ok in (("lr", lr, lr > 0), ("momentum", momentum, 0 <= momentum < 1),
                                ("weight_decay", weight_decay, weight_decay >= 0)):
            if not ok:
                raise ValueError(f"CaffeSGD: {name} out of range, got {value!r}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

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
            velocity = [self.state[p].setdefault("velocity", torch.zeros_like(p)) for p in params]
            torch._foreach_mul_(velocity, group["momentum"])
            torch._foreach_add_(velocity, grads, alpha=group["lr"])
            torch._foreach_sub_(params, velocity)
        return loss


def make_optimizer(c: TrainConfig, params: Iterable) -> torch.optim.Optimizer:
    """The configuration's SGD: c.sgd "pytorch" (torch.optim.SGD) or "caffe"."""
    if c.sgd == "caffe":
        return CaffeSGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
    return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay, nesterov=c.nesterov)
