"""The whole model under torch.compile in every recompute mode: the same
values, gradients and running statistics as eager (updated once per step, the
recomputation included), and no more saved bytes than eager keeps in the same
mode."""
import copy

import pytest
import torch

from conftest import assert_close
from fused_preact import PreActResNet
from fused_preact.memory import saved_activation_bytes

pytestmark = pytest.mark.usefixtures("one_thread")


def _compare(backend: str, recompute: str):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = PreActResNet(11, recompute=recompute, backend="native")
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(4, 3, 16, 16)
    saved = saved_activation_bytes(lambda: compiled(x), model), saved_activation_bytes(lambda: eager(x), eager)
    out, want = compiled(x), eager(x)
    out.sum().backward()
    want.sum().backward()
    assert_close(out, want.detach(), torch.float32, "output", scale=3.0)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert_close(p.grad, q.grad, torch.float32, name, scale=3.0)
    for (name, b), c in zip(model.named_buffers(), eager.buffers()):
        if b.is_floating_point():
            assert_close(b, c, torch.float32, name)
        else:  # num_batches_tracked: two forwards each, none counted twice
            assert torch.equal(b, c) and int(b) == 2, name
    return saved


@pytest.mark.parametrize("recompute", ["none", "bn_relu", "unit", "segment"])
def test_compiled_model_matches_eager(recompute):
    compiled_saved, eager_saved = _compare("aot_eager", recompute)
    if recompute in ("unit", "segment"):
        assert compiled_saved <= eager_saved


@pytest.mark.parametrize("recompute", ["bn_relu", "segment"])
def test_inductor_matches_eager_and_keeps_no_more(recompute):
    compiled_saved, eager_saved = _compare("inductor", recompute)
    assert compiled_saved <= eager_saved
