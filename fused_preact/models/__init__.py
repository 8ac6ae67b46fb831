from .preact_resnet import (
    RECOMPUTE_MODES,
    PreActBlock,
    PreActBottleneck,
    PreActResNet,
    default_block,
    preact_resnet110,
    preact_resnet164,
    preact_resnet1001,
)
from .registry import create_model, list_models, register_model

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
]
