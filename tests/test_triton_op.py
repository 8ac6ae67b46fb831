"""backend="triton" end to end: the op, its residual and statistics epilogues,
and whole networks, against the float64 truth and the reference backend.
On a CPU these run the Triton kernels in the interpreter (TRITON_INTERPRET=1,
as CI sets it); on a CUDA machine without it, the compiled kernels on CUDA
tensors."""
import functools
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close, make_layout, randomize
from fused_preact import PreActResNet, reference
from fused_preact.ops import bn_relu_conv2d
from fused_preact.ops.backends import resolve_backend
from fused_preact.ops.bn_relu_conv import bn_relu_conv2d_op
import test_op
from test_op import CASES, _run

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if not torch.cuda.is_available() and not INTERPRET:
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1 (set before triton is imported)",
                allow_module_level=True)

# The interpreter runs kernels on CPU tensors; compiled kernels need CUDA ones.
DEVICE = "cpu" if INTERPRET else "cuda"
_problem = functools.partial(test_op._problem, device=DEVICE)


def _triton(*args, **kwargs):
    return bn_relu_conv2d(*args, backend="triton", **kwargs)


def _truth(x, weight, gamma, beta, running, conv, training):
    x64, w64, g64, b64 = (t.detach().double().requires_grad_() for t in (x, weight, gamma, beta))
    return _run(reference.bn_relu_conv2d_eager, x64, w64, g64, b64, (running[0].double(), running[1].double()),
                conv, training)


def _assert_matches_truth(got, truth, dtype, m):
    (y, grads, rm, rv), (ty, tgrads, trm, trv) = got, truth
    ty = ty.detach()
    assert y.dtype == dtype and y.shape == ty.shape
    assert_close(y, ty, dtype, "y", scale=max(3.0, float(ty.abs().max())))
    for name, g, want in zip(("dx", "dW", "dgamma", "dbeta"), grads, tgrads):
        assert_close(g, want, dtype, name, scale=max(3.0, float(want.abs().max())) * (m ** 0.5 if name != "dx" else 1))
    assert_close(rm, trm, torch.float32, "running_mean")
    assert_close(rv, trv, torch.float32, "running_var")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("case", CASES[:4])
def test_matches_nn_modules_fp32(case, layout, training):
    x, weight, gamma, beta, running, conv = _problem(case, torch.float32, layout)
    got = _run(_triton, x, weight, gamma, beta, running, conv, training)
    _assert_matches_truth(got, _truth(x, weight, gamma, beta, running, conv, training), torch.float32,
                          x.numel() // x.shape[1])


@pytest.mark.parametrize("case", CASES[:2])
def test_matches_nn_modules_fp16(case):
    x, weight, gamma, beta, running, conv = _problem(case, torch.float16, "channels_last")
    got = _run(_triton, x, weight, gamma, beta, running, conv, True)
    assert got[1][2].dtype == torch.float32  # gamma stays fp32, like BatchNorm under autocast
    _assert_matches_truth(got, _truth(x, weight, gamma, beta, running, conv, True), torch.float16,
                          x.numel() // x.shape[1])


@pytest.mark.parametrize("kernel, padding", [(1, 0), (3, 1)], ids=["1x1+1x1", "3x3+1x1"])
def test_with_shortcut_equals_two_modules(kernel, padding):
    x, weight, gamma, beta, running, _ = _problem((3, 5, 7, 9, 6, kernel, 2, padding), torch.float32)
    shortcut = torch.randn(8, 5, 1, 1, device=DEVICE, requires_grad=True)
    y, sc = bn_relu_conv2d(x, weight, gamma, beta, running[0].clone(), running[1].clone(), stride=2, padding=padding,
                           backend="triton", shortcut_weight=shortcut)
    inputs = (x, weight, shortcut, gamma, beta)
    x64, w64, s64, g64, b64 = (t.detach().double().requires_grad_() for t in inputs)
    a = torch.relu(F.batch_norm(x64, None, None, g64, b64, True))
    ty, tsc = F.conv2d(a, w64, None, 2, padding), F.conv2d(a, s64, None, 2, 0)
    assert_close(y, ty, name="y", scale=3)
    assert_close(sc, tsc, name="shortcut", scale=3)
    got = torch.autograd.grad((y.sum(), (sc * sc).sum()), inputs)
    want = torch.autograd.grad((ty.sum(), (tsc * tsc).sum()), (x64, w64, s64, g64, b64))
    for name, g, w in zip(("dx", "dW", "dW_shortcut", "dgamma", "dbeta"), got, want):
        assert_close(g, w, name=name, scale=max(3.0, float(w.abs().max())))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_residual_is_added_and_receives_the_output_gradient(backend, layout):
    x, weight, gamma, beta, running, conv = _problem(CASES[1], torch.float32, layout)
    plain = bn_relu_conv2d(x, weight, gamma, beta, None, None, backend=backend, **conv)
    residual = make_layout(torch.randn(plain.shape, device=DEVICE), layout).requires_grad_()
    y = bn_relu_conv2d(x, weight, gamma, beta, None, None, backend=backend, residual=residual, **conv)
    assert_close(y, plain + residual, name="y")
    g = torch.randn(y.shape, device=DEVICE)
    got = torch.autograd.grad(y, (residual, x, weight), g)
    want = torch.autograd.grad(plain, (x, weight), g)
    assert torch.equal(got[0], g)
    for name, a, b in zip(("dx", "dW"), got[1:], want):
        assert_close(a, b, name=name, scale=3)


def test_opcheck_with_residual_and_statistics_epilogues():
    x, weight, gamma, beta, running, conv = _problem(CASES[3], torch.float32)
    stats = reference.batch_norm_stats(x.detach(), gamma.detach(), beta.detach(), None, None, None, 0.1, 1e-5)
    y = F.conv2d(x.detach(), weight.detach(), None, conv["stride"], conv["padding"])
    residual = torch.randn(y.shape, device=DEVICE, requires_grad=True)
    stride, padding = [conv["stride"]] * 2, [conv["padding"]] * 2
    torch.library.opcheck(bn_relu_conv2d_op, (x, [weight], gamma, beta, *stats, residual, stride, padding,
                                              [1, 1], [1], True, "triton", 1e-3))


def test_torch_compile_fullgraph_matches_eager():
    x, weight, gamma, beta, running, conv = _problem(CASES[0], torch.float32)
    eager = _run(_triton, x, weight, gamma, beta, running, conv, True)
    compiled = _run(torch.compile(_triton, fullgraph=True, backend="aot_eager"), x, weight, gamma, beta, running,
                    conv, True)
    assert_close(compiled[0], eager[0], name="y")
    for name, a, b in zip(("dx", "dW", "dgamma", "dbeta"), compiled[1], eager[1]):
        assert_close(a, b, name=name, scale=3)


def _small_net(backend, depth, block, shortcut):
    torch.manual_seed(0)
    return randomize(PreActResNet(depth, block=block, shortcut=shortcut, backend=backend)).to(DEVICE)


@pytest.mark.parametrize("loader_merge", [True, False], ids=["merged-by-conv", "merge-launch"])
@pytest.mark.parametrize("depth, block, shortcut", [(11, "bottleneck", "B"), (8, "basic", "A"),
                                                    (8, "basic", "B")])
def test_two_sgd_steps_match_reference_backend(depth, block, shortcut, loader_merge, monkeypatch):
    # Each layer's statistics merged by its conv's loader (few partials, as
    # here) or by a launch of their own (LOADER_MERGE_MAX_PARTIALS = 0).
    from fused_preact.triton_kernels import batch_stats

    if not loader_merge:
        monkeypatch.setattr(batch_stats, "LOADER_MERGE_MAX_PARTIALS", 0)
    x, labels = torch.randn(4, 3, 8, 8, device=DEVICE), torch.randint(0, 10, (4,), device=DEVICE)
    results = {}
    for backend in ("reference", "triton"):
        model = _small_net(backend, depth, block, shortcut).to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        losses = []
        for _ in range(2):
            opt.zero_grad()
            loss = F.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), labels)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        results[backend] = (torch.tensor(losses), model.state_dict())
    assert_close(results["triton"][0], results["reference"][0], torch.float32, "losses")
    for name, want in results["reference"][1].items():
        got = results["triton"][1][name]
        if want.is_floating_point():
            # Two fp32 computations summing in different orders, and SGD with
            # momentum carries their rounding differences on: 10x fp32's atol
            # (a wrong gradient is off by orders of magnitude more).
            assert_close(got, want, torch.float32, name, scale=10 * max(1.0, float(want.abs().max())))
        else:
            assert torch.equal(got, want), name


def test_auto_picks_triton_on_cuda_for_channels_last_input_only():
    cuda = torch.device("cuda")
    assert resolve_backend("auto", cuda, torch.float32) == "triton"
    assert resolve_backend("auto", cuda, torch.bfloat16) == "triton"
    assert resolve_backend("auto", cuda, torch.float32, channels_last=False) != "triton"
    assert resolve_backend("auto", cuda, torch.float64) != "triton"  # no fp64 Triton kernels
    assert resolve_backend("auto", torch.device("cpu"), torch.float32) != "triton"
    with pytest.raises(RuntimeError, match="backend='triton' has no kernels for torch.float64"):
        resolve_backend("triton", torch.device(DEVICE), torch.float64)


@pytest.mark.parametrize("x_layout, w_layout", [("nchw", "nchw"), ("channels_last", "nchw"),
                                                ("nchw", "channels_last"), ("strided", "nchw")])
def test_output_layout_follows_pytorch_convolution(x_layout, w_layout):
    # Under torch.compile the fake's strides (F.conv2d's rule) are trusted, so
    # the kernels must produce exactly those.
    x, weight, gamma, beta, running, conv = _problem(CASES[0], torch.float32, x_layout, requires_grad=False)
    weight = make_layout(weight, w_layout)
    got = _triton(x, weight, gamma, beta, None, None, **conv)
    want = F.conv2d(x, weight, None, conv["stride"], conv["padding"])
    assert got.stride() == want.stride()


def test_nan_propagates_like_relu():
    x, weight, gamma, beta, running, conv = _problem(CASES[2], torch.float32, requires_grad=False)
    x[0, 0, 1, 1] = float("nan")
    mean, invstd = torch.zeros(x.shape[1], device=DEVICE), torch.ones(x.shape[1], device=DEVICE)
    got = bn_relu_conv2d(x, weight, gamma, beta, mean, invstd.clone(), training=False, backend="triton", **conv)
    want = bn_relu_conv2d(x, weight, gamma, beta, mean, invstd.clone(), training=False, backend="reference", **conv)
    assert torch.equal(got.isnan(), want.isnan()) and bool(got.isnan().any())


def test_convs_with_different_strides_share_one_pre_activation():
    # An ImageNet pre-activation unit's conv1 (stride 1) and strided projection.
    from torch import nn
    from fused_preact.modules import bn_relu_conv_modules

    torch.manual_seed(0)
    bn, conv1, proj = (m.to(DEVICE) for m in (nn.BatchNorm2d(5), nn.Conv2d(5, 6, 1, bias=False),
                                              nn.Conv2d(5, 8, 1, 2, bias=False)))
    x = torch.randn(3, 5, 7, 9, device=DEVICE, requires_grad=True)
    outs = {}
    for fused in (False, True):
        (y, sc), _ = bn_relu_conv_modules(x, bn, [conv1, proj], fused=fused, backend="triton")
        params = (x, bn.weight, bn.bias, conv1.weight, proj.weight)
        outs[fused] = (y, sc, *torch.autograd.grad((y.sum(), (sc * sc).sum()), params))
    for name, a, b in zip(("y", "shortcut", "dx", "dgamma", "dbeta", "dW1", "dW_proj"), outs[True], outs[False]):
        assert_close(a, b, torch.float32, name, scale=max(3.0, float(b.detach().abs().max())))


def _sum_alone(partials, dtype=torch.float32):
    from fused_preact.triton_kernels.row_sums import Partials, sum_partials

    return sum_partials([Partials(partials, dtype, lambda total: total)])[0]


@pytest.mark.parametrize("rows", [3, 9, 37])  # one level, and groups merged in parallel first
def test_partial_reductions_match_torch(rows):
    from fused_preact.triton_kernels.batch_stats import merge_partials

    g = torch.Generator().manual_seed(rows)
    partials = torch.randn(rows, 10, generator=g).to(DEVICE)
    total = _sum_alone(partials)
    assert_close(total, partials.double().sum(0), torch.float32, "sum")
    if not INTERPRET:  # programs run one after another in the interpreter: no order to vary there
        assert torch.equal(total, _sum_alone(partials))
    # (count, mean, M2) partials of known data merged into its mean and variance
    data = torch.randn(rows, 7, 6, generator=g, dtype=torch.float64) * 3 + 50
    count = torch.full((rows, 6), 7.0)
    count[0] = 0.0  # an empty partial contributes nothing
    var, mean = torch.var_mean(data[1:].reshape(-1, 6), dim=0, correction=0)
    parts = [count, data.mean(1).float(), ((data - data.mean(1, keepdim=True)) ** 2).sum(1).float()]
    got_mean, got_var = merge_partials(*(t.to(DEVICE) for t in parts))
    assert_close(got_mean, mean, torch.float32, "mean", scale=50)
    assert_close(got_var, var, torch.float32, "var", scale=10)


def test_a_channels_last_step_copies_no_weight_and_no_gradient():
    # The forward kernel reads a channels_last weight in place, and wgrad
    # writes dW in the weight's layout, so autograd stores it without a copy:
    # a channels_last model's step copies nothing that eager nn does not.
    from fused_preact.dispatch_count import count_step

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, device=DEVICE).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (2,), device=DEVICE)
    counts = {}
    for name, options in (("eager", dict(fused=False)), ("triton", dict(backend="triton"))):
        model = PreActResNet(11, **options).to(DEVICE, memory_format=torch.channels_last)
        counts[name] = count_step(model, x, labels)
    triton, eager = counts["triton"], counts["eager"]
    for op in ("copy_", "_to_copy", "clone", "cat"):
        assert triton.ops[op] == eager.ops[op], op
    assert all(p.grad.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.dim() == 4)


@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("large", [False, True])
def test_forward_copies_weights_only_for_large_gemms_or_unreadable_layouts(kernel, large, monkeypatch):
    # A small GEMM reads weights contiguous along the input channels in place
    # (a 1x1 weight is, in either layout; an NCHW 3x3 one is not); a large one
    # copies them into one matrix (IN_PLACE_WEIGHT_MAX_ROWS and _OUTPUTS = 0
    # make this one large): one op for both weights, and still one launch.
    from fused_preact.dispatch_count import DispatchCounter
    from fused_preact.triton_kernels import conv_forward as cf

    if large:
        monkeypatch.setattr(cf, "IN_PLACE_WEIGHT_MAX_ROWS", 0)
        monkeypatch.setattr(cf, "IN_PLACE_WEIGHT_MAX_OUTPUTS", 0)
    x = torch.randn(2, 8, 6, 6, device=DEVICE).contiguous(memory_format=torch.channels_last)
    ones, zeros = torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE)
    # Weights that require grad, as a model's do: the copy stays outside autograd.
    weights = [torch.randn(12, 8, kernel, kernel, device=DEVICE, requires_grad=True),
               torch.randn(4, 8, kernel, kernel, device=DEVICE, requires_grad=True)]
    with DispatchCounter() as counter:
        outs, _ = cf.conv_forward(x, ones, zeros, weights, 1, kernel // 2)
    copies = sum(counter.ops[op] for op in ("clone", "copy_", "cat", "_to_copy"))
    assert copies == (1 if large or kernel == 3 else 0)
    assert sum(counter.triton.values()) == 1
    for out, w in zip(outs, weights):
        assert_close(out, F.conv2d(x.relu(), w.detach(), None, 1, kernel // 2), torch.float32, "out")


def test_a_small_net_step_merges_statistics_in_the_convs():
    # PreActResNet-11 at 8x8: every layer's input has few statistics partials,
    # so its conv merges them (no merge launch), and the step dispatches at
    # most 0.75x eager nn's ATen ops + Triton launches.
    from fused_preact.dispatch_count import count_step

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, device=DEVICE).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (2,), device=DEVICE)
    counts = {name: count_step(PreActResNet(11, **options).to(DEVICE, memory_format=torch.channels_last), x, labels)
              for name, options in (("eager", dict(fused=False)), ("triton", dict(backend="triton")))}
    assert "_merge_partials_kernel" not in counts["triton"].triton
    assert counts["triton"].total <= 0.75 * counts["eager"].total


def test_statistics_deferred_for_a_forward_that_never_came_are_merged():
    # deferred_batch_norm_stats leaves the statistics to the next forward;
    # if that forward is of other statistics, the left ones get their merge
    # launch then, and are the formula's.
    from fused_preact.ops.backends import Conv, get_backend

    backend = get_backend("triton")
    x1, x2 = (torch.randn(2, 6, 5, 5, device=DEVICE).contiguous(memory_format=torch.channels_last) * 2 + 1
              for _ in range(2))
    gamma, beta = torch.rand(6, device=DEVICE) + 0.5, torch.randn(6, device=DEVICE)
    left = backend.deferred_batch_norm_stats(x1, gamma, beta, None, None, None, 0.1, 1e-5)
    taken = backend.deferred_batch_norm_stats(x2, gamma, beta, None, None, None, 0.1, 1e-5)
    w = torch.randn(4, 6, 1, 1, device=DEVICE)
    backend.forward(x1, left[2], left[3], [Conv(w, (1, 1), (0, 0))])
    for stats, x in ((left, x1), (taken, x2)):
        var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
        invstd = 1 / torch.sqrt(var + 1e-5)
        for name, got, want in zip(("mean", "invstd", "scale", "shift"), stats,
                                   (mean, invstd, gamma * invstd, beta - mean * gamma * invstd)):
            assert_close(got, want, torch.float32, name, scale=10)


def test_partial_sums_of_several_buffers_share_launches():
    # A layer's weight gradients and dgrad sum their partials together: one
    # launch for up to three buffers of any shapes and output dtypes, both
    # reduction levels included, each summed as it would be alone; one fp32
    # row is a view.
    from fused_preact.dispatch_count import DispatchCounter
    from fused_preact.triton_kernels.row_sums import Partials, sum_partials

    g = torch.Generator().manual_seed(0)
    shapes = [((1, 5), torch.float32), ((9, 70), torch.float16), ((37, 3), torch.float32), ((5, 130), torch.float32),
              ((2, 4), torch.float32)]
    buffers = [torch.randn(*shape, generator=g).to(DEVICE) for shape, _ in shapes]
    jobs = [Partials(b, dtype, lambda total, i=i: (i, total)) for i, (b, (_, dtype)) in enumerate(zip(buffers, shapes))]
    with DispatchCounter() as counter:
        results = sum_partials(jobs)
    # 4 buffers to launch: 3 (two of them with two levels) then 1 (one level)
    assert sum(counter.triton.values()) == 2, counter.triton
    assert [i for i, _ in results] == list(range(len(jobs)))  # each job's own finish, in order
    assert results[0][1].data_ptr() == buffers[0].data_ptr()  # the single row, not copied
    for (_, total), b, (_, dtype) in zip(results, buffers, shapes):
        assert total.dtype == dtype
        assert torch.equal(total, _sum_alone(b, dtype))
        assert_close(total, b.double().sum(0), dtype, "sum")
