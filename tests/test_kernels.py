"""The compiled BN-ReLU kernels (torch.ops.fused_preact.*) on the CPU against the
float64 reference, in every dtype and layout, plus opcheck."""
import pytest
import torch

from conftest import DTYPES, LAYOUTS, assert_close, make_layout
from fused_preact import reference
from fused_preact.ops.kernel_tables import native

SHAPES = [(3, 5, 7, 9), (1, 1, 1, 2), (2, 3, 33, 35), (4, 17, 1, 1), (2, 8, 40, 40)]


@pytest.fixture(scope="module")
def kernels():
    return native()


def _inputs(shape, dtype, layout, mean=0.5, std=2.0):
    x = make_layout((torch.randn(shape, dtype=torch.float64) * std + mean).to(dtype), layout)
    c = shape[1]
    sd = reference.stats_dtype(x)
    scale = torch.randn(c, dtype=sd)
    shift = torch.randn(c, dtype=sd)
    grad = make_layout(torch.randn(shape, dtype=torch.float64).to(dtype), layout)
    return x, scale, shift, grad


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_kernels_match_reference(kernels, shape, dtype, layout):
    x, scale, shift, grad = _inputs(shape, dtype, layout)
    x64, g64 = x.double(), grad.double()  # the stored (rounded) values, in float64
    m = x.numel() // x.shape[1]

    mean, invstd = kernels.batch_stats(x, 1e-5)
    ref_mean, ref_invstd = reference.batch_stats(x64, 1e-5)
    assert mean.dtype == reference.stats_dtype(x)
    stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert_close(mean, ref_mean, stat_dtype, "mean")
    assert_close(invstd, ref_invstd, stat_dtype, "invstd")

    out = kernels.bn_relu_apply(x, scale, shift)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert_close(out, reference.bn_relu_apply(x64, scale.double(), shift.double()), dtype, "bn_relu_apply")

    p64 = (mean.double(), invstd.double(), scale.double(), shift.double())
    sum_dz, sum_dz_xhat = kernels.bn_relu_backward_reduce(grad, x, mean, invstd, scale, shift)
    ref_sum_dz, ref_sum_dz_xhat = reference.bn_relu_backward_reduce(g64, x64, *p64)
    assert_close(sum_dz, ref_sum_dz, stat_dtype, "sum_dz", scale=m)
    assert_close(sum_dz_xhat, ref_sum_dz_xhat, stat_dtype, "sum_dz_xhat", scale=m)

    dx = kernels.bn_relu_backward_input(grad, x, mean, invstd, scale, shift, sum_dz, sum_dz_xhat)
    ref_dx = reference.bn_relu_backward_input(g64, x64, *p64, sum_dz.double(), sum_dz_xhat.double())
    assert_close(dx, ref_dx, dtype, "dx (training)", scale=float(scale.abs().max()))

    dx_eval = kernels.bn_relu_backward_input(grad, x, mean, invstd, scale, shift, None, None)
    assert_close(dx_eval, reference.bn_relu_backward_input(g64, x64, *p64), dtype, "dx (eval)",
                 scale=float(scale.abs().max()))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_outputs_keep_the_input_layout(kernels, layout):
    x, scale, shift, grad = _inputs((2, 4, 5, 6), torch.float32, layout)
    assert kernels.bn_relu_apply(x, scale, shift).stride() == x.stride()
    mean, invstd = kernels.batch_stats(x, 1e-5)
    assert kernels.bn_relu_backward_input(grad, x, mean, invstd, scale, shift, None, None).stride() == x.stride()


def test_permuted_input_without_mergeable_spatial_axes(kernels):
    base = torch.randn(2, 5, 4, 3, dtype=torch.float64)
    x = base.permute(0, 1, 3, 2)  # H and W no longer merge into one stride
    scale, shift = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    assert_close(kernels.bn_relu_apply(x, scale, shift), reference.bn_relu_apply(x, scale, shift))
    mean, invstd = kernels.batch_stats(x, 1e-5)
    assert_close(mean, reference.batch_stats(x, 1e-5)[0])


def test_batch_stats_is_stable_for_large_means(kernels):
    # A raw sum-of-squares variance in fp32 loses every digit here.
    x = 1e4 + 0.1 * torch.randn(4, 3, 32, 32, dtype=torch.float64)
    mean, invstd = kernels.batch_stats(x.float(), 0.0 + 1e-12)
    var = invstd.double().pow(-2)
    truth = x.float().double().var(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(var, truth, rtol=1e-3), (var, truth)


def test_relu_mask_blocks_gradient_where_z_is_not_positive(kernels):
    x = torch.tensor([-1.0, 0.0, 2.0, 3.0]).view(1, 1, 2, 2)
    one = torch.ones(1)
    dx = kernels.bn_relu_backward_input(torch.ones_like(x), x, torch.zeros(1), one, one, torch.zeros(1), None, None)
    assert dx.flatten().tolist() == [0.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_reductions_do_not_depend_on_the_thread_count(kernels, layout):
    # at::parallel_for splits the work by thread count; the partial sums are
    # merged in a fixed order of fixed-size chunks, so the bits must not change.
    x, scale, shift, grad = _inputs((8, 16, 40, 40), torch.float32, layout)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            stats = kernels.batch_stats(x, 1e-5)
            results.append(stats + kernels.bn_relu_backward_reduce(grad, x, *stats, scale, shift))
    finally:
        torch.set_num_threads(threads)
    for again in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], again))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck(kernels, dtype, layout):
    x, scale, shift, grad = _inputs((2, 3, 5, 4), dtype, layout)
    mean, invstd = kernels.batch_stats(x, 1e-5)
    ops = torch.ops.fused_preact
    torch.library.opcheck(ops.batch_stats, (x, 1e-5))
    torch.library.opcheck(ops.bn_relu_apply, (x, scale, shift))
    torch.library.opcheck(ops.bn_relu_backward_reduce, (grad, x, mean, invstd, scale, shift))
    torch.library.opcheck(ops.bn_relu_backward_input, (grad, x, mean, invstd, scale, shift, mean, invstd))
    torch.library.opcheck(ops.bn_relu_backward_input, (grad, x, mean, invstd, scale, shift, None, None))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda k: k.batch_stats(torch.randn(2, 3, 4), 1e-5), "x must be a 4-D"),
        (lambda k: k.batch_stats(torch.randint(0, 3, (2, 3, 4, 4)), 1e-5), "x must be float32"),
        (lambda k: k.batch_stats(torch.randn(2, 3, 4, 4), -1.0), "eps must be positive"),
        (lambda k: k.bn_relu_apply(torch.randn(2, 3, 4, 4), torch.ones(4), torch.ones(3)), "scale must be a 1-D"),
        (lambda k: k.bn_relu_apply(torch.randn(2, 3, 4, 4), torch.ones(3, dtype=torch.float64), torch.ones(3)),
         "scale must be Float"),
        (lambda k: k.bn_relu_backward_reduce(torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 4), *[torch.ones(3)] * 4),
         "grad_act must have the shape of x"),
        (lambda k: k.bn_relu_backward_input(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), *[torch.ones(3)] * 5,
                                            None), "must be given together"),
    ],
)
def test_bad_arguments_are_named(kernels, call, message):
    with pytest.raises(RuntimeError, match=message):
        call(kernels)


def test_nan_propagates_through_apply_like_torch_relu(kernels):
    x = torch.tensor([float("nan"), -1.0, 2.0]).view(1, 1, 1, 3)
    out = kernels.bn_relu_apply(x, torch.ones(1), torch.zeros(1))
    assert out.isnan()[0, 0, 0, 0] and out.flatten()[1:].tolist() == [0.0, 2.0]
