"""PreActBlock and PreActBottleneck against the paper's formula
x_{l+1} = h(x_l) + F(x_l), with F and h written out here from plain torch ops
(not from the package's modules), for every shortcut kind, stage-first and
inner units, training and eval mode, fused and plain."""
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close, randomize
from fused_preact import PreActBlock, PreActBottleneck

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def bn(t, m, training):
    """BatchNorm with m's parameters: batch statistics in training, running ones in eval."""
    if training:
        return F.batch_norm(t, None, None, m.weight, m.bias, True, 0.0, m.eps)
    return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)


def preact(t, m, training):
    return F.relu(bn(t, m, training))


def conv(t, m):
    return F.conv2d(t, m.weight, None, m.stride, m.padding)


def zero_padded(t, stride, out_channels):
    """Option A as preresnet.lua builds it: a 1x1 average pool with the stride, then zero channels appended."""
    t = F.avg_pool2d(t, 1, stride)
    return torch.cat([t, t.new_zeros(t.shape[0], out_channels - t.shape[1], *t.shape[2:])], 1)


def basic_formula(u, x, training, shortcut_kind, stage_first):
    """F = conv2(BN-ReLU(conv1(BN-ReLU(x)))); h = identity, zero-padded identity or 1x1 projection, reading
    BN-ReLU(x) in a stage's first unit ('both_preact') and x elsewhere."""
    a = preact(x, u.bn1, training)
    residual = conv(preact(conv(a, u.conv1), u.bn2, training), u.conv2)
    source = a if stage_first else x
    if shortcut_kind == "projection":
        h = F.conv2d(source, u.shortcut.weight, None, u.conv1.stride)
    elif shortcut_kind == "zero_padded":
        h = zero_padded(source, u.conv1.stride[0], u.conv2.out_channels)
    else:
        h = source
    return h + residual


def bottleneck_formula(u, x, training, shortcut_kind, stage_first):
    a = preact(x, u.bn1, training)
    residual = conv(preact(conv(preact(conv(a, u.conv1), u.bn2, training), u.conv2), u.bn3, training), u.conv3)
    source = a if stage_first else x
    h = F.conv2d(source, u.shortcut.weight, None, u.conv1.stride) if shortcut_kind == "projection" else source
    return h + residual


# (unit class, in_planes, planes, stride, shortcut option, preact_shortcut, formula's shortcut, stage-first)
UNITS = [
    (PreActBlock, 4, 4, 1, "A", False, "identity", False),  # an inner unit
    (PreActBlock, 4, 4, 1, "A", True, "identity", True),  # stage 1's first unit of a CIFAR net (16 -> 16)
    (PreActBlock, 4, 4, 1, "B", True, "identity", True),  # the same with option B: no projection, 4 -> 4
    (PreActBlock, 4, 8, 2, "A", None, "zero_padded", True),  # stage 2/3 first unit, option A
    (PreActBlock, 4, 8, 2, "B", None, "projection", True),  # stage 2/3 first unit, option B
    (PreActBottleneck, 16, 4, 1, "B", False, "identity", False),  # an inner bottleneck unit
    (PreActBottleneck, 4, 4, 1, "B", None, "projection", True),  # stage 1's first unit (16 -> 64)
    (PreActBottleneck, 16, 8, 2, "B", None, "projection", True),  # stage 2/3 first unit
    (PreActBottleneck, 16, 4, 1, "B", True, "identity", True),  # identity of the pre-activation
]
UNIT_IDS = [f"{c.__name__}-{i}to{p * c.expansion}-s{s}-{sc}-{kind}{'-first' if first else ''}"
            for c, i, p, s, sc, _, kind, first in UNITS]
# (fused, backend): the op with both of its CPU backends, and the plain nn modules
IMPLS = [(True, "native"), (True, "reference"), (False, "auto")]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fused, backend", IMPLS, ids=["native", "reference", "plain"])
@pytest.mark.parametrize("unit_cls, in_planes, planes, stride, shortcut, preact_shortcut, kind, stage_first", UNITS,
                         ids=UNIT_IDS)
def test_unit_computes_h_plus_f(unit_cls, in_planes, planes, stride, shortcut, preact_shortcut, kind, stage_first,
                                fused, backend, training):
    torch.manual_seed(0)
    unit = randomize(unit_cls(in_planes, planes, stride, shortcut, fused, backend, preact_shortcut)).double()
    assert (unit.shortcut is not None) == (kind == "projection")
    unit.train(training)
    x = torch.randn(3, in_planes, 7, 7, dtype=F64, requires_grad=True)
    formula = basic_formula if unit_cls is PreActBlock else bottleneck_formula
    want = formula(unit, x, training, kind, stage_first)
    got = unit(x)
    assert_close(got, want, F64, "x_{l+1}", scale=10.0)
    g = torch.randn(want.shape, dtype=F64)
    params = [p for p in unit.parameters()]
    got_grads = torch.autograd.grad(got, [x, *params], g)
    want_grads = torch.autograd.grad(want, [x, *params], g)
    names = ["x", *(n for n, _ in unit.named_parameters())]
    for name, a, b in zip(names, got_grads, want_grads):
        assert_close(a, b, F64, f"d{name}", scale=10.0)


def test_stage_first_identity_reads_the_pre_activation_not_x():
    """Both readings of the stage-1 first unit differ, so the test above tells them apart."""
    torch.manual_seed(0)
    unit = randomize(PreActBlock(4, 4, 1, "A", True, "native", preact_shortcut=True)).double().eval()
    x = torch.randn(2, 4, 5, 5, dtype=F64)
    with torch.no_grad():
        diff = basic_formula(unit, x, False, "identity", True) - basic_formula(unit, x, False, "identity", False)
    assert diff.abs().max() > 0.1


@pytest.mark.parametrize("unit_cls, kwargs, argument", [
    (PreActBlock, dict(in_planes=4, planes=8, stride=2, shortcut="B", preact_shortcut=False), "preact_shortcut"),
    (PreActBlock, dict(in_planes=4, planes=4, shortcut="A", preact_shortcut="yes"), "preact_shortcut"),
    (PreActBlock, dict(in_planes=4, planes=4, shortcut="C"), "shortcut"),
    (PreActBottleneck, dict(in_planes=4, planes=4, shortcut="A"), "shortcut"),
])
def test_bad_unit_options_name_the_argument(unit_cls, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        unit_cls(**kwargs)
