"""Command line: presets resolve to the paper's recipes, and bad options or
paths end with exactly one clear line on stderr (exit status 2)."""
import json

import pytest
import torch
from torch import nn

from fused_preact import list_models
from fused_preact.models import register_model
from fused_preact.train.__main__ import main

PLAIN_NET = "train_test_net_without_options"
if PLAIN_NET not in list_models():
    # A registered network whose factory takes none of the fused options.
    register_model(PLAIN_NET, lambda num_classes=10: nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes)))

TINY = ["--preset", "quick", "--train-size", "128", "--test-size", "32", "--threads", "1"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default runs/ and data/ land here


def _fails(capsys, argv, match):
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert match in lines[0], lines[0]
    return lines[0]


def _config(capsys, argv):
    assert main([*argv, "--print-config"]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("configuration: ")][0]
    return json.loads(line[len("configuration: "):])


def test_presets(capsys):
    paper = _config(capsys, ["--preset", "paper"])
    assert (paper["batch_size"], paper["lr"], paper["momentum"], paper["weight_decay"]) == (128, 0.1, 0.9, 1e-4)
    assert (paper["warmup_iters"], paper["warmup_lr"], paper["iters"]) == (400, 0.01, 64000)
    assert paper["milestones"] == [32000, 48000] and paper["milestone_unit"] == "iters"
    assert (paper["crop_pad"], paper["flip"], paper["nesterov"]) == (4, True, False)
    official = _config(capsys, ["--preset", "torch-official"])
    assert (official["batch_size"], official["nesterov"], official["epochs"],
            official["warmup_iters"]) == (64, True, 200, 0)
    assert official["normalize"] == "channel" and official["milestone_unit"] == "epochs"
    quick = _config(capsys, ["--preset", "quick"])
    assert quick["dataset"] == "shapes10" and quick["device"] == "cpu"


def test_overrides(capsys):
    c = _config(capsys, ["--preset", "paper", "--depth", "1001", "--dataset", "cifar100", "--batch-size", "64",
                         "--lr", "0.05", "--amp", "bf16", "--recompute", "segment", "--no-fused", "--backend",
                         "reference", "--channels-last", "--compile", "--seed", "3", "--iters", "10",
                         "--model-arg", "shortcut=A", "--model-arg", "segment_size=3"])
    assert (c["depth"], c["dataset"], c["batch_size"], c["lr"], c["amp"]) == (1001, "cifar100", 64, 0.05, "bf16")
    assert (c["recompute"], c["fused"], c["backend"], c["channels_last"], c["compile"]) == \
        ("segment", False, "reference", True, True)
    assert c["iters"] == 10 and c["epochs"] is None and c["model_args"] == {"shortcut": "A", "segment_size": 3}
    # A fixed-depth network does not inherit the preset's depth.
    assert _config(capsys, ["--preset", "paper", "--arch", "preact_resnet1001"])["depth"] is None
    # --epochs on an iteration preset: milestones given with it are epochs.
    c = _config(capsys, ["--preset", "paper", "--epochs", "20", "--milestones", "10,15"])
    assert (c["epochs"], c["iters"], c["milestones"], c["milestone_unit"]) == (20, None, [10, 15], "epochs")


@pytest.mark.parametrize("argv, match", [
    (["--no-such-option"], "unrecognized arguments: --no-such-option"),
    (["--preset", "nope"], "argument --preset: invalid choice"),
    (["--epochs", "3", "--iters", "4"], "either --epochs or --iters"),
    (["--batch-size", "0"], "--batch-size: must be a positive integer"),
    (["--batch-size", "1"], "--batch-size must be at least 2"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--momentum", "1.5"], "--momentum must be in [0, 1)"),
    (["--milestones", "5,3"], "--milestones must be increasing"),
    (["--milestones", "a,b"], "comma-separated numbers"),
    (["--preset", "quick", "--warmup-iters", "5"], "--warmup-iters needs a positive --warmup-lr"),
    (["--backend", "nope"], "--backend must be one of"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda"),
    (["--model-arg", "novalue"], "expected KEY=VALUE"),
    (["--nesterov", "--momentum", "0"], "--nesterov needs --momentum > 0"),
])
def test_bad_options(capsys, argv, match):
    _fails(capsys, argv, match)


@pytest.mark.parametrize("argv, match", [
    (["--arch", "no_such_net"], "--arch 'no_such_net' is not a registered network"),
    (["--arch", "preact_resnet164", "--depth", "20"], "preact_resnet164: depth is fixed at 164 by the name"),
    (["--depth", "9"], "network 'preact_resnet': PreActResNet: depth"),
    (["--recompute", "sometimes"], "recompute must be one of"),
    (["--recompute", "bn_relu", "--no-fused"], "recompute='bn_relu' needs fused=True"),
    (["--arch", PLAIN_NET, "--no-fused"], f"network '{PLAIN_NET}' does not take --no-fused"),
    (["--arch", PLAIN_NET, "--model-arg", "width=3"], "does not take --model-arg width=..."),
    (["--train-size", "10"], "--batch-size 64 is larger than the 10 training images"),
])
def test_bad_network_options(capsys, argv, match):
    _fails(capsys, [*TINY, *argv], match)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(capsys):
    _fails(capsys, [*TINY, "--device", "cuda"], "CUDA is not available")


def test_bad_paths(capsys, tmp_path):
    _fails(capsys, ["--dataset", "cifar10", "--depth", "8", "--no-download", "--data-dir", str(tmp_path / "nothing")],
           f"put cifar-10-python.tar.gz (md5 c58f30108f718f92721af3b95e74349a, from "
           f"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz) into {tmp_path / 'nothing'}/")
    _fails(capsys, ["--resume", str(tmp_path / "no_run")], f"no checkpoint at {tmp_path / 'no_run'}")
    _fails(capsys, ["--eval-only", str(tmp_path / "none.pt")], "no checkpoint at")
    _fails(capsys, ["--resume"], "--resume needs a checkpoint or run directory")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    _fails(capsys, ["--eval-only", str(junk)], "is not a readable checkpoint")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    _fails(capsys, [*TINY, "--out", str(a_file)], "exists and is not a directory")


def test_existing_run_and_resume_mismatch(capsys, tmp_path):
    out = tmp_path / "run"
    assert main([*TINY, "--iters", "2", "--out", str(out)]) == 0
    capsys.readouterr()
    _fails(capsys, [*TINY, "--iters", "2", "--out", str(out)], "already holds a run; pass --resume")
    _fails(capsys, ["--resume", str(out), "--lr", "0.5"], "--lr 0.5 differs from the checkpoint's 0.1")
    _fails(capsys, ["--resume", str(out), "--preset", "paper"], "trained with --preset quick, not paper")
    _fails(capsys, ["--eval-only", str(out), "--lr", "0.5"], "drop --lr")
