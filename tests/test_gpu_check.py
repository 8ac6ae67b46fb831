"""benchmarks/gpu_check.sh's deadline: GPU_CHECK_SECONDS bounds the whole
run, clipping every step's limit, so that the check ends within the device's
command limit; a step it leaves no time for is not run, and says so."""
import os
import signal
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
STEPS = ["warm", "triton_untuned", "triton_tuned", "native_tests", "cuda_graphs", "inductor", "bench_unit",
         "bench_train_step", "bench_memory", "bench_op", "bench_train_compile", "bench_convert", "bench_wide_dense"]


def _check(tmp_path, budget: str, timeout: int) -> subprocess.CompletedProcess:
    """A dry run with GPU_CHECK_SECONDS=budget; its steps, in a process group
    of their own, stopped with it if it overruns."""
    command = ["bash", str(SCRIPT), "--dry-run", str(tmp_path)]
    env = {**os.environ, "GPU_CHECK_SECONDS": budget}
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as check:
        try:
            stdout, _ = check.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(check.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(check.args, check.returncode, stdout)


def _rows(summary: str) -> dict:
    cells = [line.split("|")[1:3] for line in summary.splitlines()[2:] if line.startswith("| ")]
    return {name.strip(): result.strip() for name, result in cells}


def test_a_spent_budget_runs_no_step_and_fails_the_check(tmp_path):
    done = _check(tmp_path, "1", timeout=120)
    assert done.returncode == 1, done.stdout[-3000:]
    rows = _rows((tmp_path / "summary.txt").read_text())
    assert rows == {**{step: "not run: time budget spent" for step in STEPS}, "build": "ok"}


def test_the_budget_must_be_whole_seconds(tmp_path):
    done = _check(tmp_path, "9m", timeout=60)
    assert done.returncode == 2 and "GPU_CHECK_SECONDS must be a whole number of seconds" in done.stdout
