"""Host work per training step: the kernel-launching ATen ops and Triton
launches one forward+backward step dispatches, and the SGD step's, counted
with `fused_preact.dispatch_count` (its `count_step` and `DispatchCounter`),
plus whether any of them synchronises with the device.

Counted on the CPU whatever the machine (the counter sees Triton launches only
in the interpreter): eager nn and the native backend in every recompute mode
on a small bottleneck net (PreActResNet-11, batch 2) and on PreActResNet-164
(batch 2, 32x32), the Triton backend on the small net under TRITON_INTERPRET=1
only. The small net's group runs on 8x8 images in channels_last (the Triton
kernels' layout) for all its rows: the interpreter takes about a minute per
32x32 step of it on two cores, against seconds at 8x8. The eager and native
counts do not depend on the image size; the Triton count can grow a little
with it (more partial-statistics merges at larger images). SGD is the
training-step suite's (providers.sgd, the trainer's foreach update); a
foreach op is one dispatch here and a few chunked launches on a GPU.

Counts are in extra_info (`fwd_bwd_ops` = `aten_ops` + `triton_launches`,
`sgd_ops`, `step_ops`, `syncs`); the timed single round is the counting
itself, not a speed measurement. A few seconds; 2-3 more minutes with the
interpreted Triton rows.
"""
import os

import pytest
import torch

from conftest import record
from fused_preact import PreActResNet
from fused_preact.dispatch_count import DispatchCounter, count_step
from providers import FUSED_MODES, sgd

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
BATCH = 2
# depth: (backends of the fused rows, layout, image size); every net has an eager row.
NETS = {11: (("native", "triton"), torch.channels_last, 8), 164: (("native",), torch.contiguous_format, 32)}
CASES = []
for _depth, (_backends, _, _) in NETS.items():
    CASES.append(pytest.param(_depth, "eager", id=f"{_depth}-eager"))
    for _backend in _backends:
        skip = pytest.mark.skipif(_backend == "triton" and not INTERPRET,
                                  reason="Triton launches are counted in the interpreter: set TRITON_INTERPRET=1")
        CASES += [pytest.param(_depth, f"fused-{mode}-{_backend}", id=f"{_depth}-fused-{mode}-{_backend}", marks=skip)
                  for mode in FUSED_MODES]

def count_training_step(model, x, labels) -> tuple[DispatchCounter, DispatchCounter]:
    """(forward+backward counter, SGD step counter), each counted after one
    uncounted run (warm caches, the optimizer's momentum buffers created)."""
    fwd_bwd = count_step(model, x, labels)  # leaves its counted step's gradients
    opt = sgd(model)
    opt.step()
    with DispatchCounter() as step:
        opt.step()
    return fwd_bwd, step


@pytest.mark.parametrize("depth, provider", CASES)
def test_launches_per_step(benchmark, depth, provider):
    torch.manual_seed(0)
    if provider == "eager":
        model = PreActResNet(depth, fused=False, recompute="none")
    else:
        _, mode, backend = provider.split("-")
        model = PreActResNet(depth, recompute=mode, backend=backend)
    _, memory, size = NETS[depth]
    model = model.to(memory_format=memory).train()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, size, size, generator=gen).contiguous(memory_format=memory)
    labels = torch.randint(0, 10, (BATCH,), generator=gen)
    counted = {}

    def target():
        counted["fwd_bwd"], counted["sgd"] = count_training_step(model, x, labels)

    benchmark.pedantic(target, rounds=1, warmup_rounds=0)
    fwd_bwd, sgd_step = counted["fwd_bwd"], counted["sgd"]
    syncs = fwd_bwd.syncs + sgd_step.syncs
    record(benchmark, f"launches|PreActResNet-{depth}, batch {BATCH}, {size}x{size}", provider, BATCH, None,
           depth=depth, aten_ops=sum(fwd_bwd.ops.values()), triton_launches=sum(fwd_bwd.triton.values()),
           fwd_bwd_ops=fwd_bwd.total, sgd_ops=sgd_step.total, step_ops=fwd_bwd.total + sgd_step.total,
           syncs=bool(syncs), sync_ops=syncs, top_ops=dict(fwd_bwd.ops.most_common(4)),
           triton_kernels=dict(fwd_bwd.triton))
