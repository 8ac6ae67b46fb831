"""Checkpoints: everything a run needs to continue exactly where it was.

A checkpoint holds the network, the optimizer (momentum buffers), the fp16
loss scaler, the iteration, the partial training sums of the current
evaluation interval and the resolved configuration. The data order and the
augmentation are functions of (seed, iteration) (schedule.py, augment.py),
so nothing else is needed for a bit-identical continuation on the CPU.
Files are written atomically: an interruption during a save leaves the
previous checkpoint intact. Each holds a SHA-256 of its own content, checked
on every load: torch.load does not check the zip CRCs, so flipped bytes would
otherwise load as wrong weights. A checkpoint is only written when every
tensor in it is finite, so the last one written is always a good one.
"""
import hashlib
from pathlib import Path
from typing import Any, Optional

import torch

from .config import RESUMABLE_CHANGES, ConfigError, TrainConfig
from .metrics import atomic_write

FORMAT = "fused_preact.train/2"
FILENAME = "checkpoint.pt"
_HASH_KEY = "content_sha256"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, I/O error)."""


def content_hash(state: Any) -> str:
    """SHA-256 of a nested structure of dicts, lists, tensors and scalars: every
    key, type, dtype, shape and byte, in a fixed order."""
    digest = hashlib.sha256()

    def visit(value):
        if isinstance(value, dict):
            digest.update(b"{%d" % len(value))
            for key in sorted(value, key=repr):
                visit(key)
                visit(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(b"[%d" % len(value))
            for item in value:
                visit(item)
        elif isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(f"{type(value).__name__}:{value!r};".encode())

    visit(state)
    return digest.hexdigest()


def nonfinite_tensors(state: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in a nested structure that hold a
    NaN or an infinity. One host synchronisation per device, not per tensor."""
    named: list[tuple[str, torch.Tensor]] = []

    def visit(value, name):
        if isinstance(value, dict):
            for key, item in value.items():
                visit(item, f"{name}.{key}" if name else str(key))
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                visit(item, f"{name}[{i}]")
        elif isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            named.append((name, value))

    visit(state, prefix)
    bad = []
    for device in {t.device for _, t in named}:
        on_device = [(n, t) for n, t in named if t.device == device]
        finite = torch.stack([torch.isfinite(t).all() for _, t in on_device]).tolist()
        bad += [n for (n, _), ok in zip(on_device, finite) if not ok]
    return bad


def training_state(net, optimizer, scaler) -> dict:
    """What the finiteness check before a save covers."""
    return {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()}


def save(path: Path, *, net, optimizer, scaler, config: TrainConfig, step: int, train_sums: torch.Tensor) -> None:
    """Write the checkpoint atomically, with its content hash. The caller has
    checked that the training state is finite (nonfinite_tensors)."""
    state = {
        "format": FORMAT,
        "step": step,
        "model": net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "config": config.to_dict(),
        "train_sums": train_sums.detach().cpu(),
        "torch_version": str(torch.__version__),
        # Networks that draw random numbers in forward (dropout) continue their streams.
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state(device) if (device := train_sums.device).type == "cuda" else None,
    }
    state = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    state[_HASH_KEY] = content_hash(state)
    try:
        atomic_write(path, lambda f: torch.save(state, f), binary=True)
    except (OSError, RuntimeError) as err:  # torch.save reports a failed write (disk full) as a RuntimeError
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).strip().splitlines()[0]
        raise CheckpointWriteError(f"cannot write the checkpoint {path} at iteration {step} ({reason}); the "
                                   f"previous checkpoint, if any, is intact") from None


def restore_rng(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["rng_cpu"].cpu())
    if device.type == "cuda" and state.get("rng_cuda") is not None:
        torch.cuda.set_rng_state(state["rng_cuda"].cpu(), device)


def find(path: str) -> Path:
    """The checkpoint file for --resume/--eval-only PATH (a file or a run directory)."""
    p = Path(path)
    if p.is_dir():
        p = p / FILENAME
    if not p.is_file():
        raise ConfigError(f"no checkpoint at {p}")
    return p


def load(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    try:
        # weights_only: a checkpoint is plain tensors and containers, never code.
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # a truncated or foreign file: torch raises several kinds
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ConfigError(f"{path} is not a readable checkpoint ({type(err).__name__}: {first_line})") from err
    if not isinstance(state, dict) or not str(state.get("format", "")).startswith("fused_preact.train/"):
        raise ConfigError(f"{path} is not a fused_preact.train checkpoint")
    if state["format"] != FORMAT:
        raise ConfigError(f"{path} is a {state['format']} checkpoint, this trainer reads {FORMAT} (with a content "
                          f"hash); evaluate or resume it with the version that wrote it")
    stored = state.pop(_HASH_KEY, None)
    if stored != content_hash(state):
        raise ConfigError(f"{path} is corrupted: its content does not match the SHA-256 stored with it; "
                          f"nothing was loaded or changed (restore the file from a copy)")
    _check_schema(path, state)
    bad = nonfinite_tensors({k: state[k] for k in ("model", "optimizer", "scaler")})
    if bad:
        raise ConfigError(f"{path} holds non-finite values in {len(bad)} tensors ({', '.join(bad[:3])}); "
                          f"it cannot be resumed or evaluated")
    return state


# What every checkpoint holds, by type (a file with a valid hash may still be
# another program's or hand-made).
_SCHEMA = {"step": int, "model": dict, "optimizer": dict, "scaler": dict, "config": dict, "train_sums": torch.Tensor,
           "rng_cpu": torch.Tensor}


def _check_schema(path: Path, state: dict) -> None:
    for key, kind in _SCHEMA.items():
        if key not in state:
            raise ConfigError(f"{path} is malformed: it has no {key!r} entry")
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise ConfigError(f"{path} is malformed: {key!r} must be a {kind.__name__}, got "
                              f"{type(state[key]).__name__}")
    if state["step"] < 0 or tuple(state["train_sums"].shape) != (3,):
        raise ConfigError(f"{path} is malformed: step {state['step']}, train_sums of shape "
                          f"{tuple(state['train_sums'].shape)} (expected >= 0 and (3,))")


def load_into(path: Path, key: str, target, state: dict) -> None:
    """target.load_state_dict(state[key]) (the network, optimizer or loss
    scaler), its refusal as one line naming the file."""
    try:
        target.load_state_dict(state[key])
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{path}: its {key} does not fit the {key} its configuration builds ({first})") from None


def resumed_config(saved: dict, given: dict[str, Any], preset: Optional[str]) -> TrainConfig:
    """The checkpoint's configuration with the command line's changes that keep
    the computation the same (longer schedule, other output directory, ...);
    any other difference is an error rather than a silently different run."""
    fields = set(TrainConfig.__dataclass_fields__)
    config = TrainConfig(**{k: v for k, v in saved.items() if k in fields})
    if preset is not None and preset != config.preset:
        raise ConfigError(f"--resume: the checkpoint was trained with --preset {config.preset}, not {preset}")
    for key, value in given.items():
        if getattr(config, key) == value:
            continue
        if key not in RESUMABLE_CHANGES:
            flag = "--" + key.replace("_", "-")
            raise ConfigError(f"--resume: {flag} {value!r} differs from the checkpoint's {getattr(config, key)!r}; "
                              f"only {', '.join(sorted('--' + k.replace('_', '-') for k in RESUMABLE_CHANGES))} "
                              f"may change when resuming")
        setattr(config, key, value)
    if "epochs" in given:
        config.iters = None
    if "iters" in given:
        config.epochs = None
    return config
