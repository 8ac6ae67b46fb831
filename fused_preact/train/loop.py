"""The training loop: data on the device, SGD with the recipe's schedule,
evaluation, metrics, checkpoints, resume, the NaN guard, several processes.

One iteration: take the global batch's rows of this process from the uint8
training tensor on the device, normalise, crop and flip them there
(augment.py), forward under autocast, backward (through the fp16 loss scaler
when asked), SGD step. The host syncs with the device only every
`log_every` iterations and at evaluations; training sums stay on the device
in between.
"""
import math
import resource
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from . import checkpoint, distributed
from .augment import Normalizer, random_crop_flip, step_generator
from .config import ConfigError, TrainConfig, print_config
from .data import load_dataset, num_classes, prepare_dataset
from .metrics import MetricsLog, plot_curves, write_json
from .networks import build_model
from .rundir import RunDirLock
from .optim import make_optimizer
from .schedule import BatchOrder, derived_seed, make_schedule

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MiB = 2**20


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB: the process's peak RSS


def default_out(c: TrainConfig) -> Path:
    """runs/<preset>-<dataset>-<arch><depth>-seed<seed>, numbered if taken."""
    base = Path("runs") / f"{c.preset}-{c.dataset}-{c.arch}{c.depth or ''}-seed{c.seed}"
    out, n = base, 1
    while (out / checkpoint.FILENAME).exists() or (out / "metrics.jsonl").exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def _claim_out(c: TrainConfig, resuming: bool, held: list) -> Path:
    """The run directory, locked for this trainer (the lock is appended to
    `held`): a second trainer fails here, naming the first."""
    out = default_out(c) if c.out is None else Path(c.out)
    lock = RunDirLock(out).__enter__()
    held.append(lock)
    if c.out is not None and not resuming and ((out / checkpoint.FILENAME).exists()
                                                or (out / "metrics.jsonl").exists()):
        raise ConfigError(f"--out {out} already holds a run; pass --resume to continue it or choose another --out")
    return out


def _probe(net, c: TrainConfig, device: torch.device, fmt) -> None:
    """One eval-mode forward of two blank images before anything else: an
    option the network or the device cannot honour (a backend without
    kernels here, an autocast dtype, an input size) fails now, as one line,
    not as a traceback in the first iteration. Eval mode and no_grad leave
    the network's state and the random streams untouched."""
    amp = AMP_DTYPES[c.amp]
    net.eval()
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            net(torch.zeros(2, 3, 32, 32, device=device).contiguous(memory_format=fmt))
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"network {c.arch!r} cannot run on {device} with these options: {reason}") from err
    finally:
        net.train()


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


def _sync_buffers(net, procs) -> None:
    # Each process updates BatchNorm running statistics from its own share;
    # DDP copies process 0's before every training forward. Evaluations and
    # checkpoints take process 0's too, so all processes hold one network.
    if procs.distributed:
        for b in net.buffers():
            torch.distributed.broadcast(b, src=0)


def train(c: TrainConfig, resume: Optional[Path] = None, *, interrupt_after: Optional[int] = None) -> dict:
    """Run (or continue, from checkpoint `resume`) training; returns the summary.
    `interrupt_after` (for tests) raises KeyboardInterrupt after that iteration,
    as a Ctrl-C between iterations would."""
    procs = distributed.setup(c.device)
    finished, held = False, []  # held: process 0's lock on the run directory
    try:
        if procs.distributed and c.batch_size % procs.world_size:
            raise ConfigError(f"--batch-size {c.batch_size} must be divisible by the {procs.world_size} processes")
        if procs.distributed and c.batch_size // procs.world_size < 2:
            raise ConfigError(f"--batch-size {c.batch_size} leaves fewer than 2 images per process for BatchNorm")
        out = procs.decide(lambda: _claim_out(c, resume is not None, held))
        if held and held[0].stale:
            print(f"note: {out} had the lock of a trainer that died ({held[0].stale}); taking it over", flush=True)
        summary = _train(c, procs, out, resume, interrupt_after)
        finished = True
        return summary
    finally:
        for lock in held:
            lock.__exit__(None, None, None)
        distributed.teardown(procs, wait_for_others=finished)


def _train(c: TrainConfig, procs, out: Path, resume, interrupt_after) -> dict:
    device, main = procs.device, procs.is_main
    if c.threads:
        torch.set_num_threads(c.threads)
    c.out = str(out)

    torch.manual_seed(derived_seed("init", c.seed))  # the same initial network in every process
    net = build_model(c, num_classes(c.dataset))
    fmt = torch.channels_last if c.channels_last else torch.contiguous_format
    net = net.to(device=device, memory_format=fmt)
    _probe(net, c, device, fmt)
    optimizer = make_optimizer(c, net.parameters())
    scaler = torch.amp.GradScaler(device.type, enabled=c.amp == "fp16")

    procs.decide(lambda: prepare_dataset(c.dataset, Path(c.data_dir), c.download))  # downloads once
    data = load_dataset(c.dataset, Path(c.data_dir), False, c.data_seed, c.train_size, c.test_size)
    normalize = Normalizer(c.normalize, data.train_images, c.dataset, device)
    train_x, train_y = data.train_images.to(device), data.train_labels.to(device)
    test_x, test_y = data.test_images.to(device), data.test_labels.to(device)
    schedule = make_schedule(c, len(train_y), procs.world_size)
    order = BatchOrder(c.seed, len(train_y), c.batch_size, schedule.iters_per_epoch, device)
    eval_every = c.eval_every or schedule.iters_per_epoch
    ckpt_every = c.ckpt_every or eval_every
    ckpt_path = out / checkpoint.FILENAME
    log = MetricsLog(out / "metrics.jsonl")

    # Training sums of the current evaluation interval: loss, errors, images.
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    step = 0
    if resume is not None:
        state = checkpoint.load(resume, device)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if main:
            sums.copy_(state["train_sums"])
        step = state["step"]
        checkpoint.restore_rng(state, device)
        if schedule.total_iters < step:
            raise ConfigError(f"--resume: the run is already at iteration {step}, past the {schedule.total_iters} "
                              f"iterations asked for; give a longer --iters/--epochs")
    last_good = (step, resume) if resume is not None else (None, None)
    if main:
        # Read (and so check) the metrics to keep before anything is written.
        kept = log.read_upto(step, source=resume.parent / "metrics.jsonl") if resume is not None else []
        print_config(c)
        write_json(out / "config.json", c.to_dict())
        log.rewrite(kept)
        print(f"{c.arch} on {c.dataset} ({len(train_y)} train / {len(test_y)} test images), "
              f"{sum(p.numel() for p in net.parameters()):,} parameters, {procs.world_size} process(es) on "
              f"{device}; {schedule.total_iters} iterations ({schedule.iters_per_epoch}/epoch)"
              + (f", the last {schedule.dropped_images} images of each epoch dropped (too few to split for "
                 f"BatchNorm)" if schedule.dropped_images else "")
              + (f", resuming at iteration {step}" if step else "") + f"; writing to {out}", flush=True)

    model = distributed.wrap(net, procs)
    eval_net = net
    if c.compile:
        model, eval_net = torch.compile(model), torch.compile(net)
    amp = AMP_DTYPES[c.amp]
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    bar = _progress(main, schedule.total_iters, step)
    interval_start, interval_images, window = time.perf_counter(), 0, torch.zeros(3, dtype=torch.float64,
                                                                                   device=device)
    started = time.perf_counter()

    def where_good() -> str:
        return (f"the last good checkpoint is {last_good[1]} (iteration {last_good[0]})" if last_good[1]
                else "no checkpoint was written before it")

    def guard(what: str = "loss"):
        if procs.any_true(nonfinite):
            raise TrainingDiverged(f"the {what} became NaN or infinite by iteration {step}; stopped, "
                                   f"{where_good()}. Try a lower --lr or --amp none")

    try:
        model.train()
        while step < schedule.total_iters:
            lr = schedule.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = order.indices(step)
            rows = procs.rows(len(batch))
            idx = batch[rows]
            x = normalize(train_x[idx])
            x = random_crop_flip(x, c.crop_pad, c.flip, step_generator(c.seed, step, device), rows)
            x, y = x.contiguous(memory_format=fmt), train_y[idx]
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits = model(x)
                loss_sum = F.cross_entropy(logits, y, reduction="sum")
            # The global batch's mean loss once DDP averages the gradients over
            # processes, also where an epoch's last batch splits unevenly.
            loss = loss_sum / (len(batch) / procs.world_size)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            # Device-side sums only: reading the loss here would make the host
            # wait for the device every iteration.
            for acc in (sums, window):
                acc[0] += loss_sum.detach().double()
                acc[1] += (logits.argmax(dim=1) != y).sum()
                acc[2] += len(y)
            nonfinite |= ~torch.isfinite(loss.detach())
            interval_images += len(batch)

            if step % c.log_every == 0 or step == schedule.total_iters:
                guard()
                if bar is not None:
                    w = window.tolist()
                    rate = interval_images / max(time.perf_counter() - interval_start, 1e-9)
                    bar.set_postfix(loss=f"{w[0] / w[2]:.3f}", err=f"{w[1] / w[2]:.3f}", lr=f"{lr:.3g}",
                                    img_s=f"{rate:.0f}", refresh=False)
                    bar.update(step - bar.n)
                window.zero_()
            if step % eval_every == 0 or step == schedule.total_iters:
                guard()
                rate = interval_images / max(time.perf_counter() - interval_start, 1e-9)
                _sync_buffers(net, procs)
                train_loss, train_err, count = procs.all_sum(sums.clone()).tolist()
                test_loss, test_err = evaluate(eval_net, test_x, test_y, normalize, procs, c)
                if not math.isfinite(test_loss):
                    nonfinite.fill_(True)  # stop below, after the record that shows it
                record = {"iter": step, "epoch": round(step / schedule.iters_per_epoch, 4), "lr": lr,
                          "train_loss": train_loss / count, "train_error": train_err / count,
                          "test_loss": test_loss, "test_error": test_err, "images_per_s": round(rate, 1),
                          "peak_memory_mib": round(peak_memory_mib(device), 1),
                          "time_s": round(time.perf_counter() - started, 2)}
                if main:
                    log.append(record)
                    _say(bar, f"iter {step}/{schedule.total_iters} epoch {record['epoch']:.2f}: train loss "
                              f"{record['train_loss']:.4f} err {100 * record['train_error']:.2f}% | test loss "
                              f"{test_loss:.4f} err {100 * test_err:.2f}% | lr {lr:.4g} | {rate:.0f} img/s")
                sums.zero_()
                interval_start, interval_images = time.perf_counter(), 0
                guard("test loss")
            if step % ckpt_every == 0 or step == schedule.total_iters:
                guard()
                _sync_buffers(net, procs)
                bad = checkpoint.nonfinite_tensors(checkpoint.training_state(net, optimizer, scaler))
                if procs.any_true(torch.tensor(bool(bad))):
                    raise TrainingDiverged(
                        f"{len(bad) or 'some'} tensors of the network or optimizer became NaN or infinite by "
                        f"iteration {step} ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); stopped without "
                        f"saving them: {where_good()}. Try a lower --lr or --amp none")
                # The interval's sums of all processes; on resume process 0 carries them.
                interval_sums = procs.all_sum(sums.clone())
                if main:
                    checkpoint.save(ckpt_path, net=net, optimizer=optimizer, scaler=scaler, config=c, step=step,
                                    train_sums=interval_sums)
                last_good = (step, ckpt_path)
                procs.barrier()
            if interrupt_after is not None and step == interrupt_after:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        if main:
            _say(bar, f"interrupted after iteration {step}; the last checkpoint is {last_good[1]} (iteration "
                      f"{last_good[0]}); continue with: python -m fused_preact.train --resume {out}")
        raise
    finally:
        if bar is not None:
            bar.close()

    digests = distributed.gather_digests(net, procs)
    records = log.records() if main else []
    final = records[-1] if records else {}
    summary = {
        "status": "finished",
        "final_test_error": final.get("test_error"),
        "final_test_loss": final.get("test_loss"),
        "final_train_error": final.get("train_error"),
        "best_test_error": min((r["test_error"] for r in records if r["test_error"] is not None), default=None),
        "iters": step,
        "epochs": round(step / schedule.iters_per_epoch, 4),
        "wall_time_s": round(time.perf_counter() - started, 2),
        "peak_memory_mib": round(peak_memory_mib(device), 1),
        "world_size": procs.world_size,
        "ranks_in_sync": len(set(digests)) == 1,
        "state_digests": digests,
        "checkpoint": str(ckpt_path),
        "metrics": str(log.path),
        "curves": str(out / "curves.png"),
        "config": c.to_dict(),
    }
    if main:
        if not plot_curves(records, out / "curves.png", f"{c.arch}{c.depth or ''} on {c.dataset}"):
            summary["curves"] = None  # matplotlib is not installed
        write_json(out / "summary.json", summary)
        print(f"final test error {100 * summary['final_test_error']:.2f}% after {step} iterations "
              f"({summary['wall_time_s']:.0f} s); summary in {out / 'summary.json'}", flush=True)
    return summary


def _progress(main: bool, total: int, initial: int):
    if not main:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    # disable=None: no bar when stderr is not a terminal (CI logs); the
    # per-evaluation lines are printed either way.
    return tqdm(total=total, initial=initial, unit="it", dynamic_ncols=True, disable=None, mininterval=1.0)


def _say(bar, line: str) -> None:
    if bar is not None and not bar.disable:
        bar.write(line)
    else:
        print(line, flush=True)


def evaluate_checkpoint(path: Path, device: str = "auto", eval_batch_size: Optional[int] = None) -> dict:
    """Test loss and error of a saved network (evaluation-only mode)."""
    procs = distributed.setup(device)
    try:
        state = checkpoint.load(path, procs.device)
        c = TrainConfig(**{k: v for k, v in state["config"].items() if k in TrainConfig.__dataclass_fields__})
        c.device, c.eval_batch_size = device, eval_batch_size or c.eval_batch_size
        net = build_model(c, num_classes(c.dataset))
        net.load_state_dict(state["model"])
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
