"""CUDA kernels of torch.ops.fused_preact against fused_preact.reference in float64.

Every op runs on the CUDA device with the dtype under test; the reference gets
the same (already rounded) inputs promoted to float64, so the tolerances only
cover the kernels' fp32 arithmetic and the rounding of their outputs.
"""
import pytest
import torch

import fused_preact._extension
from fused_preact import reference as ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Statistics and sums are fp32 for every dtype but fp64; activations round to their dtype.
STAT_TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10)}
STAT_TOL_FP32 = dict(atol=1e-5, rtol=1e-4)
ACT_TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
    torch.float64: dict(atol=1e-12, rtol=1e-12),
}
LAYOUTS = ["nchw", "channels_last", "batch_slice", "channels_last_slice", "hw_transposed"]
SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (3, 5, 1, 1), (1, 67, 3, 3), (4, 64, 9, 9), (5, 3, 33, 31), (8, 3, 64, 64)]
EPS = 1e-5


@pytest.fixture(scope="module", autouse=True)
def compiled_ops():
    fused_preact._extension.load()
    if not fused_preact._extension.has_cuda_kernels():
        pytest.fail("fused_preact._C was built without its CUDA kernels on a machine with a GPU")


def ops():
    return torch.ops.fused_preact


def stat_tol(dtype):
    return STAT_TOL.get(dtype, STAT_TOL_FP32)


def activation(shape, dtype, layout, gen, offset=0.0, scale=1.0):
    """A CUDA activation of `shape` laid out as `layout` (values N(offset, scale^2))."""
    n, c, h, w = shape

    def randn(*size):
        return (torch.randn(*size, generator=gen, dtype=torch.float64) * scale + offset).to("cuda", dtype)

    if layout == "nchw":
        return randn(n, c, h, w)
    if layout == "channels_last":
        return randn(n, c, h, w).contiguous(memory_format=torch.channels_last)
    if layout == "batch_slice":
        return randn(2 * n, c, h, w)[::2]
    if layout == "channels_last_slice":
        return randn(2 * n, c, h, w).contiguous(memory_format=torch.channels_last)[1::2]
    if layout == "hw_transposed":  # H and W do not merge: the binding copies it first
        return randn(n, c, w, h).transpose(2, 3)
    raise ValueError(layout)


def f64(*tensors):
    return [None if t is None else t.double() for t in tensors]


def bn_params(x, gen):
    """mean, invstd, scale, shift in the statistics dtype, as a training forward makes them."""
    mean, invstd = ref.batch_stats(x, EPS)
    c, sdt = x.shape[1], mean.dtype
    gamma = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to("cuda", sdt)
    beta = torch.randn(c, generator=gen, dtype=torch.float64).to("cuda", sdt)
    scale = gamma * invstd
    return mean, invstd, scale, beta - mean * scale


def batch_stats(x, eps):
    """(mean, invstd) of the statistics kernel, with nothing to fold or track."""
    return ops().batch_norm_stats(x, None, None, None, None, None, 0.1, eps)[:2]


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_stats(shape, layout, dtype, gen):
    x = activation(shape, dtype, layout, gen, offset=0.5)
    mean, invstd = batch_stats(x, EPS)
    want_mean, want_invstd = ref.batch_stats(x.double(), EPS)
    assert mean.dtype == ref.stats_dtype(x) and mean.device == x.device
    torch.testing.assert_close(mean.double(), want_mean, **stat_tol(dtype))
    torch.testing.assert_close(invstd.double(), want_invstd, **stat_tol(dtype))
    again = batch_stats(x, EPS)  # fixed merge order: bit-identical reruns
    assert torch.equal(again[0], mean) and torch.equal(again[1], invstd)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_batch_stats_large_mean_is_stable(layout, gen):
    # Naive sum(x^2)/m - mean^2 in fp32 loses every digit of this variance.
    x = activation((16, 8, 32, 32), torch.float32, layout, gen, offset=1000.0, scale=0.1)
    mean, invstd = batch_stats(x, EPS)
    want_mean, want_invstd = ref.batch_stats(x.double(), EPS)
    torch.testing.assert_close(mean.double(), want_mean, atol=1e-3, rtol=0)
    torch.testing.assert_close(invstd.double(), want_invstd, atol=0, rtol=1e-3)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_relu_apply(shape, layout, dtype, gen):
    x = activation(shape, dtype, layout, gen)
    _, _, scale, shift = bn_params(x, gen)
    out = ops().bn_relu_apply(x, scale, shift)
    assert out.dtype == dtype and out.shape == x.shape
    if layout == "channels_last" and x.shape[1] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.double(), ref.bn_relu_apply(*f64(x, scale, shift)), **ACT_TOL[dtype])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_relu_backward_reduce(shape, layout, dtype, gen):
    x = activation(shape, dtype, layout, gen)
    grad = activation(shape, dtype, "nchw", gen)  # a layout other than x's on purpose
    params = bn_params(x, gen)
    _, sum_dz, sum_dz_xhat = ops().bn_relu_backward(grad, x, *params, True)
    want = ref.bn_relu_backward_reduce(*f64(grad, x, *params))
    m = x.numel() // x.shape[1]
    tol = stat_tol(dtype)
    tol = dict(atol=tol["atol"] * max(1.0, m**0.5), rtol=tol["rtol"])  # sums of m terms
    torch.testing.assert_close(sum_dz.double(), want[0], **tol)
    torch.testing.assert_close(sum_dz_xhat.double(), want[1], **tol)
    again = ops().bn_relu_backward(grad, x, *params, True)
    assert torch.equal(again[1], sum_dz) and torch.equal(again[2], sum_dz_xhat)


@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_relu_backward_input(training, shape, layout, dtype, gen):
    x = activation(shape, dtype, layout, gen)
    grad = activation(shape, dtype, "channels_last", gen)
    params = bn_params(x, gen)
    dx, *sums = ops().bn_relu_backward(grad, x, *params, training)
    assert dx.dtype == dtype and dx.shape == x.shape
    want = ref.bn_relu_backward_input(*f64(grad, x, *params, *(sums if training else [None, None])))
    torch.testing.assert_close(dx.double(), want, **ACT_TOL[dtype])


def test_rejects_mismatched_devices(gen):
    x = activation((2, 3, 4, 4), torch.float32, "nchw", gen)
    with pytest.raises(RuntimeError, match="device"):
        ops().bn_relu_apply(x, torch.ones(3), torch.zeros(3))


def test_empty_batch():
    x, ones = torch.empty(0, 4, 3, 3, device="cuda"), torch.ones(4, device="cuda")
    mean, invstd = batch_stats(x, EPS)
    assert mean.shape == (4,) and mean.isnan().all() and invstd.isnan().all()
    assert ops().bn_relu_apply(x, ones, ones).shape == x.shape
    dx, *sums = ops().bn_relu_backward(x, x, ones, ones, ones, ones, True)
    assert all(torch.equal(s, torch.zeros_like(ones)) for s in sums)
    assert dx.shape == x.shape


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_opcheck(layout, dtype, gen):
    x = activation((2, 5, 7, 3), dtype, layout, gen)
    grad = activation((2, 5, 7, 3), dtype, layout, gen)
    params = bn_params(x, gen)
    sd = params[0].dtype
    running = [torch.zeros(5, device="cuda", dtype=sd), torch.ones(5, device="cuda", dtype=sd),
               torch.tensor(0, device="cuda")]
    torch.library.opcheck(ops().batch_norm_stats.default, (x, params[2], params[3], *running, 0.1, EPS))
    torch.library.opcheck(ops().bn_relu_apply.default, (x, params[2], params[3]))
    for training in (True, False):
        torch.library.opcheck(ops().bn_relu_backward.default, (grad, x, *params, training))


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_norm_stats_fold_and_running_update_match_the_cpu_reference(dtype, gen):
    x = activation((4, 6, 5, 7), dtype, "channels_last", gen, offset=0.5)
    sd = ref.stats_dtype(x)
    gamma, beta = torch.rand(6, generator=gen).to("cuda", sd) + 0.5, torch.randn(6, generator=gen).to("cuda", sd)
    running = [torch.randn(6, generator=gen).to("cuda", sd), torch.rand(6, generator=gen).to("cuda", sd) + 0.5]
    want_running = [r.double().cpu() for r in running]
    count = torch.tensor(3, device="cuda")
    got = ops().batch_norm_stats(x, gamma, beta, *running, count, 0.1, EPS)
    want = ref.batch_norm_stats(x.double().cpu(), gamma.double().cpu(), beta.double().cpu(), *want_running, None,
                                0.1, EPS)
    for name, a, b in zip(("mean", "invstd", "scale", "shift"), got, want):
        torch.testing.assert_close(a.double().cpu(), b, **stat_tol(dtype), msg=name)
    for a, b in zip(running, want_running):
        torch.testing.assert_close(a.double().cpu(), b, **stat_tol(dtype))
    assert count.item() == 4


def test_more_than_2_pow_31_elements():
    # 64-bit indexing: one channel of 2^31 + 2^15 fp16 elements (4 GiB per tensor).
    if torch.cuda.get_device_properties(0).total_memory < 16 * 2**30:
        pytest.skip("needs about 10 GiB of device memory")
    x = torch.randn(1, 1, 2**15, 2**16 + 1, device="cuda", dtype=torch.float16)
    scale, shift = torch.tensor([-2.0], device="cuda"), torch.tensor([0.5], device="cuda")
    out = ops().bn_relu_apply(x, scale, shift)
    tail = (slice(None), slice(None), slice(-2, None))  # elements past 2^31
    want = ref.bn_relu_apply(*f64(x[tail], scale, shift))
    torch.testing.assert_close(out[tail].double(), want, **ACT_TOL[torch.float16])
    del out
    mean, invstd = batch_stats(x, EPS)
    torch.testing.assert_close(mean, torch.mean(x, dim=(0, 2, 3), dtype=torch.float32), atol=1e-5, rtol=0)
    torch.testing.assert_close(invstd, torch.ones_like(invstd), atol=1e-3, rtol=0)  # randn: var 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_pre_activation_rounds_as_on_the_cpu(dtype, gen):
    """z = x * scale + shift rounded twice, as the CPU twin does (no fma): the
    activation is the CPU's bit for bit, and on constant channels (x == mean,
    so shift == -x * scale rounded: z == 0 with two roundings, an fma's
    rounding error of either sign with one) the activation, dx and both sums
    are exactly 0, as on the CPU. A masked-off inf still makes its channel's
    sum_dz_xhat NaN, as on the CPU and in torch."""
    x = torch.randn(4, 40, 3, 3, generator=gen, dtype=dtype)
    constant = slice(8, 40)  # an fma leaves all 32 at z == 0 with odds of about 2**-32
    x[:, constant] = (torch.rand(32, generator=gen, dtype=dtype) * 8 - 4)[None, :, None, None]
    x = x.contiguous(memory_format=torch.channels_last)
    gamma = torch.rand(40, generator=gen, dtype=dtype) + 0.5
    mean, invstd, scale, shift = ops().batch_norm_stats(x, gamma, None, None, None, None, 0.1, EPS)
    grad = torch.randn(x.shape, generator=gen, dtype=dtype).contiguous(memory_format=torch.channels_last)
    x[0, 0, 0, 0] = float("inf")  # masked off by a negative scale, its xhat inf
    scale[0] = -1.0
    inputs = (grad, x, mean, invstd, scale, shift)
    want = (ops().bn_relu_apply(x, scale, shift), *ops().bn_relu_backward(*inputs, True))
    got = [t.cpu() for t in (ops().bn_relu_apply(*(t.cuda() for t in (x, scale, shift))),
                             *ops().bn_relu_backward(*(t.cuda() for t in inputs), True))]
    assert torch.equal(got[0], want[0])
    assert not want[0][:, constant].any() and not want[1][:, constant].any()  # the CPU twin's zeros
    dx, sum_dz, sum_dz_xhat = got[1:]
    assert not dx[:, constant].any() and not sum_dz[constant].any() and not sum_dz_xhat[constant].any()
    assert want[3][0].isnan() and sum_dz_xhat[0].isnan()
    torch.testing.assert_close(dx[:, 1:8], want[1][:, 1:8], **stat_tol(dtype))
    for a, b in zip(got[2:], want[2:]):
        torch.testing.assert_close(a[1:8], b[1:8], **stat_tol(dtype))
