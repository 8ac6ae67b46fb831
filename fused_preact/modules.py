"""nn building blocks: BN -> ReLU -> conv(s) over plain nn.BatchNorm2d / nn.Conv2d.

The parameters always live in ordinary nn.BatchNorm2d and nn.Conv2d modules,
so a fused network and its plain twin have identical state dicts; `fused`
only chooses how forward computes: the recomputing op, or the modules
themselves (what eager PyTorch keeps for backward).
"""
from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from .ops import bn_relu_convs
from .ops.bn_relu_conv import concatenated, input_shape
from .ops.recompute_state import replaying_stats
from .recompute import running_stats_frozen

# An activation's batch statistics as a backend's epilogue hands them on to the
# next layer (opaque: the backend's own form, e.g. Triton's unmerged partials).
Stats = tuple[Tensor, ...]


def bn_relu_conv_modules(x: Tensor, bn: nn.BatchNorm2d, convs: list[nn.Conv2d], fused: bool, backend: str = "auto",
                         residual: Optional[Tensor] = None, x_stats: Optional[Stats] = None,
                         next_bn: Optional[nn.BatchNorm2d] = None, dropout: float = 0.0
                         ) -> tuple[list[Tensor], Optional[Stats]]:
    """([conv(relu(bn(x))) for conv in convs] with `residual` added to the first,
    statistics or None), with bn's exact nn semantics (momentum=None cumulative
    averaging, track_running_stats, eval mode); fused=False runs the modules.
    x may be a list of pieces, read as torch.cat(x, 1) (bn_relu_conv2d).
    dropout: drop relu(bn(x)) with this probability before the convs (pass
    0 where the dropout is off, in eval); on the fused path, inside the op.

    Along a chain of layers, BatchNorm statistics are handed on where the
    backend computes them in the convolution's epilogue (Triton): x_stats is
    x's batch statistics from the layer before (or None), and when `next_bn`
    (the BatchNorm that reads the first output) is given, the first output's
    statistics for next_bn come back as the second result, so no layer reads
    its input an extra time for statistics. They are only handed along where
    they are used: batch statistics in training on the fused path."""
    update = bn.training and bn.track_running_stats and not running_stats_frozen()
    momentum = bn.momentum if bn.momentum is not None else 0.0
    counter = None  # num_batches_tracked, when the fused statistics pass increments it
    if update and (bn.momentum is None or not fused):
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average, as nn.BatchNorm2d (reads the count on the host)
            momentum = 1.0 / float(bn.num_batches_tracked)
    elif update:
        counter = bn.num_batches_tracked
    # Batch statistics in training, or in eval when no running ones are tracked.
    use_batch_stats = bn.training or bn.running_mean is None
    running = (bn.running_mean, bn.running_var) if update or not use_batch_stats else (None, None)
    if not fused:
        a = F.relu(F.batch_norm(concatenated(x), *running, bn.weight, bn.bias, use_batch_stats, momentum, bn.eps))
        a = F.dropout(a, dropout) if dropout > 0 else a
        outs = [conv(a) for conv in convs]
        if residual is not None:
            outs[0] = outs[0] + residual
        return outs, None
    for i, conv in enumerate(convs):  # what the fused op computes; the plain path takes any conv
        if conv.padding_mode != "zeros":
            raise ValueError(f"bn_relu_conv_modules: convs[{i}] must be a zero-padded nn.Conv2d, got padding_mode="
                             f"{conv.padding_mode!r}")
    # A recompute's second run replays the first run's statistics: none to hand on.
    hand_on = next_bn is not None and next_bn.training and not replaying_stats()
    paddings = [_symmetric_padding(c, i, cropped_ok=len(convs) == 1 and residual is None and not hand_on)
                for i, c in enumerate(convs)]
    outs, stats = bn_relu_convs(
        "bn_relu_conv_modules", x, [(c.weight, c.stride, pad, c.dilation, c.groups) for c, (pad, _) in
                                    zip(convs, paddings)], bn.weight,
        bn.bias, *running, use_batch_stats, momentum, bn.eps, backend, residual=residual,
        x_stats=x_stats if use_batch_stats else None, stats_eps=next_bn.eps if hand_on else None,
        num_batches_tracked=counter, dropout=dropout,
    )
    crop = paddings[0][1]
    if crop is not None:
        height, width = input_shape(x)[2:]
        outs = [outs[0][:, :, crop[0]:crop[0] + height, crop[1]:crop[1] + width]]
    return add_biases(outs, [c.bias for c in convs]), stats


def add_biases(outs: list[Tensor], biases: list[Optional[Tensor]]) -> list[Tensor]:
    """outs[i] + biases[i] per channel where a conv has a bias: one add after
    the op, which keeps nothing for backward (its gradient is a sum)."""
    return [out if bias is None else out + bias.view(1, -1, 1, 1).to(out.dtype) for out, bias in zip(outs, biases)]


def _symmetric_padding(conv: nn.Conv2d, i: int, cropped_ok: bool):
    """(the symmetric padding the fused op runs conv with, the output's
    (row, column) offset to crop it at, or None). padding="same" pads
    (k - 1) / 2 on each side; an even kernel's "same" pads one less before
    than after, which is run as the larger padding on both sides, cropped."""
    if not isinstance(conv.padding, str):
        return conv.padding, None
    if conv.padding == "valid":
        return (0, 0), None
    totals = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation)]  # "same": stride 1 here
    if all(t % 2 == 0 for t in totals):
        return tuple(t // 2 for t in totals), None
    if not cropped_ok:
        raise ValueError(f"bn_relu_conv_modules: convs[{i}] has padding='same' with an even kernel "
                         f"{tuple(conv.kernel_size)} (more padding after than before), which runs here only for a "
                         f"single conv without residual or handed-on statistics")
    pad = tuple(t - t // 2 for t in totals)
    return pad, tuple(p - t // 2 for p, t in zip(pad, totals))


def refuse_jit_script(module: nn.Module) -> nn.Module:
    """A fused network's torch.jit.script, refused in one line."""
    if getattr(module, "fused", False):
        raise NotImplementedError(f"{type(module).__name__}: torch.jit.script cannot compile the fused op; use "
                                  f"torch.compile or torch.export, or build the network with fused=False")
    return module


class FusedBNReLUConv2d(nn.Module):
    """BatchNorm2d(in_channels) -> ReLU -> Conv2d(in_channels, out_channels, bias=False).

    With fused=True autograd keeps only the input and per-channel statistics;
    relu(bn(x)) is recomputed in backward. Submodules `bn` and `conv` hold the
    parameters, so weights load from (and into) the plain modules.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=1, stride=1, padding=0, eps: float = 1e-5,
                 momentum: float = 0.1, fused: bool = True, backend: str = "auto"):
        super().__init__()
        if not isinstance(fused, bool):
            raise TypeError(f"FusedBNReLUConv2d: fused must be True or False, got {fused!r}")
        self.bn = nn.BatchNorm2d(in_channels, eps=eps, momentum=momentum)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.fused = fused
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.bn.num_features:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"FusedBNReLUConv2d: expected an input of shape (N, {self.bn.num_features}, H, W) "
                             f"(in_channels={self.bn.num_features}), got {got}")
        return bn_relu_conv_modules(x, self.bn, [self.conv], self.fused, self.backend)[0][0]

    def extra_repr(self) -> str:
        return f"fused={self.fused}, backend={self.backend!r}"

    __prepare_scriptable__ = refuse_jit_script  # torch.jit.script asks every submodule first
