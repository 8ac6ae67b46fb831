"""An input given as pieces along channels (triton_kernels/pieces.py): the
address table the kernels read it through, its cache, the checks, and each
launcher on Pieces against the same launcher on their concatenation (the
op-level tests are in test_op_pieces.py)."""
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                reason="the Triton kernels run on the CPU under TRITON_INTERPRET=1")

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    from fused_preact.triton_kernels import batch_stats, bn_relu_backward, conv_dgrad, conv_forward, conv_wgrad
    from fused_preact.triton_kernels.pieces import Pieces


def _pieces(layout: str):
    """Three pieces: a view above the next one in the same storage, a
    separate tensor, a channel slice (offset, strided) of another."""
    torch.manual_seed(0)
    block = torch.randn(2, 9, 5, 6)
    if layout == "channels_last":
        block = block.contiguous(memory_format=torch.channels_last)
    wide = torch.randn(2, 10, 5, 6)
    return [block[:, 4:], block[:, :4], wide[:, 3:6]]


def test_the_table_holds_each_channels_offset_and_its_pieces_strides():
    pieces = _pieces("nchw")
    table = Pieces(pieces).table
    assert table.shape == (4, 12) and table.dtype == torch.int64
    base = pieces[0].data_ptr()
    want = [[(p.data_ptr() - base) // 4 + i * p.stride(1) for p in pieces for i in range(p.shape[1])],
            *[[p.stride(d) for p in pieces for _ in range(p.shape[1])] for d in (0, 2, 3)]]
    assert table.tolist() == want
    assert min(want[0]) < 0  # the second piece lies below the first


def test_the_table_written_by_kernels_for_a_cuda_graph_capture_is_the_same():
    from fused_preact.triton_kernels.pieces import _device_table, _host_table

    for layout in ("nchw", "channels_last"):
        pieces = _pieces(layout) + [torch.randn(2, 1, 5, 6)]
        assert torch.equal(_device_table(pieces), _host_table(pieces))


def test_a_table_is_built_once_for_pieces_where_they_were():
    pieces = _pieces("channels_last")
    assert Pieces(pieces).table is Pieces(list(pieces)).table
    moved = [pieces[0].clone(), *pieces[1:]]
    assert Pieces(moved).table is not Pieces(pieces).table


def test_bad_pieces_are_named():
    with pytest.raises(ValueError, match=r"pieces\[1\] must share"):
        Pieces([torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 5)])
    with pytest.raises(ValueError, match="non-empty list of 4-D"):
        Pieces([])


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("batch", [2, 1])
def test_every_launcher_reads_pieces_as_their_concatenation(layout, batch):
    pieces = [p[:batch] for p in _pieces(layout)]
    joined = torch.cat(pieces, 1)
    x = Pieces(pieces)
    c = joined.shape[1]
    scale, shift = torch.rand(c) + 0.5, torch.randn(c)
    weight = torch.randn(5, c, 3, 3) * 0.3
    for a, b in zip(batch_stats.batch_stats(x, 1e-5), batch_stats.batch_stats(joined, 1e-5)):
        torch.testing.assert_close(a, b)
    # The conv merging its input's statistics in its loader (a small x: batch 1 and 2 here).
    vec = torch.ones(c)
    outs = []
    for inp in (x, joined):
        stats, fold = batch_stats.batch_norm_stats(inp, vec, vec, None, None, None, 0.1, 1e-5, defer=True)
        outs.append(conv_forward.conv_forward(inp, stats[2], stats[3], [weight], 1, 1, fold=fold)[0][0])
        outs.append(stats[0])
    torch.testing.assert_close(outs[0], outs[2])
    torch.testing.assert_close(outs[1], outs[3])
    y = conv_forward.conv_forward(x, scale, shift, [weight], 1, 1)[0][0]
    torch.testing.assert_close(y, conv_forward.conv_forward(joined, scale, shift, [weight], 1, 1)[0][0])
    grad = torch.randn_like(y)
    mean, invstd = batch_stats.batch_stats(joined, 1e-5)
    dz, sum_dz, sum_dz_xhat = conv_dgrad.conv_dgrad([grad], [weight], [(1, 1)], [(1, 1)], x, mean, invstd, scale,
                                                    shift)
    want = conv_dgrad.conv_dgrad([grad], [weight], [(1, 1)], [(1, 1)], joined, mean, invstd, scale, shift)
    for a, b in zip((dz, sum_dz, sum_dz_xhat), want):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(conv_wgrad.conv_wgrad(grad, x, scale, shift, weight.shape, 1, 1, torch.float32),
                               conv_wgrad.conv_wgrad(grad, joined, scale, shift, weight.shape, 1, 1, torch.float32))
    dx = bn_relu_backward.bn_relu_input_grad(dz, x, mean, invstd, scale, sum_dz, sum_dz_xhat, True)
    torch.testing.assert_close(dx, bn_relu_backward.bn_relu_input_grad(want[0], joined, mean, invstd, scale, *want[1:],
                                                                       True))
