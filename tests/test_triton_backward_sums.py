"""The backward's reductions inside its own launches: dgrad's last programs
to arrive sum its BatchNorm partials (one level or two), and the dx launch
sums the weight gradients' partials in programs of its own, bit for bit as
a sum launch would; every counter back at zero."""
import pytest
import torch

from conftest import arrival_counters_at_zero, assert_close, make_layout

from _triton_forward import DEV, INTERPRET

if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)

from fused_preact.dispatch_count import DispatchCounter  # noqa: E402
from fused_preact.triton_kernels import row_sums  # noqa: E402
from fused_preact.triton_kernels.bn_relu_backward import bn_relu_input_grad, input_grad_and_sums  # noqa: E402
from fused_preact.triton_kernels.conv_dgrad import conv_dgrad  # noqa: E402
from fused_preact.triton_kernels.conv_wgrad import conv_wgrad_partials  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(n, c, size, k, stride, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = make_layout(torch.randn(n, c, *size, generator=g) * 2 + 1, "channels_last").to(device)
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    invstd = (var + 1e-5).rsqrt()
    scale = (torch.rand(c, generator=g).to(device) + 0.5) * invstd
    shift = torch.randn(c, generator=g).to(device) - mean * scale
    w = (torch.randn(k, c, 3, 3, generator=g) / (3 * c ** 0.5)).to(device)
    ho, wo = ((s + 2 - 3) // stride + 1 for s in size)
    dy = make_layout(torch.randn(n, k, ho, wo, generator=g), "channels_last").to(device)
    return x, (mean, invstd, scale, shift), w, dy


# Interpreter: 64-row tiles (one per phase below 64 rows), groups of 4 tiles,
# two levels past 8; 40 channels: two 32-wide channel tiles.
@pytest.mark.parametrize("n, size, stride, tiles", [
    (1, (5, 5), 1, 1),      # one program per channel tile: its own last
    (6, (8, 8), 1, 6),      # one level
    (3, (9, 9), 2, 12),     # four phases of 3 tiles: 3 groups
    (10, (16, 16), 1, 40),  # 10 groups
])
def test_dgrad_sums_its_partials_in_its_own_launch(n, size, stride, tiles):
    x, stats, w, dy = _layer(n, 40, size, 24, stride, DEV, seed=tiles)
    with DispatchCounter() as counter:
        dz, sum_dz, sum_dz_xhat = conv_dgrad([dy], [w], [(stride, stride)], [(1, 1)], x, *stats)
    assert counter.triton == {"_dgrad_kernel": 1}, counter.triton
    assert (row_sums.reduction_groups(tiles) is None) == (tiles <= 8)
    xhat = (x.double() - stats[0].double().view(1, -1, 1, 1)) * stats[1].double().view(1, -1, 1, 1)
    assert_close(sum_dz, dz.double().sum((0, 2, 3)), torch.float32, "sum_dz")
    assert_close(sum_dz_xhat, (dz.double() * xhat).sum((0, 2, 3)), torch.float32, "sum_dz_xhat")
    assert arrival_counters_at_zero(), "a last program left its counter set"


def test_dx_launch_sums_the_weight_gradients_bit_for_bit():
    # A bottleneck entry's conv1 and projection: two weight gradients
    # summed by programs of the dx launch, and a third buffer of thousands
    # of rows' worth (37 rows: two levels here) in fp16; the same bits as
    # their own sum launch, and the same dx as the pass alone.
    x, stats, w, dy = _layer(8, 16, (8, 8), 24, 1, DEV)
    w2 = torch.randn(8, 16, 1, 1, device=DEV)
    dy2 = torch.randn(8, 8, 8, 8, device=DEV)
    scale, shift = stats[2], stats[3]
    dz, sum_dz, sum_dz_xhat = conv_dgrad([dy, dy2], [w, w2], [(1, 1)] * 2, [(1, 1), (0, 0)], x, *stats)
    rows = torch.randn(37, 70, generator=torch.Generator().manual_seed(1)).to(DEV)

    def jobs():
        return [conv_wgrad_partials(dy, x, scale, shift, w.shape, 1, 1, torch.float32, torch.channels_last),
                conv_wgrad_partials(dy2, x, scale, shift, w2.shape, 1, 0, torch.float32),
                row_sums.Partials(rows, torch.float16, lambda total: total)]

    carried = jobs()
    assert carried[0].buffer.shape[0] > 1 and row_sums.reduction_groups(37) is not None
    with DispatchCounter() as counter:
        dx, results = input_grad_and_sums(dz, x, stats[0], stats[1], scale, sum_dz, sum_dz_xhat, True, carried)
    assert counter.triton == {"_input_grad_kernel": 1}, counter.triton
    for got, want in zip(results, row_sums.sum_partials(jobs())):
        assert torch.equal(got, want) and got.stride() == want.stride() and got.dtype == want.dtype
    assert results[0].is_contiguous(memory_format=torch.channels_last)
    assert_close(results[2], rows.double().sum(0), torch.float16, "sum")
    assert torch.equal(dx, bn_relu_input_grad(dz, x, stats[0], stats[1], scale, sum_dz, sum_dz_xhat, True))
    assert arrival_counters_at_zero()


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="programs run at once only on a GPU")
def test_last_arrivals_in_dgrad_give_the_same_bits_every_time():
    # The paper's stage-1 layer at batch 128 (thousands of row tiles, in
    # groups), 100 times: a last program that read a row before its writer
    # had stored it, or a counter left set, would change the bits.
    x, stats, w, dy = _layer(128, 64, (32, 32), 64, 1, "cuda")
    first = conv_dgrad([dy], [w], [(1, 1)], [(1, 1)], x, *stats)
    for _ in range(100):
        again = conv_dgrad([dy], [w], [(1, 1)], [(1, 1)], x, *stats)
        assert torch.equal(first[1], again[1]) and torch.equal(first[2], again[2])
    torch.cuda.synchronize()
    assert arrival_counters_at_zero()
