"""Plain-PyTorch reference implementations: the one reference shared by the
`"reference"` backend, the tests and the benchmarks.

Two levels:
- `bn_relu_conv2d_eager`: BatchNorm2d -> ReLU -> Conv2d exactly as torch.nn
  computes it (autograd keeps what it normally keeps). This is the ground truth.
- the BN-ReLU kernels (`batch_stats`, `bn_relu_apply`, `bn_relu_backward_reduce`,
  `bn_relu_backward_input`), with the same signatures and semantics as the
  compiled `torch.ops.fused_preact.*` kernels, written with tensor ops that run
  on any device. Statistics are fp32 (fp64 for fp64 input), as in the kernels.
"""
import torch
import torch.nn.functional as F


def stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1)


def batch_stats(x: torch.Tensor, eps: float):
    """Per-channel mean and 1/sqrt(biased var + eps) over (N, H, W)."""
    var, mean = torch.var_mean(x.to(stats_dtype(x)), dim=(0, 2, 3), correction=0)
    return mean, torch.rsqrt(var + eps)


def bn_relu_apply(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """relu(x * scale + shift) per channel, computed in the statistics dtype."""
    z = x.to(scale.dtype) * _per_channel(scale) + _per_channel(shift)
    return torch.relu(z).to(x.dtype)


def _dz_and_xhat(grad_act, x, mean, invstd, scale, shift):
    xs = x.to(scale.dtype)
    active = xs * _per_channel(scale) + _per_channel(shift) > 0
    dz = torch.where(active, grad_act.to(scale.dtype), 0)
    xhat = (xs - _per_channel(mean)) * _per_channel(invstd)
    return dz, xhat


def bn_relu_backward_reduce(grad_act, x, mean, invstd, scale, shift):
    """(sum dz, sum dz * xhat) per channel, dz = grad_act masked by relu'(z)."""
    dz, xhat = _dz_and_xhat(grad_act, x, mean, invstd, scale, shift)
    return dz.sum(dim=(0, 2, 3)), (dz * xhat).sum(dim=(0, 2, 3))


def bn_relu_backward_input(grad_act, x, mean, invstd, scale, shift, sum_dz=None, sum_dz_xhat=None):
    """dx of BN -> ReLU; batch statistics (training) when the sums are given."""
    dz, xhat = _dz_and_xhat(grad_act, x, mean, invstd, scale, shift)
    if sum_dz is not None:
        m = x.numel() // x.shape[1]
        dz = dz - (_per_channel(sum_dz) + xhat * _per_channel(sum_dz_xhat)) / m
    return (dz * _per_channel(scale)).to(x.dtype)


def bn_relu_conv2d_eager(x, conv_weight, bn_weight, bn_bias, running_mean, running_var, stride=1,
                         padding=0, training=True, momentum=0.1, eps=1e-5):
    """BatchNorm2d -> ReLU -> Conv2d(bias=False) exactly as torch.nn computes it."""
    a = F.relu(F.batch_norm(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps))
    return F.conv2d(a, conv_weight, None, stride, padding)
