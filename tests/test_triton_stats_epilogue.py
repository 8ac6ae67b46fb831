"""The conv forward's statistics epilogue (triton_kernels/stats_epilogue.py):
the next BatchNorm's (count, mean, M2) of outs[0] merged inside the conv's
launch by its last programs, in one level or two, for every column tile; the
counters back at zero; the merged row folded by the next conv's loader, so
that no merge launch runs between two convs at any size."""
import pytest
import torch

from _triton_forward import DEV, INTERPRET, _ref_conv
from conftest import arrival_counters_at_zero, assert_close, make_layout

if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)

from fused_preact.dispatch_count import DispatchCounter  # noqa: E402
from fused_preact.triton_kernels import row_sums, tuning  # noqa: E402
from fused_preact.triton_kernels.batch_stats import batch_norm_stats  # noqa: E402
from fused_preact.triton_kernels.conv_forward import conv_forward  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(n, c, k, size, device, residual_mean=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = make_layout(torch.randn(n, c, *size, generator=g), "channels_last").to(device)
    scale, shift = (torch.rand(c, generator=g) + 0.5).to(device), torch.randn(c, generator=g).to(device)
    w = (torch.randn(k, c, 3, 3, generator=g) / (3 * c ** 0.5)).to(device)
    res = (torch.randn(n, k, *size, generator=g) + residual_mean).to(device)
    return x, scale, shift, w, res


def _check_merged(merged, out):
    count, mean, m2 = merged
    k = out.shape[1]
    assert all(t.shape == (1, k) and t.dtype == torch.float32 for t in merged)
    var_ref, mean_ref = torch.var_mean(out.double(), dim=(0, 2, 3), correction=0)
    rows = out.numel() // k
    assert torch.equal(count[0], torch.full((k,), float(rows), device=count.device))
    assert_close(mean[0], mean_ref, torch.float32, "mean")
    assert_close(m2[0] / rows, var_ref, torch.float32, "var")


# Interpreter: 16 output rows per partial, groups of 4 partials, two levels
# past 8 partials (128 rows); one 64-row tile holds one group. 40 and 70
# outputs: two and three 32-wide column tiles; a shortcut adds outs[1]'s.
@pytest.mark.parametrize("n, size, k, shortcut", [
    (1, (5, 5), 40, False),    # 2 partials, one row tile: its own last program
    (2, (6, 7), 70, True),     # 6 partials: one level
    (3, (7, 7), 40, False),    # 10 partials: 3 groups, the last of 2 partials
    (4, (12, 12), 40, True),   # 36 partials: 9 groups
])
def test_merged_statistics_in_the_conv_launch(n, size, k, shortcut):
    x, scale, shift, w, res = _layer(n, 8, k, size, DEV, residual_mean=3.0, seed=k + n)
    weights = [w] + ([torch.randn(12, 8, 3, 3, device=DEV) / 8.5] if shortcut else [])
    partial_rows = -(-n * size[0] * size[1] // tuning.sizing.rows_per_partial)
    with DispatchCounter() as counter:
        outs, merged = conv_forward(x, scale, shift, weights, 1, 1, residual=res, stats=True, raw_stats=True)
    assert counter.triton == {"_conv_fwd_kernel": 1}, counter.triton
    assert (row_sums.reduction_groups(partial_rows) is None) == (partial_rows <= 8)
    assert_close(outs[0], _ref_conv(x, scale, shift, w, 1, 1) + res.double(), torch.float32, "out")
    _check_merged(merged, outs[0])
    assert arrival_counters_at_zero(), "a last program left its counter set"


def test_the_merged_row_is_folded_by_the_next_conv_at_any_size():
    # Past the loader merge's bounds on rows (1024) a statistics pass's
    # partials are merged by a launch; the epilogue's single merged row is
    # folded by the next conv whatever the rows: two convs, two launches,
    # and the next BatchNorm's statistics, fold and running update as the
    # formula gives them from the stored output.
    x, scale, shift, w, res = _layer(6, 8, 16, (16, 16), DEV, residual_mean=-2.0)
    assert 6 * 16 * 16 > 1024
    (y,), merged = conv_forward(x, scale, shift, [w], 1, 1, residual=res, stats=True, raw_stats=True)
    gamma, beta = torch.rand(16, device=DEV) + 0.5, torch.randn(16, device=DEV)
    running = [torch.zeros(16, device=DEV), torch.ones(16, device=DEV)]
    with DispatchCounter() as counter:
        stats, fold = batch_norm_stats(y, gamma, beta, *running, None, 0.1, 1e-5, merged, defer=True)
        w2 = torch.randn(8, 16, 1, 1, device=DEV) / 4
        (z,), _ = conv_forward(y, stats[2], stats[3], [w2], 1, 0, fold=fold)
    assert fold is not None and counter.triton == {"_conv_fwd_kernel": 1}, counter.triton
    var, mean = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
    invstd = (var + 1e-5).rsqrt()
    assert_close(stats[0], mean, torch.float32, "mean")
    assert_close(stats[1], invstd, torch.float32, "invstd")
    assert_close(stats[2], gamma.double() * invstd, torch.float32, "scale")
    rows = y.numel() // 16
    assert_close(running[1], 0.9 + 0.1 * var * rows / (rows - 1), torch.float32, "running_var")
    assert_close(z, _ref_conv(y, stats[2], stats[3], w2, 1, 0), torch.float32, "next conv")


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="programs run at once only on a GPU")
def test_last_arrivals_in_the_conv_give_the_same_bits_every_time():
    # The paper's stage-1 layer at batch 128 (4096 partials, 16 groups) and
    # a 256-output one: a last program that read a row before its writer had
    # stored it, or a counter left set, would change the bits.
    for c, k in ((64, 64), (64, 256)):
        x, scale, shift, w, res = _layer(128, c, k, (32, 32), "cuda")
        first = conv_forward(x, scale, shift, [w], 1, 1, residual=res, stats=True, raw_stats=True)
        for _ in range(100):
            again = conv_forward(x, scale, shift, [w], 1, 1, residual=res, stats=True, raw_stats=True)
            assert all(torch.equal(a, b) for a, b in zip(first[1], again[1]))
        _check_merged(first[1], first[0][0])
    torch.cuda.synchronize()
    assert arrival_counters_at_zero()
