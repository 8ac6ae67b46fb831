"""Weight gradient of BN -> ReLU -> conv, with relu(bn(x)) recomputed in the loader.

Forward was y = conv2d(a, W, stride, padding), a = relu(x * scale + shift) per
channel. Backward for the weight:

    dW[k, c, r, s] = sum_{n, ho, wo} dy[n, k, ho, wo] * a[n, c, ho * stride_h - p_h + r, wo * stride_w - p_w + s]

with a = 0 at padded positions (the padding is applied to a, so a padded tap
contributes 0, not relu(shift)).

`conv_wgrad` computes this as an implicit GEMM: rows = the K output channels,
columns = the C input channels of one tap (r, s) (so that a channels_last x is
read along C, coalesced), reduction = the L = N*Ho*Wo output positions. The
operand loader reads x and applies the BN affine and ReLU on the fly, rounding a
to x's dtype before the dot as eager does (it convolves the materialised a).

L is large (N*H*W) while K*C*R*S can be tiny (16x16 taps), so the reduction is
split into SPLIT contiguous chunks, one per program column; each program writes
its fp32 partial dW to its own slice of a [SPLIT, K, C, R, S] buffer, and a
second kernel sums the slices in a fixed order: bit-identical results run to run,
no atomics, no host synchronisation. SPLIT and the chunk size come from the
problem shape on the host (never from the autotuner), so the autotuned tile sizes
change neither the buffer's shape nor which chunk a position belongs to.
"""
import functools

import torch
import triton
import triton.language as tl

from . import tuning
from .common import (activation_args, bn_relu, cdiv, channel_vector, check_activation, check_dropout, conv_out_size,
                     device_of, dot_precision, dropout_args, dropped, launcher, needs_int64, next_power_of_2, pair,
                     piece_offsets, sm_count)
from .row_sums import Partials, sum_partials

# ----------------------------------------------------------------------------- kernels


@triton.jit
def _wgrad_kernel(
    dy_ptr, x_ptr, table_ptr, scale_ptr, shift_ptr, part_ptr, drop_seed_ptr, drop_threshold, drop_scale,
    N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw, L, chunk,
    s_dyn, s_dyk, s_dyh, s_dyw, s_xn, s_xc, s_xh, s_xw, s_wk, s_wc, s_wr, s_ws,
    PIECES: tl.constexpr, PIECES_IDX64: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    # Axis 0: output tiles, K tiles fastest so that programs reading the same
    # x columns (one channel tile at one tap) run together and share them in L2.
    # Axis 1: the chunk of the reduction this program sums.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_k_tiles = tl.cdiv(K, BLOCK_M)
    num_c_tiles = tl.cdiv(C, BLOCK_N)
    pid_k = pid % num_k_tiles
    pid_c = (pid // num_k_tiles) % num_c_tiles
    tap = pid // (num_k_tiles * num_c_tiles)
    r = tap // S
    s = tap % S

    offs_k = pid_k * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = offs_k < K
    c_ok = offs_c < C
    scale = tl.load(scale_ptr + offs_c, mask=c_ok, other=0.0)[None, :]
    shift = tl.load(shift_ptr + offs_c, mask=c_ok, other=0.0)[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    start = split * chunk
    end = tl.minimum(start + chunk, L)
    for l0 in range(start, end, BLOCK_L):
        l = l0 + tl.arange(0, BLOCK_L)
        l_ok = l < end
        n = l // (Ho * Wo)
        ho = (l // Wo) % Ho
        wo = l % Wo
        n64 = n.to(tl.int64)  # whole-tensor offsets may pass 2**31; per-image ones do not
        g = tl.load(dy_ptr + (n64 * s_dyn + ho * s_dyh + wo * s_dyw)[None, :] + offs_k[:, None] * s_dyk,
                    mask=k_ok[:, None] & l_ok[None, :], other=0.0)
        h = ho * sh - ph + r
        w = wo * sw - pw + s
        inside = l_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        if PIECES:  # x's channels from their pieces, in place
            x_offs = piece_offsets(table_ptr, C, n64[:, None], h[:, None], w[:, None], offs_c[None, :],
                                   c_ok[None, :], PIECES_IDX64)
        else:
            x_offs = (n64 * s_xn + h * s_xh + w * s_xw)[:, None] + offs_c[None, :] * s_xc
        xv = tl.load(x_ptr + x_offs, mask=inside[:, None] & c_ok[None, :], other=0.0)
        a = bn_relu(xv, scale, shift, inside[:, None])
        a = dropped(a, n64[:, None], offs_c[None, :], h[:, None], w[:, None], C, H, W, drop_seed_ptr, drop_threshold,
                    drop_scale, DROPOUT).to(x_ptr.dtype.element_ty)
        acc = tl.dot(g.to(a.dtype), a, acc, input_precision=PRECISION)

    # Partial dW of this chunk, laid out like dW itself (the s_w* strides of a
    # dense [K, C, R, S]), so the summed slices are dW with no further copy.
    out = (part_ptr + split.to(tl.int64) * (K * C * R * S)
           + offs_k[:, None] * s_wk + offs_c[None, :] * s_wc + r * s_wr + s * s_ws)
    tl.store(out, acc, mask=k_ok[:, None] & c_ok[None, :])


# ------------------------------------------------------------------------------ host

def _configs(tiles):
    """Configs of (BLOCK_M, BLOCK_N) output tiles: small tiles take longer
    reduction steps (BLOCK_L) to keep the dot busy."""
    configs = []
    for bm, bn in tiles:
        area = bm * bn
        bl = 128 if area <= 512 else 64 if area <= 4096 else 32
        configs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_L": bl},
                                     num_warps=4 if area <= 4096 else 8, num_stages=3))
    return configs


# Output tiles over K x C per profile. GPU: channel counts 16-256, pruned to
# the problem below; the interpreter runs one small config. Each profile's
# wgrad_chunk_align is a multiple of every BLOCK_L it may run, so chunks hold
# whole blocks whatever the autotuner picks.
CONFIGS = {
    "gpu": _configs([(bm, bn) for bm in (16, 32, 64, 128) for bn in (16, 32, 64, 128)]),
    "interpreter": [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_L": 64}, num_warps=4, num_stages=1)],
}
for _profile in (tuning.GPU, tuning.INTERPRETER):
    assert all(_profile.wgrad_chunk_align % c.kwargs["BLOCK_L"] == 0 for c in CONFIGS[_profile.name])


def _prune_wgrad(configs, named_args, **kwargs):
    """Tiles much wider than the channel counts only compute zeros; tiles
    under 32 wide are never the fastest when the channels are wider than
    that. The first kept is the pinned config."""
    k_cap = max(16, next_power_of_2(named_args["K"]))
    c_cap = max(16, next_power_of_2(named_args["C"]))
    kept = [cf for cf in configs if min(k_cap, 32) <= cf.kwargs["BLOCK_M"] <= k_cap
            and min(c_cap, 32) <= cf.kwargs["BLOCK_N"] <= c_cap]
    return kept or configs[:1]


_wgrad = tuning.Tuned(_wgrad_kernel, CONFIGS, key=["N", "C", "H", "W", "K", "R", "S", "sh", "sw", "chunk", "PIECES",
                                                      "DROPOUT"],
                      prune=_prune_wgrad)


def _split(L: int, out_tiles: int, device: torch.device) -> tuple[int, int]:
    """(SPLIT, chunk): enough programs to fill the GPU (a few per SM), but
    chunks of at least a few blocks so the partial buffer stays small. The
    interpreter's profile aims at a few chunks per output tile instead, so
    that the tests' small problems are split too."""
    sizes = tuning.sizing
    if sizes.wgrad_programs_per_sm is None:
        target = 4 * out_tiles
    else:
        target = sizes.wgrad_programs_per_sm * sm_count(device)
    split = max(1, min(cdiv(target, out_tiles), cdiv(L, sizes.wgrad_min_chunk), 256))
    chunk = cdiv(cdiv(L, split), sizes.wgrad_chunk_align) * sizes.wgrad_chunk_align
    return cdiv(L, chunk), chunk


@launcher(lambda grad, x, *args, **kwargs: device_of(x))
def conv_wgrad(grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, weight_shape,
               stride, padding, out_dtype: torch.dtype,
               memory_format: torch.memory_format = torch.contiguous_format, dropout=None) -> torch.Tensor:
    """dW (`weight_shape` = (K, C, R, S), `out_dtype`, in `memory_format`:
    contiguous or channels_last, the weight's own, so that autograd
    accumulates it into .grad without a copy) of conv2d(relu(x * scale +
    shift), W, stride, padding) given its output's gradient `grad` (see the
    module docstring). Deterministic. dropout: forward's (p, seed), whose
    mask the loader makes again (conv_forward's)."""
    return sum_partials([conv_wgrad_partials(grad, x, scale, shift, weight_shape, stride, padding, out_dtype,
                                             memory_format, dropout)])[0]


@launcher(lambda grad, x, *args, **kwargs: device_of(x))
def conv_wgrad_partials(grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, weight_shape,
                        stride, padding, out_dtype: torch.dtype,
                        memory_format: torch.memory_format = torch.contiguous_format, dropout=None) -> Partials:
    """conv_wgrad's launch without its sum: the chunks' partial dW, which
    sum_partials finishes into dW, together with other buffers' sums."""
    check_activation(x)
    check_dropout(dropout, x)
    stride, padding = pair(stride, "stride", 1), pair(padding, "padding")
    if min(stride) < 1 or min(padding) < 0:
        raise ValueError(f"stride must be >= 1 and padding >= 0, got {stride} and {padding}")
    n, c, h, w = x.shape
    weight_shape = tuple(weight_shape)
    if len(weight_shape) != 4 or weight_shape[1] != c:
        raise ValueError(f"weight_shape must be (K, {c}, R, S) (C = x's channels), got {weight_shape}")
    k, _, r, s = weight_shape
    ho, wo = conv_out_size(h, r, stride[0], padding[0]), conv_out_size(w, s, stride[1], padding[1])
    if ho < 1 or wo < 1:
        raise ValueError(f"weight_shape ({r}x{s} with padding {padding}) does not fit x's {h}x{w} image")
    if not isinstance(grad, torch.Tensor) or tuple(grad.shape) != (n, k, ho, wo):
        got = tuple(grad.shape) if isinstance(grad, torch.Tensor) else type(grad).__name__
        raise ValueError(f"grad must have the conv's output shape {(n, k, ho, wo)}, got {got}")
    if grad.dtype != x.dtype:
        raise TypeError(f"grad must have x's dtype {x.dtype}, got {grad.dtype}")
    if grad.device != x.device:
        raise ValueError(f"grad must be on x's device {x.device}, got {grad.device}")
    if out_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    if memory_format not in (torch.contiguous_format, torch.channels_last):
        raise ValueError(f"memory_format must be torch.contiguous_format or torch.channels_last, got {memory_format}")
    scale, shift = channel_vector(scale, "scale", x), channel_vector(shift, "shift", x)
    # dW's strides in that format, as empty(..., memory_format=) would give them
    w_strides = (c * r * s, 1, s * c, c) if memory_format == torch.channels_last else (c * r * s, r * s, s, 1)

    L = n * ho * wo
    finish = functools.partial(torch.as_strided, size=weight_shape, stride=w_strides)
    if L == 0 or k * c == 0:  # nothing to launch: an empty sum
        return Partials(torch.zeros((1, k * c * r * s), device=x.device), out_dtype, finish)
    split, chunk = _split(L, cdiv(k, 64) * cdiv(c, 64) * r * s, x.device)
    partials = torch.empty((split, k * c * r * s), dtype=torch.float32, device=x.device)
    x_arg, table, pieces = activation_args(x)
    _wgrad[lambda meta: (cdiv(k, meta["BLOCK_M"]) * cdiv(c, meta["BLOCK_N"]) * r * s, split)](
        grad, x_arg, table, scale, shift, partials, *dropout_args(dropout, scale),
        n, c, h, w, k, r, s, ho, wo, stride[0], stride[1], padding[0], padding[1], L, chunk,
        *grad.stride(), *x.stride(), *w_strides,
        PIECES=pieces, PIECES_IDX64=pieces and needs_int64(x), DROPOUT=dropout is not None,
        PRECISION=dot_precision(x.dtype),
    )
    return Partials(partials, out_dtype, finish)
