"""The benchmark suites' pytest hooks (benchmarks/conftest.py) around
pytest-benchmark's JSON: a run stopped in a benchmark's warm-up, as
benchmarks/gpu_check.sh stops a step at its time limit (SIGINT), still
writes the benchmarks that finished."""
import json
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

SUITE = '''
def test_finished(benchmark):
    benchmark.pedantic(lambda: None, rounds=2, warmup_rounds=1)


def test_stopped_in_its_warm_up(benchmark):
    def stopped():
        raise KeyboardInterrupt  # what SIGINT raises
    benchmark.pedantic(stopped, rounds=2, warmup_rounds=1)


def test_never_reached(benchmark):
    benchmark.pedantic(lambda: None, rounds=2)
'''


def test_a_run_stopped_in_a_warm_up_writes_the_finished_benchmarks(tmp_path):
    (tmp_path / "test_suite.py").write_text(SUITE)
    out = tmp_path / "out.json"
    # -p conftest: the benchmark suites' conftest, found on PYTHONPATH, as a plugin of this run.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCHMARKS), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
                           "--rootdir", str(tmp_path), "test_suite.py", f"--benchmark-json={out}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert "KeyboardInterrupt" in done.stdout + done.stderr, done.stdout[-3000:] + done.stderr[-3000:]
    assert out.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    assert [b["name"] for b in json.loads(out.read_text())["benchmarks"]] == ["test_finished"]
