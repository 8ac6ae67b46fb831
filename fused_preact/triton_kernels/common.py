"""What the Triton kernel modules share: the BN-ReLU operand transform and the
corrected two-pass moments (device functions), the argument checks, conv
geometry and index-width rules, the device guard of every launcher (host).
The fixed-order reduction that every multi-program sum goes through is in
row_sums.py."""
import functools
import math
from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from . import SUPPORTED_DTYPES, dense_format, interpreting, launches_on, tuning
from .pieces import Pieces

INT32_MAX = 2**31 - 1


def _release(version: str) -> tuple[int, int]:
    return tuple(int(part) for part in version.split(".")[:2])


# triton 3.6's interpreter turns a loop bound (a 1-element array) into an int
# with int(array), which numpy 2.4 refuses (triton-lang/triton#9171, fixed in
# later releases): every kernel would fail inside the interpreter with a numpy
# TypeError. Say so at import instead.
if interpreting():
    import numpy

    if _release(triton.__version__) < (3, 7) and _release(numpy.__version__) >= (2, 4):
        raise ImportError(f"TRITON_INTERPRET=1 with triton {triton.__version__} needs numpy < 2.4 (its interpreter "
                          f"converts loop bounds with int(array), which numpy {numpy.__version__} refuses): "
                          "pip install 'numpy<2.4', or triton >= 3.7")


# ----------------------------------------------------------------------------- device functions

@triton.jit
def bn_relu(x, scale, shift, valid):
    """relu(x * scale + shift) in fp32, and 0 where `valid` is false. Padding
    is applied to the activation, not to x: a padded position contributes 0,
    not relu(shift)."""
    z = x.to(tl.float32) * scale + shift
    # ~(z <= 0) rather than z > 0: NaN propagates, as in torch.relu.
    return tl.where(valid & ~(z <= 0.0), z, 0.0)


@triton.jit
def piece_offsets(table_ptr, C, n, h, w, c, c_ok, IDX64: tl.constexpr):
    """Offsets (int64) from the first piece's pointer of x[n, c, h, w], x
    given as pieces (pieces.py: the table's rows are each channel's offset
    and its piece's N, H, W strides); n, h, w, c broadcast against each
    other (rows [:, None] and channels [None, :] for a tile). The offset
    between pieces, separate allocations, may pass 2**31; the offset within
    a piece is int32 unless IDX64 (a piece of 2**31 elements or more)."""
    t = table_ptr + c
    off = tl.load(t, mask=c_ok, other=0)
    s_n = tl.load(t + C, mask=c_ok, other=0)
    s_h = tl.load(t + 2 * C, mask=c_ok, other=0)
    s_w = tl.load(t + 3 * C, mask=c_ok, other=0)
    if IDX64:
        inside = n.to(tl.int64) * s_n + h.to(tl.int64) * s_h + w.to(tl.int64) * s_w
    else:
        inside = (n.to(tl.int32) * s_n.to(tl.int32) + h.to(tl.int32) * s_h.to(tl.int32)
                  + w.to(tl.int32) * s_w.to(tl.int32)).to(tl.int64)
    return off + inside


@triton.jit
def dropout_kept(seed_ptr, index, threshold):
    """Where the op's dropout keeps element `index` (its int64 index in the
    activation's logical NCHW order) of the call whose seed is at seed_ptr:
    SplitMix64 of (seed, index), the hash ops/dropout.py computes in tensor
    ops, bit for bit; its top 53 bits, as an integer u53, keep the element
    where u53 / 2**53 >= p, that is u53 >= threshold = ceil(p * 2**53)
    (dropout_args), exactly and without float64."""
    z = tl.load(seed_ptr).to(tl.uint64) + (index.to(tl.uint64) + 1) * 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    z = z ^ (z >> 31)
    return (z >> 11) >= threshold.to(tl.uint64)


@triton.jit
def dropped(a, n, c, h, w, C, H, W, seed_ptr, threshold, scale, DROPOUT: tl.constexpr):
    """a (fp32, of the activation's element [n, c, h, w], broadcast) through
    the op's dropout: 0 where dropout_kept drops it, a * scale (1 / (1 - p))
    where it keeps it; a itself without DROPOUT. Forward's loader applies it
    to relu(z), backward to relu(z)'s gradient: the same mask, made again."""
    if DROPOUT:
        index = ((n.to(tl.int64) * C + c) * H + h) * W + w
        a = tl.where(dropout_kept(seed_ptr, index, threshold), a * scale, 0.0)
    return a


@triton.jit
def two_pass(v, ok, n, axis: tl.constexpr):
    """(mean, M2) along `axis` of the `ok` entries of v, n of them (n > 0), by the
    corrected two-pass algorithm: the rounding error of the first mean is recovered
    from the sum of the deviations, so the mean stays exact to a few ulps even when it
    is 1e4 times the spread (a plain sum of 1e4-sized values is not)."""
    mean = tl.sum(tl.where(ok, v, 0.0), axis=axis) / n
    d = tl.where(ok, v - tl.expand_dims(mean, axis), 0.0)
    sum_d = tl.sum(d, axis=axis)
    return mean + sum_d / n, tl.sum(d * d, axis=axis) - sum_d * sum_d / n


# ----------------------------------------------------------------------------- host

# triton.cdiv and triton.next_power_of_2 are constexpr functions (usable in a
# kernel), whose host calls unwrap every argument: ~10 µs a call where a
# launch makes a dozen. The launchers use these plain ones.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The least power of 2 >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def launcher(device_from: Callable[..., Optional[torch.device]]):
    """Decorates a host function that launches Triton kernels: it runs with
    its tensors' CUDA device current, device_from(*args, **kwargs) (None when
    the argument is no tensor: the function's own checks then say what is
    wrong). A Triton launch goes to the current device, whatever its
    tensors' device; the C++ ops have a device guard for the same reason."""
    def wrap(fn):
        @functools.wraps(fn)
        def guarded(*args, **kwargs):
            device = device_from(*args, **kwargs)
            if device is None or device.type != "cuda":  # the interpreter's CPU tensors: nothing to switch
                return fn(*args, **kwargs)
            with torch.cuda.device(device):
                return fn(*args, **kwargs)
        return guarded
    return wrap


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """SMs of `device`: its own on CUDA, else the profile's (tuning.sizing:
    the interpreter, host_cost's meta tensors standing in for a GPU)."""
    if device.type != "cuda":
        return tuning.sizing.sm_count
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


# A launch of fewer programs than this per SM leaves SMs idle or running a
# single program, whose loads nothing overlaps: tile choices that reach it
# come first (filling_first), and the host's own choices aim for it.
PROGRAMS_PER_SM = 2


def filling_first(configs: list, programs: Callable[[triton.Config], int], device: torch.device) -> list:
    """`configs` with those whose grid (`programs(config)`) gives every SM of
    `device` PROGRAMS_PER_SM programs first, the rest after, each in its own
    order: the first is the pinned config, and the autotuner still times all."""
    target = PROGRAMS_PER_SM * sm_count(device)
    return sorted(configs, key=lambda cf: programs(cf) < target)


def device_of(t) -> Optional[torch.device]:
    return t.device if isinstance(t, torch.Tensor) else None


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for operands of `dtype`: fp32 follows PyTorch's
    TF32 setting for convolutions (torch.backends.cudnn.allow_tf32), so the
    Triton path rounds exactly where cuDNN would."""
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and not interpreting():
        return "tf32"
    return "ieee"


def needs_int64(*tensors) -> bool:
    """Whether an element offset of one of `tensors` (or of Pieces' tensors)
    can pass 2**31 - 1 (one past the largest offset its strides reach), so
    the kernel must index in 64 bits."""
    tensors = [p for t in tensors for p in (t.tensors if isinstance(t, Pieces) else (t,))]
    return max(1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride())) for t in tensors) > INT32_MAX


def pair(v, name: str, minimum: int = 0) -> tuple[int, int]:
    """An int or a pair of ints >= minimum as a pair; else a ValueError naming `name`."""
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    if (not isinstance(v, (tuple, list)) or len(v) != 2
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= minimum for i in v)):
        raise ValueError(f"{name} must be an int or a pair of ints >= {minimum}, got {v!r}")
    return tuple(v)


def per_weight(v, count: int, name: str, minimum: int) -> list[tuple[int, int]]:
    """One (h, w) pair per weight: a shared pair/int, or a list with one per weight."""
    if isinstance(v, (tuple, list)) and len(v) == count and all(isinstance(i, (tuple, list)) for i in v):
        return [pair(p, f"{name}[{i}]", minimum) for i, p in enumerate(v)]
    return [pair(v, name, minimum)] * count


def conv_out_size(size: int, k: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - k) // stride + 1


def conv_output_format(x: torch.Tensor, weights) -> torch.memory_format:
    """PyTorch's rule for a convolution's output layout (the one F.conv2d and its
    fake follow): channels_last when the input or a weight is channels_last."""
    if any(dense_format(t) == torch.channels_last for t in (x, *weights)):
        return torch.channels_last
    return torch.contiguous_format


def activation_args(x) -> tuple:
    """(x's pointer, piece table, PIECES) as a kernel that reads x takes them:
    for Pieces, the first piece and its table; for a tensor, x itself, any
    pointer for the unused table, and PIECES off."""
    if isinstance(x, Pieces):
        return x.first, x.table, True
    return x, x, False


def check_dropout(dropout, x) -> None:
    """dropout: None, or (p in (0, 1), a one-element int64 seed on x's device)."""
    if dropout is None:
        return
    p, seed = dropout
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout's p must be in (0, 1), got {p!r}")
    if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1 or \
            seed.device != x.device:
        raise ValueError(f"dropout's seed must be a one-element int64 tensor on x's device {x.device}, got "
                         f"{getattr(seed, 'dtype', type(seed).__name__)}")


def dropout_args(dropout, dummy: torch.Tensor) -> tuple:
    """(seed pointer, threshold, 1 / (1 - p)) of a kernel that drops out, for
    `dropout` = (p, seed: int64 [1] on the device) or None (then any pointer,
    and DROPOUT off: nothing is read). The threshold of dropout_kept:
    p * 2**53 is exact in float64, and the kept u53 are the integers >= it."""
    if dropout is None:
        return dummy, 0, 1.0
    p, seed = dropout
    return seed, math.ceil(p * 2.0 ** 53), 1.0 / (1.0 - p)


def empty_activation(x) -> torch.Tensor:
    """An empty tensor of x's shape, dtype and layout (dense): x's gradient's.
    A dense x's layout is named to torch.empty: empty_like costs more host
    time (on meta tensors it runs a Python reference, ~20 us a call)."""
    if isinstance(x, Pieces):
        return x.new_dense()
    if x.is_contiguous():
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    return torch.empty_like(x)


def check_activation(x, name: str = "x") -> None:
    """A 4-D float32/float16/bfloat16 tensor with data (or Pieces of such
    tensors), on a device the kernels run on: CUDA, or the CPU under the
    interpreter."""
    if isinstance(x, Pieces):  # same N, H, W, dtype and device throughout (Pieces checks)
        x = x.first
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be a 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16 for the Triton kernels, got {x.dtype}")
    if x.shape[1] == 0 or x.numel() == 0:
        raise ValueError(f"{name} must have at least one channel and one value per channel, got shape "
                         f"{tuple(x.shape)}")
    if not launches_on(x.device):
        raise ValueError(f"{name} must be a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1), got device "
                         f"{x.device}")


def channel_vector(v: Optional[torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    """A per-channel fp32 statistic as a contiguous [C] tensor on x's device."""
    c = x.shape[1]
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape ({c},), got {type(v).__name__}")
    if tuple(v.shape) != (c,):
        raise ValueError(f"{name} must have shape ({c},) (one value per channel of x), got {tuple(v.shape)}")
    if v.dtype != torch.float32:
        raise TypeError(f"{name} must be float32 (statistics are fp32 for every activation dtype), got {v.dtype}")
    if v.device != x.device:
        raise ValueError(f"{name} must be on x's device {x.device}, got {v.device}")
    return v.contiguous()
