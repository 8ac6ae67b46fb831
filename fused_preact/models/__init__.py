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

__all__ = [
    "RECOMPUTE_MODES",
    "PreActBlock",
    "PreActBottleneck",
    "PreActResNet",
    "default_block",
    "preact_resnet110",
    "preact_resnet164",
    "preact_resnet1001",
]
