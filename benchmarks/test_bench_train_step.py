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
import gc

import pytest

from conftest import DEVICE, SIZES, graph_pool_bytes, memory_per_image, record
from providers import (build_model, graphed_providers, is_compiled, model_providers, provider_step, runs_at,
                       training_batch)


def _cases():
    """Every provider at every depth, the compiled ones last (gpu_check.sh
    runs them as a step of their own, with an eager row for the ratios)."""
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
    graphed = provider in graphed_providers()
    if graphed:
        gc.collect()  # an earlier provider's graphs and their pools go first
        pools = graph_pool_bytes(DEVICE)
    step = provider_step(provider, model, forward, x, y)
    loss = float(step().detach())  # warm-up; creates the optimizer state (compiles, or captures the graph)
    if graphed:
        # The step's peak above the weights is what its graph's private pool
        # holds: activations, gradients and temporaries of the captured step.
        memory = ("peak", (graph_pool_bytes(DEVICE) - pools) / SIZES.batch)
    benchmark.pedantic(step, rounds=SIZES.rounds, warmup_rounds=1)
    if not graphed:
        # Memory of a forward (CPU: what autograd keeps) or of forward + backward (GPU peak).
        memory = memory_per_image(DEVICE, model, lambda: forward(x), SIZES.batch)
    record(benchmark, f"train|ResNet-{depth}", provider, SIZES.batch, memory, depth=depth, first_loss=loss)
