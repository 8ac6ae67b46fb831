"""Memory against depth (ResNet-110, -164, -290, -1001) for every provider, and on
a GPU the largest batch that fits the card. The timed part is one forward (CPU)
or forward+backward (GPU); the figures are the memory ones in extra_info."""
import pytest
import torch

from conftest import memory_per_image, record, synchronize
from providers import build_model, model_providers, sizes_for

_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZES = sizes_for(_DEVICE.type)
CASES = [(depth, provider) for depth in SIZES.memory_depths for provider in model_providers(_DEVICE)
         if provider != "compile" or depth <= SIZES.max_compile_depth]


def largest_batch(device, model, forward, batch: int) -> int:
    """Peak memory is affine in the batch: fit it at batch/2 and batch, solve for the card."""
    peaks = []
    for b in (batch // 2, batch):
        x = torch.randn(b, 3, 32, 32, device=device)
        peaks.append(memory_per_image(device, model, lambda: forward(x), b)[1] * b)
    per_image = (peaks[1] - peaks[0]) / (batch - batch // 2)
    fixed = peaks[1] - per_image * batch
    free = torch.cuda.get_device_properties(device).total_memory - torch.cuda.memory_allocated(device)
    return int((free - fixed) // per_image)


@pytest.mark.parametrize("depth, provider", CASES, ids=[f"{d}-{p}" for d, p in CASES])
def test_memory_vs_depth(benchmark, device, sizes, depth, provider):
    model, forward = build_model(provider, depth, device)
    model.train()
    batch = sizes.batch
    x = torch.randn(batch, 3, 32, 32, device=device)

    def run():
        out = forward(x)
        if device.type == "cuda":
            out.sum().backward()
        synchronize(device)

    benchmark.pedantic(run, rounds=1, warmup_rounds=1)
    extra = {"depth": depth}
    if device.type == "cuda":
        extra["largest_batch_on_card"] = largest_batch(device, model, forward, batch)
    record(benchmark, f"memory|ResNet-{depth}", provider, batch,
           memory_per_image(device, model, lambda: forward(x), batch), **extra)
