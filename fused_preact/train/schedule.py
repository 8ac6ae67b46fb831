"""Iteration bookkeeping shared by every process: the learning rate at each
iteration, and which training images form each global batch.

Both are pure functions of (config, iteration), which is what makes a resumed
run repeat the uninterrupted one exactly: nothing about the data order or the
schedule lives only in memory.
"""
import dataclasses
import hashlib

import torch

from .config import ConfigError, TrainConfig


def derived_seed(kind: str, *numbers: int) -> int:
    """A 63-bit seed for one purpose (data order, augmentation, ...) that does
    not collide with another purpose's seeds for nearby numbers."""
    text = ":".join([kind, *map(str, numbers)]).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


@dataclasses.dataclass(frozen=True)
class Schedule:
    iters_per_epoch: int
    total_iters: int
    milestones: tuple[int, ...]  # in iterations
    lr: float
    lr_decay: float
    warmup_iters: int
    warmup_lr: float
    dropped_images: int = 0  # of each epoch: a last batch too small to split (see make_schedule)

    def lr_at(self, step: int) -> float:
        """Learning rate of iteration `step` (0-based)."""
        if step < self.warmup_iters:
            return self.warmup_lr
        return self.lr * self.lr_decay ** sum(step >= m for m in self.milestones)

    def epoch_of(self, step: int) -> int:
        return step // self.iters_per_epoch


def make_schedule(c: TrainConfig, train_images: int, processes: int = 1) -> Schedule:
    """Epochs of ceil(images / batch) iterations, the last batch holding the
    remainder, as fb.resnet.torch's dataloader.lua does (size(): math.ceil,
    line 64; the last batch's math.min, line 75): 782 iterations of batch 64 on
    CIFAR's 50k images. A remainder that would leave a process fewer than two
    images (BatchNorm needs two) is dropped instead."""
    full, remainder = divmod(train_images, c.batch_size)
    if full < 1:
        raise ConfigError(f"--batch-size {c.batch_size} is larger than the {train_images} training images")
    keeps_remainder = remainder >= 2 * processes
    ipe = full + (remainder > 0 and keeps_remainder)
    total = c.iters if c.iters is not None else c.epochs * ipe
    unit = ipe if c.milestone_unit == "epochs" else 1
    return Schedule(ipe, total, tuple(m * unit for m in c.milestones), c.lr, c.lr_decay, c.warmup_iters,
                    c.warmup_lr if c.warmup_lr is not None else c.lr, 0 if keeps_remainder else remainder)


class BatchOrder:
    """Global batch `step` = a slice of epoch `step // iters_per_epoch`'s
    permutation, drawn on the CPU from (seed, epoch) so every process and
    every device type sees the same order; an epoch's last batch holds what
    is left of it."""

    def __init__(self, seed: int, train_images: int, batch_size: int, iters_per_epoch: int, device: torch.device):
        self.seed, self.n, self.batch, self.ipe, self.device = seed, train_images, batch_size, iters_per_epoch, device
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> torch.Tensor:
        """The training images of global batch `step`."""
        epoch, position = divmod(step, self.ipe)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(derived_seed("order", self.seed, epoch))
            self._perm, self._epoch = torch.randperm(self.n, generator=gen).to(self.device), epoch
        return self._perm[position * self.batch:(position + 1) * self.batch]
