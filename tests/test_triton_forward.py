"""Triton forward kernel: the fused BN-ReLU implicit-GEMM conv (conv_forward), its
residual and statistics epilogues, its weights of any layout and its argument errors,
against float64 references built from plain PyTorch. Batch statistics:
test_triton_batch_stats.py.

Runs on CPU tensors under the triton interpreter (TRITON_INTERPRET=1, set before
triton is imported: the CI sets it for the whole suite), else on CUDA; shapes are
tiny because the interpreter is slow. The @gpu tests run the compiled kernels at
the paper's shapes, bf16 included (bf16 under the interpreter: test_triton_gpu_configs.py,
whose bf16 dot is decoded as a GPU's).
"""
import pytest
import torch
import torch.nn.functional as F

from _triton_forward import DEV, INTERPRET, NO_ORDER_TO_VARY, _ref_conv, _var_mean
from conftest import assert_close, make_layout

if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from fused_preact.triton_kernels import common  # noqa: E402
from fused_preact.triton_kernels import conv_forward as cf  # noqa: E402
from fused_preact.triton_kernels.batch_stats import batch_stats, merge_partials  # noqa: E402
from fused_preact.triton_kernels.conv_forward import conv_forward  # noqa: E402

# the GPU check runs these modules whole on a GPU: factory calls follow the kernels' device
pytestmark = pytest.mark.usefixtures("one_thread", "on_triton_device")


def _bn_params(C, device=DEV):
    return torch.randn(C, device=device), torch.randn(C, device=device)


def _check_moments(moments, out, dtype=torch.float32, name="out"):
    var, mean = _var_mean(out)
    spread = float(var.max().sqrt()) + 1.0
    assert moments[0].dtype == moments[1].dtype == torch.float32
    assert_close(moments[0], mean, dtype, f"{name} mean", scale=spread)
    assert_close(moments[1], var, dtype, f"{name} var", scale=spread ** 2)


# ----------------------------------------------------------------------------- conv_forward

# (N, C, H, W, K, kernel, stride, padding, layout, dtype): odd sizes, channels not a
# multiple of the 16-wide tiles, rows not a multiple of BLOCK_M.
CASES = [
    (3, 5, 7, 9, 6, 1, 1, 0, "nchw", torch.float32),
    (3, 5, 7, 9, 6, 1, 1, 0, "channels_last", torch.float16),
    (3, 5, 7, 9, 6, 1, 1, 0, "strided", torch.float32),
    (3, 5, 7, 9, 6, 3, 1, 1, "channels_last", torch.float32),
    (3, 5, 7, 9, 6, 3, 1, 1, "nchw", torch.float16),
    (2, 5, 7, 9, 6, 3, 2, 1, "strided", torch.float16),
    (2, 20, 6, 5, 20, 3, 2, 1, "channels_last", torch.float32),
    (2, 20, 7, 6, 34, 1, 2, 0, "channels_last", torch.float16),
    (2, 3, 6, 7, 17, 3, 2, 0, "nchw", torch.float32),
]


@pytest.mark.parametrize("N,C,H,W,K,k,stride,pad,layout,dtype", CASES)
def test_conv_forward(N, C, H, W, K, k, stride, pad, layout, dtype):
    x = make_layout(torch.randn(N, C, H, W).to(dtype), layout)
    scale, shift = _bn_params(C)
    w = (torch.randn(K, C, k, k) / (C * k * k) ** 0.5).to(dtype)
    outs, moments = conv_forward(x, scale, shift, [w], (stride, stride), (pad, pad))
    assert moments is None and len(outs) == 1
    out = outs[0]
    ref = _ref_conv(x, scale, shift, w, stride, pad)
    assert out.dtype == dtype and out.shape == ref.shape
    channels_last = layout == "channels_last"
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_close(out, ref, dtype, "out")


def test_two_weights_one_gemm(monkeypatch):
    # Stage entry: conv1 (1x1 here) and the 1x1 projection shortcut, stride 2: one launch.
    launches = []
    real = cf._launch
    monkeypatch.setattr(cf, "_launch", lambda *a: launches.append(len(a[3])) or real(*a))
    x = make_layout(torch.randn(2, 6, 9, 7), "channels_last")
    scale, shift = _bn_params(6)
    w1, w2 = torch.randn(10, 6, 1, 1), torch.randn(12, 6, 1, 1)
    outs, moments = conv_forward(x, scale, shift, [w1, w2], (2, 2), (0, 0), stats=True)
    assert launches == [2]
    for i, w in enumerate((w1, w2)):
        assert_close(outs[i], _ref_conv(x, scale, shift, w, 2, 0), torch.float32, f"outs[{i}]")
        assert outs[i].is_contiguous(memory_format=torch.channels_last)
    _check_moments(moments, outs[0])


def test_mixed_kernel_sizes_residual_stats():
    # Basic-block stage entry: 3x3 conv1 (padding 1) + 1x1 shortcut (padding 0), stride 2;
    # residual and statistics belong to outs[0] only.
    x = torch.randn(2, 5, 7, 9).half()
    scale, shift = _bn_params(5)
    w1 = (torch.randn(8, 5, 3, 3) / 6.7).half()
    w2 = (torch.randn(4, 5, 1, 1) / 2.2).half()
    res = make_layout(torch.randn(2, 8, 4, 5).half(), "strided")
    outs, moments = conv_forward(x, scale, shift, [w1, w2], (2, 2), [(1, 1), (0, 0)], residual=res, stats=True)
    assert_close(outs[0], _ref_conv(x, scale, shift, w1, 2, 1) + res.double(), torch.float16, "outs[0]")
    assert_close(outs[1], _ref_conv(x, scale, shift, w2, 2, 0), torch.float16, "outs[1]")
    _check_moments(moments, outs[0])


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_residual_and_stats_epilogue(layout):
    x = make_layout(torch.randn(2, 20, 5, 7), layout)
    scale, shift = _bn_params(20)
    w = torch.randn(18, 20, 3, 3) / 13.4
    res = make_layout(torch.randn(2, 18, 5, 7), "channels_last" if layout == "nchw" else "strided")
    outs, moments = conv_forward(x, scale, shift, [w], 1, 1, residual=res, stats=True)
    assert_close(outs[0], _ref_conv(x, scale, shift, w, 1, 1) + res.double(), torch.float32, "out")
    _check_moments(moments, outs[0])


def test_stats_large_mean():
    # Output mean 1e4, std ~1: the partials must not cancel.
    x = make_layout(torch.randn(4, 8, 12, 12), "channels_last")
    scale, shift = _bn_params(8)
    w = torch.randn(6, 8, 1, 1) / 2.8
    res = torch.randn(4, 6, 12, 12) * 0.5 + 1e4
    outs, moments = conv_forward(x, scale, shift, [w], 1, 0, residual=res, stats=True)
    _check_moments(moments, outs[0])


def test_stats_of_rounded_output_fp16():
    x = torch.randn(2, 7, 6, 6).half()
    scale, shift = _bn_params(7)
    w = (torch.randn(5, 7, 1, 1) / 2.6).half()
    outs, moments = conv_forward(x, scale, shift, [w], 1, 0, stats=True)
    # Statistics of the fp16 values as stored: fp32-accurate against them.
    _check_moments(moments, outs[0], torch.float32)


@NO_ORDER_TO_VARY
def test_conv_forward_deterministic():
    x = make_layout(torch.randn(2, 6, 7, 7, device=DEV), "channels_last")
    scale, shift = _bn_params(6)
    w = torch.randn(7, 6, 3, 3, device=DEV)
    res = torch.randn(2, 7, 7, 7, device=DEV)
    runs = [conv_forward(x, scale, shift, [w], 1, 1, residual=res, stats=True) for _ in range(2)]
    assert torch.equal(runs[0][0][0], runs[1][0][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_int64_offsets(monkeypatch):
    # The 64-bit offset path (taken past 2**31 elements), forced on a small tensor.
    monkeypatch.setattr(common, "INT32_MAX", 0)
    x = make_layout(torch.randn(2, 5, 6, 7), "strided")
    scale, shift = _bn_params(5)
    w = torch.randn(6, 5, 3, 3) / 6.7
    res = torch.randn(2, 6, 6, 7)
    outs, moments = conv_forward(x, scale, shift, [w], 1, 1, residual=res, stats=True)
    assert_close(outs[0], _ref_conv(x, scale, shift, w, 1, 1) + res.double(), torch.float32, "out")
    _check_moments(moments, outs[0])
    var_ref, mean_ref = _var_mean(x)
    mean, invstd = batch_stats(x, 1e-5)
    assert_close(mean, mean_ref, torch.float32, "mean")
    assert_close(invstd, (var_ref + 1e-5).rsqrt(), torch.float32, "invstd")


# ----------------------------------------------------------------------------- errors


def test_errors():
    x = torch.randn(2, 4, 5, 5)
    scale, shift = _bn_params(4)
    w = torch.randn(3, 4, 3, 3)
    with pytest.raises(TypeError, match=r"x must be float32, float16 or bfloat16.*float64"):
        conv_forward(x.double(), scale, shift, [w.double()], 1, 1)
    with pytest.raises(TypeError, match=r"x must be float32, float16 or bfloat16.*float64"):
        batch_stats(x.double(), 1e-5)
    with pytest.raises(ValueError, match=r"x must be a 4-D"):
        conv_forward(x[0], scale, shift, [w], 1, 1)
    with pytest.raises(ValueError, match=r"scale must have shape \(4,\)"):
        conv_forward(x, scale[:3], shift, [w], 1, 1)
    with pytest.raises(TypeError, match=r"shift must be float32"):
        conv_forward(x, scale, shift.half(), [w], 1, 1)
    with pytest.raises(ValueError, match=r"scale must be on x's device"):
        conv_forward(x, scale.to("meta"), shift, [w], 1, 1)
    with pytest.raises(ValueError, match=r"weights\[1\] must be a tensor \[K, 4, R, S\]"):
        conv_forward(x, scale, shift, [w, torch.randn(3, 5, 1, 1)], 1, [(1, 1), (0, 0)])
    with pytest.raises(TypeError, match=r"weights\[0\] must have x's dtype"):
        conv_forward(x, scale, shift, [w.half()], 1, 1)
    with pytest.raises(ValueError, match=r"weights must hold at least one"):
        conv_forward(x, scale, shift, [], 1, 1)
    with pytest.raises(ValueError, match=r"stride must be the same for all weights"):
        conv_forward(x, scale, shift, [w, w], [(1, 1), (2, 2)], 1)
    with pytest.raises(ValueError, match=r"padding must be an int or a pair"):
        conv_forward(x, scale, shift, [w], 1, (1, -1))
    with pytest.raises(ValueError, match=r"empty output"):
        conv_forward(x, scale, shift, [torch.randn(3, 4, 7, 7)], 1, 0)
    with pytest.raises(ValueError, match=r"residual must have outs\[0\]'s shape \(2, 3, 5, 5\)"):
        conv_forward(x, scale, shift, [w], 1, 1, residual=torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"m2 must have count's shape"):
        merge_partials(torch.ones(2, 3), torch.ones(2, 3), torch.ones(3, 3))
    with pytest.raises(ValueError, match=r"eps must be a non-negative"):
        batch_stats(x, -1.0)


# ----------------------------------------------------------------------------- GPU, paper shapes

gpu = pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(),
                         reason="compiled triton kernels need CUDA (and no TRITON_INTERPRET)")

# (C, K, kernel, stride, padding) at N=128, 32x32: the CIFAR pre-act ResNet's convs.
PAPER = [(64, 16, 1, 1, 0), (16, 16, 3, 1, 1), (64, 128, 1, 2, 0), (128, 128, 3, 1, 1)]


@pytest.fixture
def no_tf32():
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # fp32 checked at fp32 tolerance (ieee tl.dot)
    yield
    torch.backends.cudnn.allow_tf32 = old


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("C,K,k,stride,pad", PAPER)
def test_gpu_paper_shapes(C, K, k, stride, pad, dtype, no_tf32):
    x = torch.randn(128, C, 32, 32, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
    scale, shift = _bn_params(C, "cuda")
    w = (torch.randn(K, C, k, k, device="cuda") / (C * k * k) ** 0.5).to(dtype)
    res = torch.randn(128, K, 32 // stride, 32 // stride, device="cuda").to(dtype)
    outs, moments = conv_forward(x, scale, shift, [w], stride, pad, residual=res, stats=True)
    a = torch.relu(x.float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(dtype)
    ref = F.conv2d(a.double(), w.double(), None, stride, pad) + res.double()
    assert outs[0].is_contiguous(memory_format=torch.channels_last)
    assert_close(outs[0], ref, dtype, "out", scale=2.0)
    _check_moments(moments, outs[0])
    # And against torch's own conv of the materialised activation, in dtype.
    torch_out = F.conv2d(a, w, None, stride, pad) + res
    assert_close(outs[0], torch_out.double(), dtype, "out vs torch", scale=2.0)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gpu_stage_entry_pair(dtype, layout):
    x = make_layout(torch.randn(128, 64, 32, 32, device="cuda").to(dtype), layout)
    scale, shift = _bn_params(64, "cuda")
    w1 = (torch.randn(128, 64, 3, 3, device="cuda") / 24).to(dtype)
    w2 = (torch.randn(128, 64, 1, 1, device="cuda") / 8).to(dtype)
    outs, moments = conv_forward(x, scale, shift, [w1, w2], 2, [(1, 1), (0, 0)], stats=True)
    assert_close(outs[0], _ref_conv(x, scale, shift, w1, 2, 1), dtype, "outs[0]")
    assert_close(outs[1], _ref_conv(x, scale, shift, w2, 2, 0), dtype, "outs[1]")
    _check_moments(moments, outs[0])
    w3 = (torch.randn(128, 64, 1, 1, device="cuda") / 8).to(dtype)
    outs2, _ = conv_forward(x, scale, shift, [w2, w3], 2, 0)  # one GEMM over 256 columns
    assert_close(outs2[0], outs[1].double(), dtype, "outs2[0]")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_batch_stats(dtype):
    x = (torch.randn(128, 64, 32, 32, device="cuda") * 2 + 1e3).to(dtype)
    for layout in ("nchw", "channels_last"):
        xl = make_layout(x, layout)
        mean, invstd = batch_stats(xl, 1e-5)
        var_ref, mean_ref = _var_mean(xl)
        assert_close(mean, mean_ref, torch.float32, "mean", scale=10.0)
        assert_close(invstd, (var_ref + 1e-5).rsqrt(), torch.float32, "invstd")


@pytest.mark.gpu
@gpu
def test_gpu_cuda_graph_capture():
    x = torch.randn(128, 16, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    scale, shift = _bn_params(16, "cuda")
    w = torch.randn(16, 16, 3, 3, device="cuda") / 12
    run = lambda: (conv_forward(x, scale, shift, [w], 1, 1, stats=True), batch_stats(x, 1e-5))  # noqa: E731
    eager = run()  # autotunes outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured[0][0][0], eager[0][0][0])
    assert all(torch.equal(a, b) for a, b in zip(captured[0][1], eager[0][1]))
    assert all(torch.equal(a, b) for a, b in zip(captured[1], eager[1]))


@pytest.mark.parametrize("in_place", [True, False], ids=["read-in-place", "copied-matrix"])
@pytest.mark.parametrize("w_layout", ["contiguous", "channels_last", "strided"])
def test_weights_of_any_layout(w_layout, in_place, monkeypatch):
    # OIHW weights, a channels_last model's weights and views give the same
    # convolution, also two weights of different layouts sharing one GEMM;
    # read in place (small GEMMs) or through the copied matrix (large ones).
    if not in_place:
        monkeypatch.setattr(cf, "IN_PLACE_WEIGHT_MAX_ROWS", 0)
        monkeypatch.setattr(cf, "IN_PLACE_WEIGHT_MAX_OUTPUTS", 0)
    x = make_layout(torch.randn(2, 6, 7, 5), "channels_last")
    scale, shift = _bn_params(6)

    def weight(k, r):
        if w_layout == "strided":  # every other input channel of a wider weight
            return (torch.randn(k, 12, r, r) / (6 * r * r) ** 0.5)[:, ::2]
        w = torch.randn(k, 6, r, r) / (6 * r * r) ** 0.5
        return w.contiguous(memory_format=torch.channels_last) if w_layout == "channels_last" else w

    w3 = weight(9, 3)
    outs, _ = conv_forward(x, scale, shift, [w3], 1, 1)
    assert_close(outs[0], _ref_conv(x, scale, shift, w3, 1, 1), torch.float32, "3x3")
    w1, w2 = weight(7, 1), torch.randn(5, 6, 1, 1) / 6 ** 0.5
    outs, _ = conv_forward(x, scale, shift, [w1, w2], 2, 0)
    for i, w in enumerate((w1, w2)):
        assert_close(outs[i], _ref_conv(x, scale, shift, w, 2, 0), torch.float32, f"outs[{i}]")


def test_weights_changed_where_no_version_counter_sees_it():
    # A CUDA-graph replay of an optimizer step, or a write through .data,
    # changes a weight without moving its _version: the forward must still
    # convolve with the weight as it is now.
    x = make_layout(torch.randn(2, 6, 7, 5), "channels_last")
    scale, shift = _bn_params(6)
    w1, w2 = torch.randn(4, 6, 1, 1), torch.randn(5, 6, 1, 1)
    conv_forward(x, scale, shift, [w1, w2], 1, 0)
    version = w2._version
    w2.data.mul_(-2.0)
    assert w2._version == version
    outs, _ = conv_forward(x, scale, shift, [w1, w2], 1, 0)
    for i, w in enumerate((w1, w2)):
        assert_close(outs[i], _ref_conv(x, scale, shift, w, 1, 0), torch.float32, f"outs[{i}]")
