"""The compiled kernels (fused_preact._C), imported once with the package.

`import fused_preact` never fails for want of the extension: the "reference"
backend and the plain-PyTorch models work without it. A failed import is
remembered and reported by `load()`, which the ops that need a compiled kernel
call. Everything here is settled at import time, so torch.compile traces the
ops' dispatch as constants.
"""
import importlib

import torch


class ExtensionNotBuiltError(RuntimeError):
    pass


def _import():
    try:
        return importlib.import_module("fused_preact._C"), None
    except ImportError as err:  # kept, reported when a kernel is actually needed
        return None, err


_MODULE, _IMPORT_ERROR = _import()
_HAS_CUDA_KERNELS = _MODULE is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
    "fused_preact::batch_norm_stats", "CUDA"
)


def available() -> bool:
    return _MODULE is not None


def has_cuda_kernels() -> bool:
    return _HAS_CUDA_KERNELS


def load():
    """The compiled module (torch.ops.fused_preact.* registered), or a clear error."""
    if _MODULE is None:
        raise ExtensionNotBuiltError(
            "fused_preact's compiled kernels are not built (import of fused_preact._C failed: "
            f"{_IMPORT_ERROR}). Build them with `pip install --no-build-isolation .` from the source tree, "
            'or use backend="reference".'
        )
    return _MODULE
