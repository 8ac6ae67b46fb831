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

    mean, invstd = _batch_stats(kernels, x)
    ref_mean, ref_invstd = reference.batch_stats(x64, 1e-5)
    assert mean.dtype == reference.stats_dtype(x)
    stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert_close(mean, ref_mean, stat_dtype, "mean")
    assert_close(invstd, ref_invstd, stat_dtype, "invstd")

    out = kernels.bn_relu_apply(x, scale, shift)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert_close(out, reference.bn_relu_apply(x64, scale.double(), shift.double()), dtype, "bn_relu_apply")

    p64 = (mean.double(), invstd.double(), scale.double(), shift.double())
    dx, sum_dz, sum_dz_xhat = kernels.bn_relu_backward(grad, x, mean, invstd, scale, shift, True)
    ref_sum_dz, ref_sum_dz_xhat = reference.bn_relu_backward_reduce(g64, x64, *p64)
    assert_close(sum_dz, ref_sum_dz, stat_dtype, "sum_dz", scale=m)
    assert_close(sum_dz_xhat, ref_sum_dz_xhat, stat_dtype, "sum_dz_xhat", scale=m)
    ref_dx = reference.bn_relu_backward_input(g64, x64, *p64, sum_dz.double(), sum_dz_xhat.double())
    assert_close(dx, ref_dx, dtype, "dx (training)", scale=float(scale.abs().max()))

    dx_eval, *eval_sums = kernels.bn_relu_backward(grad, x, mean, invstd, scale, shift, False)
    assert_close(dx_eval, reference.bn_relu_backward_input(g64, x64, *p64), dtype, "dx (eval)",
                 scale=float(scale.abs().max()))
    assert torch.equal(eval_sums[0], sum_dz) and torch.equal(eval_sums[1], sum_dz_xhat)


def _batch_stats(kernels, x, eps=1e-5):
    """(mean, invstd) from the statistics kernel, nothing to fold or track."""
    mean, invstd, scale, shift = kernels.batch_norm_stats(x, None, None, None, None, None, 0.1, eps)
    assert torch.equal(scale, invstd)  # gamma 1, beta 0
    torch.testing.assert_close(shift, -mean * invstd)
    return mean, invstd


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [0.1, 1.0])
def test_batch_norm_stats_folds_the_affine_and_updates_running_statistics_as_nn_does(kernels, dtype, momentum):
    # Written out from nn.BatchNorm2d's definition (float64), not from the
    # reference kernels: z = gamma * (x - mean) / sqrt(var + eps) + beta = x *
    # scale + shift; running <- (1 - momentum) * running + momentum * batch,
    # the variance unbiased (m / (m - 1)); one more batch counted.
    x = (torch.randn(3, 6, 5, 7, dtype=torch.float64) * 3 + 1).to(dtype)
    sd = reference.stats_dtype(x)
    gamma, beta = torch.randn(6, dtype=sd), torch.randn(6, dtype=sd)
    running_mean, running_var = torch.randn(6, dtype=sd), torch.rand(6, dtype=sd) + 0.5
    count = torch.tensor(4)
    rm0, rv0 = running_mean.double().clone(), running_var.double().clone()
    mean, invstd, scale, shift = kernels.batch_norm_stats(x, gamma, beta, running_mean, running_var, count,
                                                          momentum, 1e-3)
    x64, m = x.double(), x.numel() // 6
    batch_mean = x64.mean(dim=(0, 2, 3))
    batch_var = ((x64 - batch_mean.view(1, -1, 1, 1)) ** 2).sum(dim=(0, 2, 3)) / m
    z = gamma.double().view(1, -1, 1, 1) * (x64 - batch_mean.view(1, -1, 1, 1)) \
        / torch.sqrt(batch_var.view(1, -1, 1, 1) + 1e-3) + beta.double().view(1, -1, 1, 1)
    assert_close(x64 * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1), z, sd, "x*scale+shift",
                 scale=float(z.abs().max()))
    assert_close(mean, batch_mean, sd, "mean")
    assert_close(running_mean, (1 - momentum) * rm0 + momentum * batch_mean, sd, "running_mean")
    assert_close(running_var, (1 - momentum) * rv0 + momentum * batch_var * m / (m - 1), sd, "running_var",
                 scale=float(batch_var.max()))
    assert count.item() == 5


def test_batch_norm_stats_refuses_running_statistics_it_cannot_update_in_place(kernels):
    x, stride2 = torch.randn(2, 3, 4, 4), torch.ones(6)[::2]
    with pytest.raises(RuntimeError, match="running_mean must be contiguous"):
        kernels.batch_norm_stats(x, None, None, stride2, torch.ones(3), None, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="num_batches_tracked must be a one-element int64"):
        kernels.batch_norm_stats(x, None, None, None, None, torch.zeros(1), 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="momentum must be in"):
        kernels.batch_norm_stats(x, None, None, None, None, None, 1.5, 1e-5)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_outputs_keep_the_input_layout(kernels, layout):
    x, scale, shift, grad = _inputs((2, 4, 5, 6), torch.float32, layout)
    assert kernels.bn_relu_apply(x, scale, shift).stride() == x.stride()
    mean, invstd = _batch_stats(kernels, x)
    assert kernels.bn_relu_backward(grad, x, mean, invstd, scale, shift, True)[0].stride() == x.stride()


def test_permuted_input_without_mergeable_spatial_axes(kernels):
    base = torch.randn(2, 5, 4, 3, dtype=torch.float64)
    x = base.permute(0, 1, 3, 2)  # H and W no longer merge into one stride
    scale, shift = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    assert_close(kernels.bn_relu_apply(x, scale, shift), reference.bn_relu_apply(x, scale, shift))
    mean, invstd = _batch_stats(kernels, x)
    assert_close(mean, reference.batch_stats(x, 1e-5)[0])


def test_batch_stats_is_stable_for_large_means(kernels):
    # A raw sum-of-squares variance in fp32 loses every digit here.
    x = 1e4 + 0.1 * torch.randn(4, 3, 32, 32, dtype=torch.float64)
    mean, invstd = _batch_stats(kernels, x.float(), 1e-12)
    var = invstd.double().pow(-2)
    truth = x.float().double().var(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(var, truth, rtol=1e-3), (var, truth)


def test_relu_mask_blocks_gradient_where_z_is_not_positive(kernels):
    x = torch.tensor([-1.0, 0.0, 2.0, 3.0]).view(1, 1, 2, 2)
    one = torch.ones(1)
    dx = kernels.bn_relu_backward(torch.ones_like(x), x, torch.zeros(1), one, one, torch.zeros(1), False)[0]
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
            stats = kernels.batch_norm_stats(x, None, None, None, None, None, 0.1, 1e-5)
            results.append(stats + kernels.bn_relu_backward(grad, x, *stats[:2], scale, shift, True))
    finally:
        torch.set_num_threads(threads)
    for again in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], again))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck(kernels, dtype, layout):
    x, scale, shift, grad = _inputs((2, 3, 5, 4), dtype, layout)
    mean, invstd = _batch_stats(kernels, x)
    ops = torch.ops.fused_preact
    running = [torch.zeros(3), torch.ones(3), torch.tensor(0)]
    torch.library.opcheck(ops.batch_norm_stats, (x, scale, shift, *running, 0.1, 1e-5))
    torch.library.opcheck(ops.batch_norm_stats, (x, None, None, None, None, None, 0.1, 1e-5))
    torch.library.opcheck(ops.bn_relu_apply, (x, scale, shift))
    for training in (True, False):
        torch.library.opcheck(ops.bn_relu_backward, (grad, x, mean, invstd, scale, shift, training))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda k: k.batch_norm_stats(torch.randn(2, 3, 4), *[None] * 5, 0.1, 1e-5), "x must be a 4-D"),
        (lambda k: k.batch_norm_stats(torch.randint(0, 3, (2, 3, 4, 4)), *[None] * 5, 0.1, 1e-5), "x must be float32"),
        (lambda k: k.batch_norm_stats(torch.randn(2, 3, 4, 4), *[None] * 5, 0.1, -1.0), "eps must be positive"),
        (lambda k: k.batch_norm_stats(torch.randn(2, 3, 4, 4), torch.ones(4), *[None] * 4, 0.1, 1e-5),
         "weight must be a 1-D"),
        (lambda k: k.batch_norm_stats(torch.randn(2, 3, 4, 4), None, None, torch.ones(3), None, None, 0.1, 1e-5),
         "must be given together"),
        (lambda k: k.bn_relu_apply(torch.randn(2, 3, 4, 4), torch.ones(4), torch.ones(3)), "scale must be a 1-D"),
        (lambda k: k.bn_relu_apply(torch.randn(2, 3, 4, 4), torch.ones(3, dtype=torch.float64), torch.ones(3)),
         "scale must be Float"),
        (lambda k: k.bn_relu_backward(torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 4), *[torch.ones(3)] * 4, True),
         "grad_act must have the shape of x"),
    ],
)
def test_bad_arguments_are_named(kernels, call, message):
    with pytest.raises(RuntimeError, match=message):
        call(kernels)


def test_nan_propagates_through_apply_like_torch_relu(kernels):
    x = torch.tensor([float("nan"), -1.0, 2.0]).view(1, 1, 1, 3)
    out = kernels.bn_relu_apply(x, torch.ones(1), torch.zeros(1))
    assert out.isnan()[0, 0, 0, 0] and out.flatten()[1:].tolist() == [0.0, 2.0]


def test_empty_batch_gives_nan_statistics(kernels):
    # No values per channel: every statistics output is NaN (torch.var_mean of nothing), and nothing else runs.
    x, ones = torch.empty(0, 4, 3, 3), torch.ones(4)
    stats = kernels.batch_norm_stats(x, ones, ones, None, None, None, 0.1, 1e-5)
    assert all(t.shape == (4,) and t.dtype == torch.float32 and t.isnan().all() for t in stats)
    assert kernels.bn_relu_apply(x, ones, ones).shape == x.shape
