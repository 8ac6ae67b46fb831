"""The model zoo by name: every registered network, its parameter count
(counted independently from the architecture's definition), its structure, and
the errors its options raise. Numerics are in test_model_zoo_numerics.py."""
import pytest
import torch
from torch import nn

import fused_preact
from fused_preact.models import IMAGENET_STAGES, ORDERINGS

CIFAR_ORDERING_NAMES = [f"resnet{d}_{o}" for o in ORDERINGS[1:] for d in (110, 164)]
TABLE1_VARIANTS = ["const_scaling", "exclusive_gating", "shortcut_gating", "conv_shortcut", "dropout_shortcut"]
NEW_NAMES = [
    "resnet", "resnet110", "resnet164", "resnet1001",
    *[f"resnet_{o}" for o in ORDERINGS[1:]], *CIFAR_ORDERING_NAMES,
    *[f"resnet_{v}" for v in TABLE1_VARIANTS], *[f"resnet110_{v}" for v in TABLE1_VARIANTS],
    "imagenet_preact_resnet", *[f"preact_resnet{d}" for d in IMAGENET_STAGES],
]


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def meta_model(name, **options):
    with torch.device("meta"):
        return fused_preact.create_model(name, **options)


# ---- parameter counts, from widths and depths alone -------------------------------------------------------------

def cifar_param_count(depth, block, ordering="original", shortcut=None, variant=None, num_classes=10):
    """Conv, BN and Linear parameters of the CIFAR ResNets of Fig. 4 / Fig. 2: stem conv (+ BN unless the
    ReLU-only pre-activation ordering), units whose k convs each have one BN on their output channels (for
    BN-after-addition the last one normalises the sum: same channels), shortcuts (projections with a BN,
    resnet.lua's, except in the ReLU-only pre-activation ordering), gates, and the Linear head. The shortcut
    defaults to opts.lua's CIFAR "A" for basic units, "B" for bottleneck units."""
    shortcut = shortcut or ("A" if block == "basic" else "B")
    per_unit, expansion = {"basic": (6, 1), "bottleneck": (9, 4)}[block]
    n = (depth - 2) // per_unit
    count = 3 * 16 * 3 * 3 + (0 if ordering == "relu_only_preact" else 2 * 16)
    c_in = 16
    for stage, width in enumerate((16, 32, 64)):
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            c_out = width * expansion
            if block == "basic":
                count += 9 * c_in * width + 9 * width * width + 2 * width + 2 * c_out
            else:
                count += c_in * width + 9 * width * width + width * c_out + 4 * width + 2 * c_out
            if shortcut == "C" or (shortcut == "B" and (stride != 1 or c_in != c_out)):
                count += c_in * c_out + (0 if ordering == "relu_only_preact" else 2 * c_out)
            if variant in ("exclusive_gating", "shortcut_gating"):
                count += c_in * c_out + c_out  # 1x1 gate conv with bias b_g
            c_in = c_out
    return count + c_in * num_classes + num_classes


def imagenet_param_count(depth, projection="preact_conv", num_classes=1000):
    """Stem 7x7 conv + BN, units with one BN before each conv (none before the very first conv of the first
    unit in preresnet.lua HEAD's form, preact_conv), 1x1 projections (+ BN for the first version's conv_bn)
    where channels change, head BN + Linear."""
    stages = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3],
              200: [3, 24, 36, 3]}[depth]
    bottleneck = depth >= 50
    count, c_in = 3 * 64 * 7 * 7 + 2 * 64, 64
    for stage, (width, units) in enumerate(zip((64, 128, 256, 512), stages)):
        for i in range(units):
            c_out = width * (4 if bottleneck else 1)
            bn1 = 0 if stage == 0 and i == 0 and projection == "preact_conv" else 2 * c_in
            if bottleneck:
                count += bn1 + c_in * width + 2 * width + 9 * width * width + 2 * width + width * c_out
            else:
                count += bn1 + 9 * c_in * width + 2 * width + 9 * width * width
            if c_in != c_out:
                count += c_in * c_out + (2 * c_out if projection == "conv_bn" else 0)
            c_in = c_out
    return count + 2 * c_in + c_in * num_classes + num_classes


def test_every_new_name_is_listed_and_builds():
    listed = fused_preact.list_models()
    assert set(NEW_NAMES) <= set(listed)
    assert fused_preact.list_models("resnet110_*") == sorted(
        [f"resnet110_{o}" for o in ORDERINGS[1:]] + [f"resnet110_{v}" for v in TABLE1_VARIANTS])
    for name in NEW_NAMES:
        if name == "resnet1001":
            continue  # built by the tests below; the slowest to build
        assert isinstance(meta_model(name, num_classes=7), nn.Module), name


@pytest.mark.parametrize("name, depth, block, ordering, shortcut, variant", [
    *[(f"resnet{d}", d, b, "original", None, None) for d, b in ((110, "basic"), (164, "bottleneck"),
                                                                (1001, "bottleneck"))],
    *[(f"resnet{d}_{o}", d, b, o, None, None) for o in ORDERINGS[1:] for d, b in ((110, "basic"), (164, "bottleneck"))],
    *[(f"resnet110_{v}", 110, "basic", "original", "C" if v == "conv_shortcut" else None, v) for v in TABLE1_VARIANTS],
])
def test_cifar_param_counts_match_the_architecture(name, depth, block, ordering, shortcut, variant):
    assert n_params(meta_model(name, num_classes=100)) == cifar_param_count(depth, block, ordering, shortcut,
                                                                            variant, 100)


@pytest.mark.parametrize("depth, block, shortcut, ordering", [
    (20, "basic", "A", "original"), (32, "basic", "A", "relu_only_preact"), (8, "basic", "C", "bn_after_add"),
    (14, "basic", "B", "original"),
    (11, "bottleneck", "C", "relu_before_add"), (20, "bottleneck", "B", "relu_only_preact"),
])
def test_cifar_family_param_counts_match_the_architecture(depth, block, shortcut, ordering):
    name = "resnet" if ordering == "original" else f"resnet_{ordering}"
    model = meta_model(name, depth=depth, block=block, shortcut=shortcut)
    assert n_params(model) == cifar_param_count(depth, block, ordering, shortcut)


@pytest.mark.parametrize("name, expected", [
    # preact_resnet164 1,703,258 and preact_resnet1001 10,327,706 (measured on the official nets; pinned in
    # test_models.py). Original units put each BN on a conv's output instead of its input, and a stem BN(16) in
    # place of the head BN(256): the stages' first units gain 2*((64-16) + (128-64) + (256-128)) = 480 =
    # 2*256 - 2*16, so these balance; the three projections' BNs (resnet.lua) add 2*(64 + 128 + 256) = 896.
    ("resnet164", 1_703_258 + 896), ("resnet1001", 10_327_706 + 896), ("resnet164_bn_after_add", 1_703_258 + 896),
    # basic units balance the same way (2*(16 + 32) = 96 = 2*64 - 2*16); zero-padded shortcuts (opts.lua's
    # CIFAR default) have no parameters: = preact_resnet110 with "A"
    ("resnet110", 1_727_962),
])
def test_known_cifar_param_counts(name, expected):
    assert n_params(meta_model(name)) == expected


def test_resnet20_with_zero_padded_shortcuts_has_the_first_papers_count():
    # 0.27M in He et al. 2015, Table 6; 269,722 in the common PyTorch reproductions (option A, Linear bias).
    assert n_params(meta_model("resnet", depth=20, shortcut="A")) == 269_722


# torchvision's post-activation ResNets: the pre-activation nets' BNs balance against them over the net (the
# head BN has the channels the per-unit BNs move), less the projections' BNs (2 * (128 + 256 + 512) basic,
# 2 * (256 + 512 + 1024 + 2048) bottleneck) and the first unit's BN(64), which HEAD's preresnet.lua lacks.
TORCHVISION_COUNTS = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032, 101: 44_549_160, 152: 60_192_808,
                      200: 64_673_832}


@pytest.mark.parametrize("depth, expected", [
    (18, 11_687_720), (34, 21_795_880), (50, 25_549_352), (101, 44_541_480), (152, 60_185_128), (200, 64_666_152),
])
def test_imagenet_param_counts(depth, expected):
    model = meta_model(f"preact_resnet{depth}")
    assert n_params(model) == imagenet_param_count(depth) == expected
    projection_bns = 2 * (128 + 256 + 512) if depth < 50 else 2 * (256 + 512 + 1024 + 2048)
    assert expected == TORCHVISION_COUNTS[depth] - projection_bns
    # c5301063's form: the projections' BNs and the first unit's BN(64) are back
    assert n_params(meta_model(f"preact_resnet{depth}", projection="conv_bn")) == TORCHVISION_COUNTS[depth] + 128
    for projection, classes in (("preact_conv", 1000), ("conv_bn", 10)):
        model = meta_model("imagenet_preact_resnet", depth=depth, projection=projection, num_classes=classes)
        assert n_params(model) == imagenet_param_count(depth, projection, classes)


@pytest.mark.parametrize("name", ["imagenet_preact_resnet", *[f"preact_resnet{d}" for d in IMAGENET_STAGES]])
def test_imagenet_factories_default_to_1000_classes(name):
    assert meta_model(name).fc.out_features == 1000  # no num_classes given
    assert meta_model("preact_resnet164").fc.out_features == 10  # the CIFAR nets' default


# ---- structure --------------------------------------------------------------------------------------------------

def _main_path_convs(model):
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and "shortcut" not in n and "merge" not in n]


@pytest.mark.parametrize("name, depth", [("resnet110", 110), ("resnet164_relu_only_preact", 164),
                                         ("resnet110_exclusive_gating", 110), ("resnet1001", 1001),
                                         *[(f"preact_resnet{d}", d) for d in IMAGENET_STAGES]])
def test_depth_counts_main_path_convs_and_the_linear_layer(name, depth):
    assert len(_main_path_convs(meta_model(name))) + 1 == depth


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("projection", ["conv_bn", "preact_conv"])
def test_imagenet_structure_follows_preresnet_lua(depth, projection):
    """preresnet.lua HEAD (preact_conv) and its first version c5301063 (conv_bn)."""
    model = meta_model("imagenet_preact_resnet", depth=depth, projection=projection)
    assert (model.conv1.kernel_size, model.conv1.stride) == ((7, 7), (2, 2))
    first_units, n = [], 0
    for count in IMAGENET_STAGES[depth][1]:
        first_units.append(n)
        n += count
    assert len(model.units) == n
    for i, unit in enumerate(model.units):
        # HEAD: the stem's BN-ReLU pre-activates the first unit ('no_preact'); c5301063 gave it its own
        assert (unit.bn1 is None) == (i == 0 and projection == "preact_conv")
        strided = "conv2" if depth >= 50 else "conv1"  # bottleneck: stride on the 3x3 conv
        expected_stride = 2 if i in first_units[1:] else 1
        assert getattr(unit, strided).stride == (expected_stride,) * 2
        projects = i in (first_units if depth >= 50 else first_units[1:])
        assert (unit.shortcut is not None) == projects
        assert (unit.shortcut_bn is not None) == (projects and projection == "conv_bn")
        if projects:
            assert unit.shortcut.stride == (expected_stride,) * 2 and unit.shortcut.bias is None
    assert model.bn.num_features == model.fc.in_features == (2048 if depth >= 50 else 512)


def test_gate_bias_initialisation_is_configurable():
    for name in ("resnet110_exclusive_gating", "resnet_shortcut_gating"):
        default = fused_preact.create_model(name, **({} if "110" in name else {"depth": 8}))
        assert all(torch.all(u.merge.gate.bias == -6.0) for u in default.units)
        custom = fused_preact.create_model(name, gate_bias_init=-2.5, **({} if "110" in name else {"depth": 8}))
        assert all(torch.all(u.merge.gate.bias == -2.5) for u in custom.units)
        assert all(u.merge.exclusive == ("exclusive" in name) for u in custom.units)


def test_options_reach_the_networks():
    model = meta_model("resnet110_const_scaling", lambda_shortcut=1.0, lambda_residual=0.25, fused=False)
    assert {(u.merge.lambda_shortcut, u.merge.lambda_residual) for u in model.units} == {(1.0, 0.25)}
    assert model.recompute == "none" and not model.fused
    assert meta_model("resnet110_dropout_shortcut").units[0].merge.drop_ratio == 0.5
    assert all(u.shortcut is not None for u in meta_model("resnet110_conv_shortcut").units)
    assert meta_model("resnet", depth=56, shortcut="A").units[9].pad_shortcut == (2, 16)
    assert meta_model("resnet110", depth=110).depth == 110  # a trainer's --depth that agrees with the name
    assert meta_model("preact_resnet50", recompute="unit", projection="preact_conv").recompute == "unit"


# ---- errors name the argument -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, options, argument", [
    ("resnet", dict(depth=100), "depth"),
    ("resnet", dict(depth=164, block="wide"), "block"),
    ("resnet", dict(depth=164, shortcut="A"), "shortcut"),
    ("resnet", dict(depth=20, shortcut="D"), "shortcut"),
    ("resnet", dict(depth=20, ordering="sideways"), "ordering"),
    ("resnet", dict(depth=20, recompute="all"), "recompute"),
    ("resnet", dict(depth=20, recompute="bn_relu", fused=False), "recompute"),
    ("resnet", dict(depth=20, recompute="unit", segment_size=2), "segment_size"),
    ("resnet110", dict(depth=164), "depth"),
    ("resnet_bn_after_add", dict(ordering="original"), "ordering"),
    ("resnet110_const_scaling", dict(lambda_shortcut="half"), "lambda_shortcut"),
    ("resnet110_const_scaling", dict(lambda_residual=float("inf")), "lambda_residual"),
    ("resnet110_exclusive_gating", dict(gate_bias_init=float("nan")), "gate_bias_init"),
    ("resnet110_dropout_shortcut", dict(drop_ratio=1.0), "drop_ratio"),
    ("resnet110_dropout_shortcut", dict(recompute="unit"), "recompute"),
    ("resnet110_conv_shortcut", dict(shortcut="B"), "shortcut"),
    ("resnet110_shortcut_gating", dict(merge=None), "merge"),
    ("imagenet_preact_resnet", dict(depth=20), "depth"),
    ("imagenet_preact_resnet", dict(depth=18, projection="conv"), "projection"),
    ("preact_resnet18", dict(depth=34), "depth"),
    ("preact_resnet50", dict(recompute="segment", segment_size=0), "segment_size"),
])
def test_bad_options_raise_value_error_naming_them(name, options, argument):
    with pytest.raises(ValueError, match=argument):
        meta_model(name, **options)


def test_unknown_name_lists_close_names():
    with pytest.raises(ValueError, match="resnet110_exclusive_gating"):
        fused_preact.create_model("exclusive_gating")
