"""DenseNet-BC (fused_preact.models.densenet): against pytorchcv's CIFAR
DenseNet-BC with copied weights in float64 in every recompute mode; what it
keeps for backward grows linearly with depth; the names; the trainer."""
import math

import pytest
import torch

from conftest import assert_close, copy_state_in_order
from fused_preact import create_model, list_models
from fused_preact.memory import saved_activation_bytes
from fused_preact.models import DenseNet

pytestmark = pytest.mark.usefixtures("one_thread")

MODES = [("none", False), ("none", True), ("bn_relu", True), ("unit", True), ("segment", True), ("unit", False)]


@pytest.mark.parametrize("recompute, fused", MODES, ids=[f"{m}-{'fused' if f else 'plain'}" for m, f in MODES])
def test_matches_pytorchcv_densenet_bc_in_float64(recompute, fused):
    pytorchcv = pytest.importorskip("pytorchcv.model_provider", reason="a test dependency: pip install -r "
                                    "requirements-test.txt")
    from convert_peers import assert_same_training

    torch.manual_seed(0)
    peer = pytorchcv.get_model("densenet40_k12_bc_cifar10", pretrained=False).double()
    for m in peer.modules():  # away from the init's 1/0, so that every BatchNorm term is checked
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5), torch.nn.init.uniform_(m.bias, -0.2, 0.2)
    ours = DenseNet(40, 12, recompute=recompute, fused=fused, segment_size=4 if recompute == "segment" else None)
    ours = ours.double()
    copy_state_in_order(peer, ours)
    assert_same_training(peer, ours, (2, 3, 32, 32), torch.float64, list(peer.named_parameters()))


def _kept_per_image(model, batch=2):
    x = torch.randn(batch, 3, 32, 32)
    return saved_activation_bytes(lambda: model(x), model) / batch


@pytest.mark.parametrize("recompute", ["bn_relu", "unit"])
def test_what_it_keeps_grows_linearly_with_depth_where_eager_grows_quadratically(recompute):
    depths = (28, 52, 76)  # n = 4, 8, 12 dense layers per block
    fused = [_kept_per_image(DenseNet(d, 12, recompute=recompute)) for d in depths]
    eager = [_kept_per_image(DenseNet(d, 12, fused=False)) for d in depths]
    # Equal steps in depth: equal steps in bytes (the second difference is
    # only the transitions' and head's channel counts, which grow linearly
    # too, so it vanishes); eager's grow with each layer's input width.
    steps, eager_steps = [b - a for a, b in zip(fused, fused[1:])], [b - a for a, b in zip(eager, eager[1:])]
    assert abs(steps[1] - steps[0]) <= 0.02 * steps[0], fused
    assert eager_steps[1] > 1.3 * eager_steps[0], eager
    assert fused[-1] < 0.3 * eager[-1], (fused, eager)


def test_keeps_under_0_6x_of_torchvisions_memory_efficient_and_under_0_25x_recomputing_its_layers():
    pytest.importorskip("torchvision", reason="a test dependency: pip install -r requirements-test.txt")
    from fused_preact.models.densenet import torchvision_densenet_bc

    efficient = _kept_per_image(torchvision_densenet_bc(40, 12, memory_efficient=True))
    assert _kept_per_image(DenseNet(40, 12)) <= 0.6 * efficient
    assert _kept_per_image(DenseNet(40, 12, recompute="unit")) <= 0.25 * efficient


def test_torchvisions_twin_is_the_same_network():
    pytest.importorskip("torchvision", reason="a test dependency: pip install -r requirements-test.txt")
    from fused_preact.models.densenet import torchvision_densenet_bc

    torch.manual_seed(0)
    twin = torchvision_densenet_bc(16, 4).double().eval()
    ours = DenseNet(16, 4).double().eval()
    # torchvision's stem keeps norm0/relu0/pool0 slots as Identity: the same parameters, in order.
    copy_state_in_order(twin, ours)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert_close(ours(x), twin(x), torch.float64, "output")


def test_each_mode_keeps_less_than_the_one_before():
    kept = [_kept_per_image(DenseNet(40, 12, recompute=m, fused=m != "none")) for m in ("none", "bn_relu", "unit")]
    assert kept[0] > 2 * kept[1] > 2 * 1.2 * kept[2], kept


@pytest.mark.parametrize("name, peer", [("densenet_bc_100_12", "densenet100_k12_bc_cifar10"),
                                        ("densenet_bc_190_40", "densenet190_k40_bc_cifar10"),
                                        ("densenet_bc_250_24", "densenet250_k24_bc_cifar10")])
def test_the_named_nets_have_pytorchcvs_parameters(name, peer):
    pytorchcv = pytest.importorskip("pytorchcv.model_provider", reason="a test dependency: pip install -r "
                                    "requirements-test.txt")
    with torch.device("meta"):
        ours, theirs = create_model(name), pytorchcv.get_model(peer, pretrained=False)
    assert [tuple(v.shape) for v in ours.state_dict().values()] == [
        tuple(v.shape) for v in theirs.state_dict().values()]


def test_names_and_options():
    assert {"densenet_bc", "densenet_bc_100_12", "densenet_bc_190_40", "densenet_bc_250_24"} <= set(
        list_models("densenet*"))
    model = create_model("densenet_bc_100_12", num_classes=100)
    assert (model.depth, model.growth_rate, model.fc.out_features) == (100, 12, 100)
    assert create_model("densenet_bc", depth=40).depth == 40
    with pytest.raises(ValueError, match="densenet_bc_190_40: depth is fixed at 190 by the name"):
        create_model("densenet_bc_190_40", depth=100)
    with pytest.raises(ValueError, match=r"DenseNet: depth must be 6n\+4 with n >= 1"):
        DenseNet(41)
    with pytest.raises(ValueError, match="DenseNet: recompute must be one of"):
        DenseNet(40, recompute="all")


def test_the_trainer_trains_it(tmp_path):
    from fused_preact.train.__main__ import run
    from fused_preact.train.metrics import read_jsonl

    run(["--preset", "quick", "--arch", "densenet_bc", "--depth", "10", "--train-size", "128", "--test-size", "64",
         "--threads", "1", "--iters", "4", "--eval-every", "2", "--model-arg", "growth_rate=4", "--recompute", "unit",
         "--out", str(tmp_path / "run")])
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["iter"] for r in records] == [2, 4] and all(math.isfinite(r["train_loss"]) for r in records), records
