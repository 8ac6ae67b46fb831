"""Dropout inside the op (bn_relu_conv2d(..., dropout=p)): the mask backward
uses is forward's (against float64 PyTorch given the same mask), it is
nn.Dropout's distribution, p=0 and eval are bit-identical to no dropout,
gradcheck, a unit/segment recompute drops the same elements, torch.compile,
and convert fuses BN -> ReLU -> Dropout -> Conv."""
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import BACKENDS, assert_close
from fused_preact import PreActResNet, convert
from fused_preact.ops import bn_relu_conv2d
from fused_preact.ops.dropout import Dropout

pytestmark = pytest.mark.usefixtures("one_thread")


def _problem(dtype=torch.float64):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, 6, dtype=dtype, requires_grad=True)
    w = (torch.randn(4, 5, 3, 3, dtype=dtype) / 6).requires_grad_()
    g = (torch.rand(5, dtype=dtype) + 0.5).requires_grad_()
    b = torch.randn(5, dtype=dtype).requires_grad_()
    return x, w, g, b


def _seed_drawn_after(global_seed: int) -> torch.Tensor:
    """The seed the op draws first after torch.manual_seed(global_seed) (ops/dropout.py draw_seed)."""
    torch.manual_seed(global_seed)
    return torch.randint(0, 1 << 62, (1,), dtype=torch.int64)


INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# Triton runs here in the interpreter (TRITON_INTERPRET=1, as the test command
# sets it), in float32 (its kernels take no float64), on the CPU.
BACKEND_DTYPES = [(b, torch.float64) for b in BACKENDS] + ([("triton", torch.float32)] if INTERPRET else [])


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES, ids=[b for b, _ in BACKEND_DTYPES])
@pytest.mark.parametrize("pieces", [False, True], ids=["tensor", "pieces"])
def test_backward_uses_forwards_mask(backend, dtype, pieces):
    x, w, g, b = (t.detach().to(dtype).requires_grad_() for t in _problem())
    running = (torch.zeros(5, dtype=g.dtype), torch.ones(5, dtype=g.dtype))
    torch.manual_seed(7)
    inputs = [x[:, :2], x[:, 2:]] if pieces else x  # the mask indexes the pieces' concatenation
    y = bn_relu_conv2d(inputs, w, g, b, *running, padding=1, dropout=0.3, backend=backend)
    leaves = [t.detach().double().requires_grad_() for t in (x, w, g, b)]
    a = F.relu(F.batch_norm(leaves[0], None, None, leaves[2], leaves[3], True))
    want = F.conv2d(a * Dropout(0.3, _seed_drawn_after(7)).mask(a), leaves[1], padding=1)
    assert_close(y, want, dtype, "output", scale=float(want.detach().abs().max()))
    grad = torch.randn_like(want)
    for name, got, expected in zip("xwgb", torch.autograd.grad(y, (x, w, g, b), grad.to(dtype)),
                                   torch.autograd.grad(want, leaves, grad)):
        assert_close(got, expected, dtype, f"d{name}", scale=float(expected.abs().max()) + 1)


@pytest.mark.skipif(not INTERPRET, reason="the Triton kernels run on the CPU under TRITON_INTERPRET=1")
def test_triton_kernels_make_the_masks_mask_bit_for_bit():
    """With scale 1 and shift 0 on a positive x, the conv's loader, wgrad's
    loader and dgrad's epilogue each apply exactly ops/dropout.py's mask: a
    1x1 identity conv shows forward's, and dW / dx show backward's."""
    from fused_preact.triton_kernels import conv_dgrad, conv_forward, conv_wgrad

    torch.manual_seed(0)
    x = torch.rand(2, 6, 5, 7) + 1.0  # relu(x * 1 + 0) = x: nothing clipped
    ones, zeros = torch.ones(6), torch.zeros(6)
    eye = torch.eye(6).view(6, 6, 1, 1)
    drop = Dropout(0.4, _seed_drawn_after(9))
    mask = drop.mask(x)
    y = conv_forward.conv_forward(x, ones, zeros, [eye], dropout=drop)[0][0]
    assert torch.equal(y == 0, mask == 0)
    torch.testing.assert_close(y, x * mask)
    dy = torch.rand_like(x) + 1.0
    dz = conv_dgrad.conv_dgrad([dy], [eye], [(1, 1)], [(0, 0)], x, zeros, ones, ones, zeros, dropout=drop)[0]
    torch.testing.assert_close(dz, dy * mask)
    dw = conv_wgrad.conv_wgrad(dy, x, ones, zeros, eye.shape, 1, 0, torch.float32, dropout=drop)
    torch.testing.assert_close(dw, torch.einsum("nkhw,nchw->kc", dy, x * mask).view_as(eye))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_the_mask_is_nn_dropouts_distribution(p):
    like = torch.empty(200_000, dtype=torch.float32)
    mask = Dropout(p, _seed_drawn_after(3)).mask(like)
    kept = mask != 0
    assert torch.all(mask[kept] == torch.tensor(1 / (1 - p), dtype=torch.float32))
    rate, n = kept.double().mean().item(), like.numel()
    assert abs(rate - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5, rate
    # Neighbouring elements are independent: the rate of pairs kept together is (1 - p)^2.
    both = (kept[:-1] & kept[1:]).double().mean().item()
    assert abs(both - (1 - p) ** 2) < 5 * ((1 - p) ** 2 / n) ** 0.5 + 1e-3, both
    assert not torch.equal(mask, Dropout(p, _seed_drawn_after(4)).mask(like))  # another seed, another mask


@pytest.mark.parametrize("backend", BACKENDS)
def test_p_zero_and_eval_are_bit_identical_to_no_dropout(backend):
    x, w, g, b = _problem()
    running = (torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64))
    for training in (True, False):
        plain = bn_relu_conv2d(x, w, g, b, *running, training=training, backend=backend)
        off = bn_relu_conv2d(x, w, g, b, *running, training=training, dropout=0.0, backend=backend)
        assert torch.equal(plain, off)
    evaluated = bn_relu_conv2d(x, w, g, b, *running, training=False, dropout=0.5, backend=backend)
    assert torch.equal(evaluated, bn_relu_conv2d(x, w, g, b, *running, training=False, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64_with_a_fixed_seed(backend):
    x, w, g, b = _problem()

    def f(x, w, g, b):
        torch.manual_seed(11)  # every evaluation draws the same mask
        return bn_relu_conv2d(x, w, g, b, None, None, padding=1, dropout=0.4, backend=backend)

    assert torch.autograd.gradcheck(f, (x, w, g, b))


@pytest.mark.parametrize("recompute", ["unit", "segment"])
def test_a_recompute_drops_the_same_elements_as_the_first_run(recompute):
    torch.manual_seed(0)
    model = PreActResNet(8, block="basic", shortcut="B", widen_factor=2, dropout=0.4, segment_size=2 if
                         recompute == "segment" else None, recompute=recompute).double()
    twin = copy.deepcopy(model)
    twin.recompute = "bn_relu"
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    results = []
    for m in (twin, model):
        torch.manual_seed(5)
        out = m(x)
        out.square().sum().backward()
        results.append((out.detach(), [p.grad for p in m.parameters()]))
    (want, want_grads), (got, got_grads) = results
    assert_close(got, want, torch.float64, "output", scale=float(want.abs().max()))
    for (name, _), a, b in zip(model.named_parameters(), got_grads, want_grads):
        assert_close(a, b, torch.float64, f"grad {name}", scale=float(b.abs().max()) + 1)


COMPILED = [("reference", torch.float64)] + ([("triton", torch.float32)] if INTERPRET else [])


@pytest.mark.parametrize("backend, dtype", COMPILED, ids=[b for b, _ in COMPILED])
def test_torch_compile_matches_eager(backend, dtype):
    """Triton's traceable path (the triton_weight_grad / triton_input_grad ops) takes the dropout too."""
    x, w, g, b = (t.detach().to(dtype).requires_grad_() for t in _problem())

    def f(x):
        return bn_relu_conv2d(x, w, g, b, None, None, padding=1, dropout=0.3, backend=backend)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    outs = []
    for fn in (f, compiled):
        torch.manual_seed(2)
        y = fn(x)
        outs.append((y.detach(), *torch.autograd.grad(y.square().sum(), (x, w))))
    for name, got, want in zip(("output", "dx", "dw"), outs[1], outs[0]):
        assert_close(got, want, dtype, name, scale=float(want.abs().max()))


class DropoutChain(nn.Module):
    def __init__(self, functional: bool):
        super().__init__()
        self.bn, self.drop, self.conv = nn.BatchNorm2d(5), nn.Dropout(0.3), nn.Conv2d(5, 4, 3, padding=1, bias=False)
        self.functional = functional

    def forward(self, x):
        a = F.relu(self.bn(x))
        return self.conv(F.dropout(a, 0.3, self.training) if self.functional else self.drop(a))


@pytest.mark.parametrize("functional", [False, True], ids=["nn.Dropout", "F.dropout"])
def test_convert_fuses_relu_dropout_conv(functional):
    torch.manual_seed(0)
    model = DropoutChain(functional).double()
    converted = convert(copy.deepcopy(model))
    assert str(converted.fused_preact_report) == "fused 1 of 1 chains"
    x = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    torch.manual_seed(9)
    got = converted(x)
    a = F.relu(F.batch_norm(x, None, None, model.bn.weight, model.bn.bias, True))
    want = model.conv(a * Dropout(0.3, _seed_drawn_after(9)).mask(a))
    assert_close(got, want, torch.float64, "train output", scale=float(want.detach().abs().max()))
    model(x)  # the same running-statistics update as the converted model's
    model.eval(), converted.eval()
    assert_close(converted(x), model(x), torch.float64, "eval output")


def test_bad_dropout_is_named():
    x, w, g, b = _problem()
    with pytest.raises(ValueError, match=r"bn_relu_conv2d: dropout must be a probability in \[0, 1\), got 1.0"):
        bn_relu_conv2d(x, w, g, b, None, None, dropout=1.0)
    with pytest.raises(ValueError, match="PreActResNet: dropout with recompute='unit' needs fused=True"):
        PreActResNet(8, block="basic", dropout=0.3, fused=False, recompute="unit")


def test_a_converted_unit_whose_dropout_is_fused_is_recomputed_with_the_same_masks():
    torch.manual_seed(0)
    model = nn.Sequential(*(DropoutChain(functional) for functional in (False, True, False))).double()
    for unit in model:  # each unit keeps its input's shape: 5 -> 5 channels
        unit.conv = nn.Conv2d(5, 5, 3, padding=1, bias=False).double()
    plain, units = convert(model), convert(model, recompute="unit")
    assert units.fused_preact_report.recomputed == [["0"], ["1"], ["2"]]
    assert not units.fused_preact_report.not_recomputed
    x = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    results = []
    for m in (plain, units):
        torch.manual_seed(4)
        out = m(x)
        results.append((out.detach(), torch.autograd.grad(out.square().sum(), list(model.parameters()))))
    assert_close(results[1][0], results[0][0], torch.float64, "output", scale=float(results[0][0].abs().max()))
    for a, b in zip(results[1][1], results[0][1]):
        assert_close(a, b, torch.float64, "grad", scale=float(b.abs().max()) + 1)
