"""Triton's JIT for a GPU that is not there: compiling the kernels for
sm_<arch> on a machine without one, and reading what was compiled (registers,
local and shared memory, tensor-core instructions). The ahead-of-time compile
(fused_preact.aot), fused_preact.host_cost and fused_preact.occupancy use it.
"""
import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from . import SUPPORTED_DTYPES, batch_stats, bn_relu_backward, conv_dgrad, conv_forward, conv_wgrad
from .pieces import Pieces


class OfflineDriver:
    """The surface of triton's active driver that JITFunction.run and the
    autotuner use, answering for a GPU of sm_<arch> with no device behind
    it (in compiling_for, and in fused_preact.host_cost and fused_preact.occupancy)."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_benchmarker(self):
        # Every config "takes" the same time: the autotuner keeps the pruner's
        # first, as the pinned path does (nothing runs to be timed).
        return lambda kernel_call, quantiles=None, **kwargs: [1.0, 1.0, 1.0]

    def is_active(self):
        return True


def _check_without_device(x, name="x"):
    """check_activation's checks except the device: these CPU tensors are never read."""
    x = x.first if isinstance(x, Pieces) else x
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}: a 4-D float32/float16/bfloat16 tensor expected")


@contextlib.contextmanager
def compiling_for(arch: int, record, skip=lambda name, config: False):
    """Inside, a Triton launch compiles for sm_<arch> and calls record(kernel
    name, config, compiled kernel, seconds it took) instead of running; an
    autotuned launch compiles every config its pruner keeps. A launch for
    which skip(kernel name, config) is true compiles nothing."""
    saved_driver = driver._active  # not .active: creating the real driver needs a GPU
    saved_run, saved_tune = JITFunction.run, Autotuner.run
    patched = [(m, m.check_activation) for m in (batch_stats, conv_forward, conv_dgrad, conv_wgrad, bn_relu_backward)]

    def run(self, *args, grid=None, warmup=False, **kwargs):
        if skip(self.fn.__name__, _config_of(kwargs)):
            return None
        start = time.perf_counter()
        kernel = saved_run(self, *args, grid=grid, warmup=True, **kwargs)
        record(self.fn.__name__, _config_of(kwargs), kernel, time.perf_counter() - start)
        return kernel

    def tune(self, *args, **kwargs):
        kwargs.pop("grid", None)
        kwargs.pop("warmup", None)
        self.nargs = dict(zip(self.arg_names, args))
        configs = self.prune_configs(kwargs) if len(self.configs) > 1 else self.configs
        for config in configs:
            self.fn.run(*args, **kwargs, **config.all_kwargs())

    driver.set_active(OfflineDriver(arch))
    JITFunction.run, Autotuner.run = run, tune
    for module, _ in patched:
        module.check_activation = _check_without_device
    try:
        yield
    finally:
        driver._active = saved_driver
        JITFunction.run, Autotuner.run = saved_run, saved_tune
        for module, original in patched:
            module.check_activation = original


def _config_of(kwargs) -> str:
    keys = sorted(k for k in kwargs if k.isupper() or k in ("num_warps", "num_stages"))
    return " ".join(f"{k}={kwargs[k]}" for k in keys if not isinstance(kwargs[k], torch.Tensor))


def _tool(name: str):
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else shutil.which(name)


def resource_usage(cubin: bytes) -> dict:
    """REG, LOCAL (bytes of local memory per thread: spills) and SHARED from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    return {key: int(m.group(1)) if (m := re.search(rf"\b{key}:(\d+)", text)) else None
            for key in ("REG", "LOCAL", "SHARED", "STACK")}


def tensor_cores(ptx: str) -> str:
    """The tensor-core instructions a kernel's PTX issues: wgmma (sm_90), mma, or none ("-")."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma"
    return "-"
