"""CIFAR ResNets with the original (post-activation) unit and the other
activation orderings of He et al. 2016, "Identity Mappings in Deep Residual
Networks", Fig. 4 (a)-(d) / Table 2. Full pre-activation, Fig. 4 (e), is
PreActResNet.

Units (k = 2 convs for basic units, 3 for bottleneck units; "F" is the
residual branch, "+" adds the shortcut):
- original (a):         conv-BN-ReLU-...-conv-BN, +, ReLU
- bn_after_add (b):     conv-BN-ReLU-...-conv, +, BN-ReLU
- relu_before_add (c):  conv-BN-ReLU-...-conv-BN-ReLU, +
- relu_only_preact (d): ReLU-conv-BN-ReLU-...-conv-BN, +

Widths, depths, strides and shortcuts are those of the pre-activation nets
(preact_resnet.py), so only the placement of BN and ReLU differs: 6n+2 basic
(16/32/64) or 9n+2 bottleneck (outputs 64/128/256, width out/4, stride on the
first 1x1 conv). Shortcuts as fb.resnet.torch models/resnet.lua lines 27-45:
"A" = zero-padded identity where the shape changes (basic units only; the
CIFAR default, opts.lua line 80, and the first ResNet paper's choice), "B" =
1x1 projection there, "C" = a 1x1 projection on every unit (Table 1, Fig. 2
(e)). A projection is conv + BN (resnet.lua lines 33-34; the paper's Fig. 2
caption: BN after every weight layer) in the orderings built on the original
unit, (a)-(c); (d) keeps the pre-activation nets' bias-free conv without BN
(resnet-pre-act.lua line 83), as it reads the pre-activation.

Stem and head follow where each ordering leaves its activations, as the paper
does for (a) and (e): (a)-(c) end each unit with the activated sum or add an
activation to the branch, so the stem is conv-BN-ReLU (as in the first ResNet
paper) and the head is just average pool + Linear; (d) mirrors the full
pre-activation net with ReLU in place of BN-ReLU: stem conv only, a ReLU after
the last addition, and a projection shortcut that reads the unit's
pre-activation, relu(x), as resnet-pre-act.lua's projections read BN-ReLU(x).

Fused op: every BN -> ReLU -> conv inside a branch (BN_i - ReLU - conv_{i+1})
runs through bn_relu_conv_modules; the other BN and ReLU layers (after the last conv,
after the addition, at the start of (d), after a projection) are not
followed by a conv on all of their consumers, so they run as plain modules.
"""
from typing import Callable, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from ..modules import bn_relu_conv_modules, refuse_jit_script
from .net_utils import (BLOCKS, CIFAR_WIDTHS, batch_norm, build_stages, check_choice, check_num_classes,
                        check_recompute,
                        cifar_units_per_stage, default_segment_size, default_shortcut, fixed_depth_factory,
                        init_weights, run_units, zero_padded_identity)
from .registry import register_model

ORDERINGS = ("original", "bn_after_add", "relu_before_add", "relu_only_preact")
SHORTCUTS = ("A", "B", "C")

# merge(x, shortcut, residual) -> the unit's sum; None = shortcut + residual.
# A factory makes one per unit: factory(in_planes, out_planes, stride).
MergeFactory = Callable[[int, int, int], nn.Module]


class ResidualUnit(nn.Module):
    """One CIFAR residual unit with the activation `ordering` (see the module
    docstring); `merge` combines shortcut and branch (Table 1 variants)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, block: str = "basic",
                 ordering: str = "original", shortcut: str = "B", merge: Optional[nn.Module] = None,
                 fused: bool = True, backend: str = "auto"):
        super().__init__()
        check_choice("ResidualUnit", "block", block, BLOCKS)
        check_choice("ResidualUnit", "ordering", ordering, ORDERINGS)
        check_choice("ResidualUnit", "shortcut", shortcut, SHORTCUTS)
        if shortcut == "A" and block != "basic":
            raise ValueError("ResidualUnit: shortcut 'A' (zero-padded identity) is defined for basic units only, "
                             f"got block={block!r}")
        out_planes = planes * BLOCKS[block].expansion
        if block == "basic":  # (in, out, kernel, stride) per conv
            specs = [(in_planes, planes, 3, stride), (planes, planes, 3, 1)]
        else:
            specs = [(in_planes, planes, 1, stride), (planes, planes, 3, 1), (planes, out_planes, 1, 1)]
        self.block, self.ordering, self.fused, self.backend = block, ordering, fused, backend
        self.num_convs = len(specs)
        for i, (c_in, c_out, k, s) in enumerate(specs, 1):
            self.add_module(f"conv{i}", nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False))
            if i < len(specs) or ordering != "bn_after_add":
                self.add_module(f"bn{i}", nn.BatchNorm2d(c_out))
        # (b) normalises the sum instead of the last conv's output: same channel count.
        self.post_add_bn = nn.BatchNorm2d(out_planes) if ordering == "bn_after_add" else None
        reshapes = stride != 1 or in_planes != out_planes
        use_conv = shortcut == "C" or (shortcut == "B" and reshapes)
        self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride, bias=False) if use_conv else None
        self.shortcut_bn = nn.BatchNorm2d(out_planes) if use_conv and ordering != "relu_only_preact" else None
        self.pad_shortcut = (stride, out_planes - in_planes) if reshapes and shortcut == "A" else None
        self.merge = merge

    def forward(self, x: Tensor) -> Tensor:
        preact = F.relu(x) if self.ordering == "relu_only_preact" else x
        out = self.conv1(preact)
        for i in range(1, self.num_convs):
            (out,), _ = bn_relu_conv_modules(out, getattr(self, f"bn{i}"), [getattr(self, f"conv{i + 1}")],
                                             self.fused, self.backend)
        if self.post_add_bn is None:
            out = batch_norm(out, getattr(self, f"bn{self.num_convs}"))
        if self.ordering == "relu_before_add":
            out = F.relu(out)
        if self.shortcut is not None:
            shortcut = self.shortcut(preact)
            if self.shortcut_bn is not None:
                shortcut = batch_norm(shortcut, self.shortcut_bn)
        elif self.pad_shortcut is not None:
            shortcut = zero_padded_identity(x, *self.pad_shortcut)
        else:
            shortcut = x
        out = shortcut + out if self.merge is None else self.merge(x, shortcut, out)
        if self.ordering == "original":
            out = F.relu(out)
        elif self.post_add_bn is not None:
            out = F.relu(batch_norm(out, self.post_add_bn))
        return out


class ResNet(nn.Module):
    """CIFAR ResNet of the given depth with the activation `ordering`
    ("original" by default: the post-activation unit), `shortcut` ("A"/"B"/"C";
    None: "A" for basic units, "B" for bottleneck units, as PreActResNet)
    and an optional `merge` factory for the Table 1 shortcut variants.

    recompute / segment_size / fused / backend: as PreActResNet. With
    fused=False every layer runs as a plain torch.nn module; the state dict
    is the same either way.
    """

    __prepare_scriptable__ = refuse_jit_script  # torch.jit.script: refused in one line

    def __init__(self, depth: int, num_classes: int = 10, ordering: str = "original", block: Optional[str] = None,
                 shortcut: Optional[str] = None, merge: Optional[MergeFactory] = None, recompute: Optional[str] = None,
                 fused: bool = True, segment_size: Optional[int] = None, backend: str = "auto"):
        super().__init__()
        check_choice("ResNet", "ordering", ordering, ORDERINGS)
        block, n = cifar_units_per_stage("ResNet", depth, block)
        shortcut = default_shortcut(block) if shortcut is None else shortcut
        check_choice("ResNet", "shortcut", shortcut, SHORTCUTS)
        if shortcut == "A" and block != "basic":
            raise ValueError(f"ResNet: shortcut 'A' (zero-padded identity) needs basic units, got block={block!r}")
        self.recompute = check_recompute("ResNet", recompute, fused, segment_size)
        self.depth, self.block, self.ordering, self.fused = depth, block, ordering, fused
        self.segment_size = segment_size or default_segment_size(3 * n)
        use_op = fused and self.recompute != "none"  # "none": plain modules, as PreActResNet
        expansion = BLOCKS[block].expansion

        def unit(c_in, width, stride, first, stage):
            unit_merge = merge(c_in, width * expansion, stride) if merge is not None else None
            return ResidualUnit(c_in, width, stride, block, ordering, shortcut, unit_merge, use_op, backend)

        self.conv1 = nn.Conv2d(3, CIFAR_WIDTHS[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(CIFAR_WIDTHS[0]) if ordering != "relu_only_preact" else None
        self.units, in_planes = build_stages(CIFAR_WIDTHS[0], CIFAR_WIDTHS, [n] * 3, expansion, unit)
        self.fc = nn.Linear(in_planes, check_num_classes("ResNet", num_classes))
        init_weights(self)
        if merge is not None:
            for unit in self.units:  # the gates' bias init (b_g) after the generic init
                reset = getattr(unit.merge, "reset_parameters", None)
                if reset is not None:
                    reset()
        if self.recompute in ("unit", "segment") and not all(getattr(u.merge, "deterministic", True)
                                                             for u in self.units):
            raise ValueError(f"ResNet: recompute={self.recompute!r} reruns units in backward, which would draw "
                             f"a different random shortcut mask; use recompute 'none' or 'bn_relu'")

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        if self.bn1 is not None:
            x = F.relu(self.bn1(x))
        x = run_units(self.units, x, self.recompute, self.segment_size)
        if self.ordering == "relu_only_preact":
            x = F.relu(x)  # the extra activation after the last addition, as in Fig. 4 (e)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def resnet(num_classes: int = 10, depth: int = 164, **options) -> ResNet:
    """Original (post-activation) CIFAR ResNet: 6n+2 (basic) or 9n+2 (bottleneck)."""
    return ResNet(depth, num_classes, **options)


def ordering_family(ordering: str):
    """resnet_<ordering>(num_classes, depth=164, **options)."""
    def family(num_classes: int = 10, depth: int = 164, **options) -> ResNet:
        if "ordering" in options:
            raise ValueError(f"resnet_{ordering}: the ordering is fixed by the name, got ordering="
                             f"{options['ordering']!r}")
        return ResNet(depth, num_classes, ordering=ordering, **options)

    family.__name__ = f"resnet_{ordering}"
    family.__doc__ = f"CIFAR ResNet with the {ordering!r} activation ordering (Table 2, Fig. 4)"
    return family


def _register():
    register_model("resnet", resnet)
    for depth in (110, 164, 1001):
        register_model(f"resnet{depth}", fixed_depth_factory(resnet, depth, f"resnet{depth}"))
    for ordering in ORDERINGS[1:]:
        family = ordering_family(ordering)
        register_model(f"resnet_{ordering}", family)
        for depth in (110, 164):
            name = f"resnet{depth}_{ordering}"
            register_model(name, fixed_depth_factory(family, depth, name))


_register()
