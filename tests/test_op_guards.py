"""What the op refuses rather than computes wrongly, and where it must match
nn exactly at the edges: double backward on every backend and recompute
mode, fp16 running statistics beyond fp16's range, bf16 in the Triton
interpreter, and arguments of the wrong kind."""
import os

import pytest
import torch
from torch import nn

import fused_preact
from conftest import assert_close
from fused_preact import FusedBNReLUConv2d, PreActResNet
from fused_preact.ops import bn_relu_conv2d

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
BACKENDS = ["reference", "native", *(["triton"] if INTERPRET or torch.cuda.is_available() else [])]
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_through_the_op_raises(backend):
    torch.manual_seed(0)
    module = FusedBNReLUConv2d(3, 4, 3, padding=1, backend=backend).to(DEVICE)
    x = torch.randn(2, 3, 5, 5, device=DEVICE, requires_grad=True)
    (grad,) = torch.autograd.grad(module(x).square().sum(), x)  # first order: fine
    with pytest.raises(RuntimeError, match="double backward .* not supported.*fused=False"):
        torch.autograd.grad(module(x).square().sum(), x, create_graph=True)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("recompute", ["unit", "segment"])
def test_double_backward_through_recompute_raises(recompute):
    model = PreActResNet(11, recompute=recompute, backend="native")
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(model(x).sum(), x, create_graph=True)


def test_the_plain_net_still_gives_exact_second_order_gradients():
    """The advice of the error holds: fused=False is nn, which double-differentiates."""
    model = PreActResNet(8, fused=False).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradgradcheck(lambda t: model(t), (x,), eps=1e-6, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_running_variance_beyond_fp16_range_matches_nn(backend):
    torch.manual_seed(0)
    x = (torch.randn(4, 3, 6, 6) * 400).half().to(DEVICE)  # batch variance ~1.6e5 > 65504
    weight = torch.randn(5, 3, 1, 1).half().to(DEVICE)
    bn = nn.BatchNorm2d(3).to(DEVICE)
    running = [bn.running_mean.clone().half(), bn.running_var.clone().half()]
    bn_relu_conv2d(x, weight, None, None, *running, backend=backend)
    plain = nn.BatchNorm2d(3).half().to(DEVICE).train()
    plain(x)
    assert torch.isfinite(running[1]).all()
    assert torch.equal(running[0], plain.running_mean) and torch.equal(running[1], plain.running_var)


@pytest.mark.skipif(not INTERPRET, reason="about the Triton interpreter (TRITON_INTERPRET=1)")
def test_triton_interpreter_refuses_bf16():
    x = torch.randn(2, 3, 5, 5, dtype=torch.bfloat16)
    w = torch.randn(4, 3, 3, 3, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="interpreter computes bf16 matrix products wrongly"):
        bn_relu_conv2d(x, w, None, None, None, None, backend="triton")
    reference = bn_relu_conv2d(x.float(), w.float(), None, None, None, None, backend="reference")
    assert_close(bn_relu_conv2d(x.half(), w.half(), None, None, None, None, backend="triton"), reference,
                 torch.float16, scale=5.0)  # fp16 is fine there


@pytest.mark.parametrize("make, message", [
    (lambda: PreActResNet(8, fused="False"), "fused must be True or False, got 'False'"),
    (lambda: fused_preact.create_model("resnet", depth=8, fused=1), "fused must be True or False"),
    (lambda: FusedBNReLUConv2d(3, 4, fused="yes"), "fused must be True or False"),
])
def test_a_non_bool_fused_is_refused(make, message):
    with pytest.raises(TypeError, match=message):
        make()


@pytest.mark.parametrize("name", ["preact_resnet110", "preact_resnet164", "preact_resnet1001"])
def test_fixed_depth_names_refuse_another_depth(name):
    with pytest.raises(ValueError, match=rf"{name}: depth is fixed at"):
        fused_preact.create_model(name, depth=20)
    with torch.device("meta"):
        assert fused_preact.create_model(name, depth=int(name[len("preact_resnet"):])).depth == int(name[13:])
