"""Wide ResNets for CIFAR (Zagoruyko and Komodakis 2016, "Wide Residual
Networks"): WRN-d-k is a pre-activation ResNet of basic units, n = (d - 4) / 6
per stage (the authors' depth count), widths 16k, 32k and 64k after a
16-wide stem, and a 1x1 projection of the unit's pre-activation wherever the
shape changes: PreActResNet of depth 6n + 2 (this package's count), shortcut
"B", widen_factor k.

dropout=p puts WRN's dropout between each unit's second ReLU and conv,
inside the fused op (the mask made again in backward, never kept).
"""
from .net_utils import fixed_depth_factory
from .preact_resnet import PreActResNet
from .registry import register_model


def wide_resnet(num_classes: int = 10, depth: int = 28, widen_factor: int = 10, **kwargs) -> PreActResNet:
    """WRN-depth-widen_factor (depth 6n + 4); dropout=p as its authors' (0.3 on CIFAR)."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ValueError(f"wide_resnet: depth must be 6n+4 with n >= 1, got {depth!r}")
    for fixed in ("block", "shortcut"):
        if fixed in kwargs:
            raise ValueError(f"wide_resnet: {fixed} is fixed (basic units, projection shortcuts), got "
                             f"{fixed}={kwargs[fixed]!r}")
    return PreActResNet(depth - 2, num_classes, block="basic", shortcut="B", widen_factor=widen_factor, **kwargs)


wrn28_10 = fixed_depth_factory(wide_resnet, 28, "wrn28_10", widen_factor=10)
wrn16_8 = fixed_depth_factory(wide_resnet, 16, "wrn16_8", widen_factor=8)

register_model("wide_resnet", wide_resnet)
for _factory in (wrn28_10, wrn16_8):
    register_model(_factory.__name__, _factory)
