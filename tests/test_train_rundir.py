"""The run directory keeps every run's files safe: a planted lock link, an
empty --out, resuming into another run or from an older checkpoint, a full
disk, SIGINT/SIGTERM (saved, exit 130/143), a kill at any point of a
checkpoint save, a second quick start, and the umask."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fused_preact.train import checkpoint
from fused_preact.train.__main__ import main, run
from fused_preact.train.metrics import read_jsonl

TINY = ["--preset", "quick", "--train-size", "256", "--test-size", "64", "--threads", "1"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default runs/ and data/ land here


def _one_line_error(capsys, argv, code, match):
    assert main(argv) == code
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and match in lines[0], lines


def _snapshot(directory: Path) -> dict:
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_a_lock_that_is_a_link_is_refused_and_its_target_kept(tmp_path, capsys, link):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "r1"
    out.mkdir()
    (os.symlink if link == "symlink" else os.link)(victim, out / ".lock")
    _one_line_error(capsys, [*TINY, "--iters", "2", "--out", str(out)], 2,
                    "symbolic link" if link == "symlink" else "hard link")
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("argv, match", [
    (["--out", ""], "--out is empty"),
    (["--model-arg", "depth=14"], "--model-arg depth=...: use --depth"),
])
def test_options_that_would_be_silently_wrong_are_refused(capsys, argv, match):
    _one_line_error(capsys, [*TINY, "--iters", "2", *argv], 2, match)
    assert not any(Path(".").iterdir())  # nothing written in the current directory


def test_files_a_run_would_overwrite_are_never_overwritten(tmp_path, capsys):
    (tmp_path / "config.json").write_text("mine")
    _one_line_error(capsys, [*TINY, "--iters", "2", "--out", "."], 2, "holds config.json but no checkpoint")
    assert (tmp_path / "config.json").read_text() == "mine"


def test_resume_into_another_runs_directory_is_refused(tmp_path, capsys):
    run([*TINY, "--iters", "2", "--out", "a"])
    run([*TINY, "--iters", "4", "--seed", "1", "--out", "b"])
    before = _snapshot(tmp_path / "b")
    _one_line_error(capsys, ["--resume", "a", "--iters", "4", "--out", "b"], 2, "--out b already holds a run")
    assert _snapshot(tmp_path / "b") == before
    run(["--resume", "a", "--iters", "4", "--out", "c"])  # a new directory is fine
    assert checkpoint.load(tmp_path / "c" / checkpoint.FILENAME)["step"] == 4


def test_an_older_checkpoint_continues_in_its_run_only_with_rewind(tmp_path, capsys):
    args = [*TINY, "--eval-every", "2", "--out", "run"]
    run([*args, "--iters", "2"])
    (tmp_path / "run" / "older.pt").write_bytes((tmp_path / "run" / checkpoint.FILENAME).read_bytes())
    run(["--resume", "run", "--iters", "4"])
    before = _snapshot(tmp_path / "run")
    _one_line_error(capsys, ["--resume", "run/older.pt", "--iters", "6"], 2, "pass --rewind")
    assert _snapshot(tmp_path / "run") == before
    run(["--resume", "run/older.pt", "--iters", "6", "--out", "branch"])  # into a new directory
    assert [r["iter"] for r in read_jsonl(tmp_path / "branch" / "metrics.jsonl")] == [2, 4, 6]
    run(["--resume", "run/older.pt", "--iters", "6", "--rewind"])
    assert [r["iter"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [2, 4, 6]
    assert checkpoint.load(tmp_path / "run" / checkpoint.FILENAME)["step"] == 6


def test_a_stop_request_saves_and_the_run_continues_bit_identically(tmp_path, capsys):
    args = [*TINY, "--iters", "8", "--eval-every", "4"]
    whole = run([*args, "--out", "whole"])
    assert main([*args, "--out", "cut"], stop_after=3) == 130  # as a Ctrl-C at iteration 3
    err_out = capsys.readouterr().out
    assert "stopped by SIGINT after iteration 3, saved in cut/checkpoint.pt; continue with" in err_out, err_out
    assert checkpoint.load(tmp_path / "cut" / checkpoint.FILENAME)["step"] == 3
    assert run(["--resume", "cut"])["state_digests"] == whole["state_digests"]


def test_interrupted_before_any_checkpoint_says_how_to_start_over(tmp_path, capsys):
    assert main([*TINY, "--iters", "8", "--eval-every", "2", "--ckpt-every", "8", "--out", "r"],
                interrupt_after=3) == 130
    assert "no checkpoint to resume: to start over, remove r or choose another --out" in capsys.readouterr().out
    _one_line_error(capsys, [*TINY, "--iters", "2", "--out", "r"], 2, "no checkpoint")
    _one_line_error(capsys, ["--resume", "r"], 2, "no checkpoint at r/checkpoint.pt")


def test_the_quick_start_runs_twice_into_two_directories(tmp_path):
    first = run([*TINY, "--iters", "2"])
    second = run([*TINY, "--iters", "2"])
    assert Path(first["checkpoint"]).parent.name == "quick-shapes10-preact_resnet8-seed0"
    assert Path(second["checkpoint"]).parent.name == "quick-shapes10-preact_resnet8-seed0-2"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)], ids=["022", "077", "002"])
def test_run_files_follow_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        run([*TINY, "--iters", "2", "--out", "r"])
    finally:
        os.umask(previous)
    for name in ("checkpoint.pt", "metrics.jsonl", "config.json", "summary.json"):
        assert (tmp_path / "r" / name).stat().st_mode & 0o777 == mode, name


# ---- in a child process: a full disk, SIGTERM, a kill inside a checkpoint save ----------------------------------

# The trainer, with an ACTION (KILL: SIGKILL, TERM: SIGTERM) sent to itself at
# the N-th checkpoint save's POINT (env AT=POINT:N:ACTION): half of a write
# done, the temporary written but not synced, synced but not renamed, renamed.
_CHILD = r"""
import os, signal, sys
point, nth, action = os.environ["AT"].split(":")
seen = {}
def at(here, name):
    if ".checkpoint.pt." in name or name.endswith("checkpoint.pt"):
        seen[here] = seen.get(here, 0) + 1
        if here == point and seen[here] == int(nth):
            os.kill(os.getpid(), signal.SIGKILL if action == "KILL" else signal.SIGTERM)
replace, fsync = os.replace, os.fsync
def replace_(src, dst):
    at("before_rename", str(dst)); replace(src, dst); at("after_rename", str(dst))
def fsync_(fd):
    at("before_fsync", os.readlink(f"/proc/self/fd/{fd}")); fsync(fd)
os.replace, os.fsync = replace_, fsync_
import torch
save = torch.save
def save_(obj, f, *args, **kwargs):
    first = [True]
    class Halves:  # the save's first write is cut in two
        def write(self, data):
            if not first[0]:
                return f.write(data)
            first[0] = False
            f.write(data[:len(data) // 2]); f.flush(); at("mid_write", os.readlink(f"/proc/self/fd/{f.fileno()}"))
            return f.write(data[len(data) // 2:]) + len(data) // 2
        def __getattr__(self, name):
            return getattr(f, name)
    return save(obj, Halves(), *args, **kwargs)
torch.save = save_
from fused_preact.train.__main__ import main
sys.exit(main(sys.argv[1:]))
"""
KILL_RUN = [*TINY, "--iters", "6", "--eval-every", "3", "--ckpt-every", "2"]  # saves at 2, 4 and 6


def _child(argv, at="none:0:KILL", preexec_fn=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AT": at}
    return subprocess.run([sys.executable, "-c", _CHILD, *argv], capture_output=True, text=True, env=env,
                          preexec_fn=preexec_fn, timeout=600)


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> dict:
    """The summary of KILL_RUN uninterrupted."""
    return run([*KILL_RUN, "--out", str(tmp_path_factory.mktemp("whole") / "run")])


def _outside(tmp_path, *runs) -> dict:
    return {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.relative_to(tmp_path).parts[0]
            not in runs}


@pytest.mark.parametrize("at", [f"{point}:{nth}:KILL" for point in ("mid_write", "before_fsync", "before_rename",
                                                                    "after_rename") for nth in (1, 3)])
def test_a_kill_inside_a_checkpoint_save_resumes_from_the_last_complete_one(tmp_path, at, whole):
    (tmp_path / "outside.txt").write_text("untouched")
    outside = _outside(tmp_path, "killed")
    result = _child([*KILL_RUN, "--out", "killed"], at=at)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    out = tmp_path / "killed"
    point, nth, _ = at.split(":")
    saved = 2 * (int(nth) - (point != "after_rename"))  # the last complete checkpoint's iteration (0: none)
    assert checkpoint.load(out / checkpoint.FILENAME)["step"] == saved if saved else \
        not (out / checkpoint.FILENAME).exists()
    if saved:
        assert run(["--resume", "killed"])["state_digests"] == whole["state_digests"]
        assert not list(out.glob(".*.tmp"))  # the killed save's temporary is gone
    assert _outside(tmp_path, "killed") == outside


def test_sigterm_saves_exits_143_and_removes_stale_temporaries(tmp_path, whole):
    out = tmp_path / "term"
    out.mkdir()
    stale = out / ".checkpoint.pt.abc123.tmp"
    stale.write_bytes(b"left by a killed save")
    # SIGTERM halfway through writing the checkpoint of iteration 4: the save completes, then the run stops.
    result = _child([*KILL_RUN, "--out", str(out)], at="mid_write:2:TERM")
    assert result.returncode == 143, result.stderr[-2000:]
    assert f"stopped by SIGTERM after iteration 4, saved in {out / checkpoint.FILENAME}" in result.stdout
    assert not stale.exists()
    assert checkpoint.load(out / checkpoint.FILENAME)["step"] == 4
    assert run(["--resume", str(out)])["state_digests"] == whole["state_digests"]


def test_a_full_disk_at_a_checkpoint_is_one_line_exit_3_and_keeps_the_old_one(tmp_path):
    run([*KILL_RUN, "--iters", "2", "--out", "r"])
    before = (tmp_path / "r" / checkpoint.FILENAME).read_bytes()

    def small_files():  # a write past 64 KiB fails (EFBIG), as on a full disk
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    result = _child(["--resume", "r", "--iters", "4"], preexec_fn=small_files)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 3 and len(lines) == 1, result.stderr[-3000:]
    assert "cannot write the checkpoint" in lines[0] and "previous checkpoint, if any, is intact" in lines[0]
    assert (tmp_path / "r" / checkpoint.FILENAME).read_bytes() == before
    assert not list((tmp_path / "r").glob(".*.tmp"))


def test_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ("Exit status: 0 done, 1 diverged, 2 bad input, 3 I/O failure (a full disk), 130/143 stopped by "
            "SIGINT/SIGTERM after saving a checkpoint") in text
