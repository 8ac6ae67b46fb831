"""Caffe's momentum SGD (the paper preset's) against sequences computed by
hand, and against PyTorch's form, which it equals at a constant rate; the
PyTorch form against torch.optim.SGD; both with the rate as a device tensor
(the form --cuda-graphs captures) against a float rate, bit for bit, and
without a read of the device from the host."""
import pytest
import torch

from fused_preact.dispatch_count import DispatchCounter
from fused_preact.train.config import ConfigError, resolve
from fused_preact.train.optim import CaffeSGD, PyTorchSGD, capturable_lr, make_optimizer, set_lr


def _run(optimizer_cls, lrs, weight_decay=0.0, **options):
    """w after each step of loss = w (gradient 1) from w = 1, at the given rates."""
    w = torch.nn.Parameter(torch.ones((), dtype=torch.float64))
    opt = optimizer_cls([w], lr=lrs[0], momentum=0.9, weight_decay=weight_decay, **options)
    trace = []
    for lr in lrs:
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        w.backward(torch.ones((), dtype=torch.float64))
        opt.step()
        trace.append(w.item())
    return trace


LRS = [0.01, 0.01, 0.1, 0.1]  # a x10 change after two steps, as after the paper's warm-up


def test_caffe_form_folds_the_rate_into_the_velocity():
    # v = 0.9 v + lr * 1; w -= v:  v = 0.01, 0.019, 0.1171, 0.20539
    assert _run(CaffeSGD, LRS) == pytest.approx([0.99, 0.971, 0.8539, 0.64851], abs=1e-12)


@pytest.mark.parametrize("form", [PyTorchSGD, torch.optim.SGD])
def test_pytorch_form_applies_the_new_rate_to_the_whole_velocity(form):
    # v = 0.9 v + 1; w -= lr * v:  v = 1, 1.9, 2.71, 3.439
    assert _run(form, LRS) == pytest.approx([0.99, 0.971, 0.7, 0.3561], abs=1e-12)


@pytest.mark.parametrize("nesterov", [False, True])
def test_pytorch_form_is_torchs_sgd_up_to_rounding(nesterov):
    lrs = [0.01, 0.1, 0.1, 0.01, 0.01]
    ours = _run(PyTorchSGD, lrs, weight_decay=1e-2, nesterov=nesterov)
    assert ours == pytest.approx(_run(torch.optim.SGD, lrs, weight_decay=1e-2, nesterov=nesterov), abs=1e-14)


def test_weight_decay_enters_before_the_rate():
    # g + wd * w with wd 0.5: v = 0.1 * 1.5 = 0.15 -> w 0.85; v = 0.9 * 0.15 + 0.1 * 1.425 = 0.2775 -> w 0.5725
    assert _run(CaffeSGD, [0.1, 0.1], weight_decay=0.5) == pytest.approx([0.85, 0.5725], abs=1e-12)


def test_both_forms_agree_at_a_constant_rate():
    lrs = [0.1] * 6
    assert _run(CaffeSGD, lrs, weight_decay=1e-2) == pytest.approx(_run(PyTorchSGD, lrs, weight_decay=1e-2),
                                                                   abs=1e-12)


def test_presets_pick_their_recipes_form():
    assert isinstance(make_optimizer(resolve("paper", {}), [torch.nn.Parameter(torch.ones(1))]), CaffeSGD)
    official = make_optimizer(resolve("torch-official", {}), [torch.nn.Parameter(torch.ones(1))])
    assert type(official) is PyTorchSGD and official.defaults["nesterov"]
    assert type(make_optimizer(resolve("paper", {"sgd": "pytorch"}), [torch.nn.Parameter(torch.ones(1))])) \
        is PyTorchSGD
    with pytest.raises(ConfigError, match="--nesterov needs --sgd pytorch"):
        resolve("paper", {"nesterov": True})
    with pytest.raises(ValueError, match="momentum"):
        CaffeSGD([torch.nn.Parameter(torch.ones(1))], lr=0.1, momentum=1.0)


# (optimizer class, options): both forms, with and without weight decay and Nesterov momentum
FORMS = [(CaffeSGD, dict(momentum=0.9, weight_decay=1e-4)), (CaffeSGD, dict(momentum=0.0)),
         (PyTorchSGD, dict(momentum=0.9, weight_decay=1e-4)), (PyTorchSGD, dict(momentum=0.9, nesterov=True)),
         (PyTorchSGD, dict(momentum=0.0, weight_decay=5e-4))]
FORM_IDS = ["caffe", "caffe-no-momentum", "pytorch", "pytorch-nesterov", "pytorch-plain"]
SCHEDULE = [0.02, 0.02, 0.1, 0.1, 0.01]  # two rate changes, one of them x5 up


def _float32_params():
    g = torch.Generator().manual_seed(3)
    conv = torch.randn(8, 4, 3, 3, generator=g).contiguous(memory_format=torch.channels_last)
    return [torch.nn.Parameter(t) for t in (conv, torch.randn(8, generator=g), torch.randn(10, 8, generator=g))]


def _trajectory(form, options, capturable: bool):
    """Parameters and optimizer state after each step of SCHEDULE with fixed
    random gradients; the rate set per step as the trainer does (set_lr),
    a float or (capturable) a 0-dim tensor changed in place."""
    params = _float32_params()
    opt = form(params, lr=SCHEDULE[0], **options)
    if capturable:
        capturable_lr(opt)
        rate = opt.param_groups[0]["lr"]
        assert isinstance(rate, torch.Tensor) and rate.dtype == torch.float32
    g = torch.Generator().manual_seed(4)
    trace = []
    for lr in SCHEDULE:
        set_lr(opt, lr)
        if capturable:
            assert opt.param_groups[0]["lr"] is rate  # in place: a captured step holds this tensor
        for p in params:
            p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=g))  # in the parameter's layout
        opt.step()
        trace.append([p.detach().clone() for p in params]
                     + [t.clone() for s in opt.state.values() for t in s.values()])
    return trace


def _bits(t):
    return t.view(torch.int32)  # -0.0 and 0.0 differ here


@pytest.mark.parametrize("form, options", FORMS, ids=FORM_IDS)
def test_a_tensor_rate_gives_the_float_rates_bits(form, options):
    ordinary, capturable = _trajectory(form, options, False), _trajectory(form, options, True)
    for step, (want, got) in enumerate(zip(ordinary, capturable)):
        assert len(want) == len(got)
        for i, (a, b) in enumerate(zip(want, got)):
            assert torch.equal(_bits(a), _bits(b)), f"step {step} (lr {SCHEDULE[step]}), tensor {i}"


@pytest.mark.parametrize("form, options", FORMS, ids=FORM_IDS)
def test_the_capturable_step_never_reads_the_device(form, options):
    params = _float32_params()
    opt = form(params, lr=0.1, **options)
    capturable_lr(opt)
    opt.init_state()  # as before a capture: the step recorded is the ordinary one
    for p in params:
        p.grad = torch.ones_like(p)
    with DispatchCounter() as counter:
        set_lr(opt, 0.05)
        opt.step()
    assert counter.syncs == [], counter.syncs
    assert counter.total > 0


@pytest.mark.parametrize("form, options", FORMS, ids=FORM_IDS)
def test_init_state_gives_the_first_step_its_usual_result(form, options):
    results = []
    for early in (False, True):
        params = _float32_params()
        opt = form(params, lr=0.1, **options)
        if early:
            opt.init_state()
            assert len(opt.state) == (len(params) if form is CaffeSGD or options["momentum"] else 0)
        for p in params:
            p.grad = torch.full_like(p, 0.5)
        opt.step()
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        assert torch.equal(a, b)
