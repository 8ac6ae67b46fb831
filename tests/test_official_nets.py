"""Whole networks against independent plain-PyTorch transcriptions of the
official Lua code, written here with Lua's own combinators (Sequential,
ConcatTable, CAddTable):

- resnet-pre-act.lua (KaimingHe/resnet-1k-layers): CIFAR bottleneck pre-act nets;
- preresnet.lua (fb.resnet.torch HEAD): CIFAR basic and ImageNet pre-act nets;
- resnet.lua (fb.resnet.torch): the original CIFAR nets.

The transcription creates its layers in the order the Lua creates them; the
package's network is copied into it tensor by tensor in parameter order, so a
missing, extra or reshaped layer fails the copy and any wiring difference (a
shortcut reading the wrong tensor, two BatchNorms swapped) fails the
comparison of outputs, gradients and running statistics.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_preact
from conftest import assert_close, randomize

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


# ---- Lua's combinators ------------------------------------------------------------------------------------------

class ConcatTable(nn.Module):
    """nn.ConcatTable: every branch gets the same input; the outputs form a table."""

    def __init__(self, *branches):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x):
        return [b(x) for b in self.branches]


class CAddTable(nn.Module):
    def forward(self, xs):
        return sum(xs[1:], xs[0])


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def ReLU():
    return nn.ReLU()


def SBatchNorm(n):
    return nn.BatchNorm2d(n)


def Convolution(n_in, n_out, kw, kh, dw=1, dh=1, pw=0, ph=0):
    assert (kw, dw, pw) == (kh, dh, ph)
    return nn.Conv2d(n_in, n_out, kw, dw, pw, bias=False)  # cudnn >= 4: bias removed by ConvInit


def Identity():
    return nn.Identity()


def lua_shortcut(shortcut_type, n_in, n_out, stride, with_bn):
    """preresnet.lua / resnet.lua shortcut(): 1x1 conv (+ BN in resnet.lua) for C, or B where channels change;
    else the strided zero-padded identity where channels change (AvgPool 1x1 stride, Concat(Identity,
    MulConstant(0))); else Identity."""
    if shortcut_type == "C" or (shortcut_type == "B" and n_in != n_out):
        layers = [Convolution(n_in, n_out, 1, 1, stride, stride)] + ([SBatchNorm(n_out)] if with_bn else [])
        return nn.Sequential(*layers)
    if n_in != n_out:
        return nn.Sequential(Lambda(lambda x: F.avg_pool2d(x, 1, stride)),
                             Lambda(lambda x: torch.cat([x, x * 0], 1)))
    return Identity()


# ---- preresnet.lua (fb.resnet.torch HEAD) -----------------------------------------------------------------------

class PreResNetLua:
    def __init__(self, shortcut_type):
        self.shortcut_type, self.i_channels = shortcut_type, None

    def basicblock(self, n, stride, type_=None):
        n_in = self.i_channels
        self.i_channels = n
        block, s = [], []
        if type_ == "both_preact":
            block += [SBatchNorm(n_in), ReLU()]
        elif type_ != "no_preact":
            s += [SBatchNorm(n_in), ReLU()]
        s += [Convolution(n_in, n, 3, 3, stride, stride, 1, 1), SBatchNorm(n), ReLU(),
              Convolution(n, n, 3, 3, 1, 1, 1, 1)]
        return nn.Sequential(*block, ConcatTable(nn.Sequential(*s), lua_shortcut(self.shortcut_type, n_in, n, stride,
                                                                                 False)), CAddTable())

    def bottleneck(self, n, stride, type_=None):
        n_in = self.i_channels
        self.i_channels = n * 4
        block, s = [], []
        if type_ == "both_preact":
            block += [SBatchNorm(n_in), ReLU()]
        elif type_ != "no_preact":
            s += [SBatchNorm(n_in), ReLU()]
        s += [Convolution(n_in, n, 1, 1, 1, 1, 0, 0), SBatchNorm(n), ReLU(),
              Convolution(n, n, 3, 3, stride, stride, 1, 1), SBatchNorm(n), ReLU(),
              Convolution(n, n * 4, 1, 1, 1, 1, 0, 0)]
        return nn.Sequential(*block, ConcatTable(nn.Sequential(*s), lua_shortcut(self.shortcut_type, n_in, n * 4,
                                                                                 stride, False)), CAddTable())

    def layer(self, block, features, count, stride, type_=None):
        s = [block(features, stride, "no_preact" if type_ == "first" else "both_preact")]
        s += [block(features, 1) for _ in range(2, count + 1)]
        return nn.Sequential(*s)

    def cifar(self, depth, classes):
        n = (depth - 2) // 6
        self.i_channels = 16
        return nn.Sequential(
            Convolution(3, 16, 3, 3, 1, 1, 1, 1),
            self.layer(self.basicblock, 16, n, 1), self.layer(self.basicblock, 32, n, 2),
            self.layer(self.basicblock, 64, n, 2),
            SBatchNorm(self.i_channels), ReLU(), nn.AvgPool2d(8, 1), nn.Flatten(), nn.Linear(64, classes))

    def imagenet(self, depth, classes):
        defs, features, block = {18: ((2, 2, 2, 2), 512, self.basicblock),
                                 50: ((3, 4, 6, 3), 2048, self.bottleneck)}[depth]
        self.i_channels = 64
        return nn.Sequential(
            Convolution(3, 64, 7, 7, 2, 2, 3, 3), SBatchNorm(64), ReLU(), nn.MaxPool2d(3, 2, 1),
            self.layer(block, 64, defs[0], 1, "first"), self.layer(block, 128, defs[1], 2),
            self.layer(block, 256, defs[2], 2), self.layer(block, 512, defs[3], 2),
            SBatchNorm(self.i_channels), ReLU(),
            # Avg(7, 7, 1, 1) at 224x224 input; the test's small input has a smaller final map
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(features, classes))


# ---- resnet-pre-act.lua (KaimingHe/resnet-1k-layers) ------------------------------------------------------------

def resnet_pre_act_lua(depth, classes):
    def bottleneck(n_in, n_out, stride):
        nb = n_out // 4
        if n_in == n_out:
            convs = nn.Sequential(SBatchNorm(n_in), ReLU(), Convolution(n_in, nb, 1, 1, stride, stride, 0, 0),
                                  SBatchNorm(nb), ReLU(), Convolution(nb, nb, 3, 3, 1, 1, 1, 1),
                                  SBatchNorm(nb), ReLU(), Convolution(nb, n_out, 1, 1, 1, 1, 0, 0))
            return nn.Sequential(ConcatTable(convs, Identity()), CAddTable())
        convs = nn.Sequential(Convolution(n_in, nb, 1, 1, stride, stride, 0, 0),
                              SBatchNorm(nb), ReLU(), Convolution(nb, nb, 3, 3, 1, 1, 1, 1),
                              SBatchNorm(nb), ReLU(), Convolution(nb, n_out, 1, 1, 1, 1, 0, 0))
        shortcut = nn.Sequential(Convolution(n_in, n_out, 1, 1, stride, stride, 0, 0))
        return nn.Sequential(SBatchNorm(n_in), ReLU(), ConcatTable(convs, shortcut), CAddTable())

    def layer(n_in, n_out, count, stride):
        return nn.Sequential(bottleneck(n_in, n_out, stride), *[bottleneck(n_out, n_out, 1) for _ in range(count - 1)])

    n = (depth - 2) // 9
    stages = (16, 64, 128, 256)
    return nn.Sequential(
        Convolution(3, stages[0], 3, 3, 1, 1, 1, 1),
        layer(stages[0], stages[1], n, 1), layer(stages[1], stages[2], n, 2), layer(stages[2], stages[3], n, 2),
        SBatchNorm(stages[3]), ReLU(), nn.AvgPool2d(8, 1), nn.Flatten(), nn.Linear(stages[3], classes))


# ---- resnet.lua (fb.resnet.torch), CIFAR ------------------------------------------------------------------------

def resnet_lua_cifar(depth, shortcut_type, classes):
    state = {"i_channels": 16}

    def basicblock(n, stride):
        n_in = state["i_channels"]
        state["i_channels"] = n
        s = nn.Sequential(Convolution(n_in, n, 3, 3, stride, stride, 1, 1), SBatchNorm(n), ReLU(),
                          Convolution(n, n, 3, 3, 1, 1, 1, 1), SBatchNorm(n))
        return nn.Sequential(ConcatTable(s, lua_shortcut(shortcut_type, n_in, n, stride, True)), CAddTable(), ReLU())

    def layer(features, count, stride=1):
        return nn.Sequential(*[basicblock(features, stride if i == 1 else 1) for i in range(1, count + 1)])

    n = (depth - 2) // 6
    return nn.Sequential(
        Convolution(3, 16, 3, 3, 1, 1, 1, 1), SBatchNorm(16), ReLU(),
        layer(16, n), layer(32, n, 2), layer(64, n, 2),
        nn.AvgPool2d(8, 1), nn.Flatten(), nn.Linear(64, classes))


# ---- the comparison ---------------------------------------------------------------------------------------------

def copy_into(lua_net, net):
    """The package's tensors into the transcription, one by one in creation order."""
    ours = list(net.parameters()) + [b for b in net.buffers()]
    theirs = list(lua_net.parameters()) + [b for b in lua_net.buffers()]
    assert len(ours) == len(theirs), f"{len(ours)} tensors, the Lua net has {len(theirs)}"
    with torch.no_grad():
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert a.shape == b.shape, f"tensor {i}: {tuple(a.shape)} vs the Lua net's {tuple(b.shape)}"
            b.copy_(a)


def run(model, x):
    x = x.detach().clone().requires_grad_()
    out = model(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype))
    return {"output": out.detach(), "input_grad": x.grad,
            **{f"grad {i}": p.grad for i, p in enumerate(model.parameters())},
            **{f"buffer {i}": b.clone() for i, b in enumerate(model.buffers())}}


def assert_same_network(net, lua_net, size, training=True):
    torch.manual_seed(0)
    randomize(net)
    net.double().train(training)
    lua_net.double().train(training)
    copy_into(lua_net, net)
    x = torch.randn(2, 3, size, size, dtype=F64)
    got, want = run(net, x), run(lua_net, x)
    assert list(got) == list(want)
    for name, expected in want.items():
        actual = got[name]
        if expected.is_floating_point():
            assert_close(actual, expected, F64, name, scale=max(1.0, float(expected.abs().max())))
        else:
            assert torch.equal(actual, expected), name


# fused (the op, native backend, in the given recompute mode) and the plain nn modules
MODES = [dict(backend="native"), dict(backend="native", recompute="unit"), dict(fused=False)]
MODE_IDS = ["fused", "fused-unit", "plain"]


@pytest.mark.parametrize("options", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("depth, shortcut", [(8, "A"), (14, "A"), (14, "B")])
def test_basic_preact_net_is_preresnet_lua(depth, shortcut, options):
    net = fused_preact.create_model("preact_resnet", 7, depth=depth, shortcut=shortcut, **options)
    assert_same_network(net, PreResNetLua(shortcut).cifar(depth, 7), 32)


def test_basic_preact_net_defaults_to_opts_lua_shortcut_a():
    net = fused_preact.create_model("preact_resnet", 7, depth=8, backend="native")
    assert_same_network(net, PreResNetLua("A").cifar(8, 7), 32)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("options", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("depth", [11, 20])
def test_bottleneck_preact_net_is_resnet_pre_act_lua(depth, options, training):
    net = fused_preact.create_model("preact_resnet", 7, depth=depth, block="bottleneck", **options)
    assert_same_network(net, resnet_pre_act_lua(depth, 7), 32, training)


@pytest.mark.parametrize("options", [dict(backend="native"), dict(fused=False)], ids=["fused", "plain"])
@pytest.mark.parametrize("depth", [18, 50])
def test_imagenet_preact_net_is_preresnet_lua(depth, options):
    net = fused_preact.create_model(f"preact_resnet{depth}", 7, **options)
    # 64x64: the last stage's BatchNorms normalise 2x2 maps over the batch of 2
    assert_same_network(net, PreResNetLua("B").imagenet(depth, 7), 64)


@pytest.mark.parametrize("options", [dict(backend="native"), dict(fused=False)], ids=["fused", "plain"])
@pytest.mark.parametrize("depth, shortcut", [(8, None), (14, "A"), (14, "B"), (8, "C")])
def test_original_net_is_resnet_lua(depth, shortcut, options):
    net = fused_preact.create_model("resnet", 7, depth=depth, **({"shortcut": shortcut} if shortcut else {}),
                                    **options)
    assert_same_network(net, resnet_lua_cifar(depth, shortcut or "A", 7), 32)
