"""The bundled trainer: reproduces the CIFAR experiments of He et al. 2016.

    python -m fused_preact.train --preset quick | paper | torch-official [options]

Modules: config (presets, command line, validation), data (CIFAR archives,
md5, embedded set), synthetic (the embedded "shapes10" set), augment
(batched crop/flip/normalise on the device), schedule (lr and data order per
iteration), networks (the registry model for a config), loop (train,
evaluate), optim (the two SGD forms, capturable), graphs (--cuda-graphs:
the step as CUDA graphs), checkpoint, metrics (JSONL, summary, curves),
distributed.
"""
from .config import PRESETS, ConfigError, TrainConfig, resolve
from .data import CIFAR, CifarSpec, DataError, load_dataset
from .evaluation import evaluate_checkpoint
from .loop import TrainingDiverged, train

__all__ = ["CIFAR", "PRESETS", "CifarSpec", "ConfigError", "DataError", "TrainConfig", "TrainingDiverged",
           "evaluate_checkpoint", "load_dataset", "resolve", "train"]
