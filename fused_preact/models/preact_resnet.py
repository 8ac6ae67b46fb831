"""Pre-activation ResNets for CIFAR (He et al. 2016, "Identity Mappings in Deep
Residual Networks"), built as the official code builds them (KaimingHe/
resnet-1k-layers, resnet-pre-act.lua):

- stem: 3x3 conv 3 -> 16, no BN/ReLU after it;
- three stages of n units (strides 1, 2, 2); bottleneck units (depth 9n+2,
  outputs 64/128/256, bottleneck width out/4) or basic units (6n+2, 16/32/64);
- the first unit of a stage whose shape changes computes BN-ReLU once and feeds
  it to both the residual branch and a 1x1 projection shortcut with the stride
  (shortcut "B"); basic nets may instead use zero-padded identity shortcuts
  ("A", the first ResNet paper's CIFAR choice);
- head: BN-ReLU, global average pool, Linear;
- init: conv ~ N(0, sqrt(2 / (k*k*out))), BN weight 1 / bias 0, Linear bias 0.
"""
from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from ..modules import Stats, bn_relu_conv_chained
from .net_utils import check_recompute, default_segment_size, init_weights, run_units
from .registry import register_model

Chain = tuple[Optional[Stats], Optional[nn.BatchNorm2d]]


class PreActBlock(nn.Module):
    """Basic unit: BN-ReLU-conv3x3, BN-ReLU-conv3x3, plus shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "B", fused: bool = True,
                 backend: str = "auto"):
        super().__init__()
        if shortcut not in ("A", "B"):
            raise ValueError(f"PreActBlock: shortcut must be 'A' (zero-padded identity) or 'B' (projection), "
                             f"got {shortcut!r}")
        self.fused, self.backend = fused, backend
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        reshapes = stride != 1 or in_planes != planes
        self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False) if reshapes and shortcut == "B" else None
        self.pad_shortcut = (stride, planes - in_planes) if reshapes and shortcut == "A" else None

    def forward(self, x: Tensor, chain: Optional[Chain] = None):
        """The unit's output; called with `chain` = (x's statistics or None, the
        BatchNorm that reads the output or None), returns (output, its statistics
        for that BatchNorm) instead: see modules.bn_relu_conv_chained."""
        x_stats, next_bn = chain or (None, None)
        if self.shortcut is not None:
            (out, residual), stats = self._layer(x, x_stats, self.bn1, [self.conv1, self.shortcut], self.bn2)
        else:
            (out,), stats = self._layer(x, x_stats, self.bn1, [self.conv1], self.bn2)
            residual = x if self.pad_shortcut is None else _zero_padded_identity(x, *self.pad_shortcut)
        (out,), stats = self._layer(out, stats, self.bn2, [self.conv2], next_bn, residual)
        return out if chain is None else (out, stats)

    def _layer(self, x, x_stats, bn, convs, next_bn, residual=None):
        return bn_relu_conv_chained(x, x_stats, bn, convs, self.fused, self.backend, residual, next_bn)


def _zero_padded_identity(x: Tensor, stride: int, extra_channels: int) -> Tensor:
    return F.pad(x[:, :, ::stride, ::stride], (0, 0, 0, 0, 0, extra_channels))


class PreActBottleneck(nn.Module):
    """Bottleneck unit: BN-ReLU-conv1x1 (with the stride), BN-ReLU-conv3x3,
    BN-ReLU-conv1x1 (x4 channels), plus identity or projection shortcut."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "B", fused: bool = True,
                 backend: str = "auto"):
        super().__init__()
        if shortcut != "B":
            raise ValueError(f"PreActBottleneck: only projection shortcuts ('B') are defined, got {shortcut!r}")
        out_planes = planes * self.expansion
        self.fused, self.backend = fused, backend
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, stride, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        reshapes = stride != 1 or in_planes != out_planes
        self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride, bias=False) if reshapes else None

    def forward(self, x: Tensor, chain: Optional[Chain] = None):
        """The unit's output; called with `chain` = (x's statistics or None, the
        BatchNorm that reads the output or None), returns (output, its statistics
        for that BatchNorm) instead: see modules.bn_relu_conv_chained."""
        x_stats, next_bn = chain or (None, None)
        if self.shortcut is not None:
            (out, residual), stats = self._layer(x, x_stats, self.bn1, [self.conv1, self.shortcut], self.bn2)
        else:
            (out,), stats = self._layer(x, x_stats, self.bn1, [self.conv1], self.bn2)
            residual = x
        (out,), stats = self._layer(out, stats, self.bn2, [self.conv2], self.bn3)
        (out,), stats = self._layer(out, stats, self.bn3, [self.conv3], next_bn, residual)
        return out if chain is None else (out, stats)

    _layer = PreActBlock._layer


_BLOCKS = {"basic": (PreActBlock, 6, (16, 32, 64)), "bottleneck": (PreActBottleneck, 9, (16, 32, 64))}


def default_block(depth: int) -> str:
    """The unit type whose depth rule (6n+2 basic, 9n+2 bottleneck) `depth` fits;
    where both fit, the paper's choice: basic up to ResNet-110, bottleneck above."""
    fits = [name for name, (_, per_unit, _) in _BLOCKS.items() if depth >= per_unit + 2 and (depth - 2) % per_unit == 0]
    if len(fits) == 1:
        return fits[0]
    return "basic" if depth <= 110 else "bottleneck"


class PreActResNet(nn.Module):
    """CIFAR pre-activation ResNet of the given depth.

    recompute: "none" keeps what eager autograd keeps; "bn_relu" (default when
    fused) keeps each conv's input and BN statistics and recomputes relu(bn(x));
    "unit" keeps each unit's input; "segment" keeps every `segment_size`-th
    unit's input (default round(sqrt(units))). All modes compute the same
    values; recomputation never updates BatchNorm running statistics twice.
    fused=False computes with the plain torch.nn modules ("bn_relu" is then
    unavailable, as it is the fused op's own recompute; default "none").
    """

    def __init__(self, depth: int, num_classes: int = 10, recompute: Optional[str] = None, fused: bool = True,
                 block: Optional[str] = None, shortcut: str = "B", segment_size: Optional[int] = None,
                 backend: str = "auto"):
        super().__init__()
        block = default_block(depth) if block is None else block
        if block not in _BLOCKS:
            raise ValueError(f"PreActResNet: block must be 'basic', 'bottleneck' or None, got {block!r}")
        unit_cls, per_unit, widths = _BLOCKS[block]
        if depth < per_unit + 2 or (depth - 2) % per_unit:
            raise ValueError(f"PreActResNet: depth for {block} units must be {per_unit}n+2 with n >= 1, got {depth}")
        recompute = check_recompute("PreActResNet", recompute, fused, segment_size)
        n = (depth - 2) // per_unit
        self.depth, self.block, self.recompute = depth, block, recompute
        self.segment_size = segment_size or default_segment_size(3 * n)
        # "none" means the plain modules compute everything, even in a fused net.
        use_op = fused and recompute != "none"

        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        units, in_planes = [], widths[0]
        for stage, width in enumerate(widths):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                units.append(unit_cls(in_planes, width, stride, shortcut, use_op, backend))
                in_planes = width * unit_cls.expansion
        self.units = nn.Sequential(*units)
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        self.fused = fused
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = run_units(self.units, self.conv1(x), self.recompute, self.segment_size, run=_run_chain)
        x = F.relu(self.bn(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def _run_chain(units: nn.Sequential, x: Tensor) -> Tensor:
    """The units in order, each handing its output's BatchNorm statistics to
    the next unit's first BatchNorm (computed in its last convolution's
    epilogue), so no unit reads its input just for statistics."""
    stats = None
    for i, unit in enumerate(units):
        next_bn = units[i + 1].bn1 if i + 1 < len(units) else None
        x, stats = unit(x, (stats, next_bn))
    return x


def preact_resnet110(num_classes: int = 10, **kwargs) -> PreActResNet:
    return PreActResNet(110, num_classes, **kwargs)


def preact_resnet164(num_classes: int = 10, **kwargs) -> PreActResNet:
    return PreActResNet(164, num_classes, **kwargs)


def preact_resnet1001(num_classes: int = 10, **kwargs) -> PreActResNet:
    return PreActResNet(1001, num_classes, **kwargs)


def preact_resnet(num_classes: int = 10, depth: int = 164, **kwargs) -> PreActResNet:
    """Any depth: 6n+2 (basic units) or 9n+2 (bottleneck units)."""
    return PreActResNet(depth, num_classes, **kwargs)


register_model("preact_resnet", preact_resnet)
for _depth, _factory in ((110, preact_resnet110), (164, preact_resnet164), (1001, preact_resnet1001)):
    register_model(f"preact_resnet{_depth}", _factory)
