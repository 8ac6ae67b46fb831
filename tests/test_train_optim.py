"""Caffe's momentum SGD (the paper preset's) against sequences computed by
hand, and against PyTorch's form, which it equals at a constant rate."""
import pytest
import torch

from fused_preact.train.config import ConfigError, resolve
from fused_preact.train.optim import CaffeSGD, make_optimizer


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


def test_pytorch_form_applies_the_new_rate_to_the_whole_velocity():
    # v = 0.9 v + 1; w -= lr * v:  v = 1, 1.9, 2.71, 3.439
    assert _run(torch.optim.SGD, LRS) == pytest.approx([0.99, 0.971, 0.7, 0.3561], abs=1e-12)


def test_weight_decay_enters_before_the_rate():
    # g + wd * w with wd 0.5: v = 0.1 * 1.5 = 0.15 -> w 0.85; v = 0.9 * 0.15 + 0.1 * 1.425 = 0.2775 -> w 0.5725
    assert _run(CaffeSGD, [0.1, 0.1], weight_decay=0.5) == pytest.approx([0.85, 0.5725], abs=1e-12)


def test_both_forms_agree_at_a_constant_rate():
    lrs = [0.1] * 6
    assert _run(CaffeSGD, lrs, weight_decay=1e-2) == pytest.approx(_run(torch.optim.SGD, lrs, weight_decay=1e-2),
                                                                   abs=1e-12)


def test_presets_pick_their_recipes_form():
    assert isinstance(make_optimizer(resolve("paper", {}), [torch.nn.Parameter(torch.ones(1))]), CaffeSGD)
    official = make_optimizer(resolve("torch-official", {}), [torch.nn.Parameter(torch.ones(1))])
    assert type(official) is torch.optim.SGD and official.defaults["nesterov"]
    assert type(make_optimizer(resolve("paper", {"sgd": "pytorch"}), [torch.nn.Parameter(torch.ones(1))])) \
        is torch.optim.SGD
    with pytest.raises(ConfigError, match="--nesterov needs --sgd pytorch"):
        resolve("paper", {"nesterov": True})
    with pytest.raises(ValueError, match="momentum"):
        CaffeSGD([torch.nn.Parameter(torch.ones(1))], lr=0.1, momentum=1.0)
