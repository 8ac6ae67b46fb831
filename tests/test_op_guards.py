"""What the op refuses rather than computes wrongly, and where it must match
nn exactly at the edges: double backward on every backend and recompute
mode, fp16 running statistics beyond fp16's range, bf16 in the Triton
interpreter, arguments of the wrong kind, and padding="same" as nn has it."""
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


@pytest.mark.parametrize("make, error, message", [
    (lambda: PreActResNet("8"), TypeError, r"PreActResNet: depth must be an int, got '8' \(str\)"),
    (lambda: PreActResNet(100), ValueError, r"depth must be 6n\+2 \(basic units\) or 9n\+2 \(bottleneck units\)"),
    (lambda: PreActResNet(100, block="basic"), ValueError, r"depth must be 6n\+2 \(basic units\) with n >= 1"),
    (lambda: PreActResNet(8, num_classes=-1), ValueError, "num_classes must be a positive int, got -1"),
    (lambda: PreActResNet(8, num_classes=2.5), ValueError, "num_classes must be a positive int, got 2.5"),
    (lambda: fused_preact.models.original_resnet.ResNet(8, None), ValueError,
     "ResNet: num_classes must be a positive int"),
])
def test_constructor_arguments_are_checked_whatever_the_backend(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_an_input_with_other_channels_names_the_module_and_its_in_channels():
    with pytest.raises(ValueError, match=r"FusedBNReLUConv2d: expected an input of shape \(N, 16, H, W\) "
                                         r"\(in_channels=16\), got \(2, 8, 5, 5\)"):
        FusedBNReLUConv2d(16, 8, 3)(torch.randn(2, 8, 5, 5))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel", [3, 2, (4, 3), (1, 2)])
def test_padding_same_matches_nn(backend, kernel):
    # An odd kernel pads (k - 1) / 2 on each side; an even one pads one less before than after.
    torch.manual_seed(0)
    dtype = torch.float32 if backend == "triton" else torch.float64  # Triton's kernels have no float64
    fused = FusedBNReLUConv2d(5, 4, kernel, padding="same", backend=backend).to(DEVICE, dtype)
    plain = FusedBNReLUConv2d(5, 4, kernel, padding="same", fused=False).to(DEVICE, torch.float64)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 5, 7, 6, dtype=torch.float64, device=DEVICE)
    for module in (fused, plain):
        xm = x.to(module.conv.weight.dtype).requires_grad_()
        out = module(xm)
        assert out.shape == (2, 4, 7, 6)
        module.grads = torch.autograd.grad(out.square().sum(), [xm, module.conv.weight, module.bn.weight])
        module.out = out.detach()
    assert_close(fused.out, plain.out, dtype, "output")
    for name, a, b in zip(["x", "conv.weight", "bn.weight"], fused.grads, plain.grads):
        assert_close(a, b, dtype, name, scale=max(1.0, b.abs().max().item()))


def _forward_ad(module, x):
    import torch.autograd.forward_ad as fwad
    with fwad.dual_level():
        module(fwad.make_dual(x, torch.ones_like(x)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transform, message", [
    (lambda m, x: torch.vmap(m)(x[None].expand(2, -1, -1, -1, -1)), "torch.func transforms"),
    (lambda m, x: torch.func.grad(lambda t: m(t).sum())(x), "torch.func transforms"),
    (lambda m, x: torch.func.jacrev(m)(x), "torch.func transforms"),
    (lambda m, x: torch.func.jvp(m, (x,), (x,)), "torch.func transforms"),
    (_forward_ad, "forward-mode AD"),
    (lambda m, x: torch.jit.trace(m, x), "torch.jit.trace cannot record the fused op"),
    (lambda m, x: torch.jit.script(nn.Sequential(m)), "FusedBNReLUConv2d: torch.jit.script cannot compile"),
    (lambda m, x: torch.jit.script(PreActResNet(8, backend=m.backend)), "PreActResNet: torch.jit.script"),
], ids=["vmap", "grad", "jacrev", "jvp", "forward_ad", "jit_trace", "jit_script", "jit_script_net"])
def test_transforms_and_jit_are_refused_in_one_line_on_every_backend(backend, transform, message):
    dtype = torch.float32 if backend == "triton" else torch.float64
    module = FusedBNReLUConv2d(4, 3, 3, padding=1, backend=backend).to(DEVICE, dtype)
    x = torch.randn(2, 4, 5, 5, dtype=dtype, device=DEVICE)
    with pytest.raises(NotImplementedError, match=message) as refused:
        transform(module, x)
    assert len(str(refused.value).splitlines()) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_running_statistics_are_refused_on_every_backend(backend):
    dtype = torch.float32 if backend == "triton" else torch.float64
    module = FusedBNReLUConv2d(4, 3, 3, padding=1, backend=backend).to(DEVICE, dtype)
    module.bn.running_mean = torch.zeros(8, dtype=dtype, device=DEVICE)[::2]
    with pytest.raises(ValueError, match=r"running_mean must be contiguous \(updated in place\), got strides \(2,\)"):
        module(torch.randn(2, 4, 5, 5, dtype=dtype, device=DEVICE))
