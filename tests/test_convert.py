"""fused_preact.convert on networks nobody here wrote (torchvision, timm,
pytorchcv, a functional Wide ResNet block in its authors' style), against the
unconverted model with the same weights in float64: outputs, every gradient
and the running statistics after two SGD steps, train/eval switching, the
state dict both ways, and the chains it must leave alone."""
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_close
from fused_preact import convert
from fused_preact.memory import saved_activation_bytes

torchvision = pytest.importorskip("torchvision", reason="a test dependency: pip install -r requirements-test.txt")
timm = pytest.importorskip("timm", reason="a test dependency: pip install -r requirements-test.txt")
pytorchcv = pytest.importorskip("pytorchcv.model_provider", reason="a test dependency: pip install -r "
                                "requirements-test.txt")

# after the importorskips:
from convert_peers import PEERS, assert_same_training, saved_or_copied, two_sgd_steps  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("name", PEERS)
def test_converted_peers_train_as_the_original(name, backend):
    make, shape, line = PEERS[name]
    torch.manual_seed(0)
    original = make().double()
    twin = copy.deepcopy(original)
    converted = convert(twin, backend=backend)
    assert str(converted.fused_preact_report) == line
    assert_same_training(original, converted, shape, torch.float64, list(original.named_parameters()))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available(),
                    reason="the Triton backend needs TRITON_INTERPRET=1 or a GPU")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available(),
                    reason="the Triton backend needs TRITON_INTERPRET=1 or a GPU")
def test_a_dilated_or_grouped_chain_falls_back_from_triton_alone():
    # Triton runs undilated, ungrouped convs: that chain takes another
    # backend, the plain chain beside it stays on Triton.
    from fused_preact.dispatch_count import DispatchCounter

    torch.manual_seed(0)
    model = nn.Sequential(Chain(conv=nn.Conv2d(4, 4, 3, padding=2, dilation=2, bias=False)),
                          Chain(conv=nn.Conv2d(4, 6, 3, padding=1, bias=False))).to(memory_format=torch.channels_last)
    converted = convert(copy.deepcopy(model), backend="triton")
    assert str(converted.fused_preact_report) == "fused 2 of 2 chains"
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    with DispatchCounter() as counter:
        out = converted(x)
    assert counter.triton["_conv_fwd_kernel"] == 1, counter.triton  # the plain chain's conv only
    with torch.no_grad():
        want = model(x)
    assert_close(out, want, torch.float32, "output", scale=float(want.abs().max()))


@pytest.mark.parametrize("name", ["torchvision DenseNet", "functional_wrn_block"])
def test_converted_peers_train_on_the_triton_backend(name):
    # Small peers (the interpreter's cost is per program): torchvision's own
    # DenseNet class at a few channels, and the functional block; fp32.
    make, shape = {"torchvision DenseNet": (
        lambda: torchvision.models.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2,
                                            num_classes=5), (2, 3, 16, 16)),
        "functional_wrn_block": PEERS["functional_wrn_block"][:2]}[name]
    torch.manual_seed(0)
    original = make().to(memory_format=torch.channels_last)
    converted = convert(copy.deepcopy(original), backend="triton")
    assert not converted.fused_preact_report.left or name == "torchvision DenseNet"
    assert_same_training(original, converted, shape, torch.float32, list(original.named_parameters()))


def test_the_state_dict_is_the_originals_and_loads_both_ways():
    make, shape, _ = PEERS["densenet121"]
    original = make()
    converted = convert(original)
    state = original.state_dict()
    assert list(converted.state_dict()) == list(state)
    assert all(converted.state_dict()[k].data_ptr() == v.data_ptr() for k, v in state.items())  # shared
    other = make()
    converted.load_state_dict(other.state_dict())
    assert all(torch.equal(original.state_dict()[k], v) for k, v in other.state_dict().items())
    fresh = convert(make())
    original.load_state_dict(fresh.state_dict())
    assert all(torch.equal(original.state_dict()[k], v) for k, v in fresh.state_dict().items())


def test_train_eval_switching_follows_the_module():
    make, shape, _ = PEERS["wrn16_10_cifar10"]
    torch.manual_seed(0)
    original = make().double()
    converted = convert(copy.deepcopy(original))
    x = torch.randn(shape, dtype=torch.float64)
    for training in (False, True, False, True):
        original.train(training), converted.train(training)
        with torch.no_grad():
            want = original(x)
            assert_close(converted(x), want, torch.float64, f"training={training}", scale=float(want.abs().max()))
    for (name, a), b in zip(converted.named_buffers(), original.buffers()):  # updated in the two training passes
        assert_close(a.double(), b.double(), torch.float64, name, scale=float(b.abs().max()) + 1)


def test_inplace_converts_the_model_itself():
    make, shape, _ = PEERS["wrn16_10_cifar10"]
    torch.manual_seed(0)
    model = make().double()
    twin = copy.deepcopy(model)
    assert convert(model, inplace=True) is model
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        want = twin(x)
        assert_close(model(x), want, torch.float64, "output", scale=float(want.abs().max()))
    assert str(model.fused_preact_report).startswith("fused 12 of 13 chains")


@pytest.mark.parametrize("how", ["torch.save", "deepcopy"])
def test_a_saved_or_copied_converted_model_is_converted_again(how):
    # The generated forward is code, not state: a loaded or copied model is
    # converted again (not its class's unfused forward), the same chains.
    make, shape, _ = PEERS["wrn16_10_cifar10"]
    torch.manual_seed(0)
    original = make()
    converted = convert(copy.deepcopy(original))
    again = saved_or_copied(converted, how)
    assert str(again.fused_preact_report) == str(converted.fused_preact_report)
    assert isinstance(again, type(original)) and list(again.state_dict()) == list(original.state_dict())
    x = torch.randn(shape)
    kept = [saved_activation_bytes(lambda m=m: m(x), m) for m in (original, converted, again)]
    assert kept[2] == kept[1] < 0.7 * kept[0], kept


def test_the_converted_model_keeps_less_for_backward():
    make, shape, _ = PEERS["densenet40_k12_bc_cifar10"]
    original = make()
    converted = convert(copy.deepcopy(original))
    x = torch.randn(shape)
    eager, fused = (saved_activation_bytes(lambda m=m: m(x), m) for m in (original, converted))
    assert fused < 0.7 * eager, (fused, eager)


# ----------------------------------------------------------------------------- chains left alone

class Chain(nn.Module):
    """bn -> act -> conv(s); `extra` says what else reads an intermediate."""

    def __init__(self, act=None, conv=None, extra=None, convs=1):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.act = act if act is not None else nn.ReLU()
        self.convs = nn.ModuleList([conv or nn.Conv2d(4, 6, 3, padding=1, bias=False) for _ in range(convs)])
        self.extra = extra

    def forward(self, x):
        z = self.bn(x)
        a = self.act(z)
        outs = [conv(a) for conv in self.convs]
        y = sum(outs[1:], outs[0])
        if self.extra == "bn output":
            y = y + z.mean()
        elif self.extra == "activation":
            y = y + a.mean()
        return y


LEFT = {
    "bn output read elsewhere": (Chain(extra="bn output"), "its output is read by act (ReLU), mean"),
    "activation read elsewhere": (Chain(extra="activation", convs=2),
                                  "its activation is read by convs.0 (Conv2d), convs.1 (Conv2d), mean"),
    "LeakyReLU": (Chain(act=nn.LeakyReLU()), "act (LeakyReLU) follows, not ReLU"),
    "ReLU6": (Chain(act=nn.ReLU6()), "act (ReLU6) follows, not ReLU"),
    "reflection-padded conv": (Chain(conv=nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect", bias=False)),
                               "convs.0 has padding_mode='reflect'"),
}


@pytest.mark.parametrize("case", LEFT)
def test_a_chain_it_cannot_prove_exact_is_left_with_its_reason(case):
    model, why = LEFT[case]
    model = model.double()
    twin = copy.deepcopy(model)
    converted = convert(twin)
    assert str(converted.fused_preact_report) == f"fused 0 of 1 chains; left: bn ({why})"
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    assert torch.equal(converted(x), model(x))  # the same modules run: bit for bit


VARIANTS = {
    "conv with bias": lambda: Chain(conv=nn.Conv2d(4, 6, 3, padding=1)),
    "fan-out, biases": lambda: Chain(conv=nn.Conv2d(4, 6, 1), convs=2),
    "grouped conv": lambda: Chain(conv=nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False)),
    "depthwise conv": lambda: Chain(conv=nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)),
    "dilated conv": lambda: Chain(conv=nn.Conv2d(4, 6, 3, padding=2, dilation=2, bias=False)),
    "dilated 'same' conv, fan-out": lambda: Chain(conv=nn.Conv2d(4, 6, 3, padding="same", dilation=2), convs=2),
    "BatchNorm momentum=None": lambda: _with_bn(Chain(), nn.BatchNorm2d(4, momentum=None)),
    "BatchNorm track_running_stats=False": lambda: _with_bn(Chain(), nn.BatchNorm2d(4, track_running_stats=False)),
    "BatchNorm affine=False": lambda: _with_bn(Chain(), nn.BatchNorm2d(4, affine=False)),
}


def _with_bn(chain, bn):
    chain.bn = bn
    return chain


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("case", VARIANTS)
def test_batch_norm_and_conv_variants_are_fused_and_train_as_the_original(case, backend):
    # A conv's bias is added after the op; groups and dilation are the op's;
    # BatchNorm's momentum=None (cumulative average), track_running_stats=False
    # (batch statistics in eval too) and affine=False are read from the module.
    torch.manual_seed(0)
    model = VARIANTS[case]().double()
    converted = convert(copy.deepcopy(model), backend=backend)
    assert str(converted.fused_preact_report) == "fused 1 of 1 chains"
    assert_same_training(model, converted, (2, 4, 5, 5), torch.float64, list(model.named_parameters()))


class ReluForms(nn.Module):
    """The same chain with each way of writing its ReLU."""

    def __init__(self, form):
        super().__init__()
        self.bn, self.conv, self.form = nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1, bias=False), form
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        z = self.bn(x)
        a = {"nn.ReLU(inplace=True)": lambda: self.relu(z), "F.relu": lambda: F.relu(z),
             "F.relu(inplace=True)": lambda: F.relu(z, inplace=True), "torch.relu": lambda: torch.relu(z),
             "torch.relu_": lambda: torch.relu_(z), "Tensor.relu": lambda: z.relu(),
             "Tensor.relu_": lambda: z.relu_()}[self.form]()
        return self.conv(a)


@pytest.mark.parametrize("form", ["nn.ReLU(inplace=True)", "F.relu", "F.relu(inplace=True)", "torch.relu",
                                  "torch.relu_", "Tensor.relu", "Tensor.relu_"])
def test_every_form_of_relu_is_fused(form):
    model = ReluForms(form).double()
    converted = convert(copy.deepcopy(model))
    assert str(converted.fused_preact_report) == "fused 1 of 1 chains"
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    assert_close(converted(x), model(x), torch.float64, form)


class Untraceable(nn.Module):
    """A forward fx cannot trace (control flow on a tensor's value) around
    children it can."""

    def __init__(self):
        super().__init__()
        self.a, self.b = Chain(), Chain(act=nn.ReLU6())
        self.a.convs[0] = nn.Conv2d(4, 4, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.a(x)
        return self.b(y) if y.sum() > 0 else self.b(-y)


def test_an_untraceable_forward_converts_its_children():
    torch.manual_seed(0)
    model = Untraceable().double()
    converted = convert(copy.deepcopy(model))
    report = str(converted.fused_preact_report)
    assert report.startswith("fused 1 of 2 chains; left: b.bn (act (ReLU6) follows, not ReLU); not traced: "
                             "Untraceable (TraceError: symbolically traced variables cannot be used as inputs to "
                             "control flow)"), report
    assert list(converted.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    assert_close(converted(x), model(x), torch.float64, "output")


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="convert: model must be an nn.Module, got int"):
        convert(3)
    with pytest.raises(ValueError, match="convert: recompute must be one of"):
        convert(Chain(), recompute="none")
    with pytest.raises(ValueError, match="convert: backend must be 'auto' or one of"):
        convert(Chain(), backend="cudnn")
    with pytest.raises(ValueError, match="convert: model is converted already"):
        convert(convert(Chain()))
    with pytest.raises(ValueError, match="convert: model is converted already"):
        convert(nn.Sequential(convert(Chain())))


# ----------------------------------------------------------------------------- torch.compile

def _small_densenet():
    return torchvision.models.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2,
                                       num_classes=5)


def test_torch_compile_with_the_backend_rewrites_the_chains_and_matches_eager():
    from fused_preact.convert import compile_backend

    torch.manual_seed(0)
    original = _small_densenet().double()
    twin = copy.deepcopy(original)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return compile_backend(gm, example_inputs)

    compiled = torch.compile(twin, backend=backend)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    outs, grads = two_sgd_steps(original, x)
    outs_c, grads_c = two_sgd_steps(compiled, x)
    # dynamo's graph holds the 11 BatchNorms as F.batch_norm calls: 2 per
    # dense layer and the transition's are fused; norm0 (read by the max
    # pool) and norm5 (the pooling head) are not.
    report = graphs[0].fused_preact_report
    assert (len(report.fused), report.chains) == (9, 11), report
    assert "fused_functional_chain" in graphs[0].code
    for i, (a, b) in enumerate(zip(outs_c, outs)):
        assert_close(a, b, torch.float64, f"step {i} output", scale=float(b.abs().max()))
    for (name, _), a, b in zip(original.named_parameters(), grads_c, grads):
        assert_close(a, b, torch.float64, f"grad {name}", scale=float(b.abs().max()) + 1)
    for (name, a), b in zip(twin.named_buffers(), original.buffers()):
        assert_close(a.double(), b.double(), torch.float64, name, scale=float(b.abs().max()) + 1)


def test_the_backend_is_registered_by_name():
    torch.manual_seed(0)
    model = Chain(convs=2).double()
    twin = copy.deepcopy(model)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    compiled = torch.compile(twin, backend="fused_preact")
    assert_close(compiled(x), model(x), torch.float64, "output", scale=float(model(x).abs().max().detach()))
