"""The Triton backward kernels (conv_dgrad, bn_relu_input_grad, conv_wgrad)
against float64 PyTorch autograd of BatchNorm -> ReLU -> conv2d.

Runs on the CPU under TRITON_INTERPRET=1 (tiny shapes: the interpreter is slow;
the interpreter's own bf16 dot is wrong: bf16 runs in test_triton_gpu_configs.py,
its dot decoded as a GPU's) and on a CUDA device
otherwise; the `gpu` tests use the paper's shapes and need CUDA.
"""
import os

import pytest
import torch
import torch.nn.functional as F

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)

from conftest import LAYOUTS, assert_close, make_layout  # noqa: E402
from fused_preact import reference  # noqa: E402
from fused_preact.triton_kernels import conv_wgrad as wgrad_module  # noqa: E402
from fused_preact.triton_kernels.bn_relu_backward import bn_relu_input_grad  # noqa: E402
from fused_preact.triton_kernels.conv_dgrad import conv_dgrad  # noqa: E402
from fused_preact.triton_kernels.conv_wgrad import conv_wgrad  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
EPS = 1e-5
# the GPU check runs these modules whole on a GPU: factory calls follow the kernels' device
pytestmark = pytest.mark.usefixtures("one_thread", "on_triton_device")


def _v(t):
    return t.view(1, -1, 1, 1)


def _out_size(size, k, stride, pad):
    return (size + 2 * pad - k) // stride + 1


def _problem(shape, convs, dtype, layout="channels_last", grad_layout=None, none=(), device=DEVICE):
    """x, BN parameters and statistics, weights and output gradients for
    convs = [(K, R, stride, padding)]; grads whose index is in `none` are None."""
    n, c, h, w = shape
    x = make_layout((torch.randn(shape, dtype=torch.float64) * 2 + 0.5).to(dtype).to(device), layout)
    mean, invstd = reference.batch_stats(x, EPS)
    gamma = (torch.rand(c) + 0.5).to(device)
    # Shifts of both signs in every problem: relu(shift) > 0 is what a padded
    # position would wrongly contribute if padding were applied to x.
    beta = (torch.linspace(-0.5, 1.0, c) + 0.1 * torch.randn(c)).to(device)
    scale = gamma * invstd
    shift = beta - mean * scale
    weights, grads, strides, paddings = [], [], [], []
    for i, (k, r, stride, pad) in enumerate(convs):
        weights.append((torch.randn(k, c, r, r, dtype=torch.float64) / (c * r * r) ** 0.5).to(dtype).to(device))
        dy = torch.randn(n, k, _out_size(h, r, stride, pad), _out_size(w, r, stride, pad), dtype=torch.float64)
        grads.append(None if i in none else make_layout(dy.to(dtype).to(device), grad_layout or layout))
        strides.append((stride, stride))
        paddings.append((pad, pad))
    return dict(x=x, mean=mean, invstd=invstd, gamma=gamma, beta=beta, scale=scale, shift=shift,
                weights=weights, grads=grads, strides=strides, paddings=paddings)


def _autograd(p, training):
    """float64 autograd truth: dict of dx, dW (list), d_gamma, d_beta, dz."""
    x64 = p["x"].detach().double().requires_grad_()
    g64 = p["gamma"].double().requires_grad_()
    b64 = p["beta"].double().requires_grad_()
    if training:  # the statistics are x's own, and part of the graph
        var, mu = torch.var_mean(x64, dim=(0, 2, 3), correction=0)
        istd = torch.rsqrt(var + EPS)
    else:
        mu, istd = p["mean"].double(), p["invstd"].double()
    z = (x64 - _v(mu)) * _v(istd) * _v(g64) + _v(b64)
    z.retain_grad()
    a = torch.relu(z)
    ws = [w.double().requires_grad_() for w in p["weights"]]
    loss = sum((F.conv2d(a, w, None, st, pad) * dy.double()).sum()
               for w, dy, st, pad in zip(ws, p["grads"], p["strides"], p["paddings"]) if dy is not None)
    loss.backward()
    return dict(dx=x64.grad, dW=[w.grad for w in ws], d_gamma=g64.grad, d_beta=b64.grad, dz=z.grad, z=z.detach())


def _check_backward(p, dtype):
    """Run the three kernels on problem p and compare them with autograd, in
    training and eval mode."""
    x = p["x"]
    stats = (p["mean"], p["invstd"], p["scale"], p["shift"])
    dz, sum_dz, sum_dz_xhat = conv_dgrad(p["grads"], p["weights"], p["strides"], p["paddings"], x, *stats)
    assert dz.dtype == x.dtype and dz.shape == x.shape and sum_dz.dtype == torch.float32
    assert dz.stride() == torch.empty_like(x).stride()
    stat_scale = float(p["scale"].abs().max())

    for training in (True, False):
        ref = _autograd(p, training)
        # Where z is within rounding of 0 the ReLU mask depends on how z was
        # rounded (fp32 statistics here, fp64 there): those few elements are
        # left out of the elementwise comparisons (the paper shapes have millions).
        clear = ref["z"].abs() > 1e-4
        assert_close(dz * clear, ref["dz"] * clear, dtype, f"dz (training={training})",
                     scale=float(ref["dz"].abs().max()))
        # d beta = sum dz, d gamma = sum dz * xhat, in both modes.
        assert_close(sum_dz, ref["d_beta"], dtype, "sum_dz", scale=float(ref["dz"].abs().sum((0, 2, 3)).max()))
        assert_close(sum_dz_xhat, ref["d_gamma"], dtype, "sum_dz_xhat",
                     scale=float(ref["dz"].abs().sum((0, 2, 3)).max()) * 3)
        dx = bn_relu_input_grad(dz, x, p["mean"], p["invstd"], p["scale"], sum_dz, sum_dz_xhat, training)
        assert dx.dtype == x.dtype and dx.stride() == torch.empty_like(x).stride()
        assert_close(dx * clear, ref["dx"] * clear, dtype, f"dx (training={training})",
                     scale=stat_scale * float(ref["dz"].abs().max()))

    for i, (dy, w) in enumerate(zip(p["grads"], p["weights"])):
        if dy is None:
            continue
        # dW in the weight's layout (a channels_last model's weights are), so
        # that autograd accumulates it without a copy.
        for fmt in (torch.contiguous_format, torch.channels_last):
            dw = conv_wgrad(dy, x, p["scale"], p["shift"], w.shape, p["strides"][i], p["paddings"][i], w.dtype, fmt)
            assert dw.dtype == w.dtype and dw.shape == w.shape
            assert dw.stride() == torch.empty(w.shape, memory_format=fmt).stride()
            assert_close(dw, ref["dW"][i], dtype, f"dW[{i}] ({fmt})", scale=float(ref["dW"][i].abs().max()))


# (name, x shape, (K, R, stride, padding)). (H + 2p - R) % stride != 0 in the
# stride-2 cases along H (1x1_s2, 3x3_s2) or W (3x3_s2_p0): the transposed conv
# must still give x's full size.
GEOMETRIES = [
    ("1x1", (3, 5, 7, 9), (6, 1, 1, 0)),
    ("3x3", (3, 5, 7, 9), (6, 3, 1, 1)),
    ("3x3_p0", (3, 5, 7, 9), (6, 3, 1, 0)),
    ("1x1_s2", (3, 5, 8, 9), (6, 1, 2, 0)),
    ("3x3_s2", (3, 5, 8, 9), (6, 3, 2, 1)),
    ("3x3_s2_p0", (3, 5, 7, 10), (6, 3, 2, 0)),
]
DTYPES = [torch.float32, torch.float16]
# Every geometry and dtype once, the layouts taking turns (all three per dtype).
SINGLE_CASES = [pytest.param(shape, conv, dtype, LAYOUTS[(gi + di) % 3], id=f"{name}-{str(dtype)[6:]}-"
                             f"{LAYOUTS[(gi + di) % 3]}")
                for gi, (name, shape, conv) in enumerate(GEOMETRIES) for di, dtype in enumerate(DTYPES)]


@pytest.mark.parametrize("shape, conv, dtype, layout", SINGLE_CASES)
def test_single_conv(shape, conv, dtype, layout):
    _check_backward(_problem(shape, [conv], dtype, layout), dtype)


@pytest.mark.parametrize("x_layout, grad_layout", [("strided", "channels_last"), ("channels_last", "nchw")])
def test_mixed_layouts(x_layout, grad_layout):
    p = _problem((3, 5, 8, 9), [(6, 3, 2, 1)], torch.float32, x_layout, grad_layout)
    _check_backward(p, torch.float32)


# A stage's first unit: conv1 and the projection shortcut on the same activation.
TWO_CONV_CASES = [
    pytest.param([(6, 3, 2, 1), (7, 1, 2, 0)], torch.float32, (), id="3x3+1x1_s2-float32"),
    pytest.param([(6, 3, 2, 1), (7, 1, 2, 0)], torch.float16, (), id="3x3+1x1_s2-float16"),
    pytest.param([(6, 1, 1, 0), (4, 1, 1, 0)], torch.float32, (), id="1x1+1x1-float32"),
    pytest.param([(6, 1, 1, 0), (4, 1, 1, 0)], torch.float16, (), id="1x1+1x1-float16"),
    pytest.param([(6, 3, 2, 1), (7, 1, 2, 0)], torch.float32, (0,), id="first_grad_none"),
    pytest.param([(6, 3, 2, 1), (7, 1, 2, 0)], torch.float32, (1,), id="second_grad_none"),
]


@pytest.mark.parametrize("convs, dtype, none", TWO_CONV_CASES)
def test_two_convs(convs, dtype, none):
    _check_backward(_problem((3, 5, 8, 9), convs, dtype, none=none), dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dz_layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_input_grad(layout, dz_layout, dtype):
    """bn_relu_input_grad alone (cheap): every layout of x, dz in x's layout or not."""
    p = _problem((3, 5, 7, 9), [], dtype, layout)
    x = p["x"]
    mask = x.double() * _v(p["scale"].double()) + _v(p["shift"].double()) > 0
    dz = make_layout((torch.randn(x.shape, dtype=torch.float64) * mask).to(dtype), dz_layout)
    dz64, xhat = dz.double(), (x.double() - _v(p["mean"].double())) * _v(p["invstd"].double())
    sum_dz, sum_dz_xhat = dz64.sum((0, 2, 3)).float(), (dz64 * xhat).sum((0, 2, 3)).float()
    m = x.numel() // x.shape[1]
    for training in (True, False):
        dx = bn_relu_input_grad(dz, x, p["mean"], p["invstd"], p["scale"], sum_dz if training else None,
                                sum_dz_xhat if training else None, training)
        corr = (_v(sum_dz.double()) + xhat * _v(sum_dz_xhat.double())) / m if training else 0
        want = (dz64 - corr) * _v(p["scale"].double())
        assert dx.dtype == dtype and dx.stride() == torch.empty_like(x).stride()
        assert_close(dx, want, dtype, f"dx (training={training})", scale=float(want.abs().max()))


@pytest.mark.skipif(INTERPRET, reason="the interpreter runs programs one after another: no order to vary")
def test_deterministic():
    """Bit-identical results run to run on a GPU, where programs run in any
    order, with the wgrad reduction split in several chunks (fixed-order
    partial sums, no atomics)."""
    p = _problem((2, 5, 8, 8), [(6, 3, 1, 1)], torch.float32)
    n, _, h, w = p["x"].shape
    split, _ = wgrad_module._split(n * h * w, 9, p["x"].device)
    assert split > 1
    args = (p["grads"][0], p["x"], p["scale"], p["shift"], p["weights"][0].shape, 1, 1, torch.float32)
    assert torch.equal(conv_wgrad(*args), conv_wgrad(*args))
    dgrad_args = (p["grads"], p["weights"], p["strides"], p["paddings"], p["x"], p["mean"], p["invstd"],
                  p["scale"], p["shift"])
    for a, b in zip(conv_dgrad(*dgrad_args), conv_dgrad(*dgrad_args)):
        assert torch.equal(a, b)


def test_errors():
    p = _problem((2, 3, 5, 5), [(4, 3, 1, 1)], torch.float32)
    x, dy, wt = p["x"], p["grads"][0], p["weights"][0]
    stats = (p["mean"], p["invstd"], p["scale"], p["shift"])
    with pytest.raises(TypeError, match=r"x must be float32, float16 or bfloat16.*float64"):
        conv_wgrad(dy.double(), x.double(), p["scale"], p["shift"], wt.shape, 1, 1, torch.float64)
    with pytest.raises(TypeError, match=r"x must be float32, float16 or bfloat16"):
        conv_dgrad([dy.double()], [wt.double()], [(1, 1)], [(1, 1)], x.double(), *stats)
    with pytest.raises(ValueError, match=r"weight_shape must be \(K, 3, R, S\)"):
        conv_wgrad(dy, x, p["scale"], p["shift"], (4, 2, 3, 3), 1, 1, torch.float32)
    with pytest.raises(ValueError, match=r"grad must have the conv's output shape"):
        conv_wgrad(dy, x, p["scale"], p["shift"], wt.shape, 2, 1, torch.float32)
    with pytest.raises(ValueError, match=r"memory_format must be torch.contiguous_format or torch.channels_last"):
        conv_wgrad(dy, x, p["scale"], p["shift"], wt.shape, 1, 1, torch.float32, torch.preserve_format)
    with pytest.raises(ValueError, match=r"weights\[0\] must be a \(K, 3, R, S\)"):
        conv_dgrad([dy], [wt[:, :2]], [(1, 1)], [(1, 1)], x, *stats)
    with pytest.raises(ValueError, match=r"grads\[0\] must have the conv's output shape"):
        conv_dgrad([dy], [wt], [(1, 1)], [(0, 0)], x, *stats)
    with pytest.raises(ValueError, match=r"at least one"):
        conv_dgrad([None], [wt], [(1, 1)], [(1, 1)], x, *stats)
    with pytest.raises(ValueError, match=r"strides must be equal"):
        dy2 = torch.zeros(2, 4, 3, 3)
        conv_dgrad([dy, dy2], [wt, wt], [(1, 1), (2, 2)], [(1, 1), (1, 1)], x, *stats)
    with pytest.raises(TypeError, match=r"mean must be float32"):
        conv_dgrad([dy], [wt], [(1, 1)], [(1, 1)], x, p["mean"].double(), *stats[1:])
    with pytest.raises(TypeError, match=r"sum_dz must be a tensor of shape \(3,\)"):
        bn_relu_input_grad(x, x, *stats[:3], None, None, training=True)
    with pytest.raises(ValueError, match=r"dz must have x's shape"):
        bn_relu_input_grad(dy, x, *stats[:3], None, None, training=False)


# ------------------------------------------------------------------ GPU, paper shapes

GPU_CASES = [
    ("1x1_64to16", (128, 64, 32, 32), [(16, 1, 1, 0)]),
    ("3x3_16to16", (128, 16, 32, 32), [(16, 3, 1, 1)]),
    ("1x1_s2_64to128", (128, 64, 32, 32), [(128, 1, 2, 0)]),
    ("3x3+1x1_s2_64to128", (128, 64, 32, 32), [(128, 3, 2, 1), (128, 1, 2, 0)]),
]


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs CUDA (and no interpreter)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("name, shape, convs", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_paper_shapes_gpu(name, shape, convs, dtype, monkeypatch):
    # fp32 is compared at fp32 tolerance: no TF32 (the kernels follow cuDNN's flag).
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    p = _problem(shape, convs, dtype, "channels_last", device="cuda")
    _check_backward(p, dtype)
    args = (p["grads"][-1], p["x"], p["scale"], p["shift"], p["weights"][-1].shape, p["strides"][-1],
            p["paddings"][-1], dtype)
    assert torch.equal(conv_wgrad(*args), conv_wgrad(*args))

