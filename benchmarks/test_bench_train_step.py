"""A full CIFAR training step (forward, backward, SGD step) of PreActResNet-110,
-164 and -1001 per provider: time per step, images/s and memory.

The compiled providers run where SIZES.compiled takes them, compile and
fused(-segment)+compile up to SIZES.max_compile_depth, compile-budget0.5/0.1
up to SIZES.max_budget_depth. In the CPU subset that is depth 110 only, and
without fused-segment+compile: a cold inductor compile of ResNet-110 takes
1-2 minutes on two cores, of ResNet-164 about 2 (110 s at budget 1.0,
120-140 s at 0.5 / 0.1), which at 164 too would add some 8 minutes to a
suite meant to take about 10. The graphed providers (eager-graphed,
fused-graphed) capture the whole step in a CUDA graph with the trainer's
StepGraphs and run on CUDA only: on the CPU they are collected and skipped.
Every provider steps with the trainer's SGD (providers.sgd).
"""
import pytest
import torch

from conftest import DEVICE, SIZES, memory_per_image, record, synchronize
from providers import (build_model, graphed_providers, is_compiled, model_providers, provider_step, runs_at,
                       training_batch)


def _cases():
    """Every provider at every depth, the compiled ones last: where a time limit
    stops the suite (gpu_check.sh), it costs the slow compiles first."""
    cases, compiled = [], []
    for depth in SIZES.depths:
        for provider in model_providers(DEVICE):
            if runs_at(provider, depth, SIZES):
                (compiled if is_compiled(provider) else cases).append(
                    pytest.param(depth, provider, id=f"{depth}-{provider}"))
        cases += [pytest.param(depth, provider, id=f"{depth}-{provider}", marks=pytest.mark.skipif(
            DEVICE.type != "cuda", reason="a CUDA-graph provider: needs a GPU")) for provider in graphed_providers()]
    return cases + compiled


CASES = _cases()


@pytest.mark.parametrize("depth, provider", CASES)
def test_train_step(benchmark, depth, provider):
    model, forward = build_model(provider, depth, DEVICE)
    model.train()
    x, y = training_batch(SIZES.batch, DEVICE)
    extra = {}
    if provider in graphed_providers():
        # Memory the captured step's private pool holds (activations,
        # gradients, temporaries): the reserved growth of the capture, the
        # warm-up's cached blocks released first.
        synchronize(DEVICE)
        torch.cuda.empty_cache()
        reserved = torch.cuda.memory_reserved(DEVICE)
    step = provider_step(provider, model, forward, x, y)
    loss = float(step().detach())  # warm-up; creates the optimizer state (compiles, or captures the graph)
    if provider in graphed_providers():
        torch.cuda.empty_cache()
        extra["graph_pool_bytes_per_image"] = (torch.cuda.memory_reserved(DEVICE) - reserved) / SIZES.batch
    benchmark.pedantic(step, rounds=SIZES.rounds, warmup_rounds=1)
    # Memory of a forward (CPU: what autograd keeps) or of forward + backward
    # (GPU peak), the graphed providers' uncaptured: the same model's figure.
    record(benchmark, f"train|ResNet-{depth}", provider, SIZES.batch,
           memory_per_image(DEVICE, model, lambda: forward(x), SIZES.batch), depth=depth, first_loss=loss, **extra)
