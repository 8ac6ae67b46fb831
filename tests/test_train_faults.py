"""The trainer under faults: divergence, corrupted checkpoints, two trainers
in one directory, bad arguments, strict JSON, and SIGKILL at random points."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fused_preact.train import checkpoint, loop
from fused_preact.train.__main__ import main, run
from fused_preact.train.config import ConfigError
from fused_preact.train.metrics import read_jsonl
from fused_preact.train.rundir import RunDirLock

TINY = ["--preset", "quick", "--train-size", "256", "--test-size", "64", "--threads", "1"]


def _files(directory: Path) -> dict:
    """The run's files (bytes and modification times), the lock aside."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir())
            if p.is_file() and p.name != ".lock"}


def _strict_json(text: str):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


# ---- 1. only finite checkpoints, and a NaN test loss stops the run ----------------------------------------------

@pytest.mark.parametrize("options, what", [
    # the test loss turns NaN while the training loss is huge but finite
    (["--lr", "1e3", "--ckpt-every", "1", "--log-every", "1"], "test loss"),
    # sane warm-up, then BatchNorm running variances overflow while the loss stays finite
    (["--warmup-iters", "4", "--warmup-lr", "0.1", "--lr", "1e6", "--ckpt-every", "1"], "network or optimizer"),
])
def test_divergence_stops_and_names_a_checkpoint_that_is_good(tmp_path, capsys, options, what):
    out = tmp_path / "run"
    assert main([*TINY, "--iters", "12", *options, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert what in err and f"the last good checkpoint is {out / 'checkpoint.pt'}" in err, err
    named = int(err.split("(iteration ")[1].split(")")[0])
    state = checkpoint.load(out / "checkpoint.pt")  # verifies the hash and that every tensor is finite
    assert state["step"] == named
    assert not checkpoint.nonfinite_tensors(state)


def test_a_nan_test_loss_is_logged_as_null_and_stops(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: (float("nan"), 0.5))
    out = tmp_path / "run"
    assert main([*TINY, "--iters", "8", "--eval-every", "2", "--out", str(out)]) == 1
    assert "the test loss became NaN" in capsys.readouterr().err
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and _strict_json(lines[0])["test_loss"] is None
    assert read_jsonl(out / "metrics.jsonl")[0]["test_loss"] is None


# ---- 2. a corrupted checkpoint is refused, and nothing changes on disk ------------------------------------------

def _flip(path: Path, tensor: torch.Tensor, flip) -> None:
    data = bytearray(path.read_bytes())
    raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    at = data.find(raw)
    assert at >= 0 and data.find(raw, at + 1) < 0  # the storage appears once, uncompressed
    flip(data, at)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("corruption", ["eight_bytes", "one_exponent_bit"])
@pytest.mark.parametrize("entry", ["--resume", "--eval-only"])
def test_corrupted_checkpoint_is_refused_in_one_line(tmp_path, capsys, corruption, entry):
    out = tmp_path / "run"
    run([*TINY, "--iters", "4", "--out", str(out)])
    fc_weight = checkpoint.load(out / "checkpoint.pt")["model"]["fc.weight"]

    def flip(data, at):
        if corruption == "eight_bytes":
            data[at + 16:at + 24] = bytes(b ^ 0xFF for b in data[at + 16:at + 24])
        else:  # float32 little-endian: bit 6 of the top byte is the exponent's second-highest bit
            data[at + 3] ^= 0x40

    _flip(out / "checkpoint.pt", fc_weight, flip)
    before = _files(out)
    target = str(out) if entry == "--resume" else str(out / "checkpoint.pt")
    assert main([entry, target] + (["--iters", "8"] if entry == "--resume" else [])) == 2
    err = capsys.readouterr().err
    assert "is corrupted" in err and len(err.strip().splitlines()) == 1, err
    assert _files(out) == before


# ---- 3. one trainer per run directory ---------------------------------------------------------------------------

def test_a_second_trainer_fails_at_once_naming_the_first(tmp_path):
    out = tmp_path / "run"
    with RunDirLock(out):
        with pytest.raises(ConfigError, match=rf"in use by another trainer \(pid {os.getpid()} on "):
            run([*TINY, "--iters", "2", "--out", str(out)])
    assert not (out / "metrics.jsonl").exists()
    run([*TINY, "--iters", "2", "--out", str(out)])  # released: the directory is free again
    assert (out / ".lock").read_text() == ""  # a clean exit leaves no holder behind


def test_the_lock_is_released_when_the_run_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: (float("nan"), 0.5))
    out = tmp_path / "run"
    assert main([*TINY, "--iters", "4", "--eval-every", "2", "--out", str(out)]) == 1
    with RunDirLock(out) as lock:
        assert lock.stale is None


# ---- 4-6. double backward, fp16 running statistics, bf16 in the interpreter: see test_op_guards.py -------------

# ---- 7. one-line errors -----------------------------------------------------------------------------------------

def _one_line_error(capsys, argv, expect):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and expect in err, err


def test_paths_that_cannot_hold_a_run(tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("")
    _one_line_error(capsys, [*TINY, "--iters", "2", "--out", str(tmp_path / "afile" / "sub")], "is a file")
    _one_line_error(capsys, [*TINY, "--iters", "2", "--out", str(tmp_path / "afile")], "not a directory")
    monkeypatch.setattr("fused_preact.train.rundir.os.access", lambda *a: False)  # root may write anywhere
    _one_line_error(capsys, [*TINY, "--iters", "2", "--out", str(tmp_path / "ro")], "is not writable")


def test_an_embedded_set_larger_than_it_can_be(capsys):
    _one_line_error(capsys, [*TINY, "--train-size", "10000000"], "larger than shapes10's 50000 train images")


def test_resume_checks_the_log_and_the_length_before_writing(tmp_path, capsys):
    out = tmp_path / "run"
    run([*TINY, "--iters", "6", "--eval-every", "2", "--out", str(out)])
    _one_line_error(capsys, ["--resume", str(out), "--iters", "3"], "already at iteration 6")
    with open(out / "metrics.jsonl", "a") as f:
        f.write("{not json}\n")
    before = _files(out)
    _one_line_error(capsys, ["--resume", str(out), "--iters", "8"], "line 4 is not a metrics record")
    assert _files(out) == before  # config.json not rewritten


def test_a_partial_last_metrics_line_is_dropped_on_resume(tmp_path):
    out = tmp_path / "run"
    run([*TINY, "--iters", "4", "--eval-every", "2", "--out", str(out)])
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"iter": 6, "test_')  # what a kill in the middle of an append leaves
    run(["--resume", str(out), "--iters", "6"])
    assert [r["iter"] for r in read_jsonl(out / "metrics.jsonl")] == [2, 4, 6]


@pytest.mark.parametrize("argv, expect", [
    (["--depths", "100"], "6n+2 (basic units) or 9n+2"),
    (["--batch", "0"], "must be an integer >= 2"),
    (["--batch", "-2"], "must be an integer >= 2"),
])
def test_memory_table_arguments(argv, expect):
    result = subprocess.run([sys.executable, "-m", "fused_preact.memory", *argv], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and expect in result.stderr


# ---- SIGKILL at random points -----------------------------------------------------------------------------------

KILL_RUN = [*TINY, "--iters", "24", "--eval-every", "3", "--ckpt-every", "2", "--log-every", "1"]


def _trainer(argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "fused_preact.train", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def _watch(proc, out, kill_after=None):
    """Poll the run until it ends, or until `kill_after` seconds after its first
    checkpoint appeared (then SIGKILL it). Once a checkpoint exists it must
    load (hash and finiteness checked) at every look. Returns when the first
    checkpoint appeared."""
    first = None
    while proc.poll() is None:
        if (out / checkpoint.FILENAME).exists():
            first = first or time.monotonic()
            checkpoint.load(out / checkpoint.FILENAME)
        if first is not None and kill_after is not None and time.monotonic() >= first + kill_after:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.communicate(timeout=60)
    return first


def test_sigkill_at_random_points_always_resumes_bit_identically(tmp_path, capsys):
    whole = run([*KILL_RUN, "--out", str(tmp_path / "whole")])
    timing = _trainer([*KILL_RUN, "--out", str(tmp_path / "timing")])
    training = time.monotonic() - _watch(timing, tmp_path / "timing")  # first checkpoint to the end
    cut_at = []
    for seed in range(4):
        out = tmp_path / f"killed{seed}"
        delay = random.Random(seed).uniform(0.0, training)
        _watch(_trainer([*KILL_RUN, "--out", str(out)]), out, kill_after=delay)
        cut_at.append(checkpoint.load(out / checkpoint.FILENAME)["step"])  # still there and good after the kill
        holder_left = (out / ".lock").read_text() != ""
        capsys.readouterr()
        resumed = run(["--resume", str(out)])
        assert resumed["state_digests"] == whole["state_digests"], (seed, delay)
        assert [r["iter"] for r in read_jsonl(out / "metrics.jsonl")] == list(range(3, 25, 3))
        assert ("had the lock of a trainer that died" in capsys.readouterr().out) == holder_left
    assert min(cut_at) < 24, cut_at  # some runs really were cut short
