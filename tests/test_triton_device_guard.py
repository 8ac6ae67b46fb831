"""Triton launches go to the current CUDA device, not to their tensors'
device: every launcher of the Triton backend makes its tensors' device
current first (common.launcher), as the C++ ops' device guards do. On the
CPU a second device is simulated: the launchers are told their tensors live
on cuda:1 while torch.cuda's device switch keeps a make-believe current
device 0, and every launch records the device current when it ran. On a
machine with two GPUs the same runs for real.
"""
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)

from conftest import assert_close  # noqa: E402
from fused_preact import PreActResNet  # noqa: E402
from fused_preact.triton_kernels import (batch_stats, bn_relu_backward, conv_dgrad, conv_forward,  # noqa: E402
                                         conv_wgrad, row_sums)

pytestmark = pytest.mark.usefixtures("one_thread", "on_triton_device")
LAUNCHER_MODULES = (batch_stats, bn_relu_backward, conv_dgrad, conv_forward, conv_wgrad, row_sums)
SECOND = torch.device("cuda", 1)


class SecondDevice:
    """torch.cuda's current device, made believe (0 at the start), and the
    current device at each Triton launch."""

    def __init__(self, patch):
        self.current = 0
        self.launches: list[tuple[str, int]] = []

        def exchange(index):
            previous, self.current = self.current, index
            return previous

        patch.setattr(torch.cuda, "_exchange_device", exchange)
        patch.setattr(torch.cuda, "_maybe_exchange_device", exchange)
        jitted = type(row_sums._sum_rows_kernel)  # every kernel's launch goes through this class's run
        original = jitted.run

        def run(fn, *args, **kwargs):
            self.launches.append((fn.fn.__name__, self.current))
            return original(fn, *args, **kwargs)

        patch.setattr(jitted, "run", run)


@pytest.fixture
def second_device(monkeypatch):
    """Launchers see their tensors on cuda:1 (the tensors stay where they are)."""
    for module in LAUNCHER_MODULES:
        monkeypatch.setattr(module, "device_of", lambda t: SECOND if isinstance(t, torch.Tensor) else None)
    return SecondDevice(monkeypatch)


def test_a_training_step_launches_every_kernel_on_its_tensors_device(second_device):
    torch.manual_seed(0)
    model = PreActResNet(11, backend="triton").to(memory_format=torch.channels_last)
    model(torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)).sum().backward()
    x = torch.randn(3, 5, 4, 6)
    mean, _ = batch_stats.batch_stats(x, 1e-5)  # the launchers the step above does not call
    batch_stats.merge_partials(torch.full((2, 5), 3.0), torch.randn(2, 5), torch.rand(2, 5))
    row_sums.sum_partials([row_sums.Partials(torch.randn(3, 5), torch.float32, lambda total: total)])
    assert_close(mean, x.double().mean((0, 2, 3)), torch.float32, "mean")
    names = {name for name, _ in second_device.launches}
    assert {"_conv_fwd_kernel", "_dgrad_kernel", "_wgrad_kernel", "_input_grad_kernel", "_merge_partials_kernel",
            "_partial_stats_kernel", "_sum_rows_kernel"} <= names
    wrong = {name for name, device in second_device.launches if device != SECOND.index}
    assert not wrong, f"launched on the current device, not their tensors': {sorted(wrong)}"
    assert second_device.current == 0, "the current device was not restored"


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_second_device_computes_while_the_first_is_current():
    torch.cuda.set_device(0)
    x = torch.randn(4, 16, 8, 8, device="cuda:1").contiguous(memory_format=torch.channels_last)
    scale, shift = torch.rand(16, device="cuda:1"), torch.randn(16, device="cuda:1")
    w = torch.randn(8, 16, 3, 3, device="cuda:1") / 12
    outs, _ = conv_forward.conv_forward(x, scale, shift, [w], 1, 1)
    torch.cuda.synchronize(1)
    assert torch.cuda.current_device() == 0
    ref = torch.nn.functional.conv2d(torch.relu(x.double() * scale.double().view(1, -1, 1, 1)
                                                + shift.double().view(1, -1, 1, 1)), w.double(), None, 1, 1)
    assert_close(outs[0], ref, torch.float32, "out on cuda:1", scale=3)
