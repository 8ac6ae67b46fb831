"""Loads the compiled kernels (fused_preact._C) on first use.

`import fused_preact` never needs the extension: the "reference" backend and
the plain-PyTorch models work without it. Only an op that needs a compiled
kernel calls `load()`, which raises one clear error when the build is missing.
"""
import functools
import importlib

import torch


class ExtensionNotBuiltError(RuntimeError):
    pass


@functools.cache
def _import():
    try:
        return importlib.import_module("fused_preact._C"), None
    except ImportError as err:  # kept, reported when a kernel is actually needed
        return None, err


def available() -> bool:
    return _import()[0] is not None


def load():
    """Import the compiled library (registering torch.ops.fused_preact.*) or raise."""
    module, err = _import()
    if module is None:
        raise ExtensionNotBuiltError(
            "fused_preact's compiled kernels are not built (import of fused_preact._C failed: "
            f"{err}). Build them with `pip install --no-build-isolation .` from the source tree, "
            'or use backend="reference".'
        )
    return module


def has_cuda_kernels() -> bool:
    return available() and torch._C._dispatch_has_kernel_for_dispatch_key("fused_preact::batch_stats", "CUDA")
