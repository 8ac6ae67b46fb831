"""Numerics of the model zoo on the CPU: each unit against the paper's formula
(Fig. 2, Fig. 4, preresnet.lua), fused nets against their plain twins (outputs,
gradients, running statistics), state dicts loading both ways, recompute
modes, and which BN -> ReLU -> conv sequences go through the fused op."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_preact
from conftest import BACKENDS, assert_close, randomize
from fused_preact.models import ConstantScaling, DropoutShortcut, Gating, ImageNetPreActUnit, ResidualUnit
from fused_preact.models import imagenet_preact, original_resnet

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def forward_backward(model, x, seed=3):
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)  # the same dropout-shortcut masks in both twins
    out = model(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=out.dtype))
    return {"output": out.detach(), "input_grad": x.grad,
            **{f"grad:{n}": p.grad for n, p in model.named_parameters()},
            **{f"buffer:{n}": b.clone() for n, b in model.named_buffers()}}


def assert_same(got, want):
    assert got.keys() == want.keys()
    for name, expected in want.items():
        actual = got[name]
        assert actual is not None, name
        if expected.is_floating_point():
            assert_close(actual, expected, F64, name, scale=max(1.0, expected.abs().max().item()))
        else:
            assert torch.equal(actual, expected), name


def twins(name, options, source="plain", **fused_options):
    """(plain, fused) float64 nets with equal weights, copied from `source` into the other."""
    torch.manual_seed(0)
    plain = fused_preact.create_model(name, num_classes=5, fused=False, **options)
    torch.manual_seed(1)
    fused = fused_preact.create_model(name, num_classes=5, **options, **fused_options)
    src, dst = (plain, fused) if source == "plain" else (fused, plain)
    dst.load_state_dict(randomize(src).state_dict(), strict=True)
    return plain.double(), fused.double()


# (name, options, input size): small nets of every variant; depth 8 = one basic unit per stage, depth 20 = two
# bottleneck units per stage (identity and projection units of every kind).
NETS = [
    ("resnet", dict(depth=8), 16), ("resnet", dict(depth=8, shortcut="A"), 16), ("resnet", dict(depth=20), 8),
    *[(f"resnet_{o}", dict(depth=d), s) for o in original_resnet.ORDERINGS[1:] for d, s in ((8, 16), (20, 8))],
    *[(f"resnet_{v}", dict(depth=8), 16) for v in ("const_scaling", "exclusive_gating", "shortcut_gating",
                                                     "conv_shortcut", "dropout_shortcut")],
    ("resnet_exclusive_gating", dict(depth=20), 8),
]
NET_IDS = [f"{n}-{'-'.join(f'{k}{v}' for k, v in o.items())}" for n, o, _ in NETS]
# The ImageNet nets cost seconds each, so fewer combinations, at 48x48: their last stage is then 2x2 and its BNs
# normalise over 8 values (at 32x32 over 2, where BN's backward is so ill-conditioned that float64 rounding
# shows at 1e-9).
IMAGENET_CASES = [  # (name, options, backend, training)
    ("preact_resnet18", {}, "reference", True), ("preact_resnet18", {}, "native", False),
    ("preact_resnet18", dict(projection="preact_conv"), "native", True),
    ("preact_resnet50", {}, "reference", True), ("preact_resnet50", {}, "native", False),
    ("preact_resnet50", dict(projection="preact_conv"), "native", True),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, options, size", NETS, ids=NET_IDS)
def test_fused_net_matches_plain_twin(name, options, size, backend, training):
    plain, fused = twins(name, options, source="fused" if training else "plain", backend=backend)
    plain.train(training), fused.train(training)
    x = torch.randn(2, 3, size, size, dtype=F64)
    assert_same(forward_backward(fused, x), forward_backward(plain, x))


@pytest.mark.parametrize("name, options, backend, training", IMAGENET_CASES,
                         ids=[f"{n}-{o.get('projection', 'conv_bn')}-{b}-{'train' if t else 'eval'}"
                              for n, o, b, t in IMAGENET_CASES])
def test_fused_imagenet_net_matches_plain_twin(name, options, backend, training):
    test_fused_net_matches_plain_twin(name, options, 48, backend, training)


@pytest.mark.parametrize("name, options", [(n, o) for n, o, _ in NETS[::2]] + [("preact_resnet18", {}),
                                             ("preact_resnet18", dict(projection="preact_conv"))],
                         ids=NET_IDS[::2] + ["preact_resnet18", "preact_resnet18-preact_conv"])
def test_state_dicts_load_both_ways_strictly(name, options):
    for source in ("plain", "fused"):  # twins() loads one into the other with strict=True
        plain, fused = twins(name, options, source=source)
        assert list(plain.state_dict()) == list(fused.state_dict())


RECOMPUTE_CASES = [  # (fused, recompute, segment_size)
    (True, "none", None), (True, "bn_relu", None), (True, "unit", None), (True, "segment", None),
    (True, "segment", 2), (False, "unit", None), (False, "segment", 3)]


@pytest.mark.parametrize("name, options, size, fused, recompute, segment_size", [
    *[("resnet_bn_after_add", dict(depth=20), 8, *case) for case in RECOMPUTE_CASES],
    *[("resnet_shortcut_gating", dict(depth=8, shortcut="A"), 16, *case) for case in RECOMPUTE_CASES],
    ("preact_resnet18", {}, 48, True, "unit", None), ("preact_resnet18", {}, 48, False, "segment", 3),
], ids=lambda v: "-".join(f"{k}{w}" for k, w in v.items()) if isinstance(v, dict) else None)
def test_recompute_modes_match_the_plain_net(name, options, size, fused, recompute, segment_size):
    """Same values, gradients and running statistics (updated once: the plain BN layers inside units obey
    frozen running statistics in the rerun)."""
    plain, _ = twins(name, options)
    torch.manual_seed(2)
    model = fused_preact.create_model(name, num_classes=5, fused=fused, recompute=recompute,
                                      segment_size=segment_size, **options).double()
    model.load_state_dict(plain.state_dict(), strict=True)
    x = torch.randn(2, 3, size, size, dtype=F64)
    for _ in range(2):
        assert_same(forward_backward(model, x), forward_backward(plain, x))


# ---- which BN -> ReLU -> conv sequences use the fused op --------------------------------------------------------

@pytest.mark.parametrize("name, options, bn_relu_convs_per_unit", [
    ("resnet", dict(depth=8), [1, 1, 1]), ("resnet", dict(depth=11), [2, 2, 2]),
    *[(f"resnet_{o}", dict(depth=11), [2, 2, 2]) for o in original_resnet.ORDERINGS[1:]],
    ("resnet_exclusive_gating", dict(depth=8), [1, 1, 1]), ("resnet_conv_shortcut", dict(depth=8), [1, 1, 1]),
    ("preact_resnet18", {}, [1] + [2] * 7), ("preact_resnet50", {}, [2] + [3] * 15),
    ("preact_resnet50", dict(projection="conv_bn"), [3] * 16),
], ids=lambda v: f"{len(v)}units" if isinstance(v, list) else "-".join(f"{k}{w}" for k, w in v.items())
   if isinstance(v, dict) else None)
@pytest.mark.parametrize("recompute", ["bn_relu", "unit", "none"])
def test_every_bn_relu_conv_goes_through_the_op(monkeypatch, name, options, bn_relu_convs_per_unit, recompute):
    """Each BatchNorm is used once per forward: through bn_relu_conv_modules (with fused=True unless
    recompute="none") where a ReLU and conv(s) follow it on every path, else as a plain module."""
    calls = []
    for module in (original_resnet, imagenet_preact):
        real = module.bn_relu_conv_modules

        def spy(x, bn, convs, fused, backend="auto", _real=real):
            calls.append((bn, tuple(convs), fused))
            return _real(x, bn, convs, fused, backend)

        monkeypatch.setattr(module, "bn_relu_conv_modules", spy)
    model = fused_preact.create_model(name, num_classes=5, recompute=recompute, backend="native", **options)
    module_calls = []
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.register_forward_hook(lambda m, i, o: module_calls.append(m))
    size = 32 if name.startswith("preact") else 8
    with torch.no_grad():
        model(torch.randn(2, 3, size, size))
    per_unit = [sum(any(c[0] is m for m in unit.modules()) for c in calls) for unit in model.units]
    assert per_unit == bn_relu_convs_per_unit
    assert {fused for *_, fused in calls} == {recompute != "none"}
    for bn, convs, _ in calls:  # the op's BN and convs are the unit's bn_i and conv_i (+ its projection)
        unit = next(u for u in model.units if any(m is bn for m in u.modules()))
        i = next(int(n[2:]) for n, m in unit.named_children() if m is bn)
        assert convs[0] is getattr(unit, f"conv{i + (not name.startswith('preact'))}")
        shares_preact = name.startswith("preact") and options.get("projection", "preact_conv") == "preact_conv" \
            and i == 1 and unit.shortcut is not None
        assert convs[1:] == ((unit.shortcut,) if shares_preact else ())
    op_bns = [c[0] for c in calls]
    all_bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert sorted(map(id, op_bns + module_calls)) == sorted(map(id, all_bns))


# ---- units against the paper's formulas (eval mode, float64) ----------------------------------------------------

def bn(t, m):
    return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)


def conv(t, m):
    return F.conv2d(t, m.weight, m.bias, m.stride, m.padding)


def branch(u, t):  # conv1-BN-ReLU-conv2, the basic branch up to its last BN
    return conv(F.relu(bn(conv(t, u.conv1), u.bn1)), u.conv2)


# Fig. 4 (a)-(d) on a basic unit 4 -> 4 (identity shortcut) and 4 -> 8 with stride 2 (projection)
ORDERING_FORMULAS = {
    "original": lambda u, x, sc: F.relu(sc(x) + bn(branch(u, x), u.bn2)),
    "bn_after_add": lambda u, x, sc: F.relu(bn(sc(x) + branch(u, x), u.post_add_bn)),
    "relu_before_add": lambda u, x, sc: sc(x) + F.relu(bn(branch(u, x), u.bn2)),
    # the projection reads the pre-activation relu(x), as resnet-pre-act.lua's read BN-ReLU(x)
    "relu_only_preact": lambda u, x, sc: (x if u.shortcut is None else sc(F.relu(x))) + bn(branch(u, F.relu(x)), u.bn2),
}


def _unit_check(unit, formula, x):
    randomize(unit).double().eval()
    with torch.no_grad():
        assert_close(unit(x), formula(x), F64, "unit output", scale=5.0)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("planes, stride", [(4, 1), (8, 2)], ids=["identity", "projection"])
@pytest.mark.parametrize("ordering", list(ORDERING_FORMULAS))
def test_ordering_units_follow_fig4(ordering, planes, stride, fused):
    unit = ResidualUnit(4, planes, stride, "basic", ordering, "B", None, fused, "native")
    if unit.shortcut is None:
        sc = lambda t: t  # noqa: E731
    elif ordering == "relu_only_preact":  # the pre-activation nets' projection: a conv alone
        sc = lambda t: conv(t, unit.shortcut)  # noqa: E731
    else:  # resnet.lua's projection: conv + BN
        sc = lambda t: bn(conv(t, unit.shortcut), unit.shortcut_bn)  # noqa: E731
    _unit_check(unit, lambda x: ORDERING_FORMULAS[ordering](unit, x, sc), torch.randn(2, 4, 6, 6, dtype=F64))


def test_original_bottleneck_unit():
    u = ResidualUnit(16, 4, 2, "bottleneck", "original", "B", None, True, "native")
    assert u.conv1.stride == (2, 2) and u.conv1.kernel_size == (1, 1)  # stride on the first 1x1, as the CIFAR nets
    f = lambda x: F.relu(bn(conv(x, u.shortcut), u.shortcut_bn) + bn(conv(F.relu(bn(  # noqa: E731
        conv(F.relu(bn(conv(x, u.conv1), u.bn1)), u.conv2), u.bn2)), u.conv3), u.bn3))
    _unit_check(u, f, torch.randn(2, 16, 6, 6, dtype=F64))


# Fig. 2 (b)-(f) on a basic original unit 4 -> 4
MERGE_FORMULAS = {
    "const_scaling": (lambda: ConstantScaling(0.3, 1.7), lambda u, x, r: F.relu(0.3 * x + 1.7 * r)),
    "exclusive_gating": (lambda: Gating(4, 4, 1, True, -1.5),
                         lambda u, x, r: F.relu((1 - torch.sigmoid(conv(x, u.merge.gate))) * x
                                                + torch.sigmoid(conv(x, u.merge.gate)) * r)),
    "shortcut_gating": (lambda: Gating(4, 4, 1, False, -1.5),
                        lambda u, x, r: F.relu((1 - torch.sigmoid(conv(x, u.merge.gate))) * x + r)),
    "dropout_shortcut_eval": (lambda: DropoutShortcut(0.5), lambda u, x, r: F.relu(0.5 * x + r)),
}


@pytest.mark.parametrize("variant", list(MERGE_FORMULAS))
def test_shortcut_variant_units_follow_fig2(variant):
    make_merge, formula = MERGE_FORMULAS[variant]
    unit = ResidualUnit(4, 4, 1, "basic", "original", "B", make_merge(), True, "native")
    _unit_check(unit, lambda x: formula(unit, x, bn(branch(unit, x), unit.bn2)), torch.randn(2, 4, 6, 6, dtype=F64))


def test_conv_shortcut_unit_follows_fig2e():
    unit = ResidualUnit(4, 4, 1, "basic", "original", "C", None, True, "native")
    f = lambda x: F.relu(bn(conv(x, unit.shortcut), unit.shortcut_bn) + bn(branch(unit, x), unit.bn2))  # noqa: E731
    _unit_check(unit, f, torch.randn(2, 4, 6, 6, dtype=F64))


def test_dropout_shortcut_drops_without_rescaling():
    drop = DropoutShortcut(0.5).train()
    shortcut, residual = torch.full((100, 100), 3.0), torch.full((100, 100), 0.25)
    out = drop(None, shortcut, residual)
    assert set(out.unique().tolist()) == {0.25, 3.25}
    assert 0.45 < (out > 1).double().mean().item() < 0.55
    assert torch.equal(drop.eval()(None, shortcut, residual), torch.full((100, 100), 1.75))


def test_exclusive_gating_limits():
    """b_g -> -inf: g = 0, the unit passes its shortcut (then ReLU); b_g -> +inf: g = 1, only the branch."""
    x = torch.randn(2, 4, 6, 6, dtype=F64)
    for bias, expected in ((-1e4, lambda u: F.relu(x)), (1e4, lambda u: F.relu(bn(branch(u, x), u.bn2)))):
        unit = ResidualUnit(4, 4, 1, "basic", "original", "B", Gating(4, 4, 1, True), True, "native")
        randomize(unit).double().eval()
        unit.merge.gate.bias.data.fill_(bias)
        with torch.no_grad():
            assert_close(unit(x), expected(unit), F64, "gated unit")


# preresnet.lua units: bottleneck 8 -> 16 with stride 2 (projection), basic 4 -> 4, and the first unit
@pytest.mark.parametrize("projection", ["conv_bn", "preact_conv"])
def test_imagenet_bottleneck_projection_unit(projection):
    u = ImageNetPreActUnit(8, 4, 2, "bottleneck", True, projection, True, "native")
    a = lambda t, m: F.relu(bn(t, m))  # noqa: E731
    sc = (lambda x: bn(conv(x, u.shortcut), u.shortcut_bn)) if projection == "conv_bn" else \
        (lambda x: conv(a(x, u.bn1), u.shortcut))
    f = lambda x: sc(x) + conv(a(conv(a(conv(a(x, u.bn1), u.conv1), u.bn2), u.conv2), u.bn3), u.conv3)  # noqa
    _unit_check(u, f, torch.randn(2, 8, 7, 7, dtype=F64))


@pytest.mark.parametrize("preactivate", [True, False], ids=["unit", "first_unit"])
def test_imagenet_basic_unit(preactivate):
    u = ImageNetPreActUnit(4, 4, 1, "basic", preactivate, "conv_bn", True, "native")
    pre = (lambda x: F.relu(bn(x, u.bn1))) if preactivate else (lambda x: x)
    f = lambda x: x + conv(F.relu(bn(conv(pre(x), u.conv1), u.bn2)), u.conv2)  # noqa: E731
    _unit_check(u, f, torch.randn(2, 4, 6, 6, dtype=F64))
