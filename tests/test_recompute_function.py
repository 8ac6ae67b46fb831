"""The recompute() function on small functions and single fused layers: gradients,
grad and autocast modes, frozen running statistics, and the StatsTape's refusal of
a replay of other layers. Whole nets: test_recompute.py."""
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_close
from fused_preact import FusedBNReLUConv2d
from fused_preact.ops.bn_relu_conv import normalization_stats
from fused_preact.ops.recompute_state import StatsTape
from fused_preact.recompute import frozen_running_stats, recompute, running_stats_frozen

pytestmark = pytest.mark.usefixtures("one_thread")


def _small_function():
    """(run, its module's parameters, a list of run's grad modes per call, the module)."""
    module = nn.Module()
    module.w1 = nn.Parameter(torch.randn(5, 4, dtype=torch.float64))
    module.b1 = nn.Parameter(torch.randn(4, dtype=torch.float64))
    module.w2 = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    calls = []

    def run(x):  # reads the parameters through the module, as recompute() asks
        calls.append(torch.is_grad_enabled())
        return (torch.tanh(x @ module.w1 + module.b1) @ module.w2).square()

    return run, list(module.parameters()), calls, module


@pytest.mark.parametrize("input_requires_grad", [True, False])
def test_recompute_gives_same_gradients_as_direct_call(input_requires_grad):
    run, params, calls, module = _small_function()
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=input_requires_grad)
    g = torch.randn(6, 3, dtype=torch.float64)
    direct = run(x)
    wanted = [x, *params] if input_requires_grad else params
    expected = torch.autograd.grad(direct, wanted, g)
    calls.clear()
    out = recompute(run, x, module)
    assert calls == [False]
    assert_close(out, direct, torch.float64, "output")
    got = torch.autograd.grad(out, wanted, g)
    assert calls == [False, True]
    for a, b in zip(got, expected):
        assert_close(a, b, torch.float64)


def test_recompute_leaves_input_grad_none_when_input_does_not_require_grad():
    run, params, _, module = _small_function()
    x = torch.randn(6, 5, dtype=torch.float64)
    recompute(run, x, module).sum().backward()
    assert x.grad is None and all(p.grad is not None for p in params)


def test_recompute_under_no_grad_runs_once_without_graph():
    run, params, calls, module = _small_function()
    with torch.no_grad():
        out = recompute(run, torch.randn(6, 5, dtype=torch.float64), module)
    assert calls == [False] and not out.requires_grad


def test_frozen_running_stats_nests_and_restores():
    assert not running_stats_frozen()
    with frozen_running_stats():
        assert running_stats_frozen()
        with frozen_running_stats():
            assert running_stats_frozen()
        assert running_stats_frozen()
    assert not running_stats_frozen()
    with pytest.raises(KeyError), frozen_running_stats():
        raise KeyError
    assert not running_stats_frozen()


def test_frozen_running_stats_is_per_thread():
    seen = []
    with frozen_running_stats():
        thread = threading.Thread(target=lambda: seen.append(running_stats_frozen()))
        thread.start()
        thread.join()
    assert seen == [False]


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
@pytest.mark.parametrize("fused, backend", [(True, "reference"), (True, "native"), (False, "reference")],
                         ids=["fused-reference", "fused-native", "unfused"])
def test_frozen_running_stats_keep_buffers_but_normalise_with_batch_stats(fused, backend, momentum):
    mod = FusedBNReLUConv2d(4, 6, kernel_size=3, padding=1, momentum=momentum, fused=fused, backend=backend).double()
    with torch.no_grad():
        mod.bn.running_mean.uniform_(-1, 1)
        mod.bn.running_var.uniform_(0.5, 2)
    before = {n: b.clone() for n, b in mod.bn.named_buffers()}
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64) * 2 + 1
    expected = F.conv2d(F.relu(F.batch_norm(x, None, None, mod.bn.weight, mod.bn.bias, True)), mod.conv.weight,
                        padding=1)
    with frozen_running_stats():
        out = mod(x)
    assert_close(out, expected, torch.float64, "output")
    for name, b in mod.bn.named_buffers():
        assert torch.equal(b, before[name]), name
    mod(x)
    assert int(mod.bn.num_batches_tracked) == 1 and not torch.equal(mod.bn.running_mean, before["running_mean"])


@pytest.mark.parametrize("fused", [True, False])
def test_recomputed_module_updates_running_stats_once(fused):
    mod = FusedBNReLUConv2d(4, 6, kernel_size=3, padding=1, fused=fused).double()
    twin = FusedBNReLUConv2d(4, 6, kernel_size=3, padding=1, fused=fused).double()
    twin.load_state_dict(mod.state_dict())
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64) + 1
    recompute(mod, x.requires_grad_(), mod).sum().backward()
    twin(x).sum()
    for name, b in twin.bn.named_buffers():
        assert torch.equal(getattr(mod.bn, name), b), name


def test_stats_tape_refuses_a_replay_of_other_layers():
    def layer(x, weight=None):
        return normalization_stats(x, weight, None, None, None, None, True, 0.1, 1e-5, "reference")

    x, weight = torch.randn(2, 3, 4, 4), torch.ones(3)
    tape = StatsTape()
    with tape.recording():
        layer(x, weight)
    with pytest.raises(RuntimeError, match=r"layer 0 of the replayed run differs from the recorded run's: its input "
                                           r"shape \(2, 5, 4, 4\) is not the recorded \(2, 3, 4, 4\)"), \
            tape.replaying():
        layer(torch.randn(2, 5, 4, 4), torch.ones(5))
    with pytest.raises(RuntimeError, match=r"layer 0 .*: its BatchNorm is not the recorded run's \(same input shape "
                                           r"\(2, 3, 4, 4\)\)"), tape.replaying():
        layer(x, torch.ones(3))  # the same shape, another BatchNorm
    with pytest.raises(RuntimeError, match="replayed run normalised 0 layers, the recorded one 1"), tape.replaying():
        pass
    with pytest.raises(RuntimeError, match=r"layer 1 .*: the recorded run has no such layer"), tape.replaying():
        layer(x, weight)
        layer(x, weight)
    with tape.replaying():
        assert all(got is kept for got, kept in zip(layer(x, weight), tape.tensors, strict=True))


def _autocast_probe():
    lin = nn.Linear(8, 8)
    seen = []

    def run(x):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return torch.tanh(lin(x)) * lin(x)

    return run, lin, seen


def test_recompute_restores_forward_autocast_state_in_backward():
    run, lin, seen = _autocast_probe()
    params = list(lin.parameters())
    x = torch.randn(4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.float16):
        out = recompute(run, x, lin)
        direct = run(x)
    assert out.dtype == torch.float16
    got = torch.autograd.grad(out.float().sum(), [x, *params])
    expected = torch.autograd.grad(direct.float().sum(), [x, *params])
    assert seen == [(True, torch.float16)] * 3
    for a, b in zip(got, expected):
        assert_close(a, b, torch.float64)


def test_recompute_backward_ignores_autocast_active_at_backward_time():
    run, lin, seen = _autocast_probe()
    params = list(lin.parameters())
    x = torch.randn(4, 8, requires_grad=True)
    out, direct = recompute(run, x, lin), run(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch.autograd.grad(out.sum(), [x, *params])
        expected = torch.autograd.grad(direct.sum(), [x, *params])
    assert [enabled for enabled, _ in seen] == [False, False, False]
    for a, b in zip(got, expected):
        assert_close(a, b, torch.float64)
