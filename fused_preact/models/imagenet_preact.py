"""ImageNet pre-activation ResNets (He et al. 2016, Table 5), built as
fb.resnet.torch's models/preresnet.lua builds them:

- stem: 7x7 conv 3 -> 64 with stride 2, BN-ReLU, 3x3 max pool with stride 2;
- four stages, widths 64/128/256/512, strides 1/2/2/2; units per stage
  18: [2,2,2,2], 34: [3,4,6,3] (basic units); 50: [3,4,6,3], 101: [3,4,23,3],
  152: [3,8,36,3], 200: [3,24,36,3] (bottleneck units, outputs 4x width);
- basic unit: BN-ReLU-conv3x3 (stride), BN-ReLU-conv3x3, plus shortcut;
- bottleneck unit: BN-ReLU-conv1x1, BN-ReLU-conv3x3 (the stride sits here,
  not on the first 1x1 conv as in the CIFAR nets), BN-ReLU-conv1x1 (4x);
- stage-first units ('both_preact', preresnet.lua lines 91-93, 119-120)
  compute BN-ReLU once before the split and project it with a bias-free 1x1
  conv with the stage stride (shortcut type 'B', lines 28-34: only where the
  channel count changes, so the basic nets' first stage, 64 -> 64, keeps the
  identity); the very first unit ('no_preact', lines 94 and 150) has no
  BN-ReLU of its own, its input being the stem's BN-ReLU + max pool output;
- the other units pre-activate only their branch (lines 94-97); their
  identity reads x;
- head: BN-ReLU after the last addition, global average pool, Linear;
- init: conv ~ N(0, sqrt(2 / (k*k*out))), BN weight 1 / bias 0, Linear bias 0.

projection= picks the version of preresnet.lua:
- "preact_conv" (default): HEAD (the file last changed in f9f325d), as above;
- "conv_bn": the file as first committed (c5301063, 2016-04-11; its
  bottleneck's second BN had n*4 channels, fixed in 3beb17b): every unit,
  the very first included, pre-activates only its branch, and the projection
  is 1x1 conv + BN on the raw unit input x. 1d5f060 replaced it with the
  'both_preact' form above.

Fused op: every BN-ReLU-conv of the units (in "preact_conv" a stage-first
unit's feeds the branch and the projection in one call). The stem's conv-BN-ReLU-
maxpool, the projection's BN and the head's BN-ReLU-pool are plain modules.
The head pools adaptively, so inputs need not be 224x224.
"""
from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from ..modules import bn_relu_conv_modules, refuse_jit_script
from .net_utils import (BLOCKS, batch_norm, build_stages, check_choice, check_num_classes, check_recompute,
                        default_segment_size, fixed_depth_factory, init_weights, run_units)
from .registry import register_model

# depth -> (block, units per stage)
IMAGENET_STAGES = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}
IMAGENET_WIDTHS = (64, 128, 256, 512)
PROJECTIONS = ("conv_bn", "preact_conv")


class ImageNetPreActUnit(nn.Module):
    """Basic or bottleneck pre-activation unit of the ImageNet nets.
    preactivate=False: no BN-ReLU of its own (the input is already activated)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, block: str = "bottleneck",
                 preactivate: bool = True, projection: str = "preact_conv", fused: bool = True, backend: str = "auto"):
        super().__init__()
        check_choice("ImageNetPreActUnit", "block", block, BLOCKS)
        check_choice("ImageNetPreActUnit", "projection", projection, PROJECTIONS)
        out_planes = planes * BLOCKS[block].expansion
        if block == "basic":  # (in, out, kernel, stride) per conv
            specs = [(in_planes, planes, 3, stride), (planes, planes, 3, 1)]
        else:
            specs = [(in_planes, planes, 1, 1), (planes, planes, 3, stride), (planes, out_planes, 1, 1)]
        self.block, self.projection, self.fused, self.backend = block, projection, fused, backend
        self.num_convs = len(specs)
        for i, (c_in, c_out, k, s) in enumerate(specs, 1):
            if i > 1 or preactivate:
                self.add_module(f"bn{i}", nn.BatchNorm2d(c_in))
            self.add_module(f"conv{i}", nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False))
        if not preactivate:
            self.bn1 = None
        # preresnet.lua (type 'B') projects only where the channel count changes.
        reshapes = in_planes != out_planes
        self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride, bias=False) if reshapes else None
        self.shortcut_bn = nn.BatchNorm2d(out_planes) if reshapes and projection == "conv_bn" else None
        if not reshapes and stride != 1:
            raise ValueError(f"ImageNetPreActUnit: an identity shortcut cannot take stride {stride}; "
                             f"in_planes ({in_planes}) must differ from the output channels ({out_planes})")

    def forward(self, x: Tensor) -> Tensor:
        shares_preact = self.bn1 is not None and self.shortcut is not None and self.projection == "preact_conv"
        if shares_preact:
            (out, shortcut), _ = bn_relu_conv_modules(x, self.bn1, [self.conv1, self.shortcut], self.fused,
                                                      self.backend)
        else:
            if self.bn1 is None:
                out = self.conv1(x)
            else:
                (out,), _ = bn_relu_conv_modules(x, self.bn1, [self.conv1], self.fused, self.backend)
            shortcut = x if self.shortcut is None else self.shortcut(x)
            if self.shortcut_bn is not None:
                shortcut = batch_norm(shortcut, self.shortcut_bn)
        for i in range(2, self.num_convs + 1):
            (out,), _ = bn_relu_conv_modules(out, getattr(self, f"bn{i}"), [getattr(self, f"conv{i}")],
                                             self.fused, self.backend)
        return out + shortcut


class ImageNetPreActResNet(nn.Module):
    """ImageNet pre-activation ResNet of depth 18/34/50/101/152/200 (see the
    module docstring). recompute / segment_size / fused / backend: as
    PreActResNet; projection: "preact_conv" (default: preresnet.lua HEAD) or
    "conv_bn" (its first version, c5301063)."""

    __prepare_scriptable__ = refuse_jit_script  # torch.jit.script: refused in one line

    def __init__(self, depth: int, num_classes: int = 1000, projection: str = "preact_conv",
                 recompute: Optional[str] = None, fused: bool = True, segment_size: Optional[int] = None,
                 backend: str = "auto"):
        super().__init__()
        check_choice("ImageNetPreActResNet", "depth", depth, IMAGENET_STAGES)
        check_choice("ImageNetPreActResNet", "projection", projection, PROJECTIONS)
        self.recompute = check_recompute("ImageNetPreActResNet", recompute, fused, segment_size)
        block, counts = IMAGENET_STAGES[depth]
        self.depth, self.block, self.projection, self.fused = depth, block, projection, fused
        self.segment_size = segment_size or default_segment_size(sum(counts))
        use_op = fused and self.recompute != "none"

        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        # HEAD's 'no_preact' first unit; c5301063 pre-activated every unit.
        self.units, in_planes = build_stages(
            64, IMAGENET_WIDTHS, counts, BLOCKS[block].expansion,
            lambda c_in, width, stride, first, stage: ImageNetPreActUnit(
                c_in, width, stride, block, projection == "conv_bn" or stage > 0 or not first, projection, use_op,
                backend))
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, check_num_classes("ImageNetPreActResNet", num_classes))
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = run_units(self.units, x, self.recompute, self.segment_size)
        x = F.relu(self.bn(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def imagenet_preact_resnet(num_classes: int = 1000, depth: int = 50, **options) -> ImageNetPreActResNet:
    """ImageNet pre-activation ResNet (fb.resnet.torch preresnet.lua), depth 18/34/50/101/152/200."""
    return ImageNetPreActResNet(depth, num_classes, **options)


register_model("imagenet_preact_resnet", imagenet_preact_resnet)
for _depth in IMAGENET_STAGES:
    register_model(f"preact_resnet{_depth}",
                   fixed_depth_factory(imagenet_preact_resnet, _depth, f"preact_resnet{_depth}", default_classes=1000))
