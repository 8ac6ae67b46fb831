"""The fused op in standard operators, for exporters and runtimes that do not
know fused_preact's op (ONNX above all):

    ep = torch.export.export(model.eval(), (x,))           # keeps fused_preact.bn_relu_conv2d
    ep = ep.run_decompositions(export_decompositions())    # relu(x * scale + shift) -> conv2d
    torch.onnx.export(ep, f="model.onnx")                  # standard ONNX operators only

The decomposition computes what the op does, in the ops PyTorch's own
BatchNorm -> ReLU -> conv would export to: the normalised activation is
materialised, which an inference graph does anyway. It covers what an
eval-mode export holds: the op with running statistics (folded into scale
and shift before it). A training-mode graph that hands statistics on to the
next layer (a backend's own partials) has no standard form and is refused.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from .bn_relu_conv import _convs


def bn_relu_conv2d_decomposed(x: Tensor, conv_weights: list[Tensor], bn_weight, bn_bias, mean, invstd,
                              scale: Tensor, shift: Tensor, residual, strides: list[int], paddings: list[int],
                              dilations: list[int], groups: list[int], training: bool, backend: str,
                              stats_eps, dropout: float = 0.0, dropout_seed=None) -> list[Tensor]:
    """fused_preact.bn_relu_conv2d's outputs from aten ops (its arguments, in its order)."""
    if stats_eps is not None or dropout > 0:
        raise NotImplementedError("fused_preact.bn_relu_conv2d hands BatchNorm statistics on to the next layer, or "
                                  "drops out, in training mode, which has no standard-operator form here: export "
                                  "the model in eval mode (model.eval())")
    a = reference.bn_relu_apply(x, scale, shift)
    outs = [F.conv2d(a, c.weight, None, c.stride, c.padding, c.dilation, c.groups)
            for c in _convs(conv_weights, strides, paddings, dilations, groups)]
    if residual is not None:
        outs[0] = outs[0] + residual
    return outs


def export_decompositions() -> dict:
    """{the op: its decomposition}, for ExportedProgram.run_decompositions."""
    return {torch.ops.fused_preact.bn_relu_conv2d.default: bn_relu_conv2d_decomposed}
