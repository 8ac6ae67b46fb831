"""Triton kernels of the fused BN -> ReLU -> conv op (one module per kernel
family: forward, dgrad, wgrad). Each module holds its kernels, then their host
launchers. Importing this package needs triton; fused_preact.ops imports it
lazily, so the package itself works without triton.

Under TRITON_INTERPRET=1 (set before triton is imported) the kernels run on
CPU tensors; that is how they are tested without a GPU.
"""
import os

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """Whether triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1).
    Here, not in common.py, so that asking does not import triton."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_enabled() -> bool:
    """FUSED_PREACT_TRITON_AUTOTUNE=0 gives each kernel one fixed GPU config:
    little to compile (the GPU correctness tests), but untuned speed."""
    return os.environ.get("FUSED_PREACT_TRITON_AUTOTUNE", "1") != "0"


def pair(v, name: str, minimum: int = 0) -> tuple[int, int]:
    """An int or a pair of ints >= minimum as a pair; else a ValueError naming `name`."""
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    if (not isinstance(v, (tuple, list)) or len(v) != 2
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= minimum for i in v)):
        raise ValueError(f"{name} must be an int or a pair of ints >= {minimum}, got {v!r}")
    return tuple(v)


def conv_out_size(size: int, k: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - k) // stride + 1


def _channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def conv_output_format(x: torch.Tensor, weights) -> torch.memory_format:
    """PyTorch's rule for a convolution's output layout (the one F.conv2d and its
    fake follow): channels_last when the input or a weight is channels_last."""
    if _channels_last(x) or any(_channels_last(w) for w in weights):
        return torch.channels_last
    return torch.contiguous_format
