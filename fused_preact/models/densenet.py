"""DenseNet-BC for CIFAR (Huang et al. 2017, "Densely Connected Convolutional
Networks"), built from the fused op reading each layer's input as pieces.

Every dense layer is BN-ReLU-Conv1x1 (bn_size * k channels, the bottleneck)
then BN-ReLU-Conv3x3 (k channels, the growth rate) on the concatenation of
all the features before it in its block. Here that concatenation is never
made for autograd to keep: the op takes the features as a list of pieces
(bn_relu_conv2d), so what a block keeps grows linearly with its depth, not
quadratically. Transitions (between blocks) are BN-ReLU-Conv1x1 halving the
channels, then a 2x2 average pool; the stem is a 3x3 conv to 2k channels;
the head BN-ReLU, an 8x8 average pool and a Linear layer. Depth L = 6n + 4
(n dense layers per block, 3 blocks).

Recompute modes: "none" (fused=False: the plain modules, the concatenation
kept as eager PyTorch keeps it), "bn_relu" (default: each layer keeps its
input pieces and its bottleneck's output), "unit" (each dense layer keeps its
input pieces alone and recomputes its bottleneck in backward), "segment"
(runs of `segment_size` dense layers of a block recompute together; their
inputs are still every earlier layer's output, so it keeps what "unit" keeps).
"""
import functools
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..modules import bn_relu_conv_modules, refuse_jit_script
from ..recompute import recompute
from .net_utils import check_num_classes, check_recompute, default_segment_size, fixed_depth_factory, init_weights
from .registry import register_model

Features = Union[Tensor, list[Tensor]]


class DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1 -> BN-ReLU-Conv3x3 on the concatenation of `features`
    (a list of pieces); returns the k new channels."""

    def __init__(self, in_channels: int, growth_rate: int, bn_size: int = 4, fused: bool = True,
                 backend: str = "auto"):
        super().__init__()
        self.fused, self.backend = fused, backend
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, features: list[Tensor]) -> Tensor:
        (bottleneck,), _ = bn_relu_conv_modules(features, self.norm1, [self.conv1], self.fused, self.backend)
        (new,), _ = bn_relu_conv_modules(bottleneck, self.norm2, [self.conv2], self.fused, self.backend)
        return new


class DenseBlock(nn.ModuleList):
    """Dense layers, each reading every feature before it: features in (a
    tensor or a list of pieces), the list grown by each layer's output out."""

    def __init__(self, layers: list[DenseLayer], recompute: str = "bn_relu", segment_size: int = 1):
        super().__init__(layers)
        size = {"unit": 1, "segment": segment_size}.get(recompute)
        # The groups recomputed together (a plain list: the layers stay registered here alone).
        self.groups = [] if size is None else [nn.ModuleList(layers[i:i + size]) for i in range(0, len(layers), size)]

    def forward(self, features: Features) -> list[Tensor]:
        features = list(features) if isinstance(features, (list, tuple)) else [features]
        if not self.groups:
            return _grow(self, features, keep_input=True)
        for group in self.groups:
            features = features + recompute(functools.partial(_grow, group, keep_input=False), features, group)
        return features


def _grow(layers, features: list[Tensor], keep_input: bool) -> list[Tensor]:
    """features, each layer's output appended in turn (keep_input=False:
    only the new outputs)."""
    grown = list(features)
    for layer in layers:
        grown.append(layer(grown))
    return grown if keep_input else grown[len(features):]


class Transition(nn.Module):
    """BN-ReLU-Conv1x1 (to out_channels) -> 2x2 average pool, on features as pieces."""

    def __init__(self, in_channels: int, out_channels: int, fused: bool = True, backend: str = "auto"):
        super().__init__()
        self.fused, self.backend = fused, backend
        self.norm = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, features: Features) -> Tensor:
        (out,), _ = bn_relu_conv_modules(list(features) if isinstance(features, (list, tuple)) else features,
                                         self.norm, [self.conv], self.fused, self.backend)
        return F.avg_pool2d(out, 2)


class DenseNet(nn.Module):
    """CIFAR DenseNet-BC of depth L = 6n + 4 and growth rate k (see the
    module docstring): stem, 3 dense blocks of n layers with 2 transitions
    (compression 0.5), BN-ReLU, 8x8 average pool, Linear."""

    __prepare_scriptable__ = refuse_jit_script

    def __init__(self, depth: int = 100, growth_rate: int = 12, num_classes: int = 10, bn_size: int = 4,
                 compression: float = 0.5, recompute: Optional[str] = None, fused: bool = True,
                 segment_size: Optional[int] = None, backend: str = "auto"):
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise ValueError(f"DenseNet: depth must be 6n+4 with n >= 1 (DenseNet-BC: 2 convs per dense layer, "
                             f"3 blocks), got {depth!r}")
        if isinstance(growth_rate, bool) or not isinstance(growth_rate, int) or growth_rate < 1:
            raise ValueError(f"DenseNet: growth_rate must be a positive int, got {growth_rate!r}")
        recompute = check_recompute("DenseNet", recompute, fused, segment_size)
        n = (depth - 4) // 6
        self.depth, self.growth_rate, self.recompute = depth, growth_rate, recompute
        self.segment_size = segment_size or default_segment_size(n)
        use_op = fused and recompute != "none"
        channels = 2 * growth_rate
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        stages = []
        for block in range(3):
            layers = [DenseLayer(channels + i * growth_rate, growth_rate, bn_size, use_op, backend) for i in range(n)]
            stages.append(DenseBlock(layers, recompute, self.segment_size))
            channels += n * growth_rate
            if block < 2:
                out = int(channels * compression)
                stages.append(Transition(channels, out, use_op, backend))
                channels = out
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, check_num_classes("DenseNet", num_classes))
        self.fused = fused
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        features = self.stages(self.conv1(x))
        x = F.relu(self.bn(torch.cat(features, 1)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def torchvision_densenet_bc(depth: int, growth_rate: int, num_classes: int = 10, memory_efficient: bool = False):
    """The same network as DenseNet(depth, growth_rate) written by
    torchvision (needs torchvision): its DenseNet class with CIFAR's stem (a
    3x3 conv to 2k channels in place of the 7x7/2 conv, BatchNorm, ReLU and
    max pool). memory_efficient=True is torchvision's own recompute (each
    layer's concatenation and bottleneck checkpointed): what the benchmarks
    and tests compare against."""
    import torchvision

    n = (depth - 4) // 6
    model = torchvision.models.DenseNet(growth_rate=growth_rate, block_config=(n, n, n),
                                        num_init_features=2 * growth_rate, bn_size=4, num_classes=num_classes,
                                        memory_efficient=memory_efficient)
    model.features.conv0 = nn.Conv2d(3, 2 * growth_rate, 3, padding=1, bias=False)
    for name in ("norm0", "relu0", "pool0"):
        setattr(model.features, name, nn.Identity())
    return model


def densenet_bc(num_classes: int = 10, depth: int = 100, growth_rate: int = 12, **kwargs) -> DenseNet:
    """Any depth 6n+4 and growth rate."""
    return DenseNet(depth, growth_rate, num_classes, **kwargs)


densenet_bc_100_12 = fixed_depth_factory(densenet_bc, 100, "densenet_bc_100_12", growth_rate=12)
densenet_bc_190_40 = fixed_depth_factory(densenet_bc, 190, "densenet_bc_190_40", growth_rate=40)
densenet_bc_250_24 = fixed_depth_factory(densenet_bc, 250, "densenet_bc_250_24", growth_rate=24)

register_model("densenet_bc", densenet_bc)
for _factory in (densenet_bc_100_12, densenet_bc_190_40, densenet_bc_250_24):
    register_model(_factory.__name__, _factory)
