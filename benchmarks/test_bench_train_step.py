"""A full CIFAR training step (forward, backward, SGD step) of PreActResNet-110,
-164 and -1001 per provider: time per step, images/s and memory.

The compiled providers run where SIZES.compiled takes them, compile and
fused(-segment)+compile up to SIZES.max_compile_depth, compile-budget0.5/0.1
up to SIZES.max_budget_depth. In the CPU subset that is depth 110 only, and
without fused-segment+compile: a cold inductor compile of ResNet-110 takes
1-2 minutes on two cores, of ResNet-164 about 2 (110 s at budget 1.0,
120-140 s at 0.5 / 0.1), which at 164 too would add some 8 minutes to a
suite meant to take about 10. The graphed providers (eager-graphed,
fused-graphed) capture the whole step in a CUDA graph and run on CUDA only:
on the CPU they are collected and skipped.
"""
import pytest
import torch.nn.functional as F

from conftest import DEVICE, SIZES, memory_per_image, record, synchronize
from providers import (build_model, capture_train_step, graph_optimizer, graphed_providers, is_compiled,
                       model_providers, runs_at, training_batch, training_step)


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
    if provider in graphed_providers():
        # Static buffers the graph reads; each step copies the batch into them.
        replay = capture_train_step(model, graph_optimizer(model), F.cross_entropy, x.clone(), y.clone())

        def step():
            loss = replay(x, y)
            synchronize(DEVICE)
            return loss

        step()  # the first replay (uploads the graph)
        benchmark.pedantic(step, rounds=SIZES.rounds, warmup_rounds=1)
        # The peak allocated while the step was captured, above what existed before it.
        record(benchmark, f"train|ResNet-{depth}", provider, SIZES.batch,
               ("peak", replay.capture_peak_bytes / SIZES.batch), depth=depth, captured_after_warmup_steps=3)
        return
    step = training_step(model, forward, x, y)
    loss = float(step().detach())  # warm-up; creates the optimizer state (and compiles)
    benchmark.pedantic(step, rounds=SIZES.rounds, warmup_rounds=1)
    # Memory of a forward (CPU: what autograd keeps) or of forward + backward (GPU peak).
    record(benchmark, f"train|ResNet-{depth}", provider, SIZES.batch,
           memory_per_image(DEVICE, model, lambda: forward(x), SIZES.batch), depth=depth, first_loss=loss)
