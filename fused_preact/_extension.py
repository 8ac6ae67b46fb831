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


# The newest operator the sources define: a library built from older sources
# lacks it (an in-place build not redone after an update) and is refused whole,
# rather than failing later at the first layer that needs the missing op.
_NEWEST_OP = "bn_relu_conv"


def _import():
    try:
        module = importlib.import_module("fused_preact._C")
    except ImportError as err:  # kept, reported when a kernel is actually needed
        return None, err
    if not hasattr(torch.ops.fused_preact, _NEWEST_OP):
        return None, ImportError(f"{module.__file__} was built from older sources (it has no "
                                 f"fused_preact::{_NEWEST_OP}); rebuild it")
    return module, None


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
