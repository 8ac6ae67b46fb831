"""The run directory: which one a run writes to (claim_out), and one trainer
per directory, by an exclusive lock held for the whole run.

Two trainers writing into one --out would interleave metrics.jsonl, overwrite
each other's checkpoints and summaries. The lock is an flock on OUT/.lock, so
the kernel releases it when the process ends in any way (exit, exception,
SIGKILL); the file itself records the holder (pid, host, start time) while it
runs and is emptied on a clean release, so a non-empty file that nobody holds
was left by a trainer that died.

The lock file is opened without following a symbolic link and must be a
regular file with one name: a link planted in a shared or received run
directory would otherwise have its target truncated and overwritten.
"""
import errno
import fcntl
import json
import os
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Optional

from .checkpoint import FILENAME as CHECKPOINT
from .config import ConfigError, TrainConfig

LOCK_NAME = ".lock"
# The files a run writes (atomically, through ".NAME.*.tmp" temporaries).
RUN_FILES = (CHECKPOINT, "metrics.jsonl", "config.json", "summary.json", "curves.png")


def _writable_directory(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"--out {out} exists and is not a directory") from None
    except NotADirectoryError:
        raise ConfigError(f"--out {out}: a parent of it is a file, not a directory") from None
    except OSError as err:
        raise ConfigError(f"--out {out} cannot be created: {err.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out} is not writable")


def _describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {started}"


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True


class RunDirLock:
    """with RunDirLock(out) as lock: ... -- fails at once with a ConfigError
    naming the holder when another trainer has the directory; `stale` is
    the description of a dead trainer's lock that was taken over, if any."""

    def __init__(self, out: Path):
        self.out, self.path = Path(out), Path(out) / LOCK_NAME
        self.stale: Optional[str] = None
        self._file = None

    def __enter__(self) -> "RunDirLock":
        _writable_directory(self.out)
        f = _open_lock_file(self.out, self.path)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            f.seek(0)
            text = f.read()
            f.close()
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"--out {self.out}: cannot lock {self.path}: {err.strerror}") from None
            holder = _parse(text)
            who = _describe(holder) if holder else "another process"
            raise ConfigError(f"--out {self.out} is in use by another trainer ({who}); wait for it to finish or "
                              f"choose another --out") from None
        f.seek(0)
        previous = _parse(f.read())
        if previous:
            state = "not running" if not _alive(previous.get("pid")) or previous.get("host") != socket.gethostname() \
                else "running, but no longer holding the lock"
            self.stale = f"{_describe(previous)}, {state}"
        f.seek(0)
        f.truncate()
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "argv": sys.argv}, f)
        f.flush()
        self._file = f
        _remove_stale_temporaries(self.out)
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()  # a clean release: no stale record
            self._file.flush()
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def _open_lock_file(out: Path, path: Path):
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ConfigError(f"--out {out}: {path} is a symbolic link, not a lock file; remove the link "
                              f"(the trainer does not write through it)") from None
        raise ConfigError(f"--out {out} is not writable: {err.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        what = f"has {info.st_nlink} names (a hard link)" if stat.S_ISREG(info.st_mode) else "is not a regular file"
        raise ConfigError(f"--out {out}: {path} {what}; a run's lock must be a regular file of its own: remove it")
    return os.fdopen(fd, "r+")


def _remove_stale_temporaries(out: Path) -> None:
    """Temporaries of the run's files left by a trainer killed mid-write
    (the lock is held: no other trainer is writing them)."""
    for name in RUN_FILES:
        for tmp in out.glob(f".{name}.*.tmp"):
            if tmp.is_file() and not tmp.is_symlink():
                tmp.unlink(missing_ok=True)


def _parse(text: str) -> dict:
    try:
        value = json.loads(text) if text.strip() else {}
    except ValueError:
        return {"pid": "?", "host": "?"}
    return value if isinstance(value, dict) else {}


def run_files(out: Path) -> list[str]:
    """The files of a run (RUN_FILES) that `out` holds."""
    return [name for name in RUN_FILES if (out / name).exists()]


def default_out(c: TrainConfig) -> Path:
    """runs/<preset>-<dataset>-<arch><depth>-seed<seed>, numbered if taken."""
    base = Path("runs") / f"{c.preset}-{c.dataset}-{c.arch}{c.depth or ''}-seed{c.seed}"
    out, n = base, 1
    while run_files(out):
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def claim_out(c: TrainConfig, resume: Optional[Path], rewind: bool, held: list) -> Path:
    """The run directory, locked for this trainer (the lock is appended to
    `held`): a second trainer fails here, naming the first. Nothing of
    another run is overwritten: a new run needs a directory without a run's
    files, a resumed one its own directory or one without them, and an older
    checkpoint of a directory's run continues there only with --rewind."""
    out = default_out(c) if c.out is None else Path(c.out)
    lock = RunDirLock(out).__enter__()
    held.append(lock)
    present = run_files(out)
    if resume is None and present:
        if CHECKPOINT in present:
            raise ConfigError(f"--out {out} already holds a run; pass --resume to continue it or choose another "
                              f"--out")
        raise ConfigError(f"--out {out} holds {', '.join(present)} but no checkpoint (a run stopped before its first "
                          f"save, or other files): nothing to resume, nothing overwritten; remove them or choose "
                          f"another --out")
    if resume is not None and out.resolve() != resume.parent.resolve() and present:
        raise ConfigError(f"--out {out} already holds a run ({', '.join(present)}); --resume {resume} continues "
                          f"in its own directory or into a new --out")
    if resume is not None and out.resolve() == resume.parent.resolve() and resume.name != CHECKPOINT \
            and CHECKPOINT in present and not rewind:
        raise ConfigError(f"--resume {resume} is an older checkpoint of the run in {out}: continuing there would "
                          f"cut its metrics.jsonl after that checkpoint and replace {out / CHECKPOINT}; "
                          f"resume into a new --out, or pass --rewind to do that")
    return out
