"""Triton kernels of the fused BN -> ReLU -> conv op (one module per kernel
family: batch statistics (partial_stats.py, then batch_stats.py's merge),
forward, dgrad, input gradient, wgrad; what they share is in common.py, the
fixed-order reductions of their partials in row_sums.py, an input given as
pieces in pieces.py, how they are sized and autotuned in tuning.py). Each
module holds its kernels, then their host launchers.
Importing the modules needs triton; this package's own names (settings
read from the environment) do not, so fused_preact.ops can ask them
without importing triton.

Under TRITON_INTERPRET=1 (set before triton is imported) the kernels run on
CPU tensors; that is how they are tested without a GPU.
"""
import functools
import os

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache  # read on every launch; triton itself reads it once, at import
def interpreting() -> bool:
    """Whether triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# The devices whose tensors the launchers take besides CUDA: fused_preact.host_cost
# adds "meta" (and "cpu") while it runs a step with every Triton launch cut
# where the compiled kernel would start, so that no kernel needs a GPU.
HOST_ONLY_DEVICES: set = set()


def launches_on(device: torch.device) -> bool:
    """Whether the launchers take tensors on `device`: CUDA; the CPU in the
    interpreter; HOST_ONLY_DEVICES while host_cost cuts the launches."""
    return device.type == "cuda" or device.type in HOST_ONLY_DEVICES or (device.type == "cpu" and interpreting())


def autotune_enabled() -> bool:
    """FUSED_PREACT_TRITON_AUTOTUNE=0 pins each kernel's config to the first its
    pruner keeps for a shape (tuning.pinned): no timing, little to compile."""
    return os.environ.get("FUSED_PREACT_TRITON_AUTOTUNE", "1") != "0"


def dense_format(t: torch.Tensor) -> torch.memory_format:
    """channels_last for a channels_last tensor (that is not also contiguous,
    as size-1 dims allow), else contiguous_format: the layout a kernel's output
    takes after a convolution's input or weight."""
    channels_last = t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format
