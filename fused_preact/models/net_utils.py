"""What the model zoo's networks share: the unit types and depth rules, the
stage builder, the recompute modes, the paper's weight init, the zero-padded
shortcut, and a BatchNorm call that recompute can rerun.

Recompute modes (see PreActResNet): "none" keeps what eager autograd keeps;
"bn_relu" (needs fused=True) keeps each fused BN-ReLU-conv's input and BN
statistics; "unit" keeps each residual unit's input; "segment" keeps every
`segment_size`-th unit's input. All compute the same values.
"""
import functools
import math
from typing import Callable, NamedTuple, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from ..recompute import recompute, running_stats_frozen

RECOMPUTE_MODES = ("none", "bn_relu", "unit", "segment")


class Block(NamedTuple):
    layers_per_unit: int  # a CIFAR net of n units per stage has depth layers_per_unit * n + 2
    expansion: int  # a unit's output channels / its width


BLOCKS = {"basic": Block(6, 1), "bottleneck": Block(9, 4)}
CIFAR_WIDTHS = (16, 32, 64)


def default_block(depth: int) -> str:
    """The unit type whose CIFAR depth rule (6n+2 basic, 9n+2 bottleneck)
    `depth` fits; where both fit, the paper's choice: basic up to ResNet-110,
    bottleneck above."""
    fits = [name for name, b in BLOCKS.items() if depth >= b.layers_per_unit + 2
            and (depth - 2) % b.layers_per_unit == 0]
    return fits[0] if len(fits) == 1 else ("basic" if depth <= 110 else "bottleneck")


def default_shortcut(block: str) -> str:
    """fb.resnet.torch's CIFAR default "A" for basic units (opts.lua line 80);
    "B" for bottleneck units, the only kind resnet-pre-act.lua builds."""
    return "A" if block == "basic" else "B"


def cifar_units_per_stage(owner: str, depth: int, block: Optional[str]) -> tuple[str, int]:
    """(block, units per stage) of a CIFAR net of `depth` (block None: default_block)."""
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise TypeError(f"{owner}: depth must be an int, got {depth!r} ({type(depth).__name__})")
    chosen = block is not None
    block = block if chosen else default_block(depth)
    check_choice(owner, "block", block, BLOCKS)
    per_unit = BLOCKS[block].layers_per_unit
    if depth < per_unit + 2 or (depth - 2) % per_unit:
        rules = [f"{b.layers_per_unit}n+2 ({name} units)" for name, b in BLOCKS.items() if not chosen or name == block]
        raise ValueError(f"{owner}: depth must be {' or '.join(rules)} with n >= 1, got {depth}")
    return block, (depth - 2) // per_unit


def build_stages(in_planes: int, widths, counts, expansion: int, make_unit) -> tuple[nn.Sequential, int]:
    """The units of every stage, in order, and their output channels:
    make_unit(in_planes, width, stride, first_of_stage, stage) for each unit,
    the stride 2 on the first unit of every stage but the first."""
    units = []
    for stage, (width, count) in enumerate(zip(widths, counts)):
        for i in range(count):
            units.append(make_unit(in_planes, width, 2 if stage > 0 and i == 0 else 1, i == 0, stage))
            in_planes = width * expansion
    return nn.Sequential(*units), in_planes


def check_recompute(owner: str, recompute: Optional[str], fused: bool, segment_size: Optional[int]) -> str:
    """The recompute mode to use (default "bn_relu" when fused, else "none"),
    after checking it, `fused` and segment_size; `owner` names the class in errors."""
    if not isinstance(fused, bool):
        raise TypeError(f"{owner}: fused must be True or False, got {fused!r}")
    recompute = ("bn_relu" if fused else "none") if recompute is None else recompute
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"{owner}: recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}")
    if recompute == "bn_relu" and not fused:
        raise ValueError(f"{owner}: recompute='bn_relu' needs fused=True (it is the fused op's recompute)")
    if segment_size is not None and (recompute != "segment" or not isinstance(segment_size, int)
                                     or segment_size < 1):
        raise ValueError(f"{owner}: segment_size must be a positive int and needs recompute='segment', "
                         f"got {segment_size!r} with recompute={recompute!r}")
    return recompute


def default_segment_size(num_units: int) -> int:
    return max(1, round(math.sqrt(num_units)))


def run_units(units: nn.Sequential, x: Tensor, mode: str, segment_size: int,
              run: Optional[Callable[[nn.Sequential, Tensor], Tensor]] = None) -> Tensor:
    """run(units, x) (default units(x)), keeping for backward what `mode` says:
    under "unit"/"segment", run(group, x) per group of units, recomputed in backward."""
    run = run or (lambda group, x: group(x))
    if mode not in ("unit", "segment"):
        return run(units, x)
    size = 1 if mode == "unit" else segment_size
    for start in range(0, len(units), size):
        group = units[start:start + size]
        x = recompute(functools.partial(run, group), x, group)
    return x


def init_weights(model: nn.Module) -> None:
    """The official code's init (resnet-pre-act.lua, fb.resnet.torch): conv
    weights ~ N(0, sqrt(2 / (k*k*out))), BN weight 1 / bias 0, Linear bias 0.
    Conv biases (only the gating convs have one) keep what their module set."""
    for m in model.modules():
        if any(p.is_meta for p in m.parameters(recurse=False)):
            continue  # no values to set (e.g. counting parameters); meta init is slow, not free
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def batch_norm(x: Tensor, bn: nn.BatchNorm2d) -> Tensor:
    """bn(x), except that in a recompute's second run (frozen running
    statistics) it normalises the same way but leaves running_mean/var and
    num_batches_tracked alone, as the fused op does; calling bn directly there
    would update them twice."""
    if not running_stats_frozen():
        return bn(x)
    use_batch_stats = bn.training or bn.running_mean is None
    running = (None, None) if use_batch_stats else (bn.running_mean, bn.running_var)
    return F.batch_norm(x, *running, bn.weight, bn.bias, use_batch_stats, 0.0, bn.eps)


def check_num_classes(owner: str, num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{owner}: num_classes must be a positive int, got {num_classes!r}")
    return num_classes


def check_choice(owner: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {tuple(choices)}, got {value!r}")


def fixed_depth_factory(family, depth: int, name: str, default_classes: int = 10, **defaults):
    """family(num_classes, depth=depth, **defaults, **options) registered as
    `name`; a `depth` option (e.g. from a trainer's --depth) must agree with
    the name; `defaults` (a width, a growth rate) are the name's other
    numbers, which options may override."""
    def factory(num_classes: int = default_classes, **options):
        if options.setdefault("depth", depth) != depth:
            raise ValueError(f"{name}: depth is fixed at {depth} by the name, got depth={options['depth']}; "
                             f"use the family that takes depth= instead")
        return family(num_classes, **{**defaults, **options})

    factory.__name__ = name
    given = "".join(f", {k}={v!r}" for k, v in defaults.items())
    factory.__doc__ = f"{family.__name__}(num_classes, depth={depth}{given}, **options); depth is fixed by the name."
    return factory


def zero_padded_identity(x: Tensor, stride: int, extra_channels: int) -> Tensor:
    """Shortcut "A": x subsampled by `stride`, zeros for the extra channels
    (preresnet.lua / resnet.lua: a 1x1 average pool with the stride, then x
    concatenated with 0 * x along the channels)."""
    return F.pad(x[:, :, ::stride, ::stride], (0, 0, 0, 0, 0, extra_channels))
