"""fused_preact: memory- and speed-efficient pre-activation ResNets.

    from fused_preact import PreActResNet
    from fused_preact.ops import bn_relu_conv2d

Importing the package never needs the compiled extension; an op that needs a
compiled kernel loads it on first use (see fused_preact._extension).
"""
from .models import (
    PreActBlock,
    PreActBottleneck,
    PreActResNet,
    create_model,
    list_models,
    preact_resnet110,
    preact_resnet164,
    preact_resnet1001,
)
from .convert import convert
from .modules import FusedBNReLUConv2d

__all__ = [
    "FusedBNReLUConv2d",
    "convert",
    "PreActBlock",
    "PreActBottleneck",
    "PreActResNet",
    "create_model",
    "list_models",
    "preact_resnet110",
    "preact_resnet164",
    "preact_resnet1001",
]
__version__ = "0.1.0"
