"""Shared test helpers: per-dtype tolerances and a comparison that says where
tensors differ. The reference implementations come from fused_preact.reference,
the same module the benchmarks use."""
import os

import pytest
import torch

# (atol, rtol) for results computed in a dtype, compared with a float64 truth.
TOLERANCES = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 3e-2),
}
DTYPES = list(TOLERANCES)
BACKENDS = ["reference", "native"]


def assert_close(actual, expected, dtype=None, name="tensor", scale=1.0):
    """assert_close in the tolerance of `dtype` (default: actual's), with atol scaled
    by `scale` (e.g. the magnitude of a sum), reporting the worst element."""
    atol, rtol = TOLERANCES[dtype or actual.dtype]
    actual, expected = actual.double(), expected.double()
    diff = (actual - expected).abs()
    bound = atol * scale + rtol * expected.abs()
    if not bool((diff <= bound).all()):
        worst = int((diff - bound).flatten().argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape)) if diff.dim() else ()
        raise AssertionError(
            f"{name}: {int((diff > bound).sum())}/{diff.numel()} elements differ; worst at {idx}: "
            f"got {actual.flatten()[worst].item():.6g}, expected {expected.flatten()[worst].item():.6g} "
            f"(|diff| {diff.flatten()[worst].item():.3g} > atol {atol * scale:.3g} + rtol {rtol})"
        )


def arrival_counters_at_zero() -> bool:
    """Whether every device's ring of arrival counters (triton_kernels.row_sums)
    is back at zero: a last program to arrive resets the counter it used."""
    from fused_preact.triton_kernels import row_sums

    return all(not ring.any() for ring, _ in row_sums._rings.values())


def make_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as x in NCHW, channels_last, or as a non-contiguous slice.
    Apply it last: a later .to(dtype or device) would make a dense copy."""
    if layout == "nchw":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other image of a larger batch, values preserved
        big = torch.empty((2 * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        big[::2] = x
        assert x.shape[0] == 1 or not big[::2].is_contiguous()
        return big[::2]
    raise ValueError(layout)


LAYOUTS = ["nchw", "channels_last", "strided"]


def randomize(model, seed=1):
    """BN affine parameters and running statistics, Linear and conv biases (the
    gating convs') away from their init values, so a test sees them used."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                    m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            elif isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of many tiny ops: intra-op threads gain nothing there, and OpenMP
    spin-waiting on a loaded machine slows them tenfold. The kernels' threading is
    exercised by test_kernels/test_op, which run with the default thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def on_triton_device():
    """Tensor factories default to the Triton kernels' device: the CPU under the
    interpreter (TRITON_INTERPRET=1), else CUDA."""
    with torch.device("cpu" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "cuda"):
        yield


@pytest.fixture
def bf16_as_on_gpu(monkeypatch):
    """bf16 in the Triton interpreter computed as a GPU computes it. The
    interpreter stores bf16 as its raw uint16 bits and its tl.dot multiplies
    those bits as integers (results ~1e9 off), and it converts fp32 to bf16 by
    truncation. Here a bf16 operand of tl.dot is decoded to fp32 first
    (exact: the products a tensor core forms, summed in fp32) and fp32 -> bf16
    rounds to nearest even (the GPU's cvt.rn). A no-op off the interpreter."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    dot, cast = InterpreterBuilder.create_dot, InterpreterBuilder.cast_impl

    def as_fp32(handle):
        if handle.dtype != tl.bfloat16:
            return handle
        return TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, *args):
        return dot(self, as_fp32(a), as_fp32(b), d, *args)

    def cast_impl(self, src, dst_type):
        if src.dtype == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
            return TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return cast(self, src, dst_type)

    monkeypatch.setattr(InterpreterBuilder, "create_dot", create_dot)
    monkeypatch.setattr(InterpreterBuilder, "cast_impl", cast_impl)


def copy_state_in_order(source, target) -> None:
    """source's state dict into target's, entry by entry in order: the same
    layers in the same order under other names (a peer's weights)."""
    ours, theirs = target.state_dict(), source.state_dict()
    assert len(ours) == len(theirs), (len(ours), len(theirs))
    for (name, mine), (their_name, value) in zip(ours.items(), theirs.items()):
        assert mine.shape == value.shape, (name, their_name)
        mine.copy_(value)
