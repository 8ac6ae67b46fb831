"""No host synchronisation in a training step (forward, backward, SGD step),
for every backend and recompute mode: on a GPU, one would stall the launch
queue every layer and forbid CUDA-graph capture. Counted on the CPU with the
package's dispatch counter."""
import os

import pytest
import torch
import torch.nn.functional as F

from fused_preact import PreActResNet
from fused_preact.dispatch_count import DispatchCounter

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
BACKENDS = ["reference", "native", *(["triton"] if INTERPRET else [])]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_counter_sees_a_host_synchronisation():
    x = torch.randn(3)
    with DispatchCounter() as counter:
        x.sum().item()
        torch.nonzero(x > 0)
    assert counter.syncs == ["aten::_local_scalar_dense", "aten::nonzero"]


@pytest.mark.parametrize("recompute", ["none", "bn_relu", "unit", "segment"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_training_step_never_waits_for_the_device(backend, recompute):
    torch.manual_seed(0)
    memory = torch.channels_last if backend == "triton" else torch.contiguous_format
    model = PreActResNet(11, recompute=recompute, backend=backend).to(memory_format=memory)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=memory)
    labels = torch.randint(0, 10, (2,))
    for counted in (False, True):  # the second step, once momentum buffers exist
        with DispatchCounter() as counter:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), labels).backward()
            opt.step()
    assert counter.syncs == [], counter.syncs
    assert counter.total > 0
