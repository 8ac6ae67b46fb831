"""Checkpoints: everything a run needs to continue exactly where it was.

A checkpoint holds the network, the optimizer (momentum buffers), the fp16
loss scaler, the iteration, the partial training sums of the current
evaluation interval and the resolved configuration. The data order and the
augmentation are functions of (seed, iteration) (schedule.py, augment.py),
so nothing else is needed for a bit-identical continuation on the CPU.
Files are written atomically: an interruption during a save leaves the
previous checkpoint intact.
"""
from pathlib import Path
from typing import Any, Optional

import torch

from .config import RESUMABLE_CHANGES, ConfigError, TrainConfig
from .metrics import atomic_write

FORMAT = "fused_preact.train/1"
FILENAME = "checkpoint.pt"


def save(path: Path, *, net, optimizer, scaler, config: TrainConfig, step: int, train_sums: torch.Tensor) -> None:
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
    atomic_write(path, lambda f: torch.save(state, f), binary=True)


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
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a fused_preact.train checkpoint")
    return state


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
