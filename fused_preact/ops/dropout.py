"""Dropout inside the op (applied after the ReLU, before the convolution, as
Wide ResNets place it): a mask that is regenerated in backward, never stored.

Each call draws one 64-bit seed, a one-element tensor on x's device drawn
from the device's default generator (torch.randint: under CUDA-graph capture
a replay draws a new one, and torch.compile traces it). Element i of the
activation (its index in logical NCHW order, whatever the layout) is kept
where a counter-based hash of (seed, i) maps to u >= p, u uniform in [0, 1)
with 53 bits, and scaled by 1 / (1 - p), as nn.Dropout scales. The op keeps
the seed for backward (8 bytes) and computes the same mask again there.

A unit/segment recompute's second run must drop the same elements: the seed
goes through the StatsTape (recompute_state.py) like the statistics.
"""
from typing import NamedTuple

import torch
from torch import Tensor

from .recompute_state import current_tape

# SplitMix64 (Steele, Lea and Flood 2014): its increment and two multipliers,
# as signed int64 (torch's int64 arithmetic wraps modulo 2**64).
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15
_MIX1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685  # 0x94D049BB133111EB


class Dropout(NamedTuple):
    """The op's dropout: probability p of zeroing an element, and the seed of this call's mask."""
    p: float
    seed: Tensor  # (1,) int64 on x's device

    def mask(self, like: Tensor) -> Tensor:
        """0 or 1 / (1 - p) per element of `like` (its shape, dtype and device)."""
        index = torch.arange(like.numel(), device=like.device, dtype=torch.int64).view(like.shape)
        u = _uniform(index, self.seed)
        return (u >= self.p).to(like.dtype) * (1.0 / (1.0 - self.p))


def _shift(z: Tensor, bits: int) -> Tensor:
    """z >> bits as unsigned 64-bit (torch shifts int64 arithmetically)."""
    return torch.bitwise_and(torch.bitwise_right_shift(z, bits), (1 << (64 - bits)) - 1)


def _uniform(index: Tensor, seed: Tensor) -> Tensor:
    """SplitMix64 of seed + (index + 1) * golden, as float64 in [0, 1)."""
    z = seed + (index + 1) * _GOLDEN
    z = torch.bitwise_xor(z, _shift(z, 30)) * _MIX1
    z = torch.bitwise_xor(z, _shift(z, 27)) * _MIX2
    z = torch.bitwise_xor(z, _shift(z, 31))
    return _shift(z, 11).to(torch.float64) * (1.0 / (1 << 53))


def draw_seed(device: torch.device, x_shape: tuple, bn_weight) -> Tensor:
    """The seed of a layer's call (its input's shape, its BatchNorm weight):
    drawn from the device's generator, or, in a recompute's second run, the
    one the first run drew for this call."""
    tape = current_tape()

    def draw() -> tuple[Tensor]:
        return (torch.randint(0, 1 << 62, (1,), device=device, dtype=torch.int64),)

    return draw()[0] if tape is None else tape.stats(("seed", x_shape, id(bn_weight)), draw)[0]
