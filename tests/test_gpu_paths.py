"""What only a GPU can check: the CUDA C++ and Triton kernels at the paper's
shapes in every dtype (fp32 IEEE and TF32, fp16, bf16) against the float64
reference, a training step repeated bit for bit, autocast, CUDA-graph capture
of an op's forward + backward, and torch.compile with inductor. All `gpu`:
skipped without CUDA; benchmarks/gpu_check.sh runs them on the card."""
import copy
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close
from fused_preact import FusedBNReLUConv2d, PreActResNet, reference
from fused_preact.ops import bn_relu_conv2d

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET,
                                 reason="needs a CUDA device (and compiled Triton kernels, no TRITON_INTERPRET)")]
DEVICE = "cuda"
BACKENDS = ["native", "triton"]

# (C_in, C_out, kernel, size) of a CIFAR bottleneck unit's three layers in each stage, at the paper's batch of 128
PAPER_SHAPES = [(4 * w, w, 1, s) for w, s in ((16, 32), (32, 16), (64, 8))] + \
               [(w, w, 3, s) for w, s in ((16, 32), (32, 16), (64, 8))] + \
               [(w, 4 * w, 1, s) for w, s in ((16, 32), (32, 16), (64, 8))]
# dtype, TF32 on; TF32 rounds operands to 10 mantissa bits, about fp16's precision
DTYPES = [(torch.float32, False), (torch.float32, True), (torch.float16, False), (torch.bfloat16, False)]
DTYPE_IDS = ["fp32", "tf32", "fp16", "bf16"]


def _tolerance_dtype(dtype, tf32):
    return torch.float16 if tf32 else dtype


def _problem(c_in, c_out, k, size, dtype, batch=128):
    g = torch.Generator().manual_seed(c_in * 1000 + c_out * 10 + k)
    x = (torch.randn(batch, c_in, size, size, generator=g, dtype=torch.float64) * 1.5 + 0.3)
    w = torch.randn(c_out, c_in, k, k, generator=g, dtype=torch.float64) * (2.0 / (k * k * c_out)) ** 0.5
    gamma = torch.rand(c_in, generator=g, dtype=torch.float64) + 0.5
    beta = torch.randn(c_in, generator=g, dtype=torch.float64) * 0.2
    dy = torch.randn(batch, c_out, size, size, generator=g, dtype=torch.float64)
    cast = [t.to(DEVICE) for t in (x, w, gamma, beta, dy)]
    x, w, dy = (t.to(dtype).contiguous(memory_format=torch.channels_last) for t in (cast[0], cast[1], cast[4]))
    gamma, beta = (t.float() for t in cast[2:4])
    return x, w, gamma, beta, dy


@pytest.mark.parametrize("dtype, tf32", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", PAPER_SHAPES, ids=lambda s: "{}to{}-k{}-{}px".format(*s))
def test_kernels_match_the_float64_reference_at_paper_shapes(shape, backend, dtype, tf32, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    c_in, c_out, k, size = shape
    x, w, gamma, beta, dy = _problem(c_in, c_out, k, size, dtype)
    inputs = [t.detach().requires_grad_() for t in (x, w, gamma, beta)]
    rm, rv = torch.zeros(c_in, device=DEVICE), torch.ones(c_in, device=DEVICE)
    y = bn_relu_conv2d(*inputs[:2], *inputs[2:], rm, rv, padding=k // 2, backend=backend)
    grads = torch.autograd.grad(y, inputs, dy)
    truth_in = [t.detach().double().requires_grad_() for t in (x, w, gamma, beta)]
    ty = reference.bn_relu_conv2d_eager(*truth_in[:2], *truth_in[2:], None, None, padding=k // 2, training=True)
    tgrads = torch.autograd.grad(ty, truth_in, dy.double())
    tol = _tolerance_dtype(dtype, tf32)
    m = x.numel() // c_in
    ty = ty.detach()
    assert_close(y, ty, tol, "y", scale=max(3.0, float(ty.abs().max())))
    for name, g, want in zip(("dx", "dW", "dgamma", "dbeta"), grads, tgrads):
        assert_close(g, want, tol, name, scale=max(3.0, float(want.abs().max())) * (m ** 0.5 if name != "dx" else 1))


# (pieces' channels (a DenseNet layer's input) or one tensor's, C_out, kernel, size, dropout)
DENSE_WIDE_SHAPES = [((24, 12, 12, 12), 48, 1, 32, 0.0), ((96, 12, 12), 48, 1, 8, 0.0), ((160,), 160, 3, 32, 0.3),
                     ((320,), 320, 3, 16, 0.3), ((40, 12, 12), 12, 3, 16, 0.3)]


@pytest.mark.parametrize("dtype, tf32", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", DENSE_WIDE_SHAPES, ids=lambda s: "{}to{}-k{}-{}px-p{}".format(
    "+".join(map(str, s[0])), *s[1:]))
def test_pieces_and_dropout_match_the_float64_reference(shape, backend, dtype, tf32, monkeypatch):
    """DenseNet-BC's input as pieces (read in place by the Triton kernels)
    and WRN's dropout (the mask hashed in their loaders and dgrad's
    epilogue) at batch 128, against float64 with the same mask."""
    from fused_preact.ops.dropout import Dropout

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    channels, c_out, k, size, p = shape
    x, w, gamma, beta, dy = _problem(sum(channels), c_out, k, size, dtype)
    pieces = [t.contiguous(memory_format=torch.channels_last).requires_grad_()
              for t in x.detach().split(list(channels), 1)]
    inputs = [w.detach().requires_grad_(), gamma.detach().requires_grad_(), beta.detach().requires_grad_()]
    torch.manual_seed(3)
    y = bn_relu_conv2d(pieces if len(pieces) > 1 else pieces[0], inputs[0], *inputs[1:], None, None,
                       padding=k // 2, dropout=p, backend=backend)
    grads = torch.autograd.grad(y, (*pieces, *inputs), dy)
    torch.manual_seed(3)
    seed = torch.randint(0, 1 << 62, (1,), device=DEVICE, dtype=torch.int64)
    truth_in = [t.detach().double().requires_grad_() for t in (x, w, gamma, beta)]
    a = F.relu(F.batch_norm(truth_in[0], None, None, truth_in[2], truth_in[3], True))
    ty = F.conv2d(a * Dropout(p, seed).mask(a) if p else a, truth_in[1], padding=k // 2)
    tgrads = torch.autograd.grad(ty, truth_in, dy.double())
    tol = _tolerance_dtype(dtype, tf32)
    m = x.numel() // x.shape[1]
    ty = ty.detach()
    assert_close(y, ty, tol, "y", scale=max(3.0, float(ty.abs().max())))
    dx = torch.cat(grads[:len(pieces)], 1)
    for name, g, want in zip(("dx", "dW", "dgamma", "dbeta"), (dx, *grads[len(pieces):]), tgrads):
        assert_close(g, want, tol, name, scale=max(3.0, float(want.abs().max())) * (m ** 0.5 if name != "dx" else 1))


def _captured_step(module, static_x):
    """(graph, its output): module's forward and a sum's backward on static_x
    captured, after a warm-up on a side stream (Triton autotuning and the
    allocator's pools before capture); gradients zeroed, not freed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            module(static_x).sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    module.zero_grad(set_to_none=False)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = module(static_x)
        static_y.sum().backward()
    return graph, static_y


@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_captures_a_densenet_step(backend):
    """A DenseNet-BC's dense layers read features made inside the graph:
    the Triton kernels' piece tables are written by kernels during capture
    and read by every replay."""
    from fused_preact.models.densenet import DenseNet

    torch.manual_seed(0)
    model = DenseNet(depth=16, growth_rate=8, backend=backend).to(DEVICE, memory_format=torch.channels_last)
    static_x = torch.randn(8, 3, 16, 16, device=DEVICE).contiguous(memory_format=torch.channels_last)
    graph, static_y = _captured_step(model, static_x)
    eager = copy.deepcopy(model)
    for _ in range(2):  # the second replay: the tables outlive the first
        new_x = torch.randn_like(static_x)
        static_x.copy_(new_x)
        model.zero_grad(set_to_none=False)
        eager.load_state_dict(model.state_dict())
        graph.replay()
        torch.cuda.synchronize()
        eager.zero_grad()
        y = eager(new_x)
        y.sum().backward()
        assert_close(static_y, y.detach(), torch.float32, "y", scale=max(1.0, float(y.abs().max())))
        for (name, got), want in zip(model.named_parameters(), eager.parameters()):
            assert_close(got.grad, want.grad, torch.float32, name, scale=max(1.0, float(want.grad.abs().max())))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_training_step_repeats_bit_for_bit(backend):
    def step():
        torch.manual_seed(0)
        model = PreActResNet(20, block="bottleneck", backend=backend).to(DEVICE, memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(32, 3, 32, 32, generator=g).to(DEVICE).contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, 10, (32,), generator=g).to(DEVICE)
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(x), labels).backward()
            opt.step()
        return model.state_dict()

    first, second = step(), step()
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_runs_the_op_in_the_autocast_dtype(backend):
    x, w, gamma, beta, dy = _problem(64, 16, 1, 8, torch.float32, batch=16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = bn_relu_conv2d(x, w, gamma, beta, None, None, backend=backend)
    assert y.dtype == torch.bfloat16
    want = bn_relu_conv2d(x.bfloat16(), w.bfloat16(), gamma, beta, None, None, backend="reference")
    assert_close(y, want, torch.bfloat16, "y", scale=3.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_captures_forward_and_backward(backend):
    torch.manual_seed(0)
    module = FusedBNReLUConv2d(16, 16, 3, padding=1, backend=backend).to(DEVICE, memory_format=torch.channels_last)
    static_x = torch.randn(8, 16, 16, 16, device=DEVICE).contiguous(memory_format=torch.channels_last)
    graph, static_y = _captured_step(module, static_x)
    new_x = torch.randn_like(static_x)
    static_x.copy_(new_x)
    module.zero_grad(set_to_none=False)
    graph.replay()
    torch.cuda.synchronize()
    captured = (static_y.clone(), module.conv.weight.grad.clone(), module.bn.weight.grad.clone())
    eager = FusedBNReLUConv2d(16, 16, 3, padding=1, backend=backend).to(DEVICE, memory_format=torch.channels_last)
    eager.load_state_dict(module.state_dict())
    y = eager(new_x)
    y.sum().backward()
    for name, got, want in zip(("y", "dW", "dgamma"), captured, (y, eager.conv.weight.grad, eager.bn.weight.grad)):
        assert_close(got, want.detach(), torch.float32, name, scale=max(1.0, float(want.abs().max())))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_with_inductor_matches_eager(backend):
    torch.manual_seed(0)
    model = PreActResNet(11, backend=backend).to(DEVICE, memory_format=torch.channels_last)
    x = torch.randn(8, 3, 16, 16, device=DEVICE).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(model, backend="inductor")
    eager_out = model(x)
    eager_out.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out = compiled(x)
    out.sum().backward()
    assert_close(out, eager_out.detach(), torch.float32, "output", scale=max(1.0, float(eager_out.abs().max())))
    for (name, p), want in zip(model.named_parameters(), eager_grads):
        assert_close(p.grad, want, torch.float32, name, scale=3 * max(1.0, float(want.abs().max())))
