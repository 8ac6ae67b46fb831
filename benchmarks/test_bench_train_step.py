"""A full CIFAR training step (forward, backward, SGD step) of PreActResNet-110,
-164 and -1001 per provider: time per step, images/s and memory."""
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, SIZES, memory_per_image, record, synchronize
from providers import build_model, model_format, model_providers

CASES = [(depth, provider) for depth in SIZES.depths for provider in model_providers(DEVICE)
         if provider != "compile" or depth <= SIZES.max_compile_depth]


@pytest.mark.parametrize("depth, provider", CASES, ids=[f"{d}-{p}" for d, p in CASES])
def test_train_step(benchmark, depth, provider):
    model, forward = build_model(provider, depth, DEVICE)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    x = torch.randn(SIZES.batch, 3, 32, 32, device=DEVICE, generator=gen).contiguous(memory_format=model_format(DEVICE))
    y = torch.randint(0, 10, (SIZES.batch,), device=DEVICE, generator=gen)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()
        synchronize(DEVICE)
        return loss

    loss = float(step())  # warm-up; creates the optimizer state (and compiles)
    benchmark.pedantic(step, rounds=SIZES.rounds, warmup_rounds=1)
    # Memory of a forward (CPU: what autograd keeps) or of a whole step (GPU peak).
    record(benchmark, f"train|ResNet-{depth}", provider, SIZES.batch,
           memory_per_image(DEVICE, model, lambda: forward(x), SIZES.batch), depth=depth, first_loss=loss)
