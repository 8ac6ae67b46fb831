"""Processes and devices: one process per GPU under torchrun (NCCL), or gloo
on the CPU (what the tests use), or a single process without torchrun.

The paper trained CIFAR on 2 GPUs with plain data parallelism: every process
normalises with the statistics of its own share of the batch (no
SyncBatchNorm), gradients are averaged. DistributedDataParallel does exactly
that; its default buffer broadcast keeps the running statistics of process 0
everywhere, so all processes evaluate (and save) the same network.
"""
import dataclasses
import gc
import hashlib
import os
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from .config import ConfigError
from .data import DataError


class DeviceError(RuntimeError):
    pass


@dataclasses.dataclass
class Processes:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def rows(self, global_batch: int) -> slice:
        """This process's rows of a global batch: contiguous shares whose
        sizes differ by at most one (an epoch's last batch need not divide)."""
        share, extra = divmod(global_batch, self.world_size)
        start = self.rank * share + min(self.rank, extra)
        return slice(start, start + share + (self.rank < extra))

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def any_true(self, flag: torch.Tensor) -> bool:
        """True if `flag` (a bool tensor) is set in any process; every process
        gets the same answer, so they stop together."""
        value = flag.to(torch.int32).reshape(1)
        if self.distributed:
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def decide(self, fn: Callable[[], Any]) -> Any:
        """Process 0 computes fn() -- or fails with a ConfigError/DataError --
        and every process gets that same result or error: a decision (the
        output directory) cannot differ between processes, and a failed
        download does not leave the others waiting for process 0."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except (ConfigError, DataError) as err:
                error = (type(err).__name__, str(err))
        if self.distributed:
            box = [(result, error)]
            dist.broadcast_object_list(box, src=0)
            result, error = box[0]
        if error is not None:
            raise (DataError if error[0] == "DataError" else ConfigError)(error[1])
        return result


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: CUDA is not available in this torch build/machine; use --device cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type != "cuda":
        raise DeviceError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.index is None:
        device = torch.device("cuda", local_rank)
    if device.index >= torch.cuda.device_count():
        raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def _environment_int(name: str, default: int, minimum: int) -> int:
    text = os.environ.get(name, str(default))
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise DeviceError(f"environment variable {name} must be an integer >= {minimum}, got {text!r} (torchrun "
                          f"sets it; unset it to run one process)")
    return value


def setup(device_name: str) -> Processes:
    """Join the process group torchrun describes in the environment (if any)."""
    world_size = _environment_int("WORLD_SIZE", 1, 1)
    rank, local_rank = _environment_int("RANK", 0, 0), _environment_int("LOCAL_RANK", 0, 0)
    if rank >= world_size:
        raise DeviceError(f"environment variable RANK={rank} must be below WORLD_SIZE={world_size}")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if world_size > 1 and not os.environ.get(v)]
    if missing and not dist.is_initialized():
        raise DeviceError(f"WORLD_SIZE={world_size} needs {' and '.join(missing)} in the environment: start the "
                          f"processes with torchrun, or unset WORLD_SIZE to run one")
    device = pick_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(minutes=30),
                                **({"device_id": device} if device.type == "cuda" else {}))
    return Processes(rank, world_size, device)


def teardown(procs: Processes, wait_for_others: bool) -> None:
    """Leave the process group. DDP's reducer sits in a reference cycle: left
    to the garbage collector at interpreter exit, after the group is gone, it
    sometimes aborts the process ("terminate called without an active
    exception", seen with gloo); so collect it first. After a finished run
    the processes also leave together; after an error they do not wait (a
    process that failed alone must exit so that torchrun stops the others)."""
    if not (procs.distributed and dist.is_initialized()):
        return
    gc.collect()
    if wait_for_others:
        dist.barrier()
    dist.destroy_process_group()


def wrap(model: torch.nn.Module, procs: Processes) -> torch.nn.Module:
    if not procs.distributed:
        return model
    ids = [procs.device.index] if procs.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def state_digest(model: torch.nn.Module) -> str:
    """A hash of every parameter and buffer, bit for bit."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def gather_digests(model: torch.nn.Module, procs: Processes) -> Optional[list[str]]:
    """Every process's state_digest (all of them receive the list)."""
    digest = state_digest(model)
    if not procs.distributed:
        return [digest]
    out: list = [None] * procs.world_size
    dist.all_gather_object(out, digest)
    return out
