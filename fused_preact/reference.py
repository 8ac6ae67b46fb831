"""Plain-PyTorch reference implementations: the one reference shared by the
`"reference"` backend, the tests and the benchmarks.

Two levels:
- `bn_relu_conv2d_eager`: BatchNorm2d -> ReLU -> Conv2d exactly as torch.nn
  computes it (autograd keeps what it normally keeps). This is the ground truth.
- the BN-ReLU kernels (`batch_norm_stats`, `bn_relu_apply`, `bn_relu_backward`),
  with the same signatures and semantics as the compiled
  `torch.ops.fused_preact.*` kernels, written with tensor ops that run on any
  device, and the pieces they are made of (`batch_stats`, `bn_fold`,
  `bn_relu_backward_reduce`, `bn_relu_backward_input`). Statistics are fp32
  (fp64 for fp64 input), as in the kernels.
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


def bn_fold(mean, var, invstd, count: int, weight, bias, running_mean, running_var, num_batches_tracked,
            momentum: float):
    """(scale, shift) with relu(bn(x)) = relu(x * scale + shift), from a batch's
    per-channel (mean, biased var, invstd) over `count` values per channel;
    updates running_mean/var (unbiased variance, nn.BatchNorm2d's update,
    averaged in the statistics dtype and rounded once) and num_batches_tracked
    in place when given. Any of weight, bias and the running tensors may be
    None, and of another floating dtype than the statistics."""
    with torch.no_grad():
        scale = invstd if weight is None else weight.to(invstd.dtype) * invstd
        shift = -mean * scale if bias is None else torch.addcmul(bias.to(invstd.dtype), mean, scale, value=-1)
        if running_mean is not None:
            unbiased = var * (count / (count - 1))
            for r, b in ((running_mean, mean), (running_var, unbiased)):
                if r.dtype == b.dtype:
                    r.lerp_(b, momentum)
                else:
                    r.copy_(torch.lerp(r.to(b.dtype), b, momentum))
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
    return scale, shift


def bn_fold_from_invstd(mean, invstd, eps: float, count: int, weight, bias, running_mean, running_var,
                        num_batches_tracked, momentum: float):
    """bn_fold for statistics known as (mean, invstd) only: the biased variance
    is recovered as invstd^-2 - eps."""
    var = invstd.pow(-2).sub_(eps).clamp_(min=0)
    return bn_fold(mean, var, invstd, count, weight, bias, running_mean, running_var, num_batches_tracked, momentum)


def batch_norm_stats(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum: float, eps: float):
    """Training-mode BatchNorm statistics of x: (mean, invstd, scale, shift),
    the running statistics updated in place (see bn_fold)."""
    var, mean = torch.var_mean(x.to(stats_dtype(x)), dim=(0, 2, 3), correction=0)
    invstd = torch.rsqrt(var + eps)
    return mean, invstd, *bn_fold(mean, var, invstd, x.numel() // x.shape[1], weight, bias, running_mean,
                                  running_var, num_batches_tracked, momentum)


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


def bn_relu_backward(grad_act, x, mean, invstd, scale, shift, training: bool):
    """(dx, sum dz, sum dz * xhat) of BN -> ReLU; training: the statistics are
    x's batch statistics, so dx carries their correction terms."""
    sums = bn_relu_backward_reduce(grad_act, x, mean, invstd, scale, shift)
    dx = bn_relu_backward_input(grad_act, x, mean, invstd, scale, shift, *(sums if training else (None, None)))
    return dx, *sums


def bn_relu_conv2d_eager(x, conv_weight, bn_weight, bn_bias, running_mean, running_var, stride=1,
                         padding=0, training=True, momentum=0.1, eps=1e-5):
    """BatchNorm2d -> ReLU -> Conv2d(bias=False) exactly as torch.nn computes it."""
    a = F.relu(F.batch_norm(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps))
    return F.conv2d(a, conv_weight, None, stride, padding)
