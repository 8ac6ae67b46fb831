from .net_utils import RECOMPUTE_MODES, default_block
from .preact_resnet import (
    PreActBlock,
    PreActBottleneck,
    PreActResNet,
    preact_resnet110,
    preact_resnet164,
    preact_resnet1001,
)
from .registry import create_model, list_models, register_model

# Imported for their register_model calls as much as for these names.
from .original_resnet import ORDERINGS, ResidualUnit, ResNet
from .shortcut_variants import ConstantScaling, DropoutShortcut, Gating
from .imagenet_preact import IMAGENET_STAGES, ImageNetPreActResNet, ImageNetPreActUnit
from .densenet import DenseNet, densenet_bc_100_12, densenet_bc_190_40
from .wide_resnet import wide_resnet, wrn16_8, wrn28_10

__all__ = [
    "create_model",
    "list_models",
    "register_model",
    "RECOMPUTE_MODES",
    "PreActBlock",
    "PreActBottleneck",
    "PreActResNet",
    "default_block",
    "preact_resnet110",
    "preact_resnet164",
    "preact_resnet1001",
    "ORDERINGS",
    "ResidualUnit",
    "ResNet",
    "ConstantScaling",
    "Gating",
    "DropoutShortcut",
    "IMAGENET_STAGES",
    "ImageNetPreActUnit",
    "ImageNetPreActResNet",
    "DenseNet",
    "densenet_bc_100_12",
    "densenet_bc_190_40",
    "wide_resnet",
    "wrn16_8",
    "wrn28_10",
]
