"""Networks nobody here wrote, converted (fused_preact.convert) in each
recompute mode (bn_relu; unit, segment: "converted-unit",
"converted-segment"): training-step time and memory per image against the
same network as written, torch.utils.checkpoint of its stages,
torchvision's own memory_efficient DenseNet, and torch.compile at
activation memory budgets 0.5 and 0.1. torchvision densenet121 and timm
resnetv2_50 at ImageNet sizes, pytorchcv's WRN-28-10 at CIFAR's; the CPU
subset runs them small (64x64 images, batch 2; WRN-28-10 at batch 2); its
dry run (32x32, one round) leaves out the compiled providers, whose
compiles take minutes there. Needs the test dependencies
(pip install -r requirements-test.txt); skipped without them.

    pytest benchmarks/test_bench_convert.py --benchmark-only --benchmark-json=out.json
"""
import functools

import pytest
import torch

from conftest import DEVICE, time_training_step
from fused_preact import convert
from providers import COMPILE_BUDGETS, _compiled, _flag

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")
pytorchcv = pytest.importorskip("pytorchcv.model_provider")

ON_GPU = DEVICE.type == "cuda"
DRY = _flag("FUSED_PREACT_BENCH_DRY")  # gpu_check.sh --dry-run: 32x32 images, one round
IMAGENET_SIZE = 224 if ON_GPU else 32 if DRY else 64


def _densenet(memory_efficient=False):
    return torchvision.models.densenet121(memory_efficient=memory_efficient)


# name: (constructor, image size, batch, the stages checkpoint wraps, classes), on the GPU and on the CPU.
NETWORKS = {
    "densenet121": (_densenet, IMAGENET_SIZE, 32 if ON_GPU else 2,
                    lambda m: [getattr(m.features, f"denseblock{i}") for i in range(1, 5)], 1000),
    "resnetv2_50": (lambda: timm.create_model("resnetv2_50"), IMAGENET_SIZE, 32 if ON_GPU else 2,
                    lambda m: list(m.stages), 1000),
    "wrn28_10": (lambda: pytorchcv.get_model("wrn28_10_cifar10"), 32, 128 if ON_GPU else 2,
                 lambda m: [m.features.stage1, m.features.stage2, m.features.stage3], 10),
}
# provider: the recompute mode it converts with
CONVERTED = {"converted": "bn_relu", "converted-unit": "unit", "converted-segment": "segment"}
PROVIDERS = ["eager", *CONVERTED, "memory_efficient", "checkpoint", *(
    [p for p in COMPILE_BUDGETS if p != "compile"] if not DRY else [])]
CASES = [(n, p) for n in NETWORKS for p in PROVIDERS if p != "memory_efficient" or n == "densenet121"]


def _checkpointed(stages):
    """Each stage's forward through torch.utils.checkpoint (reentrant: what it
    keeps goes through save_for_backward, which the CPU accounting sees)."""
    for stage in stages:
        stage.forward = functools.partial(torch.utils.checkpoint.checkpoint, type(stage).forward.__get__(stage),
                                          use_reentrant=True)


def build(name: str, provider: str):
    """(model, forward) of network `name` as `provider` runs it, channels_last on DEVICE."""
    make, _, _, stages, _ = NETWORKS[name]
    torch.manual_seed(0)
    model = (_densenet(memory_efficient=True) if provider == "memory_efficient" else make())
    model = model.to(DEVICE, memory_format=torch.channels_last)
    if provider in CONVERTED:
        model = convert(model, recompute=CONVERTED[provider])
    elif provider == "checkpoint":
        _checkpointed(stages(model))
    if provider in COMPILE_BUDGETS:
        return model, _compiled(model, COMPILE_BUDGETS[provider])
    return model, model


@pytest.mark.parametrize("name, provider", CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_converted_training_step(benchmark, name, provider):
    _, size, batch, _, classes = NETWORKS[name]
    model, forward = build(name, provider)
    time_training_step(benchmark, model, forward, size, batch, classes, f"convert|{name}, batch {batch}, {size}x{size}",
                       provider, rounds=5 if ON_GPU else 1 if DRY else 2, warmup_rounds=0 if DRY else 1)
