"""The kernels through triton.autotune's own machinery, in the GPU's configs:
every config a kernel's pruner keeps is benchmarked (a CPU stand-in for
do_bench runs each call several times and times it by its config), the
restore hooks put back what a benchmark run updates in place (also where
those arguments are absent, which crashed triton 3.6's own hooks), the
winner is the one launched and cached, and its result is the reference's.
Then the pinned configs (deterministic algorithms, or
FUSED_PREACT_TRITON_AUTOTUNE=0): configs that add in different orders give
different bits, so the bits must not follow the timing.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)

from conftest import assert_close  # noqa: E402
from fused_preact.triton_kernels import conv_dgrad as dgrad_module  # noqa: E402
from fused_preact.triton_kernels import conv_forward as forward_module  # noqa: E402
from fused_preact.triton_kernels import conv_wgrad as wgrad_module  # noqa: E402
from fused_preact.triton_kernels import tuning  # noqa: E402
from fused_preact.triton_kernels.batch_stats import batch_norm_stats  # noqa: E402
from fused_preact.triton_kernels.conv_dgrad import conv_dgrad  # noqa: E402
from fused_preact.triton_kernels.conv_forward import conv_forward  # noqa: E402
from fused_preact.triton_kernels.conv_wgrad import conv_wgrad  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "on_triton_device")
EPS, MOMENTUM, RUNS = 1e-5, 0.1, 3


def _config_of(kwargs, names) -> tuple:
    """The config among a launch's keyword arguments: those of `names`."""
    return tuple(sorted((k, v) for k, v in kwargs.items() if k in names))


class Tuning:
    """One kernel tuned among its GPU configs in the interpreter: records
    every launch's config, and benchmarks with `bench`, which runs each call
    RUNS times and times it by `cost(config key)`."""

    def __init__(self, kernel, patch, cost=None):
        self.kernel, self.cost = kernel, cost or (lambda key: 1.0)
        self.names = {*kernel.configs["gpu"][0].kwargs, "num_warps", "num_stages"}
        self.launched: list[tuple] = []
        self.benchmarked: list[tuple] = []
        jitted = type(kernel.fn)
        original = jitted.run

        def run(fn, *args, **kwargs):
            if fn is kernel.fn:
                self.launched.append(_config_of(kwargs, self.names))
            return original(fn, *args, **kwargs)

        patch.setattr(jitted, "run", run)
        patch.setitem(kernel.timed.__dict__, "do_bench", self.bench)  # over the cached property

    def bench(self, call, quantiles=None):
        first = len(self.launched)
        for _ in range(RUNS):
            call()
        ran = set(self.launched[first:])
        assert len(ran) == 1 and len(self.launched) - first == RUNS, "a benchmark call launched other configs"
        self.benchmarked.append(ran.pop())
        t = self.cost(self.benchmarked[-1])
        return [t, t, t]

    def kept(self, **named_args) -> list[tuple]:
        return [_config_of(c.all_kwargs(), self.names)
                for c in self.kernel.prune(self.kernel.configs["gpu"], named_args)]


@pytest.fixture
def gpu_configs():
    """The GPU's configs and sizes, autotuner caches empty, tuning on (also
    where FUSED_PREACT_TRITON_AUTOTUNE=0 is set: the GPU check's pinned step)."""
    with tuning.use(tuning.GPU), pytest.MonkeyPatch.context() as patch:
        patch.setattr(tuning, "AUTOTUNE", True)
        yield patch


def _input(shape, dtype=torch.float32):
    return (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).to(dtype).contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- every kept config benchmarked

def _forward(loader: str):
    """A conv forward whose input's statistics are merged in its loader (with
    or without running statistics), or given (plain); returns (outputs, check)."""
    x = _input((2, 40, 5, 7))
    weight = torch.randn(11, 40, 3, 3) / 60
    tracked = loader == "merge-tracked"
    running = [torch.randn(40), torch.rand(40) + 0.5] if tracked else [None, None]
    live = [t.clone() if t is not None else None for t in running]
    counter = torch.zeros((), dtype=torch.int64) if tracked else None
    if loader == "plain":
        scale, shift, fold = torch.rand(40) + 0.5, torch.randn(40), None
    else:
        (_, _, scale, shift), fold = batch_norm_stats(x, None, None, *live, counter, MOMENTUM, EPS, defer=True)
        assert fold is not None
    outs, _ = conv_forward(x, scale, shift, [weight], 1, 1, stats=True, fold=fold)
    var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    if fold is not None:  # the statistics the loader merged, and the running update once
        assert_close(scale, (var + EPS).rsqrt(), torch.float32, "scale", scale=10)
    if tracked:
        m = x.numel() // 40
        assert_close(live[0], 0.9 * running[0] + 0.1 * mean, torch.float32, "running_mean", scale=10)
        assert_close(live[1], 0.9 * running[1] + 0.1 * var * m / (m - 1), torch.float32, "running_var", scale=10)
        assert int(counter) == 1
    a = torch.relu(x.double() * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1))
    assert_close(outs[0], F.conv2d(a.float().double(), weight.double(), None, 1, 1), torch.float32, "out", scale=3)
    return outs[0]


def _dgrad():
    x = _input((2, 13, 5, 7))
    scale, shift = torch.rand(13) + 0.5, torch.randn(13)
    weight = torch.randn(40, 13, 3, 3) / 10
    dy = _input((2, 40, 5, 7))
    mean, invstd = torch.randn(13), torch.rand(13) + 0.5
    dz, _, _ = conv_dgrad([dy], [weight], [(1, 1)], [(1, 1)], x, mean, invstd, scale, shift)
    z = x.double() * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
    da = torch.ops.aten.convolution_backward(dy.double(), torch.relu(z), weight.double(), None, (1, 1), (1, 1),
                                             (1, 1), False, (0, 0), 1, (True, False, False))[0]
    clear = z.abs() > 1e-4
    assert_close(dz * clear, da * (z > 0) * clear, torch.float32, "dz", scale=float(da.abs().max()))
    return dz


def _wgrad():
    x = _input((2, 13, 9, 11))
    scale, shift = torch.rand(13) + 0.5, torch.randn(13)
    dy = _input((2, 40, 9, 11))
    dw = conv_wgrad(dy, x, scale, shift, (40, 13, 3, 3), 1, 1, torch.float32)
    a = torch.relu(x.double() * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1))
    want = torch.ops.aten.convolution_backward(dy.double(), a, torch.empty(40, 13, 3, 3, dtype=torch.float64), None,
                                               (1, 1), (1, 1), (1, 1), False, (0, 0), 1, (False, True, False))[1]
    assert_close(dw, want, torch.float32, "dW", scale=float(want.abs().max()))
    return dw


# name: (kernel, run, the pruner's arguments for run's problem). run() computes,
# checks against float64 and returns the kernel's result.
ON_CPU = torch.empty(0)  # the pruners read the SM count of x's device
FORWARD_ARGS = dict(C=40, K0=11, K1=0, M=2 * 5 * 7, x_ptr=ON_CPU)
CASES = {
    "forward-merge-tracked": (forward_module._conv_fwd, lambda: _forward("merge-tracked"), FORWARD_ARGS),
    "forward-merge-untracked": (forward_module._conv_fwd, lambda: _forward("merge-untracked"), FORWARD_ARGS),
    "forward-plain": (forward_module._conv_fwd, lambda: _forward("plain"), FORWARD_ARGS),
    "dgrad": (dgrad_module._dgrad, _dgrad, dict(C=13, K1=40, K2=40, sh=1, sw=1, num_m_tiles=2, x_ptr=ON_CPU)),
    "wgrad": (wgrad_module._wgrad, _wgrad, dict(K=40, C=13)),
}


@pytest.mark.parametrize("case", CASES)
def test_every_kept_config_is_benchmarked_and_the_fastest_runs(case, gpu_configs):
    kernel, run, named_args = CASES[case]
    tuned = Tuning(kernel, gpu_configs)
    kept = tuned.kept(**named_args)
    assert len(kept) >= 2, "the case must leave the autotuner a choice"
    tuned.cost = lambda key: float(len(kept) - kept.index(key))  # the last kept is the fastest, not the pinned one
    run()
    assert sorted(tuned.benchmarked) == sorted(kept), "the autotuner skipped or repeated a config"
    assert tuned.launched[-1] == kept[-1], "the launch after tuning is not the fastest config"
    # The pick is cached: the same problem again launches it once, benchmarks
    # nothing, and goes straight to the jitted function, around triton's
    # Autotuner.run (Tuned keeps the pick itself).
    benchmarked = len(tuned.benchmarked)
    tuned.launched.clear()
    through_autotuner = []
    gpu_configs.setitem(kernel.timed.__dict__, "run", lambda *args, **kwargs: through_autotuner.append(kwargs))
    run()
    assert len(tuned.benchmarked) == benchmarked and tuned.launched == [kept[-1]]
    assert through_autotuner == []


def test_a_pick_is_kept_per_dtype(gpu_configs):
    """The same problem in another dtype is a key of its own, as in triton's
    autotuner (its key holds the tensors' dtypes): tuned anew, not given the
    float32 pick, while float32 again benchmarks nothing."""
    kernel, _, named_args = CASES["forward-plain"]
    tuned = Tuning(kernel, gpu_configs)
    kept = tuned.kept(**named_args)
    tuned.cost = lambda key: float(len(kept) - kept.index(key))

    def run(dtype):
        x, weight = _input((2, 40, 5, 7), dtype), (torch.randn(11, 40, 3, 3) / 60).to(dtype)
        conv_forward(x, torch.rand(40) + 0.5, torch.randn(40), [weight], 1, 1)

    run(torch.float32)
    benchmarked = len(tuned.benchmarked)
    assert benchmarked >= 2
    run(torch.float32)
    assert len(tuned.benchmarked) == benchmarked, "the float32 pick was not kept"
    run(torch.float16)
    assert len(tuned.benchmarked) > benchmarked, "float16 took float32's pick"


# Triton's JIT for a GPU that is not here: the ahead-of-time compile replaces
# Autotuner.run by a sweep over the kept configs, which picks none.
_AHEAD_OF_TIME = """
import torch
from fused_preact.triton_kernels import conv_forward, offline

kernel = conv_forward._conv_fwd
x = torch.empty(128, 64, 32, 32).contiguous(memory_format=torch.channels_last)
w = torch.empty(64, 64, 3, 3).contiguous(memory_format=torch.channels_last)
swept = []
with offline.compiling_for(90, lambda *args: None, skip=lambda name, config: swept.append(config) or True):
    conv_forward.conv_forward(x, torch.ones(64), torch.ones(64), [w], 1, 1)
print(len(swept), len(kernel._picks))
"""


def test_an_ahead_of_time_sweep_keeps_no_pick():
    """The ahead-of-time compile launches an autotuned kernel through a sweep
    of every kept config (fused_preact.aot), on triton 3.6 and 3.8: the
    launch must neither fail for want of a pick nor keep one, which would
    decide that key's config in place of the autotuner."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", _AHEAD_OF_TIME], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    swept, picks = map(int, done.stdout.split())
    assert swept >= 2 and picks == 0


# ----------------------------------------------------------------------------- pinned configs

# Each problem keeps configs with different reduction steps (BLOCK_K 32 and
# 64; 16 and 64; wgrad's BLOCK_L 128 and 64), which add in different orders.
PINNED_CASES = ["forward-plain", "dgrad", "wgrad"]


@pytest.mark.parametrize("pin", ["deterministic-algorithms", "autotune-off"])
@pytest.mark.parametrize("case", PINNED_CASES)
def test_pinned_configs_give_the_same_bits_whatever_the_timing(case, pin, gpu_configs):
    kernel, run, named_args = CASES[case]
    tuned = Tuning(kernel, gpu_configs)
    kept = tuned.kept(**named_args)

    def in_a_process_that_times(fastest):
        # A fresh process: empty caches, the same inputs, a timing that favours `fastest`.
        kernel.forget()
        tuned.cost = lambda key: 0.0 if key == fastest else 1.0
        torch.manual_seed(0)
        return run()

    first, last = in_a_process_that_times(kept[0]), in_a_process_that_times(kept[-1])
    assert not torch.equal(first, last), "the two configs agree bit for bit: the case shows nothing"
    benchmarked = len(tuned.benchmarked)
    if pin == "autotune-off":
        gpu_configs.setattr(tuning, "AUTOTUNE", False)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(pin == "deterministic-algorithms")
    try:
        tuned.launched.clear()
        pinned = [in_a_process_that_times(kept[0]), in_a_process_that_times(kept[-1])]
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert torch.equal(*pinned), "a pinned config followed the timing"
    assert len(tuned.benchmarked) == benchmarked, "a pinned config was benchmarked"
    assert set(tuned.launched) == {kept[0]}, "the pinned config is not the pruner's first"
