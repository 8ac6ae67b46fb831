"""An activation given as pieces along channels (a DenseNet layer's input:
every earlier layer's output), which the kernels read in place as their
concatenation: it is never copied into one tensor.

A kernel gets the first piece as its x pointer and a table (int64 [4, C],
on x's device) that says, per channel c of the concatenation, where its
values lie relative to that pointer: row 0 the element offset of
x[0, c, 0, 0], rows 1-3 the element strides of c's piece along N, H and W
(common.piece_offsets). Pieces live in separate allocations; an offset from
one to another is a difference of addresses, which pointer arithmetic on
the GPU (and the interpreter's) takes like any other.

Tables are cached by the pieces' addresses and strides, so a layer whose
pieces sit where they sat in the last step builds none. On CUDA a table is
copied from pinned memory without blocking the host; while a CUDA graph is
captured, kernels write it instead (no host memory may be read then), and
it stays cached for as long as the process runs: the graph's replays read it.
"""
from collections import OrderedDict
from typing import Sequence

import torch

# Tables kept for reuse, least recently used first out (those made during a
# capture excepted). A training step of DenseNet-BC-250 has 120 layers.
_CACHE_SIZE = 1024
_tables: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_captured: dict = {}


class Pieces:
    """Tensors [N, C_i, H, W] of one dtype and device, read as their
    concatenation [N, sum C_i, H, W] along channels. Quacks like that
    tensor where the launchers ask (shape, dtype, device, dim, numel, the
    strides and layout a dense one would have) and is never one."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        tensors = list(tensors)
        if not tensors or not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in tensors):
            raise ValueError("pieces must be a non-empty list of 4-D (N, C_i, H, W) tensors")
        first = tensors[0]
        n, _, h, w = first.shape
        for i, t in enumerate(tensors):
            if (t.shape[0], t.shape[2], t.shape[3]) != (n, h, w) or t.dtype != first.dtype or t.device != first.device:
                raise ValueError(f"pieces[{i}] must share pieces[0]'s N, H, W {(n, h, w)}, dtype {first.dtype} and "
                                 f"device {first.device}, got shape {tuple(t.shape)}, {t.dtype} on {t.device}")
        self.tensors = tensors
        self.first = first
        self.shape = torch.Size((n, sum(t.shape[1] for t in tensors), h, w))
        self.dtype, self.device = first.dtype, first.device
        channels_last = all(t.is_contiguous(memory_format=torch.channels_last) for t in tensors)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._table = None

    def dim(self) -> int:
        return 4

    def numel(self) -> int:
        return self.shape.numel()

    def stride(self, dim=None):
        """The strides of a dense tensor of this shape in the pieces' layout."""
        n, c, h, w = self.shape
        strides = (h * w * c, 1, w * c, c) if self.memory_format == torch.channels_last else (c * h * w, h * w, w, 1)
        return strides if dim is None else strides[dim]

    def is_contiguous(self, memory_format=torch.contiguous_format) -> bool:
        """Whether a dense tensor in the pieces' layout is contiguous in `memory_format`."""
        return memory_format == self.memory_format

    def detach(self) -> "Pieces":
        return self  # the kernels record nothing for autograd

    def new_dense(self) -> torch.Tensor:
        """An empty tensor of the concatenation's shape, dtype and layout (a gradient's)."""
        return torch.empty(self.shape, dtype=self.dtype, device=self.device, memory_format=self.memory_format)

    def joined(self) -> torch.Tensor:
        """The concatenation itself (a copy), for a step no kernel here runs."""
        return torch.cat(self.tensors, 1)

    @property
    def table(self) -> torch.Tensor:
        if self._table is None:
            self._table = _table_of(self.tensors)
        return self._table


def _table_of(tensors: list[torch.Tensor]) -> torch.Tensor:
    key = (tensors[0].device, tensors[0].dtype,
           *((t.data_ptr(), t.shape[1], *t.stride()) for t in tensors))
    device = tensors[0].device
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    table = _captured.get(key)
    if table is None:
        table = _tables.get(key)
        if table is not None:
            _tables.move_to_end(key)
    if table is None:
        if capturing:  # no host memory may be read while capturing: kernels write it
            table = _device_table(tensors)
        else:
            host = _host_table(tensors)
            table = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
            _tables[key] = table
            if len(_tables) > _CACHE_SIZE:
                _tables.popitem(last=False)
    if capturing:  # the graph's replays read it: never evicted
        _captured[key] = table
    return table


def _entries(tensors: list[torch.Tensor]):
    """Per piece: (its channels, its first channel's offset from tensors[0]'s
    first element, its C, N, H, W strides), in elements."""
    size = tensors[0].element_size()
    base = tensors[0].data_ptr()
    for t in tensors:
        gap = t.data_ptr() - base
        if gap % size:
            raise ValueError(f"pieces must be aligned to their element size {size}: a piece starts {gap} bytes "
                             "from the first")
        sn, sc, sh, sw = t.stride()
        yield t.shape[1], gap // size, sc, sn, sh, sw


def _host_table(tensors: list[torch.Tensor]) -> torch.Tensor:
    """[4, C] int64: per channel, its offset from tensors[0]'s first element
    and its piece's N, H, W strides, in elements."""
    rows: list[list[int]] = [[], [], [], []]
    for c, offset, sc, *strides in _entries(tensors):
        rows[0] += [offset + i * sc for i in range(c)]
        for row, stride in zip(rows[1:], strides):
            row += [stride] * c
    return torch.tensor(rows, dtype=torch.int64)


def _device_table(tensors: list[torch.Tensor]) -> torch.Tensor:
    """_host_table's table written on the device by kernels with scalar
    arguments alone (an arange and three fills per piece): what a CUDA
    graph can capture."""
    table = torch.empty((4, sum(t.shape[1] for t in tensors)), dtype=torch.int64, device=tensors[0].device)
    start = 0
    for c, offset, sc, *strides in _entries(tensors):
        if sc:
            torch.arange(offset, offset + c * sc, sc, out=table[0, start:start + c])
        else:  # one channel, or an expanded piece
            table[0, start:start + c].fill_(offset)
        for row, stride in enumerate(strides, 1):
            table[row, start:start + c].fill_(stride)
        start += c
    return table
