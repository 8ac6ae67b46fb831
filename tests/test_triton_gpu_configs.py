"""Every config a GPU may run, computed against float64: each autotune config
that a kernel's pruner can keep, in the GPU's sizing (tuning.GPU: statistics
rows grouped by 32, wgrad chunks aligned to 128, ...), on small odd shapes
whose rows, channels and outputs end inside a tile, in fp32, fp16 and bf16;
and in fp32 each config's loaders of an input as pieces and of dropout.

The interpreter (TRITON_INTERPRET=1) checks each config's indexing, masks,
loops and epilogues; it has no tensor cores (products round as numpy's do)
and runs programs one after another (no races), which the GPU check covers.
bf16 runs through `bf16_as_on_gpu` (conftest), which makes the interpreter's
bf16 products and conversions those of a GPU.
"""
import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)

from conftest import arrival_counters_at_zero, assert_close  # noqa: E402
from fused_preact.triton_kernels import conv_dgrad as dgrad_module  # noqa: E402
from fused_preact.triton_kernels import conv_forward as forward_module  # noqa: E402
from fused_preact.triton_kernels import conv_wgrad as wgrad_module  # noqa: E402
from fused_preact.triton_kernels import tuning  # noqa: E402
from fused_preact.triton_kernels.batch_stats import batch_norm_stats, merge_partials  # noqa: E402
from fused_preact.triton_kernels.bn_relu_backward import bn_relu_input_grad  # noqa: E402
from fused_preact.triton_kernels.common import cdiv, conv_out_size  # noqa: E402
from fused_preact.triton_kernels.conv_dgrad import conv_dgrad  # noqa: E402
from fused_preact.triton_kernels.conv_forward import conv_forward  # noqa: E402
from fused_preact.triton_kernels.conv_wgrad import conv_wgrad  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "on_triton_device", "bf16_as_on_gpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS, MOMENTUM = 1e-5, 0.1


def _id(config) -> str:
    return "".join(f"{k[6:]}{v}" for k, v in config.kwargs.items()) + f"w{config.num_warps}s{config.num_stages}"


def _kept(kernel, **named_args):
    """The GPU configs `kernel`'s pruner keeps for a problem of these arguments."""
    return kernel.prune(kernel.configs["gpu"], named_args)


def _cases(kernel, shapes: dict, named_args):
    return [pytest.param(name, config, id=f"{name}-{_id(config)}")
            for name, shape in shapes.items() for config in _kept(kernel, **named_args(shape))]


# Shapes: rows end inside a 64- and a 128-row tile (70, 90, 84 or 60 rows),
# channels and outputs inside every kept config's tiles; few programs each
# (the interpreter's cost is per program), 3x3 taps where the channels are few.
# name: (N, C, H, W, K0, K1, kernel, stride, padding)
FORWARD = {
    "c13-k11+9-3x3": (2, 13, 5, 7, 11, 9, 3, 1, 1),
    "c29-k67+37-1x1": (2, 29, 5, 7, 67, 37, 1, 1, 0),
    "c40-k11-3x3": (2, 40, 5, 7, 11, 0, 3, 1, 1),
    "c40-k67-1x1s2": (3, 40, 9, 11, 67, 0, 1, 2, 0),
}
# name: (N, C, H, W); both convs of a stage entry, stride 2: four row phases of 84 rows.
DGRAD = {"c13": (2, 13, 13, 11), "c67": (2, 67, 13, 11)}
DGRAD_CONVS = [(40, 3, 2, 1), (24, 1, 2, 0)]  # (K, kernel, stride, padding)
# name: (N, C, H, W, K, kernel, stride, padding); 17x17 (578 positions): two chunks of the reduction.
WGRAD = {
    "k11-c13-3x3-17px": (2, 13, 17, 17, 11, 3, 1, 1),
    "k11-c67-1x1": (2, 67, 5, 7, 11, 1, 1, 0),
    "k67-c13-1x1": (2, 13, 5, 7, 67, 1, 1, 0),
    "k67-c67-1x1s2": (2, 67, 9, 11, 67, 1, 2, 0),
}
# name: (kernel, its shapes, the pruner's arguments of a shape)
ON_CPU = torch.empty(0)  # the pruners read the SM count of their x's device
KERNELS = {
    "forward": (forward_module._conv_fwd, FORWARD,
                lambda s: dict(C=s[1], K0=s[4], K1=s[5], M=s[0] * conv_out_size(s[2], s[6], s[7], s[8])
                               * conv_out_size(s[3], s[6], s[7], s[8]), x_ptr=ON_CPU)),
    "dgrad": (dgrad_module._dgrad, DGRAD,
              lambda s: dict(C=s[1], K1=DGRAD_CONVS[0][0], K2=DGRAD_CONVS[1][0], sh=2, sw=2,
                             num_m_tiles=cdiv(s[0] * cdiv(s[2], 2) * cdiv(s[3], 2), 64), x_ptr=ON_CPU)),
    "wgrad": (wgrad_module._wgrad, WGRAD, lambda s: dict(K=s[4], C=s[1])),
}
FORWARD_CASES, DGRAD_CASES, WGRAD_CASES = (_cases(*KERNELS[name]) for name in ("forward", "dgrad", "wgrad"))


@pytest.fixture
def gpu_config():
    """gpu_config(kernel, config[, sizing]): run in the GPU's sizing (or
    `sizing`), `kernel` with `config` alone."""
    with tuning.use(tuning.GPU), pytest.MonkeyPatch.context() as patch:
        def force(kernel, config, sizing=tuning.GPU):
            patch.setattr(tuning, "sizing", sizing)
            for autotuner in (kernel.timed, kernel.pinned):
                patch.setattr(autotuner, "configs", [config])
                patch.setattr(autotuner, "cache", {})
        yield force


@pytest.mark.parametrize("name", KERNELS)
def test_the_shapes_reach_every_gpu_config(name):
    # Each GPU config is kept for one of the shapes below, so each is computed.
    kernel, shapes, named_args = KERNELS[name]
    kept = {_id(c) for shape in shapes.values() for c in _kept(kernel, **named_args(shape))}
    assert kept == {_id(c) for c in kernel.configs["gpu"]}


def _input(shape, dtype, mean=0.5):
    return (torch.randn(shape, dtype=torch.float64) * 2 + mean).to(dtype).contiguous(memory_format=torch.channels_last)


def _epilogue_partials(x, rows=32):
    """x's (count, mean, M2) per channel over groups of `rows` rows, fp32 [P, C]:
    what the conv epilogue that made x hands on (rows in (n, h, w) order)."""
    flat = x.double().permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    groups = torch.split(flat, rows)
    count = torch.stack([torch.full((x.shape[1],), float(len(g)), dtype=torch.float64) for g in groups])
    mean = torch.stack([g.mean(0) for g in groups])
    m2 = torch.stack([((g - g.mean(0)) ** 2).sum(0) for g in groups])
    return tuple(t.float() for t in (count, mean, m2))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, config", FORWARD_CASES)
def test_forward_config(shape, config, dtype, gpu_config):
    # One launch takes every branch: the BatchNorm statistics merged in the
    # loader, two outputs, the residual and the statistics epilogue; then the
    # plain loader (scale and shift given).
    gpu_config(forward_module._conv_fwd, config)
    n, c, h, w, k0, k1, k, stride, pad = FORWARD[shape]
    x = _input((n, c, h, w), dtype)
    gamma, beta = torch.rand(c) + 0.5, torch.randn(c) * 0.5
    running, counter = [torch.randn(c), torch.rand(c) + 0.5], torch.zeros((), dtype=torch.int64)
    live = [t.clone() for t in running]
    stats, fold = batch_norm_stats(x, gamma, beta, *live, counter, MOMENTUM, EPS, _epilogue_partials(x), defer=True)
    assert fold is not None
    weights = [(torch.randn(kk, c, k, k) / (c * k * k) ** 0.5).to(dtype) for kk in (k0, k1) if kk]
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    res = torch.randn(n, k0, ho, wo).to(dtype)
    outs, raw = conv_forward(x, stats[2], stats[3], weights, stride, pad, residual=res, stats=True, raw_stats=True,
                             fold=fold)

    var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    m = n * h * w
    invstd = (var + EPS).rsqrt()
    for name, got, want in zip(("mean", "invstd", "scale", "shift"), stats,
                               (mean, invstd, gamma * invstd, beta - mean * gamma * invstd)):
        assert_close(got, want, torch.float32, name, scale=10)
    assert_close(live[0], 0.9 * running[0] + 0.1 * mean, torch.float32, "running_mean", scale=10)
    assert_close(live[1], 0.9 * running[1] + 0.1 * var * m / (m - 1), torch.float32, "running_var", scale=10)
    assert int(counter) == 1

    scale, shift = stats[2].double().view(1, -1, 1, 1), stats[3].double().view(1, -1, 1, 1)
    a = torch.relu(x.double() * scale + shift).to(dtype).double()
    want = [F.conv2d(a, wt.double(), None, stride, pad) for wt in weights]
    want[0] = want[0] + res.double()
    for i, (got, ref) in enumerate(zip(outs, want)):
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert_close(got, ref, dtype, f"outs[{i}]", scale=2)
    out_var, out_mean = torch.var_mean(outs[0].double(), dim=(0, 2, 3), correction=0)
    moments = merge_partials(*raw)
    assert_close(moments[0], out_mean, torch.float32, "epilogue mean", scale=10)
    assert_close(moments[1], out_var, torch.float32, "epilogue var", scale=10 * float(out_var.max()))

    plain, _ = conv_forward(x, stats[2], stats[3], weights, stride, pad, residual=res)
    for i, (got, ref) in enumerate(zip(plain, want)):
        assert_close(got, ref, dtype, f"plain outs[{i}]", scale=2)


def _bn_relu_graph(x, c):
    """Fixed BatchNorm constants of x and z = x * scale + shift in float64, for autograd."""
    var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    invstd = (var + EPS).rsqrt()
    gamma, beta = torch.rand(c, dtype=torch.float64) + 0.5, torch.linspace(-0.5, 1.0, c, dtype=torch.float64)
    scale, shift = gamma * invstd, beta - mean * gamma * invstd
    z = (x.double() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).requires_grad_()
    return [t.float() for t in (mean, invstd, scale, shift)], z


# BLOCK_M is the host's, not the config's (64 rows, or 128 from
# dgrad_wide_rows rows on where that still fills the SMs: one SM here):
# both in fp32, one each in fp16 and bf16.
DGRAD_ROWS = [(torch.float32, 64), (torch.float32, 128), (torch.float16, 128), (torch.bfloat16, 64)]


@pytest.mark.parametrize("dtype, block_m", DGRAD_ROWS, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("shape, config", DGRAD_CASES)
def test_dgrad_config(shape, config, dtype, block_m, gpu_config):
    # Both convs of a stage entry summed into one da, the ReLU mask and the
    # BatchNorm sums in the epilogue, then dx.
    wide = dict(dgrad_wide_rows=None) if block_m == 64 else dict(dgrad_wide_rows=1, sm_count=1)
    gpu_config(dgrad_module._dgrad, config, dataclasses.replace(tuning.GPU, **wide))
    n, c, h, w = DGRAD[shape]
    x = _input((n, c, h, w), dtype)
    stats, z = _bn_relu_graph(x, c)
    weights, grads, loss = [], [], 0.0
    for k, r, stride, pad in DGRAD_CONVS:
        weights.append((torch.randn(k, c, r, r) / (c * r * r) ** 0.5).to(dtype))
        ho, wo = (h + 2 * pad - r) // stride + 1, (w + 2 * pad - r) // stride + 1
        grads.append(torch.randn(n, k, ho, wo).to(dtype).contiguous(memory_format=torch.channels_last))
        loss = loss + (F.conv2d(torch.relu(z).to(dtype).double(), weights[-1].double(), None, stride, pad)
                       * grads[-1].double()).sum()
    loss.backward()
    dz_ref = z.grad
    dz, sum_dz, sum_dz_xhat = conv_dgrad(grads, weights, [(s, s) for _, _, s, _ in DGRAD_CONVS],
                                         [(p, p) for _, _, _, p in DGRAD_CONVS], x, *stats)
    clear = z.detach().abs() > 1e-4  # the ReLU mask of z within rounding of 0 may differ
    size = float(dz_ref.abs().max())
    assert_close(dz * clear, dz_ref * clear, dtype, "dz", scale=size)
    xhat = (x.double() - stats[0].double().view(1, -1, 1, 1)) * stats[1].double().view(1, -1, 1, 1)
    sums = float(dz_ref.abs().sum((0, 2, 3)).max())
    assert_close(sum_dz, dz_ref.sum((0, 2, 3)), dtype, "sum_dz", scale=sums)
    assert_close(sum_dz_xhat, (dz_ref * xhat).sum((0, 2, 3)), dtype, "sum_dz_xhat", scale=3 * sums)
    dx = bn_relu_input_grad(dz, x, stats[0], stats[1], stats[2], sum_dz, sum_dz_xhat, True)
    m = n * h * w
    dx_ref = (dz.double() - (sum_dz.double().view(1, -1, 1, 1) + xhat * sum_dz_xhat.double().view(1, -1, 1, 1)) / m
              ) * stats[2].double().view(1, -1, 1, 1)
    assert_close(dx, dx_ref, dtype, "dx", scale=size * float(stats[2].abs().max()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, config", WGRAD_CASES)
def test_wgrad_config(shape, config, dtype, gpu_config):
    # dW of every tap, output tiles cut along K and C, the reduction in
    # chunks aligned to the GPU's 128 positions, summed in a fixed order.
    gpu_config(wgrad_module._wgrad, config)
    n, c, h, w, k, r, stride, pad = WGRAD[shape]
    x = _input((n, c, h, w), dtype)
    stats, z = _bn_relu_graph(x, c)
    weight = (torch.randn(k, c, r, r, dtype=torch.float64) / (c * r * r) ** 0.5).requires_grad_()
    ho, wo = (h + 2 * pad - r) // stride + 1, (w + 2 * pad - r) // stride + 1
    dy = torch.randn(n, k, ho, wo).to(dtype).contiguous(memory_format=torch.channels_last)
    (F.conv2d(torch.relu(z.detach()).to(dtype).double(), weight, None, stride, pad) * dy.double()).sum().backward()
    dw = conv_wgrad(dy, x, stats[2], stats[3], (k, c, r, r), stride, pad, dtype, torch.channels_last)
    assert dw.dtype == dtype and dw.is_contiguous(memory_format=torch.channels_last)
    assert_close(dw, weight.grad, dtype, "dW", scale=float(weight.grad.abs().max()))


def _pieces_and_dropout(x):
    """x as Pieces of three (one a channel slice of a wider tensor, below the
    first in memory) and a dropout of p 0.3 with its mask on x's shape."""
    from fused_preact.ops.dropout import Dropout
    from fused_preact.triton_kernels.pieces import Pieces

    c = x.shape[1]
    cut = [c // 3, c // 3 + c // 4]
    block = torch.empty(x.shape[0], c + 2, *x.shape[2:], dtype=x.dtype).contiguous(memory_format=torch.channels_last)
    block[:, 2 + cut[0]:2 + cut[1]] = x[:, cut[0]:cut[1]]
    pieces = [x[:, :cut[0]].contiguous(memory_format=torch.channels_last), block[:, 2 + cut[0]:2 + cut[1]],
              x[:, cut[1]:].contiguous(memory_format=torch.channels_last)]
    drop = Dropout(0.3, torch.tensor([12345], dtype=torch.int64))
    return Pieces(pieces), drop, drop.mask(x.double())


@pytest.mark.parametrize("kernel", ["forward", "dgrad", "wgrad"])
def test_every_gpu_config_reads_pieces_and_drops_out(kernel, gpu_config):
    """The loaders of pieces and of dropout in every config each kernel's
    pruner keeps (fp32): forward's output, dgrad's dz and wgrad's dW against
    float64 of the concatenation with the same mask."""
    module, shapes, named_args = KERNELS[kernel]
    for shape in shapes.values():
        for config in _kept(module, **named_args(shape)):
            gpu_config(module, config)
            if kernel == "forward":
                n, c, h, w, k0, _, r, stride, pad = shape
                k = k0
            elif kernel == "dgrad":
                (n, c, h, w), (k, r, stride, pad) = shape, DGRAD_CONVS[0]
            else:
                n, c, h, w, k, r, stride, pad = shape
            x = _input((n, c, h, w), torch.float32)
            stats, z = _bn_relu_graph(x, c)
            pieces, drop, mask = _pieces_and_dropout(x)
            weight = (torch.randn(k, c, r, r, dtype=torch.float64) / (c * r * r) ** 0.5).requires_grad_()
            a = (torch.relu(z) * mask).float().double()
            y = F.conv2d(a, weight, None, stride, pad)
            dy = torch.randn(y.shape).contiguous(memory_format=torch.channels_last)
            (y * dy.double()).sum().backward()
            name = f"{kernel} {_id(config)}"
            if kernel == "forward":
                got = conv_forward(pieces, stats[2], stats[3], [weight.detach().float()], stride, pad,
                                   dropout=drop)[0][0]
                assert_close(got, y.detach(), torch.float32, name, scale=2)
            elif kernel == "dgrad":
                dz = conv_dgrad([dy], [weight.detach().float()], [(stride, stride)], [(pad, pad)], pieces, *stats,
                                dropout=drop)[0]
                clear = z.detach().abs() > 1e-4  # the ReLU mask of z within rounding of 0 may differ
                assert_close(dz * clear, z.grad * clear, torch.float32, name, scale=float(z.grad.abs().max()))
            else:
                dw = conv_wgrad(dy, pieces, stats[2], stats[3], (k, c, r, r), stride, pad, torch.float32,
                                dropout=drop)
                assert_close(dw, weight.grad, torch.float32, name, scale=float(weight.grad.abs().max()))


# Groups of 4 partial rows (a multiple of every conv config's BLOCK_M // 32)
# and of 2 row tiles (dgrad's): the shapes below reduce in two levels in
# every config, which the GPU's groups of 256 reach only at the paper's sizes.
SMALL_GROUPS = {"forward": dataclasses.replace(tuning.GPU, reduction_group_rows=4),
                "dgrad": dataclasses.replace(tuning.GPU, reduction_group_rows=2)}


@pytest.mark.parametrize("kernel", ["forward", "dgrad"])
def test_every_gpu_config_reduces_in_two_levels(kernel, gpu_config):
    """The in-launch reductions of every GPU config (fp32): the conv's merged
    statistics of its output (288 rows: 9 partials, 3 groups; 40 outputs:
    one to three column tiles) and dgrad's sums (8 row tiles: 4 groups),
    against float64 of the stored output and dz; every counter back at 0."""
    from fused_preact.triton_kernels import row_sums

    module = forward_module._conv_fwd if kernel == "forward" else dgrad_module._dgrad
    for config in module.configs["gpu"]:
        gpu_config(module, config, SMALL_GROUPS[kernel])
        name = f"{kernel} {_id(config)}"
        assert row_sums.reduction_groups(9 if kernel == "forward" else 8) is not None, "one level only"
        if kernel == "forward":
            x = _input((2, 24, 12, 12), torch.float32)
            stats, _ = _bn_relu_graph(x, 24)
            w = torch.randn(40, 24, 3, 3) / 14.7
            (y,), (count, mean, m2) = conv_forward(x, stats[2], stats[3], [w], 1, 1, stats=True, raw_stats=True)
            var_ref, mean_ref = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
            assert torch.equal(count[0], torch.full((40,), 288.0)), name
            assert_close(mean[0], mean_ref, torch.float32, name + " mean", scale=10)
            assert_close(m2[0] / 288, var_ref, torch.float32, name + " var", scale=10 * float(var_ref.max()))
        else:
            x = _input(DGRAD["c13"], torch.float32)
            stats, _ = _bn_relu_graph(x, 13)
            weights = [torch.randn(k, 13, r, r) / (13 * r * r) ** 0.5 for k, r, _, _ in DGRAD_CONVS]
            grads = [torch.randn(2, k, conv_out_size(13, r, s, p), conv_out_size(11, r, s, p)) for k, r, s, p
                     in DGRAD_CONVS]
            dz, sum_dz, sum_dz_xhat = conv_dgrad(grads, weights, [(s, s) for _, _, s, _ in DGRAD_CONVS],
                                                 [(p, p) for _, _, _, p in DGRAD_CONVS], x, *stats)
            xhat = (x.double() - stats[0].double().view(1, -1, 1, 1)) * stats[1].double().view(1, -1, 1, 1)
            scale = float(dz.double().abs().sum((0, 2, 3)).max())
            assert_close(sum_dz, dz.double().sum((0, 2, 3)), torch.float32, name + " sum_dz", scale=scale)
            assert_close(sum_dz_xhat, (dz.double() * xhat).sum((0, 2, 3)), torch.float32, name + " sum_dz_xhat",
                         scale=3 * scale)
        assert arrival_counters_at_zero(), name
