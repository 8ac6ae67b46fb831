"""Triton kernels of the fused BN -> ReLU -> conv op (one module per kernel
family: forward, dgrad, wgrad). Each module holds its kernels, then their host
launchers. Importing this package needs triton; fused_preact.ops imports it
lazily, so the package itself works without triton.

Under TRITON_INTERPRET=1 (set before triton is imported) the kernels run on
CPU tensors; that is how they are tested without a GPU.
"""
import os


def interpreting() -> bool:
    """Whether triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1).
    Here, not in common.py, so that asking does not import triton."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
