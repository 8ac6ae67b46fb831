"""Memory against depth (ResNet-110, -164, -290, -1001) for every provider, and on
a GPU an estimate of the largest batch that fits the card. The figures are the
memory ones in extra_info; the timed single round is not a speed measurement.
The compiled providers (compile, compile-budget0.5/0.1, fused+compile,
fused-segment+compile) join on the CPU only, where SIZES takes them (in the
CPU subset: at depth 110, without fused-segment+compile): on a GPU the batch
sweep would recompile them for each batch size."""
import pytest
import torch

from conftest import DEVICE, SIZES, memory_per_image, record, synchronize
from providers import build_model, is_compiled, model_providers, runs_at

CASES = [(depth, provider) for depth in SIZES.memory_depths for provider in model_providers(DEVICE)
         if not is_compiled(provider) or (DEVICE.type == "cpu" and runs_at(provider, depth, SIZES))]


def largest_batch_estimate(model, forward, batch: int) -> int:
    """Peak memory is affine in the batch: fit it at batch/2 and batch (each run
    once before measuring, so one-time allocations stay out), solve for the card."""
    peaks = []
    for b in (batch // 2, batch):
        x = torch.randn(b, 3, 32, 32, device=DEVICE)
        forward(x).sum().backward()
        peaks.append(memory_per_image(DEVICE, model, lambda: forward(x), b)[1] * b)
    per_image = (peaks[1] - peaks[0]) / (batch - batch // 2)
    fixed = peaks[1] - per_image * batch
    free = torch.cuda.get_device_properties(DEVICE).total_memory - torch.cuda.memory_allocated(DEVICE)
    return int((free - fixed) // per_image)


@pytest.mark.parametrize("depth, provider", CASES, ids=[f"{d}-{p}" for d, p in CASES])
def test_memory_vs_depth(benchmark, depth, provider):
    model, forward = build_model(provider, depth, DEVICE)
    model.train()
    batch = SIZES.batch
    x = torch.randn(batch, 3, 32, 32, device=DEVICE)

    def run():
        out = forward(x)
        if DEVICE.type == "cuda":
            out.sum().backward()
        synchronize(DEVICE)

    benchmark.pedantic(run, rounds=1, warmup_rounds=1)
    extra = {"depth": depth}
    if DEVICE.type == "cuda":
        extra["largest_batch_on_card"] = largest_batch_estimate(model, forward, batch)
    record(benchmark, f"memory|ResNet-{depth}", provider, batch,
           memory_per_image(DEVICE, model, lambda: forward(x), batch), **extra)
