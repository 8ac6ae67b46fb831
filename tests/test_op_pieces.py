"""bn_relu_conv2d with x as a list of pieces, read as torch.cat(x, 1) (a
DenseNet layer's input): against BatchNorm2d -> ReLU -> Conv2d of the
concatenation in float64, on every backend; what autograd keeps (the pieces,
never their concatenation); each piece's own gradient; the running
statistics; torch.compile; the errors."""
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import BACKENDS, assert_close, make_layout
from fused_preact.ops import bn_relu_conv2d

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# Triton runs here in the interpreter (TRITON_INTERPRET=1, as the test command sets it).
ALL_BACKENDS = BACKENDS + (["triton"] if INTERPRET or torch.cuda.is_available() else [])
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"

# (N, channels of each piece, H, W, C_out, kernel, stride, padding)
CASES = [
    (2, (3, 5), 6, 7, 4, 3, 1, 1),
    (3, (1, 4, 2, 6), 5, 5, 6, 1, 1, 0),
    (2, (8,), 4, 4, 3, 3, 2, 1),  # one piece
]


def _problem(case, dtype, layout):
    n, channels, h, w, c_out, k, stride, padding = case
    c = sum(channels)
    pieces = [make_layout(torch.randn(n, ci, h, w, dtype=torch.float64).mul_(1.5).add_(0.3 * i).to(DEVICE, dtype),
                          layout).requires_grad_() for i, ci in enumerate(channels)]
    weight = (torch.randn(c_out, c, k, k, dtype=torch.float64) * (2.0 / (k * k * c_out)) ** 0.5).to(DEVICE, dtype)
    gamma = (torch.rand(c, dtype=torch.float64) + 0.5).to(DEVICE, torch.promote_types(dtype, torch.float32))
    beta = torch.randn(c, dtype=torch.float64).to(gamma)
    running = (torch.randn(c, dtype=gamma.dtype, device=DEVICE), torch.rand(c, dtype=gamma.dtype, device=DEVICE) + 0.5)
    for t in (weight, gamma, beta):
        t.requires_grad_()
    return pieces, weight, gamma, beta, running, dict(stride=stride, padding=padding)


def _truth(pieces, weight, gamma, beta, running, conv, training):
    """The concatenation through F.batch_norm -> relu -> conv2d in float64."""
    leaves = [t.detach().double().requires_grad_() for t in (*pieces, weight, gamma, beta)]
    rm, rv = running[0].double().clone(), running[1].double().clone()
    x = torch.cat(leaves[:len(pieces)], 1)
    y = F.conv2d(F.relu(F.batch_norm(x, rm, rv, leaves[-2], leaves[-1], training, 0.1, 1e-5)), leaves[-3], None,
                 **conv)
    return y, leaves, rm, rv


# Triton's kernels take float32 (and half types), not float64.
BACKEND_DTYPES = [(b, d) for b in ALL_BACKENDS for d in (torch.float64, torch.float32)
                  if b != "triton" or d != torch.float64]


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES, ids=[f"{b}-{str(d)[6:]}" for b, d in BACKEND_DTYPES])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_pieces_match_the_concatenation_through_nn(backend, dtype, layout, training, case):
    pieces, weight, gamma, beta, running, conv = _problem(case, dtype, layout)
    want, leaves, rm_want, rv_want = _truth(pieces, weight, gamma, beta, running, conv, training)
    rm, rv = running[0].clone(), running[1].clone()
    y = bn_relu_conv2d(pieces, weight, gamma, beta, rm, rv, training=training, backend=backend, **conv)
    assert_close(y, want, dtype, "output", scale=float(want.detach().abs().max()))
    g = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    got = torch.autograd.grad(y, (*pieces, weight, gamma, beta), g.to(y.dtype))
    expected = torch.autograd.grad(want, leaves, g)
    names = [f"d piece {i}" for i in range(len(pieces))] + ["d weight", "d gamma", "d beta"]
    for name, a, b, piece in zip(names, got, expected, (*pieces, weight, gamma, beta)):
        assert a.shape == piece.shape, name  # each piece's gradient is its own tensor, of its shape
        assert_close(a, b, dtype, name, scale=float(b.abs().max()) + 1)
    assert_close(rm, rm_want, dtype, "running_mean")
    assert_close(rv, rv_want, dtype, "running_var")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_autograd_keeps_the_pieces_and_never_their_concatenation(backend):
    pieces, weight, gamma, beta, running, conv = _problem(CASES[1], torch.float32, "channels_last")
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = bn_relu_conv2d(pieces, weight, gamma, beta, *running, backend=backend, **conv)
    activations = [t for t in saved if t.dim() == 4 and t.shape[0] == pieces[0].shape[0]]
    assert sorted(t.untyped_storage().data_ptr() for t in activations) == sorted(
        p.untyped_storage().data_ptr() for p in pieces)
    y.sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in pieces)


class _Concatenations(TorchDispatchMode):
    """Records the ATen cats, clones and copies that read one of `pieces`
    into other memory (the interpreter copies a CPU argument back onto
    itself after a launch: not a read into other memory)."""

    def __init__(self, pieces):
        super().__init__()
        self.storages = {p.untyped_storage().data_ptr() for p in pieces}
        self.reads = []

    def _piece(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in self.storages

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op = func.overloadpacket
        if (op in (torch.ops.aten.cat, torch.ops.aten.clone)
                and any(self._piece(t) for t in torch.utils._pytree.tree_leaves(args))) or \
                (op is torch.ops.aten.copy_ and self._piece(args[1]) and not self._piece(args[0])):
            self.reads.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif("triton" not in ALL_BACKENDS, reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("training", [True, False])
def test_triton_reads_the_pieces_in_place(training):
    """No cat or copy reads a piece in forward or backward; the pieces may
    lie anywhere (the second below the first in memory, other layouts,
    views with offsets), and each one's gradient is still its own."""
    torch.manual_seed(0)
    n, h, w = 2, 5, 6
    block = torch.randn(n, 14, h, w, device=DEVICE)
    pieces = [block[:, 9:],  # above the next piece in the same storage
              block[:, :9].contiguous(memory_format=torch.channels_last),
              torch.randn(n, 3, h, w, device=DEVICE)]
    pieces = [p.detach().requires_grad_() for p in pieces]
    c = sum(p.shape[1] for p in pieces)
    weight = torch.randn(7, c, 3, 3, device=DEVICE) * 0.2
    gamma, beta = torch.rand(c, device=DEVICE) + 0.5, torch.randn(c, device=DEVICE)
    running = (torch.randn(c, device=DEVICE), torch.rand(c, device=DEVICE) + 0.5)
    conv = dict(stride=1, padding=1)
    y_ref = bn_relu_conv2d(pieces, weight, gamma, beta, *(r.clone() for r in running), training=training,
                           backend="reference", **conv)
    g = torch.randn_like(y_ref)
    want = torch.autograd.grad(y_ref, pieces, g)
    with _Concatenations(pieces) as reads:
        y = bn_relu_conv2d(pieces, weight, gamma, beta, *(r.clone() for r in running), training=training,
                           backend="triton", **conv)
        got = torch.autograd.grad(y, pieces, g)
    assert reads.reads == []
    assert_close(y, y_ref, torch.float32, "output", scale=float(y_ref.detach().abs().max()))
    for i, (a, b, p) in enumerate(zip(got, want, pieces)):
        assert a.shape == p.shape
        assert_close(a, b, torch.float32, f"d piece {i}", scale=float(b.abs().max()) + 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    pieces, weight, gamma, beta, running, conv = _problem(CASES[0], torch.float64, "nchw")

    def f(a, b, weight, gamma, beta):
        return bn_relu_conv2d([a, b], weight, gamma, beta, running[0].clone(), running[1].clone(), backend=backend,
                              **conv)

    assert torch.autograd.gradcheck(f, (*pieces, weight, gamma, beta))


def test_nn_modules_count_a_batch_once_and_update_every_pieces_running_statistics():
    from fused_preact.modules import bn_relu_conv_modules

    torch.manual_seed(0)
    bn, conv = torch.nn.BatchNorm2d(7, momentum=None).double(), torch.nn.Conv2d(7, 3, 3, padding=1).double()
    plain = [torch.nn.BatchNorm2d(7, momentum=None).double(), conv]
    pieces = [torch.randn(2, 3, 5, 5, dtype=torch.float64), torch.randn(2, 4, 5, 5, dtype=torch.float64)]
    for _ in range(2):
        got = bn_relu_conv_modules(pieces, bn, [conv], fused=True, backend="reference")[0][0]
        want = conv(F.relu(plain[0](torch.cat(pieces, 1))))
    assert_close(got, want, torch.float64, "output")
    assert int(bn.num_batches_tracked) == 2
    assert_close(bn.running_mean, plain[0].running_mean, torch.float64, "running_mean")
    assert_close(bn.running_var, plain[0].running_var, torch.float64, "running_var")


def test_torch_compile_matches_eager():
    pieces, weight, gamma, beta, running, conv = _problem(CASES[0], torch.float64, "nchw")

    def f(pieces):
        return bn_relu_conv2d(pieces, weight, gamma, beta, None, None, backend="reference", **conv)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    want, got = f(pieces), compiled(pieces)
    assert_close(got, want, torch.float64, "output", scale=float(want.detach().abs().max()))
    grads = torch.autograd.grad(got.square().sum(), pieces)
    for a, b in zip(grads, torch.autograd.grad(want.square().sum(), pieces)):
        assert_close(a, b, torch.float64, "d piece", scale=float(b.abs().max()) + 1)


def test_bad_pieces_are_named():
    w, g, b = torch.randn(4, 5, 3, 3), torch.ones(5), torch.zeros(5)
    with pytest.raises(ValueError, match=r"bn_relu_conv2d: x must be a 4-D tensor or a non-empty list of 4-D"):
        bn_relu_conv2d([], w, g, b, None, None)
    with pytest.raises(ValueError, match=r"bn_relu_conv2d: x's pieces must share N, H, W, dtype and device.*x\[1\]"):
        bn_relu_conv2d([torch.randn(2, 2, 5, 5), torch.randn(2, 3, 6, 5)], w, g, b, None, None)
    with pytest.raises(ValueError, match=r"conv_weight must be a 4-D \(C_out, 6, kH, kW\) tensor matching x's 6"):
        bn_relu_conv2d([torch.randn(2, 2, 5, 5), torch.randn(2, 4, 5, 5)], w, torch.ones(6), torch.zeros(6), None,
                       None)
