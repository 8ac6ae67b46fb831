"""What a run leaves behind: metrics.jsonl (one record per evaluation),
summary.json, curves.png (train and test error against iterations, as the
paper's Fig. 6), and atomically written files.
"""
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

from .config import ConfigError

# Fields that measure the machine, not the computation: they differ between
# an interrupted-and-resumed run and an uninterrupted one.
TIMING_FIELDS = ("images_per_s", "time_s", "peak_memory_mib")


def _umask() -> int:
    """The process's umask, read without setting it where Linux allows."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and put back
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[object], None], binary: bool = False) -> None:
    """Write through a temporary file in the same directory and rename it over
    `path`: a reader (or a crash) sees the old file or the new one, never half.
    The file gets the permissions the umask gives a new file (mkstemp's
    temporary is private)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _strict(value):
    """value with every NaN/infinity replaced by None: strict JSON has no NaN
    token, so parsers other than Python's reject files that write one."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def dumps(obj, **options) -> str:
    """Strict JSON (non-finite numbers as null)."""
    return json.dumps(_strict(obj), allow_nan=False, sort_keys=True, **options)


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write(dumps(obj, indent=2)))


def read_jsonl(path: Path) -> list[dict]:
    """The records of a metrics.jsonl. A last line without its newline is what
    a trainer killed while appending leaves: it is dropped. Any other line that
    is not a JSON object is an error."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not a metrics log: not UTF-8 text (byte {err.start})") from None
    # Every record ends with a newline; what follows the last one was cut short.
    complete = text.split("\n")[:-1]
    records = []
    for number, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not _is_record(record):
            raise ConfigError(f"{path} line {number} is not a metrics record (an integer iter and numbers or null "
                              f"for {', '.join(_NUMBERS)}): {line[:60]!r}")
        records.append(record)
    return records


_NUMBERS = ("train_loss", "train_error", "test_loss", "test_error")  # every record has them (null: not finite)


def _is_record(record) -> bool:
    def number(v):
        return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
    return isinstance(record, dict) and isinstance(record.get("iter"), int) and not isinstance(record["iter"], bool) \
        and all(key in record and number(record[key]) for key in _NUMBERS)


class MetricsLog:
    """Append-only JSONL of evaluation records, flushed per record."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def read_upto(self, iteration: int, source: Optional[Path] = None) -> list[dict]:
        """The records up to `iteration` (a resumed run repeats what came after
        its checkpoint), read from `source` (the resumed run's log, when it
        continues into another directory) or this log."""
        return [r for r in read_jsonl(source or self.path) if r["iter"] <= iteration]

    def rewrite(self, records: list[dict]) -> None:
        atomic_write(self.path, lambda f: f.write("".join(dumps(r) + "\n" for r in records)))

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(dumps(record) + "\n")
            f.flush()

    def records(self) -> list[dict]:
        return read_jsonl(self.path)


def plot_curves(records: list[dict], path: Path, title: str) -> bool:
    """Train (dashed) and test (solid) error in % against iterations, like the
    paper's Fig. 6. Returns False when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    iters = [r["iter"] for r in records]

    def percent(key):  # a non-finite value is stored as null: a gap in the curve
        return [math.nan if r.get(key) is None else 100 * r[key] for r in records]

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(iters, percent("train_error"), "--", label="train error")
    ax.plot(iters, percent("test_error"), "-", linewidth=2, label="test error")
    ax.set_xlabel("iterations")
    ax.set_ylabel("error (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100), binary=True)
    plt.close(fig)
    return True
