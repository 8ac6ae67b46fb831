"""One trainer per run directory: an exclusive lock held for the whole run.

Two trainers writing into one --out would interleave metrics.jsonl, overwrite
each other's checkpoints and summaries. The lock is an flock on OUT/.lock, so
the kernel releases it when the process ends in any way (exit, exception,
SIGKILL); the file itself records the holder (pid, host, start time) while it
runs and is emptied on a clean release, so a non-empty file that nobody holds
was left by a trainer that died.
"""
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

from .config import ConfigError

LOCK_NAME = ".lock"


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
        try:
            f = open(self.path, "a+")
        except OSError as err:
            raise ConfigError(f"--out {self.out} is not writable: {err.strerror}") from None
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
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()  # a clean release: no stale record
            self._file.flush()
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def _parse(text: str) -> dict:
    try:
        value = json.loads(text) if text.strip() else {}
    except ValueError:
        return {"pid": "?", "host": "?"}
    return value if isinstance(value, dict) else {}
