"""One BN -> ReLU -> conv layer at the paper's shapes: forward, backward and
forward+backward time, and memory, per provider."""
import pytest
import torch

from conftest import DEVICE, SIZES, memory_per_image, record, synchronize
from providers import build_op, op_providers



def _shape_id(shape):
    cin, cout, k, s = shape
    return f"{cin}to{cout}-k{k}-{s}px"


@pytest.mark.parametrize("shape", SIZES.op_shapes, ids=_shape_id)
@pytest.mark.parametrize("provider", op_providers(DEVICE))
@pytest.mark.parametrize("phase", ["forward", "backward", "forward_backward"])
def test_bn_relu_conv(benchmark, shape, provider, phase):
    cin, cout, kernel, size = shape
    layer, forward = build_op(provider, cin, cout, kernel, DEVICE)
    # channels_last: the layout cuDNN and the Triton kernels are fastest in
    x = torch.randn(SIZES.op_batch, cin, size, size, device=DEVICE).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    grad = torch.randn(SIZES.op_batch, cout, size, size, device=DEVICE).contiguous(memory_format=torch.channels_last)

    def run_forward():
        return forward(x)

    def run_forward_backward():
        forward(x).backward(grad)

    run_forward_backward()  # warm up (and compile)
    synchronize(DEVICE)
    if phase == "backward":
        def setup():
            y = forward(x)
            synchronize(DEVICE)
            return (y,), {}

        def target(y):
            y.backward(grad)
            synchronize(DEVICE)

        benchmark.pedantic(target, setup=setup, rounds=SIZES.rounds * 3, warmup_rounds=1)
    else:
        fn = run_forward if phase == "forward" else run_forward_backward

        def target():
            fn()
            synchronize(DEVICE)

        benchmark.pedantic(target, rounds=SIZES.rounds * 3, warmup_rounds=1)
    # The least traffic any implementation needs (weights are negligible):
    # forward reads x and writes y; backward reads dy and x and writes dx.
    x_bytes, y_bytes = x.numel() * x.element_size(), grad.numel() * grad.element_size()
    ideal = {"forward": x_bytes + y_bytes, "backward": y_bytes + 2 * x_bytes}
    ideal["forward_backward"] = ideal["forward"] + ideal["backward"]
    record(benchmark, f"op|{_shape_id(shape)}|{phase}", provider, SIZES.op_batch,
           memory_per_image(DEVICE, layer, run_forward, SIZES.op_batch), shape=list(shape), ideal_bytes=ideal[phase])
