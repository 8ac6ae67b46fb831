"""Test-set evaluation: during training (every process takes a share of the
test set) and of a saved checkpoint (--eval-only)."""
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from . import checkpoint, distributed
from .augment import Normalizer
from .config import TrainConfig, validate
from .data import load_dataset, num_classes, prepare_dataset
from .networks import build_model

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@torch.no_grad()
def evaluate(net, images, labels, normalize, procs, c: TrainConfig) -> tuple[float, float]:
    """(mean loss, error) over the test set; each process takes a contiguous
    share and the sums are added up, so every process gets the same numbers."""
    was_training = net.training
    net.eval()
    share = math.ceil(len(labels) / procs.world_size)
    lo, hi = procs.rank * share, min(len(labels), (procs.rank + 1) * share)
    sums = torch.zeros(3, dtype=torch.float64, device=images.device)
    fmt = torch.channels_last if c.channels_last else torch.contiguous_format
    amp = AMP_DTYPES[c.amp]
    for start in range(lo, hi, c.eval_batch_size):
        stop = min(hi, start + c.eval_batch_size)
        x = normalize(images[start:stop]).contiguous(memory_format=fmt)
        y = labels[start:stop]
        with torch.autocast(images.device.type, dtype=amp, enabled=amp is not None):
            logits = net(x)
        sums[0] += F.cross_entropy(logits.float(), y, reduction="sum").double()
        sums[1] += (logits.argmax(dim=1) != y).sum()
        sums[2] += stop - start
    procs.all_sum(sums)
    net.train(was_training)
    loss, errors, count = sums.tolist()
    return loss / count, errors / count


def evaluate_checkpoint(path: Path, device: str = "auto", eval_batch_size: Optional[int] = None,
                        data_dir: Optional[str] = None, download: bool = True) -> dict:
    """Test loss and error of a saved network (evaluation-only mode), on the
    test set in `data_dir`; None: the run's data directory where it exists
    on this machine, else the default ./data. A checkpoint's paths are
    another machine's, perhaps: none is created or downloaded into."""
    procs = distributed.setup(device)
    try:
        state = checkpoint.load(path, procs.device)
        c = TrainConfig(**{k: v for k, v in state["config"].items() if k in TrainConfig.__dataclass_fields__})
        c.device, c.eval_batch_size = device, eval_batch_size or c.eval_batch_size
        c.data_dir = data_dir or (c.data_dir if Path(c.data_dir).is_dir() else TrainConfig.data_dir)
        c.download = download
        validate(c)
        net = build_model(c, num_classes(c.dataset))
        checkpoint.load_into(path, "model", net, state)
        fmt = torch.channels_last if c.channels_last else torch.contiguous_format
        net = net.to(device=procs.device, memory_format=fmt)
        procs.decide(lambda: prepare_dataset(c.dataset, Path(c.data_dir), c.download))
        data = load_dataset(c.dataset, Path(c.data_dir), False, c.data_seed, c.train_size, c.test_size)
        normalize = Normalizer(c.normalize, data.train_images, c.dataset, procs.device)
        loss, err = evaluate(net, data.test_images.to(procs.device), data.test_labels.to(procs.device), normalize,
                             procs, c)
        result = {"checkpoint": str(path), "iter": state["step"], "test_loss": loss, "test_error": err,
                  "test_images": len(data.test_labels)}
        if procs.is_main:
            print(f"{path} (iteration {state['step']}): test error {100 * err:.2f}%, loss {loss:.4f} on "
                  f"{len(data.test_labels)} {c.dataset} test images", flush=True)
        return result
    finally:
        distributed.teardown(procs, wait_for_others=False)
