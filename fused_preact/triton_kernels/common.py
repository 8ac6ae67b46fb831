"""Pieces every fused kernel shares."""
import torch
import triton
import triton.language as tl

from . import interpreting  # noqa: F401  (re-exported for the kernel modules)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for operands of `dtype`: fp32 follows PyTorch's
    TF32 setting for convolutions (torch.backends.cudnn.allow_tf32), so the
    Triton path rounds exactly where cuDNN would."""
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and not interpreting():
        return "tf32"
    return "ieee"


@triton.jit
def bn_relu(x, scale, shift, valid):
    """relu(x * scale + shift) in fp32, and 0 where `valid` is false. Padding
    is applied to the activation, not to x: a padded position contributes 0,
    not relu(shift)."""
    z = x.to(tl.float32) * scale + shift
    # ~(z <= 0) rather than z > 0: NaN propagates, as in torch.relu.
    return tl.where(valid & ~(z <= 0.0), z, 0.0)
