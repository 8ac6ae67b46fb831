"""The training loop: data on the device, SGD with the recipe's schedule,
evaluation, metrics, checkpoints, resume, the NaN guard, several processes.

One iteration: take the global batch's rows of this process from the uint8
training tensor on the device, normalise, crop and flip them there
(augment.py), forward under autocast, backward (through the fp16 loss scaler
when asked), SGD step; with --cuda-graphs the last three are one CUDA graph
replayed (graphs.py). The host syncs with the device only every
`log_every` iterations and at evaluations; training sums stay on the device
in between.
"""
import math
import resource
import signal
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from . import checkpoint, distributed, graphs
from .augment import Normalizer, random_crop_flip, step_generator
from .config import ConfigError, TrainConfig, print_config
from .data import load_dataset, num_classes, prepare_dataset
from .evaluation import AMP_DTYPES, evaluate
from .metrics import MetricsLog, plot_curves, write_json
from .networks import build_model
from .optim import make_optimizer, set_lr
from .rundir import claim_out
from .schedule import BatchOrder, derived_seed, make_schedule
from .stopping import Interrupted, StopRequests, signal_name

MiB = 2**20


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB: the process's peak RSS


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


def _sync_buffers(net, procs) -> None:
    # Each process updates BatchNorm running statistics from its own share;
    # DDP copies process 0's before every training forward. Evaluations and
    # checkpoints take process 0's too, so all processes hold one network.
    if procs.distributed:
        for b in net.buffers():
            torch.distributed.broadcast(b, src=0)


def train(c: TrainConfig, resume: Optional[Path] = None, *, rewind: bool = False,
          interrupt_after: Optional[int] = None, stop_after: Optional[int] = None) -> dict:
    """Run (or continue, from checkpoint `resume`) training; returns the summary.
    rewind: let `resume`, an older checkpoint of the run directory it is in,
    continue there. For tests: `interrupt_after` raises KeyboardInterrupt
    after that iteration (a second Ctrl-C), `stop_after` requests a stop
    there as SIGINT does."""
    procs = distributed.setup(c.device)
    finished, held = False, []  # held: process 0's lock on the run directory
    stops = StopRequests()
    try:
        graphs.check_support(c, procs)
        if procs.distributed and c.batch_size % procs.world_size:
            raise ConfigError(f"--batch-size {c.batch_size} must be divisible by the {procs.world_size} processes")
        if procs.distributed and c.batch_size // procs.world_size < 2:
            raise ConfigError(f"--batch-size {c.batch_size} leaves fewer than 2 images per process for BatchNorm")
        out = procs.decide(lambda: claim_out(c, resume, rewind, held))
        if held and held[0].stale:
            print(f"note: {out} had the lock of a trainer that died ({held[0].stale}); taking it over", flush=True)
        with stops.installed():
            summary = _train(c, procs, out, resume, stops, interrupt_after, stop_after)
        finished = True
        return summary
    finally:
        for lock in held:
            lock.__exit__(None, None, None)
        distributed.teardown(procs, wait_for_others=finished)


def _train(c: TrainConfig, procs, out: Path, resume, stops: StopRequests, interrupt_after, stop_after) -> dict:
    run = _Run(c, procs, out, resume)
    schedule = run.schedule
    eval_every = c.eval_every or schedule.iters_per_epoch
    ckpt_every = c.ckpt_every or eval_every

    def due(every: int) -> bool:
        return run.step % every == 0 or run.step == schedule.total_iters

    try:
        run.model.train()
        while run.step < schedule.total_iters:
            run.train_step()
            if due(c.log_every):
                run.report_progress()
            if due(eval_every):
                run.evaluate()
            if due(ckpt_every):
                run.save_checkpoint()
            if interrupt_after is not None and run.step == interrupt_after:
                raise KeyboardInterrupt
            if stop_after is not None and run.step == stop_after:
                stops.request(signal.SIGINT)
            if run.step < schedule.total_iters and stops.agreed(run.procs, due(c.log_every)):
                run.stop(stops.signum)
    except KeyboardInterrupt as err:
        if procs.is_main and not isinstance(err, Interrupted):  # a second signal, or one before the loop
            step, path = run.last_good
            _say(run.bar, f"interrupted after iteration {run.step}; " + (
                f"the last checkpoint is {path} (iteration {step}); continue with: python -m fused_preact.train "
                f"--resume {out}" if path else f"no checkpoint to resume: to start over, remove {out} or choose "
                                               f"another --out"))
        raise
    finally:
        if run.bar is not None:
            run.bar.close()
    return run.finish()


class _Run:
    """One training run's state and its pieces: set-up (network, optimizer,
    data, schedule, the resumed state, the run directory's files), one
    training iteration, progress, evaluation, checkpoint, summary."""

    def __init__(self, c: TrainConfig, procs, out: Path, resume: Optional[Path]):
        self.c, self.procs, self.out = c, procs, out
        device = self.device = procs.device
        if c.threads:
            torch.set_num_threads(c.threads)
        c.out = str(out)
        torch.manual_seed(derived_seed("init", c.seed))  # the same initial network in every process
        self.fmt = torch.channels_last if c.channels_last else torch.contiguous_format
        self.net = build_model(c, num_classes(c.dataset)).to(device=device, memory_format=self.fmt)
        _probe(self.net, c, device, self.fmt)
        self.optimizer = make_optimizer(c, self.net.parameters())
        self.scaler = torch.amp.GradScaler(device.type, enabled=c.amp == "fp16")

        procs.decide(lambda: prepare_dataset(c.dataset, Path(c.data_dir), c.download))  # downloads once
        data = load_dataset(c.dataset, Path(c.data_dir), False, c.data_seed, c.train_size, c.test_size)
        self.normalize = Normalizer(c.normalize, data.train_images, c.dataset, device)
        self.train_x, self.train_y = data.train_images.to(device), data.train_labels.to(device)
        self.test_x, self.test_y = data.test_images.to(device), data.test_labels.to(device)
        self.schedule = make_schedule(c, len(self.train_y), procs.world_size)
        self.order = BatchOrder(c.seed, len(self.train_y), c.batch_size, self.schedule.iters_per_epoch, device)
        self.ckpt_path = out / checkpoint.FILENAME
        self.log = MetricsLog(out / "metrics.jsonl")

        # Training sums of the current evaluation interval (loss, errors,
        # images) and of the current progress window, on the device.
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)
        self.window = torch.zeros(3, dtype=torch.float64, device=device)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self.step = 0
        if resume is not None:
            self._restore(resume)
        self.last_good = (self.step, resume) if resume is not None else (None, None)
        if procs.is_main:
            self._start_files(resume)

        self.model = distributed.wrap(self.net, procs)
        self.eval_net = self.net
        if c.compile:
            self.model, self.eval_net = torch.compile(self.model), torch.compile(self.net)
        self.amp = AMP_DTYPES[c.amp]
        self.bar = _progress(procs.is_main, self.schedule.total_iters, self.step)
        self.lr = self.schedule.lr_at(self.step)
        self.started = self.interval_start = time.perf_counter()
        self.interval_images = 0
        # --cuda-graphs: after the restore, so the graphs record the resumed
        # state's tensors. One process (graphs.check_support): its rows are
        # the whole batch.
        self.graphs = graphs.StepGraphs(lambda x, y: self._step(x, y, len(y)), self.net, self.optimizer, device) \
            if c.cuda_graphs else None

    def _restore(self, resume: Path) -> None:
        state = checkpoint.load(resume, self.device)
        for key, target in (("model", self.net), ("optimizer", self.optimizer), ("scaler", self.scaler)):
            checkpoint.load_into(resume, key, target, state)
        if self.procs.is_main:
            self.sums.copy_(state["train_sums"])
        self.step = state["step"]
        checkpoint.restore_rng(state, self.device)
        if self.schedule.total_iters < self.step:
            raise ConfigError(f"--resume: the run is already at iteration {self.step}, past the "
                              f"{self.schedule.total_iters} iterations asked for; give a longer --iters/--epochs")

    def _start_files(self, resume: Optional[Path]) -> None:
        c, s = self.c, self.schedule
        # Read (and so check) the metrics to keep before anything is written.
        kept = self.log.read_upto(self.step, source=resume.parent / "metrics.jsonl") if resume is not None else []
        print_config(c)
        write_json(self.out / "config.json", c.to_dict())
        self.log.rewrite(kept)
        print(f"{c.arch} on {c.dataset} ({len(self.train_y)} train / {len(self.test_y)} test images), "
              f"{sum(p.numel() for p in self.net.parameters()):,} parameters, {self.procs.world_size} process(es) "
              f"on {self.device}; {s.total_iters} iterations ({s.iters_per_epoch}/epoch)"
              + (f", the last {s.dropped_images} images of each epoch dropped (too few to split for BatchNorm)"
                 if s.dropped_images else "")
              + (f", resuming at iteration {self.step}" if self.step else "") + f"; writing to {self.out}",
              flush=True)

    def train_step(self) -> None:
        self.lr = self.schedule.lr_at(self.step)
        set_lr(self.optimizer, self.lr)  # in place under --cuda-graphs: the graphs read the rate from the device
        x, y, images = self._batch()
        if self.graphs is not None:
            loss_sum, errors = self.graphs.run(x, y)
        else:
            loss_sum, errors = self._step(x, y, images)
        self.step += 1
        # Device-side sums only: reading the loss here would make the host
        # wait for the device every iteration.
        for acc in (self.sums, self.window):
            acc[0] += loss_sum.double()
            acc[1] += errors
            acc[2] += len(y)
        self.nonfinite |= ~torch.isfinite(loss_sum)
        self.interval_images += images

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """This process's rows of global batch `self.step`, augmented on the
        device, their labels, and the global batch's size."""
        c, device = self.c, self.device
        batch = self.order.indices(self.step)
        rows = self.procs.rows(len(batch))
        idx = batch[rows]
        x = self.normalize(self.train_x[idx])
        x = random_crop_flip(x, c.crop_pad, c.flip, step_generator(c.seed, self.step, device), rows)
        return x.contiguous(memory_format=self.fmt), self.train_y[idx], len(batch)

    def _step(self, x: torch.Tensor, y: torch.Tensor, images: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, backward and SGD step on this process's rows (x, y) of a
        global batch of `images`; returns the summed loss and the number of
        errors, on the device. What --cuda-graphs records: no value here is
        read back to the host, and the rate is the optimizer's."""
        # Autocast's cache of cast weights must not outlive a capture (torch's
        # CUDA-graph notes): off under --cuda-graphs; the values are the same.
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None,
                            cache_enabled=not self.c.cuda_graphs):
            logits = self.model(x)
            loss_sum = F.cross_entropy(logits, y, reduction="sum")
        errors = (logits.argmax(dim=1) != y).sum()
        # The global batch's mean loss once DDP averages the gradients over
        # processes, also where an epoch's last batch splits unevenly.
        loss = loss_sum / (images / self.procs.world_size)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss_sum.detach(), errors

    def stop(self, signum: Optional[int]) -> None:
        """Save this iteration's checkpoint (unless saved) and raise Interrupted."""
        signum = signum or signal.SIGTERM  # None: another process received the signal
        if self.last_good[0] != self.step:
            self.save_checkpoint()
        message = (f"stopped by {signal_name(signum)} after iteration {self.step}, saved in {self.ckpt_path}; "
                   f"continue with: python -m fused_preact.train --resume {self.out}")
        if self.procs.is_main:
            _say(self.bar, message)
        raise Interrupted(signum, message)

    def _rate(self) -> float:
        return self.interval_images / max(time.perf_counter() - self.interval_start, 1e-9)

    def _where_good(self) -> str:
        step, path = self.last_good
        return f"the last good checkpoint is {path} (iteration {step})" if path else \
            "no checkpoint was written before it"

    def _guard(self, what: str = "loss") -> None:
        if self.procs.any_true(self.nonfinite):
            raise TrainingDiverged(f"the {what} became NaN or infinite by iteration {self.step}; stopped, "
                                   f"{self._where_good()}. Try a lower --lr or --amp none")

    def report_progress(self) -> None:
        self._guard()
        if self.bar is not None:
            w = self.window.tolist()
            self.bar.set_postfix(loss=f"{w[0] / w[2]:.3f}", err=f"{w[1] / w[2]:.3f}", lr=f"{self.lr:.3g}",
                                 img_s=f"{self._rate():.0f}", refresh=False)
            self.bar.update(self.step - self.bar.n)
        self.window.zero_()

    def evaluate(self) -> None:
        self._guard()
        rate = self._rate()
        _sync_buffers(self.net, self.procs)
        train_loss, train_err, count = self.procs.all_sum(self.sums.clone()).tolist()
        test_loss, test_err = evaluate(self.eval_net, self.test_x, self.test_y, self.normalize, self.procs, self.c)
        if not math.isfinite(test_loss):
            self.nonfinite.fill_(True)  # stop below, after the record that shows it
        record = {"iter": self.step, "epoch": round(self.step / self.schedule.iters_per_epoch, 4), "lr": self.lr,
                  "train_loss": train_loss / count, "train_error": train_err / count, "test_loss": test_loss,
                  "test_error": test_err, "images_per_s": round(rate, 1),
                  "peak_memory_mib": round(peak_memory_mib(self.device), 1),
                  "time_s": round(time.perf_counter() - self.started, 2)}
        if self.procs.is_main:
            self.log.append(record)
            _say(self.bar, f"iter {self.step}/{self.schedule.total_iters} epoch {record['epoch']:.2f}: train loss "
                           f"{record['train_loss']:.4f} err {100 * record['train_error']:.2f}% | test loss "
                           f"{test_loss:.4f} err {100 * test_err:.2f}% | lr {self.lr:.4g} | {rate:.0f} img/s")
        self.sums.zero_()
        self.interval_start, self.interval_images = time.perf_counter(), 0
        self._guard("test loss")

    def save_checkpoint(self) -> None:
        """Only a finite state is saved: the last checkpoint is always good."""
        self._guard()
        _sync_buffers(self.net, self.procs)
        bad = checkpoint.nonfinite_tensors(checkpoint.training_state(self.net, self.optimizer, self.scaler))
        if self.procs.any_true(torch.tensor(bool(bad))):
            raise TrainingDiverged(
                f"{len(bad) or 'some'} tensors of the network or optimizer became NaN or infinite by iteration "
                f"{self.step} ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); stopped without saving "
                f"them: {self._where_good()}. Try a lower --lr or --amp none")
        # The interval's sums of all processes; on resume process 0 carries them.
        interval_sums = self.procs.all_sum(self.sums.clone())
        if self.procs.is_main:
            checkpoint.save(self.ckpt_path, net=self.net, optimizer=self.optimizer, scaler=self.scaler,
                            config=self.c, step=self.step, train_sums=interval_sums)
        self.last_good = (self.step, self.ckpt_path)
        self.procs.barrier()

    def finish(self) -> dict:
        """The summary (written as summary.json with curves.png by process 0)."""
        c, main = self.c, self.procs.is_main
        digests = distributed.gather_digests(self.net, self.procs)
        records = self.log.records() if main else []
        final = records[-1] if records else {}
        summary = {
            "status": "finished",
            "final_test_error": final.get("test_error"),
            "final_test_loss": final.get("test_loss"),
            "final_train_error": final.get("train_error"),
            "best_test_error": min((r["test_error"] for r in records if r["test_error"] is not None),
                                   default=None),
            "iters": self.step,
            "epochs": round(self.step / self.schedule.iters_per_epoch, 4),
            "wall_time_s": round(time.perf_counter() - self.started, 2),
            "peak_memory_mib": round(peak_memory_mib(self.device), 1),
            "world_size": self.procs.world_size,
            "ranks_in_sync": len(set(digests)) == 1,
            "state_digests": digests,
            "checkpoint": str(self.ckpt_path),
            "metrics": str(self.log.path),
            "curves": str(self.out / "curves.png"),
            "config": c.to_dict(),
        }
        if main:
            if not plot_curves(records, self.out / "curves.png", f"{c.arch}{c.depth or ''} on {c.dataset}"):
                summary["curves"] = None  # matplotlib is not installed
            write_json(self.out / "summary.json", summary)
            print(f"final test error {100 * summary['final_test_error']:.2f}% after {self.step} iterations "
                  f"({summary['wall_time_s']:.0f} s); summary in {self.out / 'summary.json'}", flush=True)
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
