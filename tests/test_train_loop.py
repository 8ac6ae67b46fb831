"""The training loop on the CPU: the quick preset learns, a resumed run
equals the uninterrupted one bit for bit, fused and plain models give the
same losses, a diverging run stops and keeps its last good checkpoint,
evaluation-only mode, and a CIFAR run from fixture archives."""
import json

import pytest
import torch

from fused_preact.train import checkpoint
from fused_preact.train.__main__ import main, run
from fused_preact.train.data import CIFAR
from fused_preact.train.metrics import TIMING_FIELDS, read_jsonl

from test_train_data import write_cifar_archive

TINY = ["--preset", "quick", "--train-size", "256", "--test-size", "64", "--threads", "1"]


def _records(out):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in read_jsonl(out / "metrics.jsonl")]


def test_quick_preset_learns(tmp_path):
    # The quick preset on half its data and 10 of its 12 epochs (CI budget):
    # chance is 90% error.
    out = tmp_path / "quick"
    summary = run(["--preset", "quick", "--train-size", "2000", "--test-size", "500", "--epochs", "10",
                   "--milestones", "8", "--out", str(out)])
    assert summary["final_test_error"] < 0.5, summary
    records = read_jsonl(out / "metrics.jsonl")
    # 2000 / 64: 31 full batches and one of 16 per epoch
    assert [r["iter"] for r in records] == [32 * e for e in range(1, 11)]
    assert records[-1]["train_error"] < records[0]["train_error"]
    for key in ("train_loss", "train_error", "test_loss", "test_error", "lr", "images_per_s", "peak_memory_mib"):
        assert key in records[0]
    assert json.loads((out / "summary.json").read_text())["final_test_error"] == summary["final_test_error"]
    assert json.loads((out / "config.json").read_text())["preset"] == "quick"
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert checkpoint.load(out / "checkpoint.pt")["step"] == 320


@pytest.mark.parametrize("sgd, velocity", [("pytorch", "momentum_buffer"), ("caffe", "velocity")])
def test_resume_equals_uninterrupted_run(tmp_path, sgd, velocity):
    args = [*TINY, "--iters", "12", "--eval-every", "3", "--ckpt-every", "4", "--sgd", sgd, "--no-nesterov"]
    whole = run([*args, "--out", str(tmp_path / "whole")])
    with pytest.raises(KeyboardInterrupt):
        run([*args, "--out", str(tmp_path / "cut")], interrupt_after=6)  # after the checkpoint at 4
    assert checkpoint.load(tmp_path / "cut" / "checkpoint.pt")["step"] == 4
    assert len(read_jsonl(tmp_path / "cut" / "metrics.jsonl")) == 2  # iterations 3 and 6
    resumed = run(["--resume", str(tmp_path / "cut")])
    assert resumed["state_digests"] == whole["state_digests"]  # bit-identical network and statistics
    assert _records(tmp_path / "cut") == _records(tmp_path / "whole")
    a = checkpoint.load(tmp_path / "whole" / "checkpoint.pt")
    b = checkpoint.load(tmp_path / "cut" / "checkpoint.pt")
    for (name, x), y in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].values()):
        assert torch.equal(x[velocity], y[velocity]), name


def test_fused_and_plain_models_give_the_same_losses(tmp_path):
    args = [*TINY, "--iters", "5", "--eval-every", "1"]  # one record (train loss of one batch) per iteration
    run([*args, "--out", str(tmp_path / "fused")])
    run([*args, "--no-fused", "--out", str(tmp_path / "plain")])
    fused, plain = _records(tmp_path / "fused"), _records(tmp_path / "plain")
    assert len(fused) == 5
    torch.testing.assert_close(fused[0]["train_loss"], plain[0]["train_loss"], rtol=1e-6, atol=0)
    torch.testing.assert_close([r["train_loss"] for r in fused], [r["train_loss"] for r in plain], rtol=1e-4, atol=0)
    torch.testing.assert_close([r["test_loss"] for r in fused], [r["test_loss"] for r in plain], rtol=1e-3, atol=0)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "diverges"
    # Four sane iterations at the warm-up lr (checkpoints at 2 and 4), then an absurd lr.
    code = main([*TINY, "--iters", "12", "--warmup-iters", "4", "--warmup-lr", "0.1", "--lr", "1e30",
                 "--ckpt-every", "2", "--log-every", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "NaN or infinite" in err and "(iteration 4)" in err, err
    state = checkpoint.load(out / "checkpoint.pt")
    assert state["step"] == 4
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_eval_only(tmp_path, capsys):
    out = tmp_path / "run"
    summary = run([*TINY, "--iters", "4", "--out", str(out)])
    result = run(["--eval-only", str(out / "checkpoint.pt")])
    assert result["iter"] == 4 and result["test_error"] == summary["final_test_error"]
    assert "test error" in capsys.readouterr().out


@pytest.mark.parametrize("name, normalize", [("cifar10", "pixel-mean"), ("cifar100", "channel")])
def test_trains_on_cifar_archives(tmp_path, monkeypatch, name, normalize):
    spec, _ = write_cifar_archive(tmp_path / "data", name, per_file=40 if name == "cifar10" else 200)
    monkeypatch.setitem(CIFAR, name, spec)  # the fixture's md5 sums instead of the real ones
    summary = run(["--preset", "paper", "--dataset", name, "--data-dir", str(tmp_path / "data"), "--depth", "8",
                   "--batch-size", "32", "--iters", "3", "--warmup-iters", "1", "--normalize", normalize,
                   "--device", "cpu", "--threads", "1", "--out", str(tmp_path / "run")])
    assert summary["iters"] == 3
    assert (tmp_path / "data" / spec.folder / spec.test_files[0][0]).is_file()
    # The error is counted over the archive's whole test split, which the
    # checkpoint's network reproduces when evaluated again.
    test_images = 40 if name == "cifar10" else 200
    result = run(["--eval-only", str(tmp_path / "run" / "checkpoint.pt")])
    assert result["test_images"] == test_images and result["test_error"] == summary["final_test_error"]
    assert abs(summary["final_test_error"] * test_images - round(summary["final_test_error"] * test_images)) < 1e-9
