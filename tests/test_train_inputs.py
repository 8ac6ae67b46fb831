"""Inputs the trainer did not write or that another machine wrote: hand-made
checkpoints with a valid hash, malformed metrics logs, a checkpoint from
elsewhere for --eval-only, bad distributed environment variables, a
malformed --device, a --data-dir that is a file. Each ends with exactly one
line on stderr and exit status 2, nothing on disk changed."""
import pytest
import torch

from fused_preact.train import checkpoint
from fused_preact.train.__main__ import main, run

TINY = ["--preset", "quick", "--train-size", "256", "--test-size", "64", "--threads", "1"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def _one_line_error(capsys, argv, match):
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and match in lines[0], (code, lines)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A finished tiny run: its directory."""
    out = tmp_path_factory.mktemp("saved") / "run"
    run([*TINY, "--iters", "2", "--out", str(out)])
    return out


def _rehashed(path, edit):
    """The checkpoint at `path` edited by edit(state), saved with a valid hash."""
    state = torch.load(path, weights_only=True)
    state.pop("content_sha256")
    edit(state)
    state["content_sha256"] = checkpoint.content_hash(state)
    torch.save(state, path)


def _config(key, value):
    def edit(state):
        state["config"][key] = value
    return edit


def _drop(key):
    return lambda state: state.pop(key)


def _set(key, value):
    return lambda state: state.__setitem__(key, value)


def _other_model(state):
    state["model"]["fc.weight"] = torch.zeros(3, 3)


@pytest.mark.parametrize("entry", ["--resume", "--eval-only"])
@pytest.mark.parametrize("edit, match", [
    (_drop("model"), "is malformed: it has no 'model' entry"),
    (_drop("step"), "is malformed: it has no 'step' entry"),
    (_set("step", "2"), "'step' must be a int, got str"),
    (_set("step", -1), "is malformed: step -1"),
    (_set("config", ["x"]), "'config' must be a dict, got list"),
    (_set("train_sums", torch.zeros(5)), "train_sums of shape (5,)"),
    (_other_model, "its model does not fit the model its configuration builds"),
    (_config("depth", 14), "its model does not fit the model its configuration builds"),
    (_config("lr", "fast"), "the configuration has a value of the wrong type"),
])
def test_a_hand_made_checkpoint_is_refused_in_one_line(tmp_path, capsys, saved_run, entry, edit, match):
    target = tmp_path / "run"
    target.mkdir()
    (target / checkpoint.FILENAME).write_bytes((saved_run / checkpoint.FILENAME).read_bytes())
    _rehashed(target / checkpoint.FILENAME, edit)
    before = (target / checkpoint.FILENAME).read_bytes()
    _one_line_error(capsys, [entry, str(target), *(["--iters", "4"] if entry == "--resume" else [])], match)
    assert (target / checkpoint.FILENAME).read_bytes() == before


@pytest.mark.parametrize("content, match", [
    (b'{"iter": "2", "train_loss": 1, "train_error": 0, "test_loss": 1, "test_error": 0}\n', "line 1 is not"),
    (b'{"iter": 2, "train_loss": 1, "train_error": 0, "test_loss": 1}\n', "line 1 is not a metrics record"),
    (b'{"iter": 2, "train_loss": 1, "train_error": "0", "test_loss": 1, "test_error": 0}\n', "line 1 is not"),
    (b"\xff\xfe not text\n", "not UTF-8 text"),
])
def test_a_malformed_metrics_log_is_refused_before_training(tmp_path, capsys, saved_run, content, match):
    target = tmp_path / "run"
    target.mkdir()
    (target / checkpoint.FILENAME).write_bytes((saved_run / checkpoint.FILENAME).read_bytes())
    (target / "metrics.jsonl").write_bytes(content)
    _one_line_error(capsys, ["--resume", str(target), "--iters", "4"], match)
    assert (target / "metrics.jsonl").read_bytes() == content


def test_eval_only_reads_this_machines_data_not_the_checkpoints_paths(tmp_path, capsys, saved_run):
    # A CIFAR-10 run's checkpoint from another machine, whose data were in /elsewhere.
    foreign = tmp_path / "foreign.pt"
    foreign.write_bytes((saved_run / checkpoint.FILENAME).read_bytes())
    elsewhere = tmp_path / "elsewhere" / "data"

    def cifar_elsewhere(state):
        state["config"].update(dataset="cifar10", data_dir=str(elsewhere), download=True)

    _rehashed(foreign, cifar_elsewhere)
    _one_line_error(capsys, ["--eval-only", str(foreign), "--data-dir", "mine", "--no-download"],
                    "CIFAR-10 not found in mine:")
    _one_line_error(capsys, ["--eval-only", str(foreign), "--no-download"], "CIFAR-10 not found in data:")
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("env, match", [
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE must be an integer >= 1, got 'abc'"),
    ({"LOCAL_RANK": "x"}, "LOCAL_RANK must be an integer >= 0, got 'x'"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, "WORLD_SIZE=2 needs MASTER_ADDR and MASTER_PORT in the environment"),
    ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "1"}, "RANK=2 must be below"),
])
def test_bad_distributed_environment_is_one_line(capsys, monkeypatch, env, match):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    _one_line_error(capsys, [*TINY, "--iters", "2", "--out", "r"], match)


@pytest.mark.parametrize("argv, match", [
    (["--device", "cuda:x"], "--device must be auto, cpu, cuda or cuda:N, got 'cuda:x'"),
    (["--device", "cpu:0"], "--device must be auto, cpu, cuda or cuda:N"),
    (["--dataset", "cifar10", "--data-dir", "afile", "--no-download"], "--data-dir afile is a file"),
])
def test_bad_device_or_data_dir_is_one_line(tmp_path, capsys, argv, match):
    (tmp_path / "afile").write_text("not a directory")
    _one_line_error(capsys, [*TINY, "--iters", "2", "--out", "r", *argv], match)
