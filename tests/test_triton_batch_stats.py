"""Triton batch statistics: batch_stats, merge_partials, and the BatchNorm statistics
that batch_norm_stats(defer=True) leaves to the conv that reads x (merged in its loader),
against float64 references built from plain PyTorch.

Runs on CPU tensors under the triton interpreter (TRITON_INTERPRET=1, set before
triton is imported: the CI sets it for the whole suite), else on CUDA; shapes are
tiny because the interpreter is slow.
"""
import pytest
import torch

from _triton_forward import DEV, INTERPRET, NO_ORDER_TO_VARY, _ref_conv, _var_mean
from conftest import assert_close, make_layout

if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from fused_preact.triton_kernels.batch_stats import batch_stats, merge_partials  # noqa: E402
from fused_preact.triton_kernels.conv_forward import conv_forward  # noqa: E402

# the GPU check runs these modules whole on a GPU: factory calls follow the kernels' device
pytestmark = pytest.mark.usefixtures("one_thread", "on_triton_device")


# ----------------------------------------------------------------------------- batch_stats


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided", "hw_slice"])
def test_batch_stats(layout, dtype):
    x = (torch.randn(3, 5, 7, 9) * 2 + 0.5).to(dtype)
    if layout == "hw_slice":  # H and W strides that do not chain: the 3-level row view
        x = x.contiguous(memory_format=torch.channels_last)[:, :, 1:, ::2]
    else:
        x = make_layout(x, layout)
    mean, invstd = batch_stats(x, 1e-5)
    var_ref, mean_ref = _var_mean(x)
    assert mean.dtype == invstd.dtype == torch.float32 and mean.shape == (5,)
    assert_close(mean, mean_ref, torch.float32, "mean")
    assert_close(invstd, (var_ref + 1e-5).rsqrt(), torch.float32, "invstd")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_batch_stats_large_mean(layout):
    # mean 1e4, std 1: a sum-of-squares formula would lose every digit of the variance.
    x = make_layout(torch.randn(4, 3, 16, 16) + 1e4, layout)
    mean, invstd = batch_stats(x, 0.0)  # eps 0: invstd is 1 / std itself
    var_ref, mean_ref = _var_mean(x)
    assert_close(mean, mean_ref, torch.float32, "mean")
    assert_close(invstd.double().pow(-2), var_ref, torch.float32, "var")


def test_merge_partials_skips_empty_and_matches_pooled():
    data = torch.randn(40, 3, dtype=torch.float64) * 3 + 100
    cuts = [0, 7, 7, 20, 33, 40]  # an empty partial in the middle
    cnt, mean, m2 = [], [], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        part = data[a:b]
        cnt.append(torch.full((3,), float(b - a), dtype=torch.float64))
        mean.append(part.mean(0) if b > a else torch.full((3,), float("nan"), dtype=torch.float64))
        m2.append(((part - part.mean(0)) ** 2).sum(0) if b > a else torch.zeros(3, dtype=torch.float64))
    cnt, mean, m2 = (torch.stack(t).float().to(DEV) for t in (cnt, mean, m2))
    out_mean, out_var = merge_partials(cnt, mean, m2)
    var_ref, mean_ref = torch.var_mean(data, dim=0, correction=0)
    assert_close(out_mean, mean_ref, torch.float32, "mean")
    assert_close(out_var, var_ref, torch.float32, "var")


@NO_ORDER_TO_VARY
def test_batch_stats_deterministic():
    x = torch.randn(4, 6, 9, 11, device=DEV).contiguous(memory_format=torch.channels_last) + 3
    first, second = batch_stats(x, 1e-5), batch_stats(x, 1e-5)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# ----------------------------------------------------------------------------- statistics merged by the conv


def _bn_formula(x, gamma, beta, running, eps=1e-5, momentum=0.1):
    """Training BatchNorm written out, float64: (mean, invstd, scale, shift) and the
    running (mean, var) after one update with the unbiased variance."""
    xd = x.double()
    mean = xd.mean(dim=(0, 2, 3))
    var = ((xd - mean.view(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3))
    invstd = 1.0 / torch.sqrt(var + eps)
    scale = invstd * (gamma.double() if gamma is not None else 1.0)
    shift = (beta.double() if beta is not None else 0.0) - mean * scale
    m = x.numel() // x.shape[1]
    new_running = None if running is None else ((1 - momentum) * running[0].double() + momentum * mean,
                                                (1 - momentum) * running[1].double() + momentum * var * m / (m - 1))
    return (mean, invstd, scale, shift), new_running


@pytest.mark.parametrize("affine, tracked", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("channels, handed_on, shortcut, batch", [(6, False, True, 2), (40, True, False, 2),
                                                                  (24, True, True, 2), (6, False, False, 1)])
def test_statistics_left_to_the_conv_that_reads_x(affine, tracked, channels, handed_on, shortcut, batch):
    # batch_norm_stats(defer=True) on few partials launches no merge: the conv
    # given its LoaderFold merges them in its loader and writes the formula's
    # statistics, fold and running update (once), and convolves with them.
    # 40 channels: several channel blocks of the loader; a shortcut: two
    # outputs; batch 1 of 5x5 images: a conv of one program.
    from fused_preact.dispatch_count import DispatchCounter
    from fused_preact.triton_kernels.batch_stats import batch_norm_stats

    torch.manual_seed(0)
    if handed_on:  # x made by a conv whose epilogue wrote x's partials
        src = make_layout(torch.randn(2, 5, 6, 7), "channels_last")
        (x,), partials = conv_forward(src, torch.ones(5), torch.zeros(5), [torch.randn(channels, 5, 3, 3)], 1, 1,
                                      stats=True, raw_stats=True)
        x += 3.0  # a mean far from 0, kept consistent with the partials below
        partials = (partials[0], partials[1] + 3.0, partials[2])
    else:
        size = (6, 7) if batch > 1 else (5, 5)
        x, partials = make_layout(torch.randn(batch, channels, *size) * 2 + 3, "channels_last"), None
    gamma, beta = (torch.rand(channels) + 0.5, torch.randn(channels)) if affine else (None, None)
    running = [torch.randn(channels), torch.rand(channels) + 0.5] if tracked else None
    counter = torch.zeros((), dtype=torch.int64) if tracked else None
    want, want_running = _bn_formula(x, gamma, beta, running)
    live = [t.clone() for t in running] if tracked else [None, None]
    with DispatchCounter() as launches:
        stats, fold = batch_norm_stats(x, gamma, beta, *live, counter, 0.1, 1e-5, partials, defer=True)
    assert fold is not None
    assert launches.triton.get("_merge_partials_kernel", 0) == 0
    weights = [torch.randn(8, channels, 3, 3) / 10] + ([torch.randn(4, channels, 3, 3) / 10] if shortcut else [])
    with DispatchCounter() as launches:
        outs, _ = conv_forward(x, stats[2], stats[3], weights, 1, 1, fold=fold)
    assert sum(launches.triton.values()) == 1
    for name, got, ref in zip(("mean", "invstd", "scale", "shift"), stats, want):
        assert_close(got, ref, torch.float32, name, scale=10)
    if tracked:
        assert_close(live[0], want_running[0], torch.float32, "running_mean", scale=10)
        assert_close(live[1], want_running[1], torch.float32, "running_var", scale=10)
        assert int(counter) == 1
    for out, w in zip(outs, weights):
        assert_close(out, _ref_conv(x, want[2].float(), want[3].float(), w, 1, 1), torch.float32, "out", scale=3)
    # The same statistics, bit for bit, as the merge launch makes of the same partials.
    merged = batch_norm_stats(x, gamma, beta, None, None, None, 0.1, 1e-5, fold.partials)
    assert all(torch.equal(a, b) for a, b in zip(stats, merged))


@pytest.mark.parametrize("bound", ["LOADER_MERGE_MAX_PARTIALS", "LOADER_MERGE_MAX_ROWS"])
def test_statistics_of_a_large_layer_are_merged_at_once(bound, monkeypatch):
    # Past either bound (x's 2 partials, of an NCHW image each, and 50 rows
    # here) every program would merge too much, or too many programs would:
    # the merge launches there and then, and there is nothing to leave to the
    # conv. A single partial (a conv epilogue's merged row) is left to the
    # conv whatever the rows.
    from fused_preact.triton_kernels import batch_stats

    x = make_layout(torch.randn(2, 6, 5, 5), "nchw")
    gamma, beta = torch.rand(6) + 0.5, torch.randn(6)
    one = tuple(t[:1] for t in batch_stats.partial_stats(x[:1]))
    assert batch_stats.partial_stats(x)[0].shape[0] == 2
    assert batch_stats.batch_norm_stats(x, gamma, beta, None, None, None, 0.1, 1e-5, defer=True)[1] is not None
    monkeypatch.setattr(batch_stats, bound, 1 if bound.endswith("PARTIALS") else 49)
    stats, fold = batch_stats.batch_norm_stats(x, gamma, beta, None, None, None, 0.1, 1e-5, defer=True)
    assert fold is None
    for name, got, ref in zip(("mean", "invstd", "scale", "shift"), stats, _bn_formula(x, gamma, beta, None)[0]):
        assert_close(got, ref, torch.float32, name, scale=10)
    assert batch_stats.batch_norm_stats(x, gamma, beta, None, None, None, 0.1, 1e-5, one, defer=True)[1] is not None
