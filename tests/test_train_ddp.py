"""Two processes with torchrun, gloo on the CPU: the run completes and both
processes end with the same weights and BatchNorm statistics."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from fused_preact.train import checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_two_process_gloo_run(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fused_preact.train", "--preset", "quick", "--train-size", "256", "--test-size", "50",
           "--iters", "6", "--eval-every", "3", "--out", str(out)]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stderr[-4000:]}\n{done.stdout[-2000:]}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["iters"] == 6
    digests = summary["state_digests"]
    assert len(digests) == 2 and digests[0] == digests[1] and summary["ranks_in_sync"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [3, 6]  # one writer: process 0
    state = checkpoint.load(out / "checkpoint.pt")
    assert state["step"] == 6 and torch.isfinite(state["model"]["fc.weight"]).all()
