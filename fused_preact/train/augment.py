"""Batched input pipeline on the training device: uint8 images in, normalised
float batches out, with the paper's pad-4 random crop and horizontal flip.

No per-image Python loop: a batch's crop offsets and flips are drawn at once
and applied with one gather. The random draws for global step `step` come
from a generator seeded by (seed, step), for the whole global batch, so

- a resumed run draws exactly what the uninterrupted run drew, and
- with several processes each takes its rows of the same draw: the augmented
  images do not depend on the number of processes.

Order (as fb.resnet.torch's CIFAR pipeline): normalise, then zero-pad and
crop, so the padding is zero in normalised space (the mean colour); the flip
and the crop commute.
"""
from typing import Optional

import torch
from torch import Tensor

# Per-channel mean/std on the 0-255 scale, as the official Torch code
# (fb.resnet.torch datasets/cifar10.lua, cifar100.lua) hard-codes them.
OFFICIAL_CHANNEL_STATS = {
    "cifar10": ((125.3, 123.0, 113.9), (63.0, 62.1, 66.7)),
    "cifar100": ((129.3, 124.1, 112.4), (68.2, 65.4, 70.4)),
}
NORMALIZATIONS = ("pixel-mean", "channel", "none")


class Normalizer:
    """x_uint8 -> float: subtract the per-pixel mean of the training set
    ("pixel-mean", the first ResNet paper's and the Caffe recipe's choice),
    or (x - mean_c) / std_c per channel ("channel", the official Torch code's;
    official constants for CIFAR, training-set statistics otherwise), or
    only scale to [0, 1] ("none")."""

    def __init__(self, kind: str, train_images: Tensor, dataset: str, device: torch.device):
        if kind not in NORMALIZATIONS:
            raise ValueError(f"normalisation must be one of {NORMALIZATIONS}, got {kind!r}")
        self.kind = kind
        if kind == "pixel-mean":
            # Mean in chunks: a float copy of all of CIFAR's training set would be 600 MB.
            total = torch.zeros(train_images.shape[1:], dtype=torch.float64, device=train_images.device)
            for chunk in train_images.split(4096):
                total += chunk.sum(dim=0, dtype=torch.float64)
            self.shift = (total / len(train_images)).float().to(device)[None]
            self.scale = torch.ones((), device=device)
        elif kind == "channel":
            if dataset in OFFICIAL_CHANNEL_STATS:
                mean, std = (torch.tensor(v) for v in OFFICIAL_CHANNEL_STATS[dataset])
            else:
                mean, std = channel_stats(train_images)
            self.shift = mean.float().to(device).view(1, 3, 1, 1)
            self.scale = (1.0 / std.float()).to(device).view(1, 3, 1, 1)
        else:
            self.shift = torch.zeros((), device=device)
            self.scale = torch.full((), 1.0 / 255.0, device=device)

    def __call__(self, images: Tensor) -> Tensor:
        return (images.float() - self.shift) * self.scale


def channel_stats(images: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std (0-255 scale) of uint8 images (N, 3, H, W)."""
    x = images.double().transpose(0, 1).reshape(images.shape[1], -1)
    return x.mean(dim=1), x.std(dim=1)


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """A generator whose draws depend only on (seed, step): reproducible after a
    resume and identical in every process."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + step) % (2**63))
    return gen


def random_crop_flip(x: Tensor, pad: int, flip: bool, gen: torch.Generator, rows: Optional[slice] = None) -> Tensor:
    """Zero-pad x (B, C, H, W) by `pad` and take a random HxW crop per image,
    mirrored left-right with probability 1/2 when `flip`. Offsets and flips are
    drawn for `rows.stop` images (the global batch) and rows `rows` applied, so
    a process's share of a batch sees what a single process would."""
    b, _, h, w = x.shape
    rows = rows or slice(0, b)
    total = rows.stop
    if pad == 0 and not flip:
        return x
    offsets = torch.randint(0, 2 * pad + 1, (total, 2), generator=gen, device=gen.device)[rows].to(x.device)
    mirror = torch.rand(total, generator=gen, device=gen.device)[rows].to(x.device) < 0.5 if flip else None
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad)) if pad else x
    ys = offsets[:, 0:1] + torch.arange(h, device=x.device)  # (B, H)
    cols = torch.arange(w, device=x.device).expand(b, w)
    if mirror is not None:
        cols = torch.where(mirror[:, None], w - 1 - cols, cols)
    xs = offsets[:, 1:2] + cols  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    # Advanced indexing over (batch, row, col) with the channel slice between puts
    # the channel last: (B, H, W, C); permute back to a (B, C, H, W) view.
    out = padded[batch, :, ys[:, :, None], xs[:, None, :]]
    return out.permute(0, 3, 1, 2)
