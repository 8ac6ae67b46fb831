"""A whole pre-activation bottleneck unit (BN-ReLU-conv1x1, BN-ReLU-conv3x3,
BN-ReLU-conv1x1, plus identity), forward and backward, at the paper's stage
shapes: fused (Triton, native) against the plain nn modules and inductor."""
import pytest
import torch

from conftest import DEVICE, SIZES, memory_per_image, record, synchronize
from providers import build_unit, unit_providers


@pytest.mark.parametrize("dtype", SIZES.dtypes, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("shape", SIZES.unit_shapes, ids=lambda s: f"w{s[0]}-{s[1]}px")
@pytest.mark.parametrize("provider", unit_providers(DEVICE))
def test_unit_forward_backward(benchmark, provider, shape, dtype):
    width, size = shape
    unit, forward = build_unit(provider, width, DEVICE)
    unit.to(dtype)
    batch = SIZES.op_batch
    x = torch.randn(batch, 4 * width, size, size, device=DEVICE, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn_like(x)

    def target():
        forward(x).backward(grad)
        synchronize(DEVICE)

    target()  # warm up (autotune, compile)
    benchmark.pedantic(target, rounds=SIZES.rounds * 3, warmup_rounds=1)
    # The least traffic any implementation needs: read x, write y; read dy
    # and x, write dx (weights are negligible).
    ideal = 5 * x.numel() * x.element_size()
    record(benchmark, f"unit|w{width}-{size}px|{str(dtype).split('.')[1]}", provider, batch,
           memory_per_image(DEVICE, unit, lambda: forward(x), batch), ideal_bytes=ideal)
