"""Two-level fixed-order reductions in one launch (triton_kernels/row_sums.py):
the last program of a column block to arrive reduces the group rows. In the
interpreter: one launch where there were two, the counters back at zero, the
ring. For the GPU, where programs run at once: the compiled sm_90 code
orders each program's stores before its arrival (a barrier, then one
thread's acq_rel atomic) and reads the group rows from L2 after it."""
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import arrival_counters_at_zero, assert_close

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEV = "cpu" if INTERPRET else "cuda"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)

from fused_preact.dispatch_count import DispatchCounter  # noqa: E402
from fused_preact.triton_kernels import batch_stats, row_sums  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _partials(rows: int, channels: int, device, seed: int):
    g = torch.Generator().manual_seed(seed)
    count = torch.randint(1, 33, (rows, channels), generator=g).float()
    mean, m2 = torch.randn(rows, channels, generator=g) * 3 + 1, torch.rand(rows, channels, generator=g)
    return count.to(device), mean.to(device), m2.to(device)


def _reduced(count, mean, m2) -> tuple:
    """(mean, var, sum of m2): a merge and a sum of the partials."""
    return (*batch_stats.merge_partials(count, mean, m2),
            row_sums.sum_partials([row_sums.Partials(m2, torch.float32, lambda t: t)])[0])


def _check_against_float64(reduced, count, mean, m2):
    n = count.double().sum(0)
    want_mean = (count.double() * mean.double()).sum(0) / n
    want_m2 = (m2.double() + count.double() * (mean.double() - want_mean) ** 2).sum(0)
    for got, want, name in zip(reduced, (want_mean, want_m2 / n, m2.double().sum(0)), ("mean", "var", "sum")):
        assert_close(got, want, torch.float32, name)


@pytest.mark.parametrize("rows", [9, 37, 300])
def test_merge_and_sum_of_many_partials_are_one_launch_each(rows):
    assert row_sums.reduction_groups(rows) is not None  # the two-level path
    partials = _partials(rows, 6, DEV, rows)
    with DispatchCounter() as counter:
        reduced = _reduced(*partials)
    assert counter.triton == {"_merge_partials_kernel": 1, "_sum_rows_kernel": 1}, counter.triton
    _check_against_float64(reduced, *partials)
    assert arrival_counters_at_zero(), "the last program left its counter set"


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="programs run at once only on a GPU")
def test_last_arrivals_on_a_gpu_give_the_same_bits_every_time():
    # The paper's 4096 partials (16 groups of 256) over 64 and 256 channels,
    # 200 times: a last program that read a group row before its program
    # had written it, or a counter left set, would change the bits.
    for channels in (64, 256):
        partials = _partials(4096, channels, "cuda", channels)
        first = _reduced(*partials)
        for _ in range(200):
            assert all(torch.equal(a, b) for a, b in zip(first, _reduced(*partials)))
        _check_against_float64(first, *partials)
    torch.cuda.synchronize()
    assert arrival_counters_at_zero()


def test_a_triton_training_step_leaves_every_counter_at_zero():
    from fused_preact import PreActResNet

    torch.manual_seed(0)
    model = PreActResNet(11, backend="triton").to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 8, 8, device=DEV).contiguous(memory_format=torch.channels_last)
    ring, before = row_sums.arrival_counters(torch.device(DEV), 0)
    with DispatchCounter() as counter:
        model.to(DEV)(x).sum().backward()
    # The step's reductions run inside the conv, dgrad and dx launches, on counters from the ring.
    assert counter.triton.get("_merge_partials_kernel", 0) <= 1 and "_sum_rows_kernel" not in counter.triton
    assert row_sums.arrival_counters(torch.device(DEV), 0)[1] > before, "no launch took counters"
    assert arrival_counters_at_zero()


def test_the_ring_hands_out_aligned_disjoint_counters_and_wraps():
    device = torch.device("meta")
    row_sums._rings.pop(device, None)
    ring, first = row_sums.arrival_counters(device, 3)
    _, second = row_sums.arrival_counters(device, 17)
    _, third = row_sums.arrival_counters(device, 1)
    assert (first, second, third) == (0, 16, 48)
    assert ring.shape == (row_sums._RING,) and ring.dtype == torch.int32
    row_sums._rings[device][1] = row_sums._RING - 8
    assert row_sums.arrival_counters(device, 9)[1] == 0  # would run past the end: from the start again
    row_sums._rings.pop(device)


_COMPILE = """
import torch
from fused_preact.triton_kernels import batch_stats, offline, row_sums

kernels = {}
with offline.compiling_for(90, lambda name, config, kernel, seconds: kernels.setdefault(name, kernel)):
    row_sums.sum_partials([row_sums.Partials(torch.zeros(4096, 64), torch.float32, lambda t: t)])
    batch_stats.merge_partials(torch.ones(4096, 64), torch.zeros(4096, 64), torch.zeros(4096, 64))
for name, kernel in kernels.items():
    print("=== " + name)
    print(kernel.asm["ptx"])
"""


@pytest.fixture(scope="module")
def sm90_ptx() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # compiled code: triton's JIT, for a GPU that is not here
    done = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    parts = re.split(r"^=== (\w+)$", done.stdout, flags=re.M)[1:]
    return dict(zip(parts[::2], parts[1::2]))


@pytest.mark.parametrize("kernel", ["_sum_rows_kernel", "_merge_partials_kernel"])
def test_compiled_arrivals_follow_a_barrier_and_release_the_stores(sm90_ptx, kernel):
    lines = [line.strip() for line in sm90_ptx[kernel].splitlines()]
    arrivals = [i for i, line in enumerate(lines) if re.search(r"atom\.global\.gpu\.acq_rel\.add", line)]
    assert arrivals, f"{kernel}: no acq_rel atomic add at gpu scope"
    for i in arrivals:
        assert lines[i].startswith("@"), f"{kernel}: the arrival is not made by one thread alone: {lines[i]}"
        last_store = max(j for j in range(i) if re.match(r"(@%p\d+ )?st\.global", lines[j]))
        assert any(lines[j].startswith("bar.sync") for j in range(last_store, i)), \
            f"{kernel}: no barrier between the group row's stores and the arrival"
        assert any(re.match(r"(@%p\d+ )?ld\.global\.cg", line) for line in lines[i:]), \
            f"{kernel}: the group rows are not read from L2 after the arrival"
