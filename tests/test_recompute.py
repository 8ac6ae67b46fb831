"""Recompute modes of PreActResNet against the plain net (training steps, frozen
parameters, saved-tensor hooks, functional_call, the statistics replay, a recompute
of a recomputing net) and the saved-bytes targets of ResNet-1001. The recompute()
function itself, frozen running statistics and the StatsTape:
test_recompute_function.py."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import BACKENDS, assert_close
from fused_preact import PreActResNet
from fused_preact.memory import saved_activation_bytes
from fused_preact import ops
from fused_preact.ops import bn_relu_conv
from fused_preact.recompute import recompute

pytestmark = pytest.mark.usefixtures("one_thread")


NETS = [(20, "bottleneck"), (14, "basic")]
# (fused, recompute, segment_size, backend) compared with the plain net (fused=False, recompute="none").
MODES = [
    *((True, mode, size, backend) for backend in BACKENDS
      for mode, size in [("none", None), ("bn_relu", None), ("unit", None), ("segment", None), ("segment", 4),
                         ("segment", 1)]),
    (False, "unit", None, "auto"),
    (False, "segment", None, "auto"),
    (False, "segment", 4, "auto"),
]


def _mode_id(m):
    fused, mode, size, backend = m
    return f"{'fused' if fused else 'unfused'}-{mode}{'' if size is None else size}" + \
        (f"-{backend}" if fused else "")


def randomized_net(depth, block, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = PreActResNet(depth, block=block, **kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model.double()


def training_step(model, x, labels):
    x = x.detach().clone().requires_grad_()
    loss = F.cross_entropy(model(x), labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    return {"loss": loss.detach(), "input_grad": x.grad, **{f"grad:{n}": g for n, g in grads.items()},
            **{f"param:{n}": p.detach().clone() for n, p in model.named_parameters()},
            **{f"buffer:{n}": b.clone() for n, b in model.named_buffers()}}


def assert_same(got, want, dtype=torch.float64):
    assert got.keys() == want.keys()
    for name, expected in want.items():
        if expected.is_floating_point():
            assert_close(got[name], expected, dtype, name, scale=max(1.0, expected.abs().max().item()))
        else:
            assert torch.equal(got[name], expected), name


@pytest.mark.parametrize("fused, mode, segment_size, backend", MODES, ids=[_mode_id(m) for m in MODES])
@pytest.mark.parametrize("depth, block", NETS, ids=[f"{b}{d}" for d, b in NETS])
def test_recompute_mode_matches_plain_training_step(depth, block, fused, mode, segment_size, backend):
    plain = randomized_net(depth, block, fused=False, recompute="none")
    model = randomized_net(depth, block, seed=5, fused=fused, recompute=mode, segment_size=segment_size,
                           backend=backend)
    model.load_state_dict(plain.state_dict(), strict=True)
    x, labels = torch.randn(3, 3, 16, 16, dtype=torch.float64), torch.tensor([1, 7, 3])
    assert_same(training_step(model, x, labels), training_step(plain, x, labels))
    assert all(int(m.num_batches_tracked) == 1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("depth, block, expected", [(20, "bottleneck", 2), (164, "bottleneck", 7),
                                                    (1001, "bottleneck", 18), (14, "basic", 2)])
def test_default_segment_size_is_rounded_sqrt_of_units(depth, block, expected):
    with torch.device("meta"):
        model = PreActResNet(depth, block=block, recompute="segment")
    assert model.segment_size == expected == round(math.sqrt(len(model.units)))


@pytest.mark.parametrize("mode", ["unit", "segment"])
def test_recompute_with_frozen_parameters_matches_plain(mode):
    plain = randomized_net(20, "bottleneck", fused=False, recompute="none")
    model = randomized_net(20, "bottleneck", seed=5, recompute=mode)
    model.load_state_dict(plain.state_dict(), strict=True)
    for net in (plain, model):
        net.units[0].requires_grad_(False)
        net.units[1].bn1.requires_grad_(False)
    x, labels = torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 5])
    assert_same(training_step(model, x, labels), training_step(plain, x, labels))
    assert model.units[0].conv1.weight.grad is None and model.units[1].bn1.weight.grad is None


# ---- saved-tensor hooks -------------------------------------------------------------------------------------

def _kept_unit_inputs(model, mode):
    if mode == "bn_relu":
        return list(range(len(model.units)))
    step = 1 if mode == "unit" else model.segment_size
    return list(range(0, len(model.units), step))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["bn_relu", "unit", "segment"])
def test_backward_reads_kept_tensors_only_through_saved_tensor_hooks(mode, backend):
    model = randomized_net(20, "bottleneck", recompute=mode, backend=backend)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 10, dtype=torch.float64)
    wanted = [x, *model.parameters()]
    expected = torch.autograd.grad(model(x), wanted, g)

    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    unit_inputs, originals, packed, unpacked = {}, [], [], set()

    def record_input(i):
        def hook(module, args):
            unit_inputs.setdefault(i, args[0].data_ptr())
        return hook

    handles = [u.register_forward_pre_hook(record_input(i)) for i, u in enumerate(model.units)]

    def pack(t):
        if t.untyped_storage().data_ptr() not in own and t is not x:
            originals.append(t)
        packed.append(t.data_ptr())
        return len(packed) - 1, t.clone()

    def unpack(entry):
        unpacked.add(entry[0])
        return entry[1]

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = model(x)
    for h in handles:
        h.remove()
    with torch.no_grad():
        for t in originals:
            t.fill_(float("nan"))
    got = torch.autograd.grad(out, wanted, g)

    for i in _kept_unit_inputs(model, mode):
        assert unit_inputs[i] in packed, f"input of unit {i} is not saved through save_for_backward"
    assert unpacked == set(range(len(packed)))
    for name, a, b in zip(["input", *(n for n, _ in model.named_parameters())], got, expected):
        assert_close(a, b, torch.float64, name, scale=max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("mode", ["bn_relu", "unit"])
def test_training_under_save_on_cpu_gives_same_gradients(mode):
    model = randomized_net(11, "bottleneck", recompute=mode)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    wanted = [x, *model.parameters()]
    expected = torch.autograd.grad(model(x).square().sum(), wanted)
    with torch.autograd.graph.save_on_cpu():
        loss = model(x).square().sum()
    for a, b in zip(torch.autograd.grad(loss, wanted), expected):
        assert_close(a, b, torch.float64, scale=max(1.0, b.abs().max().item()))


# ---- whole nets under recompute: functional_call, the statistics replay, nested recomputes -------------

@pytest.mark.parametrize("mode", ["unit", "segment"])
def test_functional_call_gets_gradients_for_the_substituted_parameters(mode):
    # torch.func.functional_call binds other tensors to the parameters for the
    # forward only: the recompute in backward must use those, and their
    # gradients must reach them, not the module's own parameters.
    model = randomized_net(20, "bottleneck", recompute=mode)
    plain = randomized_net(20, "bottleneck", fused=False, recompute="none")
    substitutes = {name: (p.detach() * 1.5).requires_grad_() for name, p in model.named_parameters()}
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    torch.func.functional_call(model, substitutes, (x,)).square().sum().backward()
    # The plain net's parameters, in the same order, bound to the same values.
    plain_substitutes = {name: t.detach().clone().requires_grad_()
                         for (name, _), t in zip(plain.named_parameters(), substitutes.values(), strict=True)}
    torch.func.functional_call(plain, plain_substitutes, (x,)).square().sum().backward()
    for name, a, b in zip(substitutes, substitutes.values(), plain_substitutes.values()):
        assert a.grad is not None, name
        assert_close(a.grad, b.grad, torch.float64, name, scale=max(1.0, b.grad.abs().max().item()))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["unit", "segment"])
def test_second_run_normalises_with_the_first_runs_statistics(mode, backend, monkeypatch):
    # The recompute makes no statistics pass: every fused layer's statistics
    # are computed once, in forward (the first run records them, the second
    # replays them), and the gradients are still the plain net's.
    model = randomized_net(20, "bottleneck", recompute=mode, backend=backend)
    plain = randomized_net(20, "bottleneck", fused=False, recompute="none")
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    layers = sum(isinstance(m, nn.BatchNorm2d) for m in model.units.modules())  # a fused layer per unit BN
    passes, calls = [], []
    compute, normalize = bn_relu_conv._normalization_stats, bn_relu_conv.normalization_stats
    monkeypatch.setattr(bn_relu_conv, "_normalization_stats", lambda *a: passes.append(1) or compute(*a))
    monkeypatch.setattr(ops, "normalization_stats", lambda *a, **kw: calls.append(1) or normalize(*a, **kw))
    out = model(x)
    assert len(passes) == len(calls) == layers
    got = torch.autograd.grad(out.sum(), [x, *model.parameters()])
    assert (len(passes), len(calls)) == (layers, 2 * layers)  # the layers ran twice, their statistics pass once
    want = torch.autograd.grad(plain(x).sum(), [x, *plain.parameters()])
    for (name, _), a, b in zip([("input", None), *model.named_parameters()], got, want):
        assert_close(a, b, torch.float64, name, scale=max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("mode", ["unit", "segment"])
def test_recompute_of_a_net_that_recomputes_its_units(mode):
    # The outer block's second run (in backward) runs the inner recomputes'
    # first runs: they take their statistics from the outer replay, so both
    # stay in step; gradients and running statistics are the plain net's.
    model = randomized_net(20, "bottleneck", recompute=mode)
    plain = randomized_net(20, "bottleneck", fused=False, recompute="none")
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    out = recompute(model, x, model)
    got = torch.autograd.grad(out.sum(), [x, *model.parameters()])
    want = torch.autograd.grad(plain(x).sum(), [x, *plain.parameters()])
    for (name, _), a, b in zip([("input", None), *model.named_parameters()], got, want):
        assert_close(a, b, torch.float64, name, scale=max(1.0, b.abs().max().item()))
    # (the units' layers obey frozen_running_stats; the head's plain nn.BatchNorm2d is updated by each run)
    for (name, a), b in zip(model.units.named_buffers(), plain.units.buffers()):
        assert torch.allclose(a, b, rtol=1e-12, atol=0), name


# ---- saved bytes of ResNet-1001 ---------------------------------------------------------------------------

CONFIGS = {"eager": (False, "none"), "bn_relu": (True, "bn_relu"), "unit": (True, "unit"),
           "segment": (True, "segment")}


@pytest.fixture(scope="module")
def saved_bytes_1001():
    x, result = torch.randn(1, 3, 32, 32), {}
    for name, (fused, mode) in CONFIGS.items():
        torch.manual_seed(0)
        model = PreActResNet(1001, fused=fused, recompute=mode).train()
        result[name] = saved_activation_bytes(lambda: model(x), model)
        result[f"{name}:segment_size"] = model.segment_size
    return result


def expected_saved_bytes_1001(config, segment_size, size=32):
    """fp32 bytes autograd keeps for one image, from the architecture: eager keeps each BN's input and each
    ReLU's output, bn_relu only the BN input, unit/segment only the kept units' inputs; every config also
    keeps the image, the head's BN input/ReLU output/fc input, and BN mean and invstd where BN runs eagerly;
    unit/segment also every layer's 4 statistics vectors (the recompute's StatsTape)."""
    n, c_in, h, units = 111, 16, size, []
    for stage, width in enumerate((16, 32, 64)):
        for i in range(n):
            h_out = h // 2 if stage > 0 and i == 0 else h
            units.append([(c_in, h * h), (width, h_out * h_out), (width, h_out * h_out)])
            c_in, h = 4 * width, h_out
    head = 2 * c_in * h * h + 2 * c_in + c_in
    acts = sum(c * hw for unit in units for c, hw in unit)
    stats = 2 * sum(c for unit in units for c, _ in unit)
    unit_inputs = [unit[0][0] * unit[0][1] for unit in units]
    # A recompute's first run records each layer's mean, invstd, scale and shift for its second run.
    tape = 2 * stats
    kept = {"eager": 2 * acts + stats, "bn_relu": acts + stats, "unit": sum(unit_inputs) + tape,
            "segment": sum(unit_inputs[::segment_size]) + tape}[config]
    return 4 * (3 * size * size + kept + head)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_resnet1001_saved_bytes_match_architecture(saved_bytes_1001, config):
    expected = expected_saved_bytes_1001(config, saved_bytes_1001["segment:segment_size"])
    assert saved_bytes_1001[config] == pytest.approx(expected, rel=1e-2)


# unit: 0.333 of the units' inputs plus 0.007 of statistics recorded for the recompute (a batch of one image;
# they are per channel, so nothing at a training batch).
@pytest.mark.parametrize("config, bound", [("bn_relu", 0.51), ("unit", 0.345), ("segment", 0.06)])
def test_resnet1001_saved_bytes_ratio_to_eager(saved_bytes_1001, config, bound):
    assert saved_bytes_1001[config] / saved_bytes_1001["eager"] <= bound
