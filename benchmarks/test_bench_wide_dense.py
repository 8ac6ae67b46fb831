"""The package's Wide ResNet (WRN-28-10, dropout 0.3) and DenseNet-BC
(L=100, k=12) at CIFAR's 32x32: training-step time and memory per image in
each recompute mode ("fused": bn_relu, "fused-unit", "fused-segment")
against the same net computed eagerly (fused=False), torch.utils.checkpoint
of its stages, torchvision's memory_efficient DenseNet (its DenseNet class
given CIFAR's stem: fused_preact.models.densenet.torchvision_densenet_bc;
needs torchvision) and torch.compile at activation memory budgets 0.5 and
0.1. The CPU subset runs batch 2; its dry run (32x32, one round) leaves out
the compiled providers.

    pytest benchmarks/test_bench_wide_dense.py --benchmark-only --benchmark-json=out.json
"""
import functools

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from conftest import DEVICE, time_training_step
from fused_preact.models import DenseNet, wide_resnet
from fused_preact.models.densenet import torchvision_densenet_bc
from providers import COMPILE_BUDGETS, _compiled, _flag

ON_GPU = DEVICE.type == "cuda"
DRY = _flag("FUSED_PREACT_BENCH_DRY")


def _wrn(**options):
    return wide_resnet(depth=28, widen_factor=10, dropout=0.3, **options)


def _densenet(**options):
    return DenseNet(100, 12, **options)


# name: (constructor, batch, memory_efficient twin or None)
NETWORKS = {
    "wrn28_10 (dropout 0.3)": (_wrn, 128 if ON_GPU else 2, None),
    "densenet_bc_100_12": (_densenet, 64 if ON_GPU else 2, functools.partial(torchvision_densenet_bc, 100, 12)),
}
# provider: the model's options
MODES = {"eager": dict(fused=False), "fused": {}, "fused-unit": dict(recompute="unit"),
         "fused-segment": dict(recompute="segment"), "checkpoint": dict(fused=False)}
PROVIDERS = [*MODES, "memory_efficient", *([p for p in COMPILE_BUDGETS if p != "compile"] if not DRY else [])]
CASES = [(n, p) for n in NETWORKS for p in PROVIDERS if p != "memory_efficient" or NETWORKS[n][2] is not None]


def _checkpointed(model):
    """model's forward with each stage through torch.utils.checkpoint
    (non-reentrant: a DenseNet block takes a list of features)."""
    if isinstance(model, DenseNet):
        stages = list(model.stages)

        def head(features):
            return model.fc(F.adaptive_avg_pool2d(F.relu(model.bn(torch.cat(features, 1))), 1).flatten(1))
    else:
        n = len(model.units) // 3
        stages = [model.units[i:i + n] for i in range(0, len(model.units), n)]

        def head(x):
            return model.fc(F.adaptive_avg_pool2d(F.relu(model.bn(x)), 1).flatten(1))

    def forward(x):
        x = model.conv1(x)
        for stage in stages:
            x = torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False)
        return head(x)
    return forward


def build(name: str, provider: str):
    """(model, forward) of network `name` as `provider` runs it, channels_last on DEVICE."""
    make, _, twin = NETWORKS[name]
    torch.manual_seed(0)
    if provider == "memory_efficient":
        pytest.importorskip("torchvision", reason="a test dependency: pip install -r requirements-test.txt")
        model = twin(memory_efficient=True)
    else:
        model = make(**MODES.get(provider, dict(fused=False)))
    model = model.to(DEVICE, memory_format=torch.channels_last)
    if provider == "checkpoint":
        return model, _checkpointed(model)
    if provider in COMPILE_BUDGETS:
        return model, _compiled(model, COMPILE_BUDGETS[provider])
    return model, model


@pytest.mark.parametrize("name, provider", CASES, ids=[f"{n.split()[0]}-{p}" for n, p in CASES])
def test_wide_dense_training_step(benchmark, name, provider):
    batch = NETWORKS[name][1]
    model, forward = build(name, provider)
    time_training_step(benchmark, model, forward, 32, batch, 10, f"nets|{name}, batch {batch}, 32x32", provider,
                       rounds=5 if ON_GPU else 1 if DRY else 2, warmup_rounds=0 if DRY else 1)
