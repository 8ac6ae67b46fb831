"""convert(model, recompute="unit" / "segment"): the networks' repeated
blocks keep only their inputs and run again in backward. Against the
unconverted model in float64 with the same weights (outputs, gradients and
running statistics after two SGD steps), what each mode keeps, the units
it finds, and the units it must not recompute."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_close
from fused_preact import convert
from fused_preact.memory import saved_activation_bytes

torchvision = pytest.importorskip("torchvision", reason="a test dependency: pip install -r requirements-test.txt")
timm = pytest.importorskip("timm", reason="a test dependency: pip install -r requirements-test.txt")
pytest.importorskip("pytorchcv.model_provider", reason="a test dependency: pip install -r requirements-test.txt")

from convert_peers import PEERS, assert_same_training, saved_or_copied  # noqa: E402 (after the importorskips)

pytestmark = pytest.mark.usefixtures("one_thread")

# name: the report's recompute part under "unit" and "segment" (default segment size)
RECOMPUTED = {
    # 58 dense layers (each in a _DenseBlock, a ModuleDict with its own
    # forward: no segments) and 3 transitions (in `features`, which holds
    # other layers too: no segments either).
    "densenet121": ("61 units recomputed in backward", "61 units recomputed in backward"),
    "resnetv2_50": ("16 units recomputed in backward", "16 units recomputed in backward, in 5 segments"),
    "wrn16_10_cifar10": ("6 units recomputed in backward", "6 units recomputed in backward, in 3 segments"),
    # 18 dense units and 2 transitions, in 3 nn.Sequential stages
    "densenet40_k12_bc_cifar10": ("20 units recomputed in backward", "20 units recomputed in backward, in 6 segments"),
    "preresnet164bn_cifar10": ("54 units recomputed in backward", "54 units recomputed in backward, in 9 segments"),
    "functional_wrn_block": ("0 units recomputed in backward", "0 units recomputed in backward"),
}


@pytest.mark.parametrize("mode", ["unit", "segment"])
@pytest.mark.parametrize("name", PEERS)
def test_converted_peers_recompute_their_units_and_train_as_the_original(name, mode):
    make, shape, line = PEERS[name]
    torch.manual_seed(0)
    original = make().double()
    converted = convert(copy.deepcopy(original), recompute=mode)
    assert str(converted.fused_preact_report) == f"{line}; {RECOMPUTED[name][mode == 'segment']}"
    assert_same_training(original, converted, shape, torch.float64, list(original.named_parameters()))


def test_each_mode_keeps_less_than_the_one_before():
    make, shape, _ = PEERS["wrn16_10_cifar10"]
    torch.manual_seed(0)
    original = make()
    x = torch.randn(shape)
    kept = {"eager": saved_activation_bytes(lambda: original(x), original)}
    for mode in ("bn_relu", "unit", "segment"):
        converted = convert(original, recompute=mode)
        kept[mode] = saved_activation_bytes(lambda m=converted: m(x), converted)
    assert kept["eager"] > kept["bn_relu"] > kept["unit"] > kept["segment"], kept
    # A segment keeps its first unit's input: 3 segments of 2 units each keep
    # under half of what 6 units keep.
    assert kept["segment"] < 0.6 * kept["unit"], kept


class Unit(nn.Module):
    """A pre-activation unit with a fused chain, and a chain the converter
    leaves (LeakyReLU): that BatchNorm updates its own running statistics,
    in every run of the unit; optionally a dropout between the two."""

    def __init__(self, c: int, dropout=None):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.p = dropout  # "module": an nn.Dropout(0.5); a number: F.dropout with that p
        self.drop = nn.Dropout(0.5) if dropout == "module" else None

    def forward(self, x):
        y = self.conv1(F.relu(self.bn1(x)))
        if self.drop is not None:
            y = self.drop(y)
        elif self.p is not None:
            y = F.dropout(y, self.p, self.training)
        return x + self.conv2(F.leaky_relu(self.bn2(y), 0.1))


def _units(*dropouts) -> nn.Sequential:
    torch.manual_seed(0)
    units = nn.Sequential(*(Unit(4, d) for d in dropouts))
    for m in units.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5), nn.init.uniform_(m.bias, -0.2, 0.2)
    return units.double()


@pytest.mark.parametrize("mode", ["unit", "segment"])
def test_a_batch_norm_left_unfused_inside_a_unit_updates_its_running_statistics_once(mode):
    original = _units(None, None, None)
    converted = convert(copy.deepcopy(original), recompute=mode, segment_size=2 if mode == "segment" else None)
    report = converted.fused_preact_report
    assert [w for w, _ in report.left] == ["0.bn2", "1.bn2", "2.bn2"]
    assert report.recomputed == ([["0"], ["1"], ["2"]] if mode == "unit" else [["0", "1"], ["2"]])
    assert_same_training(original, converted, (2, 4, 6, 6), torch.float64, list(original.named_parameters()))


@pytest.mark.parametrize("dropouts, why", [
    (("module", None), ["0"]),
    ((0.3, 0.0), ["0"]),  # F.dropout with p > 0 draws; with p == 0 it does not
])
def test_a_unit_that_draws_random_numbers_is_not_recomputed(dropouts, why):
    original = _units(*dropouts, None)
    for mode in ("unit", "segment"):
        converted = convert(copy.deepcopy(original), recompute=mode, segment_size=3 if mode == "segment" else None)
        report = converted.fused_preact_report
        assert [(w, reason) for w, reason in report.not_recomputed] == [
            (w, "draws random numbers: a second run would draw others") for w in why]
        assert report.recomputed == ([["1"], ["2"]] if mode == "unit" else [["1", "2"]])
        # The same draws as the original's: the unit runs once, as written.
        torch.manual_seed(5)
        want = original(torch.ones(2, 4, 6, 6, dtype=torch.float64))
        torch.manual_seed(5)
        got = converted(torch.ones(2, 4, 6, 6, dtype=torch.float64))
        assert_close(got, want, torch.float64, f"{mode} output", scale=float(want.abs().max()))


@pytest.mark.parametrize("mode", ["unit", "segment"])
@pytest.mark.parametrize("how", ["torch.save", "deepcopy"])
def test_a_saved_or_copied_model_recomputes_the_same_units(mode, how):
    make, shape, _ = PEERS["wrn16_10_cifar10"]
    torch.manual_seed(0)
    converted = convert(make(), recompute=mode)
    again = saved_or_copied(converted, how)
    assert str(again.fused_preact_report) == str(converted.fused_preact_report)
    assert list(again.state_dict()) == list(converted.state_dict())
    x = torch.randn(shape)
    assert saved_activation_bytes(lambda: again(x), again) == saved_activation_bytes(lambda: converted(x), converted)
    # A unit saved on its own comes back recomputed too.
    unit = converted.features.stage1.unit1 if mode == "unit" else converted.features.stage1
    alone = copy.deepcopy(unit)
    assert alone._fused_preact_options == unit._fused_preact_options
    y = torch.randn(2, 16, 32, 32)
    assert saved_activation_bytes(lambda: alone(y), alone) == saved_activation_bytes(lambda: unit(y), unit)


def test_the_state_dict_is_the_originals():
    make, _, _ = PEERS["densenet121"]
    original = make()
    for mode in ("unit", "segment"):
        converted = convert(original, recompute=mode)
        assert list(converted.state_dict()) == list(original.state_dict())
        assert all(converted.state_dict()[k].data_ptr() == v.data_ptr() for k, v in original.state_dict().items())
        assert not any(hasattr(m, "_fused_preact_options") for m in original.modules())  # the original is untouched


def test_torch_compile_of_a_model_converted_with_segments_matches_eager():
    original = _units(None, None, None)
    twin = convert(copy.deepcopy(original), recompute="segment", segment_size=2)
    compiled = torch.compile(twin, backend="aot_eager")
    torch.manual_seed(1)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    for model in (original, compiled):
        model.zero_grad()
    want, got = original(x), compiled(x)
    assert_close(got, want, torch.float64, "output", scale=float(want.abs().max()))
    want.square().sum().backward()
    grads = [p.grad.clone() for p in original.parameters()]
    got.square().sum().backward()
    for (name, p), g in zip(twin.named_parameters(), grads):
        assert_close(p.grad, g, torch.float64, f"grad {name}", scale=float(g.abs().max()) + 1)
    for (name, a), b in zip(twin.named_buffers(), original.buffers()):  # updated once each
        assert_close(a.double(), b.double(), torch.float64, name, scale=float(b.abs().max()) + 1)


def test_bad_segment_sizes_are_named():
    with pytest.raises(ValueError, match="convert: segment_size must be a positive int and needs recompute='segment'"):
        convert(_units(None), recompute="unit", segment_size=2)
    with pytest.raises(ValueError, match="convert: segment_size must be a positive int"):
        convert(_units(None), recompute="segment", segment_size=0)
