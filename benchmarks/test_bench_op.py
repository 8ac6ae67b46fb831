"""One BN -> ReLU -> conv layer at the paper's shapes: forward, backward and
forward+backward time, and memory, per provider."""
import pytest
import torch

from conftest import memory_per_image, record, synchronize
from providers import build_op, op_providers, sizes_for

_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZES = sizes_for(_DEVICE.type)


def _shape_id(shape):
    cin, cout, k, s = shape
    return f"{cin}to{cout}-k{k}-{s}px"


@pytest.mark.parametrize("shape", SIZES.op_shapes, ids=_shape_id)
@pytest.mark.parametrize("provider", op_providers(_DEVICE))
@pytest.mark.parametrize("phase", ["forward", "backward", "forward_backward"])
def test_bn_relu_conv(benchmark, device, sizes, shape, provider, phase):
    cin, cout, kernel, size = shape
    layer, forward = build_op(provider, cin, cout, kernel, device)
    x = torch.randn(sizes.op_batch, cin, size, size, device=device, requires_grad=True)
    grad = torch.randn(sizes.op_batch, cout, size, size, device=device)

    def run_forward():
        return forward(x)

    def run_forward_backward():
        forward(x).backward(grad)

    run_forward_backward()  # warm up (and compile)
    synchronize(device)
    if phase == "backward":
        def setup():
            y = forward(x)
            synchronize(device)
            return (y,), {}

        def target(y):
            y.backward(grad)
            synchronize(device)

        benchmark.pedantic(target, setup=setup, rounds=sizes.rounds * 3, warmup_rounds=1)
    else:
        fn = run_forward if phase == "forward" else run_forward_backward

        def target():
            fn()
            synchronize(device)

        benchmark.pedantic(target, rounds=sizes.rounds * 3, warmup_rounds=1)
    record(benchmark, f"op|{_shape_id(shape)}|{phase}", provider, sizes.op_batch,
           memory_per_image(device, layer, run_forward, sizes.op_batch), shape=list(shape))
