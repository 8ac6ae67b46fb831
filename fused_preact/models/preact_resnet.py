"""Pre-activation ResNets for CIFAR (He et al. 2016, "Identity Mappings in Deep
Residual Networks"), built as the official code builds them (bottleneck nets:
KaimingHe/resnet-1k-layers resnet-pre-act.lua; basic nets: fb.resnet.torch
models/preresnet.lua):

- stem: 3x3 conv 3 -> 16, no BN/ReLU after it;
- three stages of n units (strides 1, 2, 2); bottleneck units (depth 9n+2,
  outputs 64/128/256, bottleneck width out/4) or basic units (6n+2, 16/32/64);
- each stage's first unit computes BN-ReLU once, before the split, and its
  shortcut reads that pre-activation: a 1x1 projection with the stride
  (shortcut "B"; every bottleneck stage entry), or for basic nets the
  zero-padded identity ("A", opts.lua's CIFAR default) and, in stage 1
  (16 -> 16), the plain identity of relu(bn(x)) (preresnet.lua's
  'both_preact', also the paper's appendix: "the first activation right after
  conv1 and before splitting into two paths");
- the other units pre-activate only their branch; their identity reads x;
- head: BN-ReLU, global average pool, Linear;
- init: conv ~ N(0, sqrt(2 / (k*k*out))), BN weight 1 / bias 0, Linear bias 0.
"""
from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from ..modules import Stats, bn_relu_conv_modules, refuse_jit_script
from .net_utils import (BLOCKS, CIFAR_WIDTHS, batch_norm, build_stages, check_num_classes, check_recompute,
                        cifar_units_per_stage,
                        default_segment_size, default_shortcut, fixed_depth_factory, init_weights, run_units,
                        zero_padded_identity)
from .registry import register_model

Chain = tuple[Optional[Stats], Optional[nn.BatchNorm2d]]


class _PreActUnit(nn.Module):
    """What the basic and bottleneck units share: the first layer, which also
    makes the shortcut h(x) of x_{l+1} = h(x_l) + F(x_l).

    The official stage-first unit ('both_preact' in preresnet.lua lines
    65-67 and 91-93; the "increasing dimensions" unit of resnet-pre-act.lua
    lines 63-66) computes BN-ReLU once, before the split, so its shortcut
    (projection, zero-padded or plain identity) reads relu(bn1(x)); every other
    unit pre-activates only its branch and its identity shortcut reads x.
    """

    def _init_shortcut(self, owner: str, in_planes: int, out_planes: int, stride: int, shortcut: str,
                       preact_shortcut: Optional[bool]) -> None:
        reshapes = stride != 1 or in_planes != out_planes
        projects = reshapes and shortcut == "B"
        self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride, bias=False) if projects else None
        self.pad_shortcut = (stride, out_planes - in_planes) if reshapes and shortcut == "A" else None
        # Every unit that reshapes is a stage's first in the official nets.
        self.preact_shortcut = reshapes if preact_shortcut is None else preact_shortcut
        if not isinstance(self.preact_shortcut, bool):
            raise ValueError(f"{owner}: preact_shortcut must be True, False or None, got {preact_shortcut!r}")
        if self.shortcut is not None and not self.preact_shortcut:
            raise ValueError(f"{owner}: a projection shortcut reads the pre-activation relu(bn1(x)) (the official "
                             f"stage-first unit); preact_shortcut=False needs an identity or 'A' shortcut")

    @property
    def takes_input_stats(self) -> bool:
        """Whether x's batch statistics handed in are used (not where bn1
        runs as a plain module for a pre-activated identity)."""
        return self.shortcut is not None or not self.preact_shortcut

    def _first_layer(self, x: Tensor, x_stats: Optional[Stats]):
        """(conv1's output, its statistics for bn2 or None, the shortcut h(x))."""
        if self.shortcut is not None:  # conv1 and the projection share one pre-activation
            (out, residual), stats = self._layer(x, x_stats, self.bn1, [self.conv1, self.shortcut], self.bn2)
            return out, stats, residual
        if self.preact_shortcut:
            # The identity reads relu(bn1(x)) itself, so it is materialised here
            # (a stage's first unit only; kept by conv1 for backward anyway).
            a = F.relu(batch_norm(x, self.bn1))
            return self.conv1(a), None, a if self.pad_shortcut is None else zero_padded_identity(a, *self.pad_shortcut)
        (out,), stats = self._layer(x, x_stats, self.bn1, [self.conv1], self.bn2)
        return out, stats, x if self.pad_shortcut is None else zero_padded_identity(x, *self.pad_shortcut)

    def _layer(self, x, x_stats, bn, convs, next_bn, residual=None, dropout=0.0):
        return bn_relu_conv_modules(x, bn, convs, self.fused, self.backend, residual, x_stats, next_bn,
                                    dropout if self.training else 0.0)


class PreActBlock(_PreActUnit):
    """Basic unit: BN-ReLU-conv3x3 (stride), BN-ReLU-conv3x3, plus the shortcut:
    "A" zero-padded identity where the shape changes (the CIFAR default of
    fb.resnet.torch opts.lua line 80), "B" 1x1 projection there. preact_shortcut:
    whether the shortcut reads relu(bn1(x)) (a stage's first unit) or x;
    default: where the shape changes (see _PreActUnit). dropout: between the
    second ReLU and conv (a Wide ResNet's), inside the op when fused."""

    expansion = BLOCKS["basic"].expansion

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A", fused: bool = True,
                 backend: str = "auto", preact_shortcut: Optional[bool] = None, dropout: float = 0.0):
        super().__init__()
        if shortcut not in ("A", "B"):
            raise ValueError(f"PreActBlock: shortcut must be 'A' (zero-padded identity) or 'B' (projection), "
                             f"got {shortcut!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"PreActBlock: dropout must be a probability in [0, 1), got {dropout!r}")
        self.fused, self.backend, self.dropout = fused, backend, float(dropout)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self._init_shortcut("PreActBlock", in_planes, planes, stride, shortcut, preact_shortcut)

    def forward(self, x: Tensor, chain: Optional[Chain] = None):
        """The unit's output; called with `chain` = (x's statistics or None, the
        BatchNorm that reads the output or None), returns (output, its statistics
        for that BatchNorm) instead: see modules.bn_relu_conv_modules."""
        x_stats, next_bn = chain or (None, None)
        out, stats, residual = self._first_layer(x, x_stats)
        (out,), stats = self._layer(out, stats, self.bn2, [self.conv2], next_bn, residual, self.dropout)
        return out if chain is None else (out, stats)


class PreActBottleneck(_PreActUnit):
    """Bottleneck unit: BN-ReLU-conv1x1 (with the stride), BN-ReLU-conv3x3,
    BN-ReLU-conv1x1 (x4 channels), plus identity or projection ("B") shortcut;
    preact_shortcut as PreActBlock."""

    expansion = BLOCKS["bottleneck"].expansion

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "B", fused: bool = True,
                 backend: str = "auto", preact_shortcut: Optional[bool] = None):
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
        self._init_shortcut("PreActBottleneck", in_planes, out_planes, stride, shortcut, preact_shortcut)

    def forward(self, x: Tensor, chain: Optional[Chain] = None):
        """As PreActBlock.forward."""
        x_stats, next_bn = chain or (None, None)
        out, stats, residual = self._first_layer(x, x_stats)
        (out,), stats = self._layer(out, stats, self.bn2, [self.conv2], self.bn3)
        (out,), stats = self._layer(out, stats, self.bn3, [self.conv3], next_bn, residual)
        return out if chain is None else (out, stats)


UNITS = {"basic": PreActBlock, "bottleneck": PreActBottleneck}


class PreActResNet(nn.Module):
    """CIFAR pre-activation ResNet of the given depth.

    recompute: "none" keeps what eager autograd keeps; "bn_relu" (default when
    fused) keeps each conv's input and BN statistics and recomputes relu(bn(x));
    "unit" keeps each unit's input; "segment" keeps every `segment_size`-th
    unit's input (default round(sqrt(units))). All modes compute the same
    values; recomputation never updates BatchNorm running statistics twice.
    shortcut: None takes the official default, "A" (zero-padded identity)
    for basic nets (fb.resnet.torch opts.lua line 80: CIFAR defaults to A) and
    "B" (projection) for bottleneck nets; basic nets take "B" too.
    fused=False computes with the plain torch.nn modules ("bn_relu" is then
    unavailable, as it is the fused op's own recompute; default "none").
    widen_factor: the stages' widths are 16k, 32k and 64k (the stem stays
    16 wide): k > 1 is a Wide ResNet (wide_resnet.py). dropout: in basic
    units, between the second ReLU and conv (WRN's), inside the fused op;
    with unit/segment recompute it needs fused=True (the op draws the same
    mask again in the second run; nn's dropout would draw another).
    """

    __prepare_scriptable__ = refuse_jit_script  # torch.jit.script: refused in one line

    def __init__(self, depth: int, num_classes: int = 10, recompute: Optional[str] = None, fused: bool = True,
                 block: Optional[str] = None, shortcut: Optional[str] = None, segment_size: Optional[int] = None,
                 backend: str = "auto", widen_factor: int = 1, dropout: float = 0.0):
        super().__init__()
        block, n = cifar_units_per_stage("PreActResNet", depth, block)
        if isinstance(widen_factor, bool) or not isinstance(widen_factor, int) or widen_factor < 1:
            raise ValueError(f"PreActResNet: widen_factor must be a positive int, got {widen_factor!r}")
        shortcut = default_shortcut(block) if shortcut is None else shortcut
        recompute = check_recompute("PreActResNet", recompute, fused, segment_size)
        if dropout and block != "basic":
            raise ValueError(f"PreActResNet: dropout is a basic unit's (a Wide ResNet's), got dropout={dropout!r} "
                             f"with block={block!r}")
        if dropout and recompute in ("unit", "segment") and not fused:
            raise ValueError(f"PreActResNet: dropout with recompute={recompute!r} needs fused=True (the op draws "
                             f"the same mask in the second run; nn's dropout would draw another)")
        self.depth, self.block, self.recompute = depth, block, recompute
        self.segment_size = segment_size or default_segment_size(3 * n)
        # "none" means the plain modules compute everything, even in a fused net.
        use_op = fused and recompute != "none"

        self.conv1 = nn.Conv2d(3, CIFAR_WIDTHS[0], 3, 1, 1, bias=False)
        self.units, in_planes = build_stages(
            CIFAR_WIDTHS[0], [w * widen_factor for w in CIFAR_WIDTHS], [n] * 3, BLOCKS[block].expansion,
            lambda c_in, width, stride, first, _: UNITS[block](c_in, width, stride, shortcut, use_op, backend,
                                                                preact_shortcut=first,
                                                                **({"dropout": dropout} if dropout else {})))
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, check_num_classes("PreActResNet", num_classes))
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
        following = units[i + 1] if i + 1 < len(units) else None
        next_bn = following.bn1 if following is not None and following.takes_input_stats else None
        x, stats = unit(x, (stats, next_bn))
    return x


def preact_resnet(num_classes: int = 10, depth: int = 164, **kwargs) -> PreActResNet:
    """Any depth: 6n+2 (basic units) or 9n+2 (bottleneck units)."""
    return PreActResNet(depth, num_classes, **kwargs)


preact_resnet110 = fixed_depth_factory(preact_resnet, 110, "preact_resnet110")
preact_resnet164 = fixed_depth_factory(preact_resnet, 164, "preact_resnet164")
preact_resnet1001 = fixed_depth_factory(preact_resnet, 1001, "preact_resnet1001")

register_model("preact_resnet", preact_resnet)
for _factory in (preact_resnet110, preact_resnet164, preact_resnet1001):
    register_model(_factory.__name__, _factory)
