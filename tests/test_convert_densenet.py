"""convert on DenseNets: a torch.cat(features, 1) -> BatchNorm -> ReLU -> Conv
chain reads the features as pieces (the op's list input), so the
concatenation is never kept; under recompute="unit" a unit called on such a
concatenation concatenates inside its recomputation. Saved bytes against
torchvision's own memory_efficient DenseNet, exact on the CPU."""
import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_close
from fused_preact import convert
from fused_preact.memory import saved_activation_bytes

torchvision = pytest.importorskip("torchvision", reason="a test dependency: pip install -r requirements-test.txt")

pytestmark = pytest.mark.usefixtures("one_thread")


def _kept(model, x):
    return saved_activation_bytes(lambda: model(x), model)


def test_densenet121_keeps_under_0_6x_of_memory_efficient_and_under_0_25x_recomputing_its_units():
    # At ImageNet's 224x224, a whole forward at batch 1.
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    model = torchvision.models.densenet121().to(memory_format=torch.channels_last)
    efficient = torchvision.models.densenet121(memory_efficient=True).to(memory_format=torch.channels_last)
    reference = _kept(efficient, x)
    fused, units = (_kept(convert(model, recompute=mode), x) for mode in ("bn_relu", "unit"))
    assert fused <= 0.6 * reference, (fused, reference)
    assert units <= 0.25 * reference, (units, reference)


def test_densenet121_at_64x64_keeps_under_0_6x_of_memory_efficient_per_image():
    """Per image (the difference between batches 2 and 1): what grows with
    the batch. At batch 1 the statistics every layer keeps per step (mean,
    invstd and the folded affine of each BatchNorm's channels, 0.63 MiB)
    take the total to 0.67x."""
    torch.manual_seed(0)
    model = convert(torchvision.models.densenet121().to(memory_format=torch.channels_last))
    efficient = torchvision.models.densenet121(memory_efficient=True).to(memory_format=torch.channels_last)
    per_image = []
    for m in (model, efficient):
        kept = [_kept(m, torch.randn(n, 3, 64, 64).contiguous(memory_format=torch.channels_last)) for n in (1, 2)]
        per_image.append(kept[1] - kept[0])
    assert per_image[0] <= 0.6 * per_image[1], per_image


def test_the_dense_layers_read_their_features_as_pieces():
    model = torchvision.models.DenseNet(growth_rate=4, block_config=(2, 3), num_init_features=8, bn_size=2,
                                        num_classes=5)
    converted = convert(model)
    # 5 dense layers and the 2 blocks' outputs concatenate: only the last
    # block's (read by norm5, which no conv follows) is left.
    code = inspect.getsource(type(converted).forward)
    assert code.count("torch.cat(") == 1, code


class CatThenChain(nn.Module):
    """torch.cat(a, b) -> bn -> relu -> conv; with `also_read`, the
    concatenation is read elsewhere too, and must be made."""

    def __init__(self, also_read: bool):
        super().__init__()
        self.bn, self.conv, self.also_read = nn.BatchNorm2d(7), nn.Conv2d(7, 3, 3, padding=1, bias=False), also_read

    def forward(self, a, b):
        x = torch.cat([a, b], dim=1)
        y = self.conv(F.relu(self.bn(x)))
        return y + x.mean() if self.also_read else y


@pytest.mark.parametrize("also_read", [False, True])
def test_a_concatenation_read_elsewhere_is_made_and_the_chain_still_fused(also_read):
    torch.manual_seed(0)
    model = CatThenChain(also_read).double()
    converted = convert(copy.deepcopy(model))
    assert str(converted.fused_preact_report) == "fused 1 of 1 chains"
    assert ("torch.cat(" in inspect.getsource(type(converted).forward)) == also_read
    a, b = (torch.randn(2, c, 5, 5, dtype=torch.float64, requires_grad=True) for c in (3, 4))
    want, got = model(a, b), converted(a, b)
    assert_close(got, want, torch.float64, "output", scale=float(want.detach().abs().max()))
    for da, db in zip(torch.autograd.grad(got.sum(), (a, b)), torch.autograd.grad(want.sum(), (a, b))):
        assert_close(da, db, torch.float64, "d piece", scale=float(db.abs().max()) + 1)
