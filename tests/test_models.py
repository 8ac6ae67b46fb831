"""PreActResNet and FusedBNReLUConv2d against their plain torch.nn twins."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import BACKENDS, assert_close, make_layout, randomize
from fused_preact.ops.backends import get_backend
from fused_preact import (
    FusedBNReLUConv2d,
    PreActBlock,
    PreActBottleneck,
    PreActResNet,
    preact_resnet110,
    preact_resnet164,
    preact_resnet1001,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# (depth, block, shortcut)
SMALL_NETS = [(11, "bottleneck", "B"), (20, "bottleneck", "B"), (8, "basic", "A"), (8, "basic", "B"),
              (14, "basic", "A")]


def _ids(nets):
    return [f"{block}{depth}{shortcut}" for depth, block, shortcut in nets]


def param_count_from_architecture(depth, block, shortcut="B", num_classes=10):
    """Parameters of the paper's CIFAR pre-activation ResNet, counted layer by layer."""
    per_unit, expansion = {"basic": (6, 1), "bottleneck": (9, 4)}[block]
    n = (depth - 2) // per_unit
    count, c_in = 3 * 16 * 3 * 3, 16
    for stage, width in enumerate((16, 32, 64)):
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            c_out = width * expansion
            if block == "basic":
                count += 2 * c_in + c_in * width * 9 + 2 * width + width * width * 9
            else:
                count += 2 * c_in + c_in * width + 2 * width + width * width * 9 + 2 * width + width * c_out
            if shortcut == "B" and (stride != 1 or c_in != c_out):
                count += c_in * c_out
            c_in = c_out
    return count + 2 * c_in + c_in * num_classes + num_classes


def twins(depth, block, shortcut="B", dtype=torch.float64, source="plain", **fused_kwargs):
    """(plain, fused) nets with equal weights, copied from `source` into the other."""
    torch.manual_seed(0)
    plain = PreActResNet(depth, block=block, shortcut=shortcut, fused=False)
    torch.manual_seed(1)
    fused = PreActResNet(depth, block=block, shortcut=shortcut, **fused_kwargs)
    src, dst = (plain, fused) if source == "plain" else (fused, plain)
    dst.load_state_dict(randomize(src).state_dict(), strict=True)
    return plain.to(dtype), fused.to(dtype)


def forward_backward(model, x, grad_seed=2):
    x = x.detach().clone().requires_grad_()
    out = model(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    out.backward(g.to(out.dtype))
    return {
        "output": out.detach(),
        "input_grad": x.grad,
        **{f"grad:{n}": p.grad for n, p in model.named_parameters()},
        **{f"buffer:{n}": b.clone() for n, b in model.named_buffers()},
    }


def assert_same_results(got, want, dtype):
    assert got.keys() == want.keys()
    for name, expected in want.items():
        actual = got[name]
        assert actual is not None, name
        if not expected.is_floating_point():
            assert torch.equal(actual, expected), name
            continue
        assert actual.dtype == expected.dtype, name
        assert_close(actual, expected, dtype, name, scale=max(1.0, expected.abs().max().item()))


def _input(dtype, batch=2, size=16):
    return torch.randn(batch, 3, size, size, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("depth, expected", [(164, 1_703_258), (1001, 10_327_706)])
def test_paper_param_counts(depth, expected):
    with torch.device("meta"):
        model = PreActResNet(depth)
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("depth, block, shortcut", [*SMALL_NETS, (110, "basic", "B")],
                         ids=_ids([*SMALL_NETS, (110, "basic", "B")]))
def test_param_count_matches_architecture(depth, block, shortcut):
    with torch.device("meta"):
        model = PreActResNet(depth, num_classes=7, block=block, shortcut=shortcut)
    assert sum(p.numel() for p in model.parameters()) == param_count_from_architecture(depth, block, shortcut, 7)


@pytest.mark.parametrize("factory, depth, unit_cls, n_units", [
    (preact_resnet110, 110, PreActBlock, 54),
    (preact_resnet164, 164, PreActBottleneck, 54),
    (preact_resnet1001, 1001, PreActBottleneck, 333),
])
def test_factories_build_paper_depth_and_block(factory, depth, unit_cls, n_units):
    with torch.device("meta"):
        model = factory(num_classes=100)
    assert model.depth == depth
    assert model.block == ("basic" if unit_cls is PreActBlock else "bottleneck")
    assert len(model.units) == n_units and all(type(u) is unit_cls for u in model.units)
    main_path_convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and "shortcut" not in n]
    assert len(main_path_convs) + 1 == depth
    assert model.fc.out_features == 100


@pytest.mark.parametrize("depth, block, shortcut", SMALL_NETS, ids=_ids(SMALL_NETS))
def test_fused_and_plain_state_dicts_load_into_each_other_strictly(depth, block, shortcut):
    for source in ("plain", "fused"):  # twins() loads one into the other with strict=True
        plain, fused = twins(depth, block, shortcut, source=source)
        assert list(plain.state_dict()) == list(fused.state_dict())


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("depth, block, shortcut", SMALL_NETS, ids=_ids(SMALL_NETS))
def test_fused_net_matches_plain_net(depth, block, shortcut, dtype, backend, training):
    plain, fused = twins(depth, block, shortcut, dtype, source="fused" if training else "plain",
                         recompute="bn_relu", backend=backend)
    plain.train(training), fused.train(training)
    x = _input(dtype)
    assert_same_results(forward_backward(fused, x), forward_backward(plain, x), dtype)


@pytest.mark.parametrize("channels_last_weights", [False, True], ids=["nchw_weights", "channels_last_weights"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("depth, block, shortcut", SMALL_NETS[::2], ids=_ids(SMALL_NETS[::2]))
def test_fused_net_channels_last_input_matches_plain_nchw(depth, block, shortcut, backend, channels_last_weights):
    plain, fused = twins(depth, block, shortcut, backend=backend)
    if channels_last_weights:
        fused.to(memory_format=torch.channels_last)
    x = _input(torch.float64)
    got = forward_backward(fused, make_layout(x, "channels_last"))
    assert_same_results(got, forward_backward(plain, x), torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_sgd_steps_match_plain_twin(backend):
    plain, fused = twins(11, "bottleneck", dtype=torch.float32, backend=backend)
    x, labels = _input(torch.float32, batch=4), torch.randint(0, 10, (4,))
    losses = {}
    for name, model in (("plain", plain), ("fused", fused)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        losses[name] = []
        for _ in range(3):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), labels)
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    assert_close(torch.tensor(losses["fused"]), torch.tensor(losses["plain"]), torch.float32, "losses")
    for name, tensor in plain.state_dict().items():
        got = fused.state_dict()[name]
        if tensor.is_floating_point():
            assert_close(got, tensor, torch.float32, name, scale=max(1.0, tensor.abs().max().item()))
        else:
            assert torch.equal(got, tensor), name


@pytest.mark.parametrize("kwargs, names", [
    (dict(depth=100, block="bottleneck"), ["depth"]),
    (dict(depth=100), ["depth"]),
    (dict(depth=2, block="basic"), ["depth"]),
    (dict(depth=11, block="wide"), ["block"]),
    (dict(depth=11, block="bottleneck", recompute="all"), ["recompute"]),
    (dict(depth=11, block="bottleneck", recompute="bn_relu", fused=False), ["recompute", "fused"]),
    (dict(depth=11, block="bottleneck", shortcut="A"), ["shortcut"]),
    (dict(depth=8, block="basic", shortcut="C"), ["shortcut"]),
    (dict(depth=11, block="bottleneck", segment_size=2), ["segment_size"]),
    (dict(depth=11, block="bottleneck", recompute="unit", segment_size=2), ["segment_size"]),
    (dict(depth=11, block="bottleneck", fused=False, segment_size=2), ["segment_size"]),
    (dict(depth=11, block="bottleneck", recompute="segment", segment_size=0), ["segment_size"]),
], ids=["depth_bottleneck", "depth_basic", "depth_zero_units", "block", "recompute", "bn_relu_unfused",
        "shortcut_A_bottleneck", "shortcut_unknown", "segment_size_bn_relu", "segment_size_unit",
        "segment_size_unfused", "segment_size_zero"])
def test_bad_arguments_raise_value_error_naming_them(kwargs, names):
    with pytest.raises(ValueError) as info:
        PreActResNet(**kwargs)
    for name in names:
        assert name in str(info.value)


# States of the BatchNorm in FusedBNReLUConv2d and its nn.Sequential twin.
BN_STATES = ["train", "eval", "untracked_train", "untracked_eval", "tracking_off_buffers_kept_train",
             "tracking_off_buffers_kept_eval"]
IMPLS = [(True, "reference"), (True, "native"), (False, "reference")]


def _set_bn_state(bn, state):
    bn.train(state.endswith("train"))
    if state.startswith("untracked") or state.startswith("tracking_off"):
        bn.track_running_stats = False
    if state.startswith("untracked"):
        bn.running_mean = bn.running_var = bn.num_batches_tracked = None


def module_twins(fused, backend, momentum, state):
    mod = FusedBNReLUConv2d(5, 6, kernel_size=3, stride=2, padding=1, momentum=momentum, fused=fused,
                            backend=backend).double()
    seq = nn.Sequential(nn.BatchNorm2d(5, momentum=momentum), nn.ReLU(),
                        nn.Conv2d(5, 6, 3, 2, 1, bias=False)).double()
    randomize(seq)
    mod.bn.load_state_dict(seq[0].state_dict())
    mod.conv.load_state_dict(seq[2].state_dict())
    _set_bn_state(mod.bn, state)
    _set_bn_state(seq[0], state)
    return mod, seq


def _module_results(module, x, bn, conv):
    out = forward_backward(module, x)
    return {"output": out["output"], "input_grad": out["input_grad"], "weight": conv.weight.grad,
            "gamma": bn.weight.grad, "beta": bn.bias.grad,
            **{n: getattr(bn, n).clone() for n in ("running_mean", "running_var", "num_batches_tracked")
               if getattr(bn, n) is not None}}


@pytest.mark.parametrize("state", BN_STATES)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
@pytest.mark.parametrize("fused, backend", IMPLS, ids=["fused-reference", "fused-native", "unfused"])
def test_fused_module_matches_bn_relu_conv_sequential(fused, backend, momentum, state):
    mod, seq = module_twins(fused, backend, momentum, state)
    for step in range(2):
        x = torch.randn(3, 5, 7, 9, dtype=torch.float64) * 1.5 + 0.3
        for p in (*mod.parameters(), *seq.parameters()):
            p.grad = None
        got = _module_results(mod, x, mod.bn, mod.conv)
        want = _module_results(seq, x, seq[0], seq[2])
        assert_same_results(got, want, torch.float64)


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("recompute", ["bn_relu", "unit", "segment"])
def test_fused_modes_route_every_unit_through_the_fused_op(recompute):
    model = PreActResNet(11, recompute=recompute, backend="native")  # 3 bottleneck units: 9 BN-ReLU-convs
    x = _input(torch.float32, size=8).requires_grad_()
    with _OpCounter() as counter:
        model(x).sum().backward()
    # relu(bn(x)) is computed once per forward; bn_relu mode recomputes it in
    # backward, unit/segment keep it in their second forward (inside backward)
    assert counter.names.count("fused_preact::bn_relu_apply") == 18
    # the statistics once per layer: unit/segment's second forward replays the first's
    assert counter.names.count("fused_preact::batch_norm_stats") == 9
    assert counter.names.count("fused_preact::bn_relu_backward") == 9
    # the head's BN-ReLU, forward and backward, is the only aten BatchNorm
    assert sum(name.startswith("aten::") and "batch_norm" in name for name in counter.names) == 2


@pytest.mark.parametrize("recompute, chains", [("bn_relu", 1), ("unit", 3), ("segment", 2)])
@pytest.mark.parametrize("backend", [*BACKENDS, "triton"])
def test_units_hand_batch_statistics_along_so_only_chain_starts_read_their_input_for_them(
        recompute, chains, backend, monkeypatch):
    # 3 bottleneck units, 9 BatchNorms before convs; segment_size 2 makes two
    # recompute groups. With epilogue statistics (Triton), they come from the
    # op before, except at the start of a group (its input arrives through a
    # recompute boundary); other backends read each input once for them.
    if backend == "triton" and not get_backend("triton").supports(torch.device("cpu"), torch.float32):
        pytest.skip("the Triton backend runs on the CPU only in the interpreter (TRITON_INTERPRET=1)")
    model = PreActResNet(11, recompute=recompute, backend=backend,
                         **({"segment_size": 2} if recompute == "segment" else {}))
    reads = []
    op_backend = get_backend(backend)
    for name in ("batch_norm_stats", "deferred_batch_norm_stats"):  # x_stats: the last argument
        if hasattr(op_backend, name):
            monkeypatch.setattr(op_backend, name, lambda x, *args, count=getattr(op_backend, name):
                                reads.append(args[-1] is None) or count(x, *args))
    x = _input(torch.float32, size=8).requires_grad_()
    out = model(x)
    passes = chains if op_backend.epilogue_stats else 9
    assert len(reads) == 9 and sum(reads) == passes
    out.sum().backward()
    assert len(reads) == 9  # unit/segment's second forward replays the first's statistics
