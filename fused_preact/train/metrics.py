"""What a run leaves behind: metrics.jsonl (one record per evaluation),
summary.json, curves.png (train and test error against iterations, as the
paper's Fig. 6), and atomically written files.
"""
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

# Fields that measure the machine, not the computation: they differ between
# an interrupted-and-resumed run and an uninterrupted one.
TIMING_FIELDS = ("images_per_s", "time_s", "peak_memory_mib")


def atomic_write(path: Path, write: Callable[[object], None], binary: bool = False) -> None:
    """Write through a temporary file in the same directory and rename it over
    `path`: a reader (or a crash) sees the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, sort_keys=True))


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog:
    """Append-only JSONL of evaluation records, flushed per record."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def truncate_after(self, iteration: int, source: Optional[Path] = None) -> list[dict]:
        """Keep the records up to `iteration` (a resumed run repeats what came
        after its checkpoint), taken from `source` (the resumed run's log, when
        it continues into another directory), and return them."""
        kept = [r for r in read_jsonl(source or self.path) if r["iter"] <= iteration]
        atomic_write(self.path, lambda f: f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept)))
        return kept

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
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
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(iters, [100 * r["train_error"] for r in records], "--", label="train error")
    ax.plot(iters, [100 * r["test_error"] for r in records], "-", linewidth=2, label="test error")
    ax.set_xlabel("iterations")
    ax.set_ylabel("error (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100), binary=True)
    plt.close(fig)
    return True
