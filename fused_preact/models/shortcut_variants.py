"""Table 1 / Fig. 2 of He et al. 2016: shortcut variants on the original
(post-activation) unit, for ResNet-110 on CIFAR-10. Each unit computes
relu(merge(x, shortcut(x), F(x))) with F the residual branch
(conv-BN-ReLU-conv-BN, its BN-ReLU-conv fused) and shortcut(x) the identity,
where the shape changes zero-padded (shortcut "A", the default of the basic
nets) or a 1x1 conv + BN projection ("B"):

- const_scaling (Fig. 2b):     lambda_shortcut * shortcut + lambda_residual * F
                               (defaults 0.5 / 0.5, the paper's 12.35% row);
- exclusive_gating (Fig. 2c):  (1 - g(x)) * shortcut + g(x) * F;
- shortcut_gating (Fig. 2d):   (1 - g(x)) * shortcut + F;
  g(x) = sigmoid(W_g x + b_g), W_g a 1x1 conv (with the unit's stride, to
  the unit's output channels), b_g initialised to gate_bias_init (default -6,
  the paper's best row); W_g gets the conv init of the rest of the net;
- conv_shortcut (Fig. 2e):     a 1x1 conv + BN on every unit's shortcut
                               (shortcut "C"; BN after every weight layer, as
                               the Fig. 2 caption says);
- dropout_shortcut (Fig. 2f):  dropout on the shortcut with ratio 0.5. The
  paper reads it as scaling the shortcut by 0.5 in expectation, so kept
  entries are NOT rescaled by 1/(1-p) (unlike nn.Dropout); eval multiplies by
  1-p, the expectation. Unit/segment recompute is refused for it: the rerun in
  backward would draw a different mask.

Every variant also takes depth= (family names resnet_<variant>, default 110)
and the options of ResNet (shortcut "A"/"B", fused, recompute, backend).
"""
import math

import torch
from torch import Tensor, nn

from .net_utils import fixed_depth_factory
from .original_resnet import ResNet
from .registry import register_model


class ConstantScaling(nn.Module):
    """lambda_shortcut * shortcut + lambda_residual * residual (Fig. 2b)."""

    def __init__(self, lambda_shortcut: float = 0.5, lambda_residual: float = 0.5):
        super().__init__()
        for name, value in (("lambda_shortcut", lambda_shortcut), ("lambda_residual", lambda_residual)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"ConstantScaling: {name} must be a finite number, got {value!r}")
        self.lambda_shortcut, self.lambda_residual = float(lambda_shortcut), float(lambda_residual)

    def forward(self, x: Tensor, shortcut: Tensor, residual: Tensor) -> Tensor:
        return self.lambda_shortcut * shortcut + self.lambda_residual * residual

    def extra_repr(self) -> str:
        return f"lambda_shortcut={self.lambda_shortcut}, lambda_residual={self.lambda_residual}"


class Gating(nn.Module):
    """g(x) = sigmoid(1x1 conv(x) + b_g); exclusive=True: (1-g)*shortcut + g*residual
    (Fig. 2c), exclusive=False: (1-g)*shortcut + residual (Fig. 2d)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, exclusive: bool, gate_bias_init: float = -6.0):
        super().__init__()
        if isinstance(gate_bias_init, bool) or not isinstance(gate_bias_init, (int, float)) \
                or not math.isfinite(gate_bias_init):
            raise ValueError(f"Gating: gate_bias_init must be a finite number, got {gate_bias_init!r}")
        self.exclusive, self.gate_bias_init = exclusive, float(gate_bias_init)
        self.gate = nn.Conv2d(in_planes, out_planes, 1, stride, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """b_g to gate_bias_init (the net calls this after its conv init)."""
        with torch.no_grad():
            self.gate.bias.fill_(self.gate_bias_init)

    def forward(self, x: Tensor, shortcut: Tensor, residual: Tensor) -> Tensor:
        g = torch.sigmoid(self.gate(x))
        return (1 - g) * shortcut + (g * residual if self.exclusive else residual)

    def extra_repr(self) -> str:
        return f"exclusive={self.exclusive}, gate_bias_init={self.gate_bias_init}"


class DropoutShortcut(nn.Module):
    """mask * shortcut + residual, mask ~ Bernoulli(1 - drop_ratio) in training
    (not rescaled: the shortcut is scaled by 1 - drop_ratio in expectation),
    (1 - drop_ratio) * shortcut + residual in eval (Fig. 2f)."""

    deterministic = False  # draws a mask: not rerunnable by unit/segment recompute

    def __init__(self, drop_ratio: float = 0.5):
        super().__init__()
        if isinstance(drop_ratio, bool) or not isinstance(drop_ratio, (int, float)) or not 0 <= drop_ratio < 1:
            raise ValueError(f"DropoutShortcut: drop_ratio must be a number in [0, 1), got {drop_ratio!r}")
        self.drop_ratio = float(drop_ratio)

    def forward(self, x: Tensor, shortcut: Tensor, residual: Tensor) -> Tensor:
        keep = 1.0 - self.drop_ratio
        if not self.training:
            return keep * shortcut + residual
        mask = torch.empty_like(shortcut).bernoulli_(keep)
        return mask * shortcut + residual

    def extra_repr(self) -> str:
        return f"drop_ratio={self.drop_ratio}"


def _no_merge_override(name: str, options: dict) -> None:
    if "merge" in options:
        raise ValueError(f"{name}: the shortcut merge is fixed by the name; got a merge option")


def resnet_const_scaling(num_classes: int = 10, depth: int = 110, lambda_shortcut: float = 0.5,
                         lambda_residual: float = 0.5, **options) -> ResNet:
    """Original-unit CIFAR ResNet with constant scaling of shortcut and residual (Table 1)."""
    _no_merge_override("resnet_const_scaling", options)
    ConstantScaling(lambda_shortcut, lambda_residual)  # checks the lambdas before building
    return ResNet(depth, num_classes, merge=lambda i, o, s: ConstantScaling(lambda_shortcut, lambda_residual),
                  **options)


def resnet_exclusive_gating(num_classes: int = 10, depth: int = 110, gate_bias_init: float = -6.0,
                            **options) -> ResNet:
    """Original-unit CIFAR ResNet with exclusive gating, b_g = gate_bias_init (Table 1)."""
    _no_merge_override("resnet_exclusive_gating", options)
    return ResNet(depth, num_classes, merge=lambda i, o, s: Gating(i, o, s, True, gate_bias_init), **options)


def resnet_shortcut_gating(num_classes: int = 10, depth: int = 110, gate_bias_init: float = -6.0,
                           **options) -> ResNet:
    """Original-unit CIFAR ResNet with shortcut-only gating, b_g = gate_bias_init (Table 1)."""
    _no_merge_override("resnet_shortcut_gating", options)
    return ResNet(depth, num_classes, merge=lambda i, o, s: Gating(i, o, s, False, gate_bias_init), **options)


def resnet_conv_shortcut(num_classes: int = 10, depth: int = 110, **options) -> ResNet:
    """Original-unit CIFAR ResNet with a 1x1 conv shortcut on every unit (Table 1)."""
    if options.setdefault("shortcut", "C") != "C":
        raise ValueError(f"resnet_conv_shortcut: the shortcut is fixed to 'C' (1x1 conv on every unit) by the name, "
                         f"got shortcut={options['shortcut']!r}")
    return ResNet(depth, num_classes, **options)


def resnet_dropout_shortcut(num_classes: int = 10, depth: int = 110, drop_ratio: float = 0.5,
                            **options) -> ResNet:
    """Original-unit CIFAR ResNet with dropout (ratio 0.5, not rescaled) on the shortcut (Table 1)."""
    _no_merge_override("resnet_dropout_shortcut", options)
    DropoutShortcut(drop_ratio)  # checks drop_ratio before building
    return ResNet(depth, num_classes, merge=lambda i, o, s: DropoutShortcut(drop_ratio), **options)


SHORTCUT_VARIANTS = {
    "const_scaling": resnet_const_scaling,
    "exclusive_gating": resnet_exclusive_gating,
    "shortcut_gating": resnet_shortcut_gating,
    "conv_shortcut": resnet_conv_shortcut,
    "dropout_shortcut": resnet_dropout_shortcut,
}

for _variant, _family in SHORTCUT_VARIANTS.items():
    register_model(f"resnet_{_variant}", _family)
    register_model(f"resnet110_{_variant}", fixed_depth_factory(_family, 110, f"resnet110_{_variant}"))
