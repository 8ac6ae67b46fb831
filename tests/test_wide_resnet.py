"""Wide ResNets (fused_preact.models.wide_resnet): against pytorchcv's CIFAR
WRN with copied weights in float64 in every recompute mode; the named nets'
parameters are pytorchcv's; the names and their errors."""
import math

import pytest
import torch

from conftest import copy_state_in_order
from fused_preact import create_model, list_models
from fused_preact.models import wide_resnet

pytestmark = pytest.mark.usefixtures("one_thread")
pytorchcv = pytest.importorskip("pytorchcv.model_provider", reason="a test dependency: pip install -r "
                                "requirements-test.txt")

MODES = [("none", False), ("bn_relu", True), ("unit", True), ("segment", True)]


@pytest.mark.parametrize("recompute, fused", MODES, ids=[m for m, _ in MODES])
def test_matches_pytorchcv_wrn_in_float64(recompute, fused):
    from convert_peers import assert_same_training
    from pytorchcv.models.wrn_cifar import get_wrn_cifar

    torch.manual_seed(0)
    peer = get_wrn_cifar(num_classes=10, blocks=10, width_factor=2).double()  # WRN-10-2: one unit per stage
    for m in peer.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5), torch.nn.init.uniform_(m.bias, -0.2, 0.2)
    ours = wide_resnet(depth=10, widen_factor=2, recompute=recompute, fused=fused).double()
    copy_state_in_order(peer, ours)
    assert_same_training(peer, ours, (2, 3, 32, 32), torch.float64, list(peer.named_parameters()))


@pytest.mark.parametrize("name, peer", [("wrn28_10", "wrn28_10_cifar10"), ("wrn16_8", None)])
def test_the_named_nets_have_pytorchcvs_parameters(name, peer):
    from pytorchcv.models.wrn_cifar import get_wrn_cifar

    with torch.device("meta"):
        ours = create_model(name)
        theirs = pytorchcv.get_model(peer) if peer else get_wrn_cifar(num_classes=10, blocks=16, width_factor=8)
    assert [tuple(v.shape) for v in ours.state_dict().values()] == [
        tuple(v.shape) for v in theirs.state_dict().values()]


def test_names_and_errors():
    assert {"wide_resnet", "wrn28_10", "wrn16_8"} <= set(list_models("w*"))
    with pytest.raises(ValueError, match="wrn28_10: depth is fixed at 28 by the name"):
        create_model("wrn28_10", depth=16)
    with pytest.raises(ValueError, match=r"wide_resnet: depth must be 6n\+4"):
        wide_resnet(depth=26)
    with pytest.raises(ValueError, match="wide_resnet: shortcut is fixed"):
        wide_resnet(shortcut="A")
    with pytest.raises(ValueError, match="PreActResNet: widen_factor must be a positive int"):
        wide_resnet(widen_factor=0)


def test_the_trainer_trains_it(tmp_path):
    from fused_preact.train.__main__ import run
    from fused_preact.train.metrics import read_jsonl

    run(["--preset", "quick", "--arch", "wide_resnet", "--depth", "10", "--model-arg", "widen_factor=2",
         "--train-size", "128", "--test-size", "64", "--threads", "1", "--iters", "4", "--eval-every", "2",
         "--recompute", "segment", "--out", str(tmp_path / "run")])
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["iter"] for r in records] == [2, 4] and all(math.isfinite(r["train_loss"]) for r in records), records
