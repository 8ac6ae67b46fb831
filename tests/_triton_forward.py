"""Helpers shared by the Triton forward tests (test_triton_forward.py,
test_triton_batch_stats.py): whether the interpreter runs the kernels, their
device, and float64 references of the BN-ReLU-conv and of batch statistics."""
import os

import pytest
import torch
import torch.nn.functional as F

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEV = "cpu" if INTERPRET else "cuda"
NO_ORDER_TO_VARY = pytest.mark.skipif(INTERPRET, reason="the interpreter runs programs one after another")


def _ref_conv(x, scale, shift, w, stride, padding):
    """conv2d(relu(x*scale+shift)) in float64, the activation rounded to x's dtype first
    (as eager PyTorch stores it)."""
    z = x.double() * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
    a = torch.relu(z).to(x.dtype).double()
    return F.conv2d(a, w.double(), None, stride, padding)


def _var_mean(t):
    return torch.var_mean(t.double(), dim=(0, 2, 3), correction=0)
