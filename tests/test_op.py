"""bn_relu_conv2d (and its two-conv form) against BatchNorm2d -> ReLU -> Conv2d."""
import contextlib

import pytest
import torch

from conftest import BACKENDS, assert_close, make_layout
from fused_preact import reference
from fused_preact.ops import bn_relu_conv2d
from fused_preact.dispatch_count import DispatchCounter
from fused_preact.ops.bn_relu_conv import bn_relu_conv2d_op
from fused_preact.ops.recompute_state import keep_activations

# (N, C, H, W, C_out, kernel, stride, padding)
CASES = [
    (3, 5, 7, 9, 6, 3, 1, 1),
    (3, 5, 7, 9, 6, 3, 2, 1),
    (2, 1, 5, 5, 3, 1, 1, 0),
    (2, 3, 6, 5, 4, 1, 2, 0),
    (4, 16, 8, 8, 16, 3, 1, 1),
]


def _problem(case, dtype, layout="nchw", requires_grad=True, device="cpu"):
    n, c, h, w, c_out, k, stride, padding = case
    x = make_layout((torch.randn(n, c, h, w, dtype=torch.float64) * 1.5 + 0.3).to(device, dtype), layout)
    weight = torch.randn(c_out, c, k, k, dtype=torch.float64).mul_((2.0 / (k * k * c_out)) ** 0.5).to(device, dtype)
    gamma = (torch.rand(c, dtype=torch.float64) + 0.5).to(device, torch.promote_types(dtype, torch.float32))
    beta = torch.randn(c, dtype=torch.float64).to(gamma)
    running = (torch.randn(c, dtype=gamma.dtype).to(device), (torch.rand(c, dtype=gamma.dtype) + 0.5).to(device))
    for t in (x, weight, gamma, beta):
        t.requires_grad_(requires_grad)
    return x, weight, gamma, beta, running, dict(stride=stride, padding=padding)


def _run(fn, x, weight, gamma, beta, running, conv, training, grad_seed=1):
    rm, rv = running[0].clone(), running[1].clone()
    y = fn(x, weight, gamma, beta, rm, rv, training=training, **conv)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64).to(y)
    grads = torch.autograd.grad(y, (x, weight, gamma, beta), g)
    return y, grads, rm, rv


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("case", CASES[:4])
def test_gradcheck_float64(backend, training, case):
    x, weight, gamma, beta, running, conv = _problem(case, torch.float64)

    def f(x, weight, gamma, beta):
        return bn_relu_conv2d(x, weight, gamma, beta, running[0].clone(), running[1].clone(), training=training,
                              backend=backend, **conv)

    assert torch.autograd.gradcheck(f, (x, weight, gamma, beta))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_matches_nn_modules(backend, dtype, layout, training, case):
    x, weight, gamma, beta, running, conv = _problem(case, dtype, layout)
    fused = _run(lambda *a, **k: bn_relu_conv2d(*a, backend=backend, **k), x, weight, gamma, beta, running, conv,
                 training)
    x64, w64, g64, b64 = (t.detach().double().requires_grad_() for t in (x, weight, gamma, beta))
    truth = _run(reference.bn_relu_conv2d_eager, x64, w64, g64, b64, (running[0].double(), running[1].double()),
                 conv, training)
    (y, grads, rm, rv), (ty, tgrads, trm, trv) = fused, truth
    assert y.dtype == dtype and y.shape == ty.shape
    m = x.numel() // x.shape[1]
    assert_close(y, ty, dtype, "y", scale=3)
    for name, got, want in zip(("dx", "dW", "dgamma", "dbeta"), grads, tgrads):
        assert_close(got, want, dtype, name, scale=3 if name == "dx" else m ** 0.5)
    assert_close(rm, trm, dtype, "running_mean")
    assert_close(rv, trv, dtype, "running_var")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_float64_truth(backend, dtype):
    x, weight, gamma, beta, running, conv = _problem(CASES[0], dtype)
    y, grads, _, _ = _run(lambda *a, **k: bn_relu_conv2d(*a, backend=backend, **k), x, weight, gamma, beta,
                          running, conv, True)
    x64, w64, g64, b64 = (t.detach().double().requires_grad_() for t in (x, weight, gamma, beta))
    ty, tgrads, _, _ = _run(reference.bn_relu_conv2d_eager, x64, w64, g64, b64,
                            (running[0].double(), running[1].double()), conv, True)
    assert y.dtype == dtype and grads[2].dtype == torch.float32
    assert_close(y, ty, dtype, "y", scale=float(ty.detach().abs().max()))
    for name, got, want in zip(("dx", "dW", "dgamma", "dbeta"), grads, tgrads):
        assert_close(got, want, dtype, name, scale=float(want.detach().abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel, padding", [(1, 0), (3, 1)])
def test_with_shortcut_equals_two_modules(backend, kernel, padding):
    x, weight, gamma, beta, running, _ = _problem((3, 5, 7, 9, 6, kernel, 2, padding), torch.float64)
    shortcut = torch.randn(8, 5, 1, 1, dtype=torch.float64, requires_grad=True)
    rm, rv = running[0].clone(), running[1].clone()
    y, sc = bn_relu_conv2d(x, weight, gamma, beta, rm, rv, stride=2, padding=padding, backend=backend,
                           shortcut_weight=shortcut)
    a = torch.relu(torch.nn.functional.batch_norm(x, running[0].clone(), running[1].clone(), gamma, beta, True))
    ty = torch.nn.functional.conv2d(a, weight, None, 2, padding)
    tsc = torch.nn.functional.conv2d(a, shortcut, None, 2, 0)
    assert_close(y, ty, name="y")
    assert_close(sc, tsc, name="shortcut")
    inputs = (x, weight, shortcut, gamma, beta)
    got = torch.autograd.grad((y.sum(), (sc * sc).sum()), inputs)
    want = torch.autograd.grad((ty.sum(), (tsc * tsc).sum()), inputs)
    for name, g, w in zip(("dx", "dW", "dW_shortcut", "dgamma", "dbeta"), got, want):
        assert_close(g, w, name=name)
    # running statistics are updated once, not once per convolution
    assert_close(rm, 0.9 * running[0] + 0.1 * x.detach().mean(dim=(0, 2, 3)), name="running_mean")
    assert_close(rv, 0.9 * running[1] + 0.1 * x.detach().var(dim=(0, 2, 3), unbiased=True), name="running_var")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keep", [False, True])
def test_an_unused_output_costs_no_conv_backward(backend, keep):
    # Only y carries a gradient: the shortcut's conv backward is skipped (its
    # gradient stays None rather than zeros), and the gradients are the
    # formula's, with relu(bn(x)) recomputed or kept (keep_activations).
    x, weight, gamma, beta, running, _ = _problem((3, 5, 7, 9, 6, 3, 1, 1), torch.float64)
    shortcut = torch.randn(8, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    with keep_activations() if keep else contextlib.nullcontext():
        y, _ = bn_relu_conv2d(x, weight, gamma, beta, running[0].clone(), running[1].clone(), padding=1,
                              backend=backend, shortcut_weight=shortcut)
    g = torch.randn_like(y)
    with DispatchCounter() as counter:
        got = torch.autograd.grad(y, (x, weight, gamma, beta, shortcut), g, allow_unused=True)
    assert counter.ops["convolution_backward"] == 1
    assert got[4] is None
    xhat = (x - x.mean((0, 2, 3), keepdim=True)) / torch.sqrt(x.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    activation = torch.relu(xhat * gamma[:, None, None] + beta[:, None, None])
    truth = torch.nn.functional.conv2d(activation, weight, None, 1, 1)
    expected = torch.autograd.grad(truth, (x, weight, gamma, beta), g)
    for name, a, b in zip(("dx", "dW", "dgamma", "dbeta"), got, expected):
        assert_close(a, b, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_is_added_and_receives_the_output_gradient(backend):
    x, weight, gamma, beta, _, conv = _problem(CASES[1], torch.float64)
    plain = bn_relu_conv2d(x, weight, gamma, beta, None, None, backend=backend, **conv)
    residual = torch.randn(plain.shape, dtype=torch.float64, requires_grad=True)
    y = bn_relu_conv2d(x, weight, gamma, beta, None, None, backend=backend, residual=residual, **conv)
    assert_close(y, plain + residual, name="y")
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (residual, x, weight), g)
    assert torch.equal(got[0], g)
    for name, a, b in zip(("dx", "dW"), got[1:], torch.autograd.grad(plain, (x, weight), g)):
        assert_close(a, b, name=name)


def test_native_eager_layer_is_one_cpp_autograd_node():
    # Eager mode runs the native backend's layer as one C++ autograd function
    # (no Python in its forward or backward); the other backends do not.
    x, weight, gamma, beta, running, conv = _problem(CASES[0], torch.float32)
    y = bn_relu_conv2d(x, weight, gamma, beta, *running, backend="native", **conv)
    assert "BnReluConv" in y.grad_fn.name()
    y = bn_relu_conv2d(x, weight, gamma, beta, *running, backend="reference", **conv)
    assert "BnReluConv" not in y.grad_fn.name()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trainable", [("x",), ("weight",), ("gamma", "beta"), ("x", "weight")])
def test_gradients_of_a_subset_of_inputs(backend, trainable):
    x, weight, gamma, beta, running, conv = _problem(CASES[1], torch.float64, requires_grad=False)
    named = dict(x=x, weight=weight, gamma=gamma, beta=beta)
    wanted = [named[n].requires_grad_() for n in trainable]
    y = bn_relu_conv2d(x, weight, gamma, beta, running[0].clone(), running[1].clone(), backend=backend, **conv)
    truth = reference.bn_relu_conv2d_eager(x, weight, gamma, beta, running[0].clone(), running[1].clone(), **conv)
    g = torch.randn_like(y)
    for name, got, want in zip(trainable, torch.autograd.grad(y, wanted, g), torch.autograd.grad(truth, wanted, g)):
        assert_close(got, want, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_keeps_only_input_statistics_and_parameters(backend):
    x, weight, gamma, beta, running, conv = _problem(CASES[1], torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        bn_relu_conv2d(x, weight, gamma, beta, *running, backend=backend, **conv)
    params = {t.untyped_storage().data_ptr() for t in (x, weight, gamma, beta)}
    others = [t for t in saved if t.untyped_storage().data_ptr() not in params]
    assert sorted(tuple(t.shape) for t in others) == [(x.shape[1],)] * 4  # mean, invstd and the fold scale, shift
    assert all(t.dtype == torch.float32 for t in others)


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_on_cpu_hooks_see_everything_kept(backend):
    x, weight, gamma, beta, running, conv = _problem(CASES[0], torch.float64)
    expected = _run(lambda *a, **k: bn_relu_conv2d(*a, backend=backend, **k), x, weight, gamma, beta, running,
                    conv, True)[1]
    unpacked = []

    def pack(t):
        return t.clone()  # backward must only ever see what went through the hooks

    def unpack(t):
        unpacked.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        y = bn_relu_conv2d(x, weight, gamma, beta, running[0].clone(), running[1].clone(), backend=backend, **conv)
    with torch.no_grad():  # a backward that read anything but the packed copies would now see NaN
        for t in (x, weight, gamma, beta):
            t.fill_(float("nan"))
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = torch.autograd.grad(y, (x, weight, gamma, beta), g)
    assert len(unpacked) >= 4
    for a, b in zip(got, expected):
        assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x, weight, gamma, beta, running, conv = _problem(CASES[1], torch.float32)
    stats = reference.batch_norm_stats(x.detach(), gamma.detach(), beta.detach(), None, None, None, 0.1, 1e-5)
    for training in (True, False):
        torch.library.opcheck(bn_relu_conv2d_op, (x, [weight], gamma, beta, *stats, None, [2, 2], [1, 1], [1, 1],
                                                  [1], training, backend, None))
    shortcut = torch.randn(4, x.shape[1], 1, 1, requires_grad=True)
    y = torch.nn.functional.conv2d(x.detach(), weight.detach(), None, 2, 1)
    residual = torch.randn(y.shape, requires_grad=True)
    torch.library.opcheck(bn_relu_conv2d_op,
                          (x, [weight, shortcut], gamma, beta, *stats, residual, [2, 2, 2, 2], [1, 1, 0, 0],
                           [1, 1, 1, 1], [1, 1], True, backend, 1e-3))
    # dilated, and depthwise (groups = channels)
    depthwise = torch.randn(x.shape[1], 1, 3, 3, requires_grad=True)
    torch.library.opcheck(bn_relu_conv2d_op, (x, [weight, depthwise], gamma, beta, *stats, None, [1, 1, 1, 1],
                                              [2, 2, 1, 1], [2, 2, 1, 1], [1, x.shape[1]], True, backend, None))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    x, weight, gamma, beta, running, conv = _problem(CASES[0], torch.float32)
    eager = _run(lambda *a, **k: bn_relu_conv2d(*a, backend=backend, **k), x, weight, gamma, beta, running, conv,
                 True)
    compiled = torch.compile(lambda *a, **k: bn_relu_conv2d(*a, backend=backend, **k), fullgraph=True,
                             backend="aot_eager")
    got = _run(compiled, x, weight, gamma, beta, running, conv, True)
    assert_close(got[0], eager[0], name="y")
    for a, b in zip(got[1], eager[1]):
        assert_close(a, b)
    assert_close(got[2], eager[2], name="running_mean")


def test_autocast_matches_eager_autocast():
    x, weight, gamma, beta, running, conv = _problem(CASES[0], torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bn_relu_conv2d(x, weight, gamma, beta, running[0].clone(), running[1].clone(), **conv)
        want = reference.bn_relu_conv2d_eager(x, weight, gamma, beta, running[0].clone(), running[1].clone(), **conv)
    assert y.dtype == want.dtype == torch.bfloat16
    assert_close(y, want, torch.bfloat16, "y", scale=float(want.detach().abs().max()))
    got_grads = torch.autograd.grad(y.float().sum(), (weight, gamma))
    want_grads = torch.autograd.grad(want.float().sum(), (weight, gamma))
    for name, got, expected in zip(("dW", "dgamma"), got_grads, want_grads):
        assert got.dtype == torch.float32
        assert_close(got, expected, torch.bfloat16, name, scale=float(expected.detach().abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dilation, groups", [(2, 1), (1, 5), ((2, 3), 5)], ids=["dilated", "depthwise",
                                                                                 "dilated-depthwise"])
def test_dilated_and_grouped_convs_match_nn_modules(backend, training, dilation, groups):
    x, _, gamma, beta, running, _ = _problem(CASES[0], torch.float64)  # 5 channels
    weight = (torch.randn(10, 5 // groups, 3, 3, dtype=torch.float64) / 3).requires_grad_()
    conv = dict(stride=1, padding=2, dilation=dilation, groups=groups)

    def fused(x, weight, gamma, beta, rm, rv, training, **conv):
        return bn_relu_conv2d(x, weight, gamma, beta, rm, rv, training=training, backend=backend, **conv)

    def plain(x, weight, gamma, beta, rm, rv, training, stride, padding, dilation, groups):
        a = torch.relu(torch.nn.functional.batch_norm(x, rm, rv, gamma, beta, training, 0.1, 1e-5))
        return torch.nn.functional.conv2d(a, weight, None, stride, padding, dilation, groups)

    got, want = (_run(fn, x, weight, gamma, beta, running, conv, training) for fn in (fused, plain))
    for name, a, b in zip(["y", "dx", "dW", "dgamma", "dbeta"], [got[0], *got[1]], [want[0], *want[1]]):
        assert_close(a.detach(), b.detach(), torch.float64, name, scale=float(b.detach().abs().max()) + 1)
    for a, b in zip(got[2:], want[2:]):
        assert_close(a, b, torch.float64, "running statistics")


def test_track_running_stats_off_uses_batch_statistics():
    x, weight, gamma, beta, _, conv = _problem(CASES[0], torch.float64)
    y = bn_relu_conv2d(x, weight, gamma, beta, None, None, **conv)
    truth = reference.bn_relu_conv2d_eager(x, weight, gamma, beta, None, None, training=True, **conv)
    assert_close(y, truth)
    inputs = (x, weight, gamma, beta)
    for name, got, want in zip(("dx", "dW", "dgamma", "dbeta"), torch.autograd.grad(y.sum(), inputs),
                               torch.autograd.grad(truth.sum(), inputs)):
        assert_close(got, want, name=name)


def _args(**override):
    x, weight, gamma, beta, running, _ = _problem(CASES[0], torch.float32, requires_grad=False)
    args = dict(x=x, conv_weight=weight, bn_weight=gamma, bn_bias=beta, running_mean=running[0],
                running_var=running[1])
    args.update(override)
    return args


@pytest.mark.parametrize(
    "override, error, message",
    [
        (dict(x=torch.randn(3, 5, 7)), ValueError, "x must be a 4-D"),
        (dict(x=torch.randint(0, 9, (3, 5, 7, 9))), TypeError, "x must be float32"),
        (dict(conv_weight=torch.randn(6, 4, 3, 3)), ValueError, "conv_weight must be a 4-D .* 5 channels"),
        (dict(conv_weight=torch.randn(6, 5, 3, 3, dtype=torch.float64)), TypeError, "conv_weight must have x's dtype"),
        (dict(bn_weight=torch.ones(4)), ValueError, r"bn_weight must have shape \(5,\)"),
        (dict(running_var=torch.ones(6)), ValueError, r"running_var must have shape \(5,\)"),
        (dict(running_mean=None), ValueError, "running_mean and running_var must be given together"),
        (dict(running_mean=None, running_var=None, training=False), ValueError, "eval mode .* needs running_mean"),
        (dict(x=torch.randn(1, 5, 1, 1), conv_weight=torch.randn(6, 5, 1, 1)), ValueError,
         "more than one value per channel"),
        (dict(bn_bias=torch.zeros(5, device="meta")), ValueError, "bn_bias must be on x's device"),
        (dict(stride=0), ValueError, "stride must be an int >= 1"),
        (dict(padding=(1, 2, 3)), ValueError, "padding must be an int >= 0 or a pair"),
        (dict(momentum=1.5), ValueError, "momentum must be a number in"),
        (dict(momentum=None), ValueError, "momentum must be a number in"),
        (dict(eps=0.0), ValueError, "eps must be a positive number"),
        (dict(eps=True), ValueError, "eps must be a positive number, got True"),
        (dict(momentum=True), ValueError, "momentum must be a number in"),
        (dict(stride=2.0), ValueError, "stride must be an int >= 1 or a pair of them, got 2.0"),
        (dict(padding=(1, 1.0)), ValueError, "padding must be an int >= 0 or a pair"),
        (dict(training="yes"), TypeError, "training must be True or False"),
        (dict(running_mean=torch.zeros(5, dtype=torch.int64)), TypeError,
         "running_mean must be a floating-point tensor, got torch.int64"),
        (dict(backend="cudnn"), ValueError, "backend must be one of"),
        # the output of _args() (3x3 conv, no padding) is (3, 6, 5, 7)
        (dict(residual=torch.randn(3, 5, 7, 9)), ValueError, r"residual must be a tensor of the output's shape "
                                                             r"\(3, 6, 5, 7\), got \(3, 5, 7, 9\)"),
        (dict(residual=[0.0]), ValueError, r"residual must be a tensor of the output's shape .* got list"),
        (dict(residual=torch.zeros(3, 6, 5, 7, dtype=torch.int64)), ValueError,
         "residual must be a floating-point tensor"),
        (dict(residual=torch.zeros(3, 6, 5, 7, device="meta")), ValueError, "residual must be .* on x's device"),
    ],
)
def test_bad_input_names_the_argument(override, error, message):
    with pytest.raises(error, match=message):
        bn_relu_conv2d(**_args(**override))


@pytest.mark.parametrize("backend", ["auto", "reference", "native"])
def test_meta_input_gives_the_output_shape_alone(backend):
    # What fused_preact.host_cost runs eager parts on: shapes, no data.
    meta = dict(x=torch.randn(3, 5, 7, 9, device="meta"), conv_weight=torch.randn(6, 5, 3, 3, device="meta"),
                bn_weight=None, bn_bias=None, running_mean=None, running_var=None)
    y = bn_relu_conv2d(**_args(**meta), backend=backend)
    assert y.device.type == "meta" and tuple(y.shape) == (3, 6, 5, 7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("training", [True, False])
def test_cuda_native_matches_nn_modules(dtype, layout, training, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # compare fp32 at fp32 tolerance
    x, weight, gamma, beta, running, conv = _problem(CASES[1], dtype, requires_grad=False)
    on_gpu = [make_layout(x.cuda(), layout), *(t.cuda() for t in (weight, gamma, beta))]
    for t in on_gpu:
        t.requires_grad_()
    y, grads, rm, rv = _run(lambda *a, **k: bn_relu_conv2d(*a, backend="native", **k), *on_gpu,
                            tuple(t.cuda() for t in running), conv, training)
    truth = _run(reference.bn_relu_conv2d_eager,
                 *(t.detach().double().requires_grad_() for t in (x, weight, gamma, beta)),
                 tuple(t.double() for t in running), conv, training)
    assert_close(y.cpu(), truth[0], dtype, "y", scale=float(truth[0].detach().abs().max()))
    for name, got, want in zip(("dx", "dW", "dgamma", "dbeta"), grads, truth[1]):
        assert_close(got.cpu(), want, dtype, name, scale=float(want.detach().abs().max()))
    assert_close(rm.cpu(), truth[2], dtype, "running_mean")
    assert_close(rv.cpu(), truth[3], dtype, "running_var")
