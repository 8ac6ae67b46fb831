"""--cuda-graphs: where capture cannot work the trainer says why in one line;
the warm-up before a capture leaves no trace; on the CPU, the graph step's
plumbing (static buffers, one graph per batch shape, warm-up, the capturable
rate, resume) runs with CUDA's capture and replay stood in for by calls of the
step, and equals the eager run bit for bit; on a GPU (`gpu`), captured
training equals uncaptured training for the native and Triton backends."""
import json
import os

import pytest
import torch
from torch import Tensor

from fused_preact import PreActResNet
from fused_preact.dispatch_count import DispatchCounter
from fused_preact.train import checkpoint, graphs
from fused_preact.train.__main__ import run
from fused_preact.train.config import ConfigError, build_parser, explicit_options, resolve
from fused_preact.train.distributed import Processes
from fused_preact.train.loop import train
from fused_preact.train.metrics import TIMING_FIELDS, read_jsonl
from fused_preact.train.optim import PyTorchSGD

from test_train_cli import TINY, _fails

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default runs/ and data/ land here


# --- where capture cannot work: one line naming the reason -------------------------------------------------------

@pytest.mark.parametrize("argv, match", [
    ([*TINY, "--cuda-graphs"], "--cuda-graphs needs a CUDA device (a graph records GPU kernel launches), got "
                               "--device cpu"),
    (["--device", "cuda", "--cuda-graphs", "--amp", "fp16"], "--cuda-graphs does not work with --amp fp16: its "
                                                             "loss scaler reads an overflow flag on the host"),
    (["--device", "cuda", "--cuda-graphs", "--compile"], "--cuda-graphs and --compile exclude each other"),
])
def test_options_that_cannot_capture(capsys, argv, match):
    _fails(capsys, argv, match)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_auto_device_without_cuda(capsys, tmp_path):
    _fails(capsys, [*TINY, "--device", "auto", "--cuda-graphs", "--out", str(tmp_path / "run")],
           "--cuda-graphs needs a CUDA device, but --device auto picked cpu (no CUDA device is visible)")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_several_processes_are_refused():
    c = resolve("paper", {"device": "cuda", "cuda_graphs": True})
    with pytest.raises(ConfigError, match=r"--cuda-graphs runs one process, got 2 \(torchrun\): "
                                          r"DistributedDataParallel's gradient all-reduce is not captured"):
        graphs.check_support(c, Processes(rank=0, world_size=2, device=torch.device("cuda", 0)))
    graphs.check_support(c, Processes(rank=0, world_size=1, device=torch.device("cuda", 0)))  # one GPU: fine
    c.cuda_graphs = False
    graphs.check_support(c, Processes(rank=0, world_size=2, device=torch.device("cpu")))


def test_the_default_captures_wherever_it_works(capsys):
    one_gpu = Processes(rank=0, world_size=1, device=torch.device("cuda", 0))
    c = resolve("paper", {"device": "cuda"})
    assert c.cuda_graphs is None  # the default: decided per run
    graphs.check_support(c, one_gpu)
    assert c.cuda_graphs is True and capsys.readouterr().out == ""
    for options, procs, why in [
        ({"device": "cuda", "amp": "fp16"}, one_gpu, "does not work with --amp fp16"),
        ({"device": "cuda", "compile": True}, one_gpu, "is not combined with --compile"),
        ({"device": "cuda"}, Processes(rank=0, world_size=2, device=torch.device("cuda", 0)), "runs one process"),
        ({"device": "cpu"}, Processes(rank=0, world_size=1, device=torch.device("cpu")), "needs a CUDA device"),
    ]:
        c = resolve("paper", options)
        graphs.check_support(c, procs)
        lines = capsys.readouterr().out.splitlines()
        assert c.cuda_graphs is False and len(lines) == 1, (options, lines)
        assert lines[0].startswith("note: CUDA graphs off: whole-step capture " + why), lines
    c = resolve("paper", {"device": "cuda", "cuda_graphs": False})  # --no-cuda-graphs: off, and nothing to say
    graphs.check_support(c, one_gpu)
    assert c.cuda_graphs is False and capsys.readouterr().out == ""


def test_cuda_graphs_may_change_on_resume(capsys, tmp_path):
    out = tmp_path / "run"
    assert run([*TINY, "--iters", "2", "--out", str(out)])["iters"] == 2
    # The same computation with or without graphs: accepted, then refused on the CPU for its device alone.
    _fails(capsys, ["--resume", str(out), "--cuda-graphs", "--iters", "3"], "--cuda-graphs needs a CUDA device")
    assert run(["--resume", str(out), "--no-cuda-graphs", "--iters", "3"])["iters"] == 3


# --- the warm-up before a capture --------------------------------------------------------------------------------

def test_the_warm_up_leaves_no_trace(one_thread):
    torch.manual_seed(0)
    net = PreActResNet(8, backend="native")
    opt = PyTorchSGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
    opt.init_state()
    x, labels = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    tensors = graphs.training_tensors(net, opt)
    assert len(tensors) == len(list(net.parameters())) * 2 + len(list(net.buffers()))
    before = [t.detach().clone() for t in tensors]
    rng = torch.get_rng_state()
    with graphs.state_put_back(tensors, torch.device("cpu")):
        for _ in range(graphs.WARMUP_ITERS):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(x), labels).backward()
            opt.step()
            torch.rand(3)  # draws, as dropout would
        assert not all(torch.equal(a, b) for a, b in zip(before, tensors))
    for i, (want, got) in enumerate(zip(before, tensors)):
        assert torch.equal(want, got), i  # weights, running statistics, num_batches_tracked, velocities
    assert torch.equal(torch.get_rng_state(), rng)
    assert [t.data_ptr() for t in graphs.training_tensors(net, opt)] == [t.data_ptr() for t in tensors]  # in place


# --- the graph step's plumbing on the CPU ------------------------------------------------------------------------

class _StandIns:
    """StepGraphs' two CUDA parts replaced by calls of the step: the warm-up
    runs the step WARMUP_ITERS times, "capture" checks what a real capture
    needs (no read of the device from the host, a tensor rate, the velocities
    in place) on a trial step whose effects are put back, and "replay" runs
    the step on the static buffers."""

    def __init__(self, monkeypatch):
        self.captured: list[tuple] = []
        self.warm_ups = 0
        stand_ins = self
        monkeypatch.setattr(graphs, "check_support", lambda c, procs: None)  # the CPU stands in for a GPU

        def warm_up(graph_steps, x, y):
            for _ in range(graphs.WARMUP_ITERS):
                graph_steps.step(x, y)
            stand_ins.warm_ups += 1

        def record(graph_steps, x, y):
            net, opt = graph_steps.net, graph_steps.optimizer
            assert all(p.grad is None for p in net.parameters())  # backward allocates them inside the graph
            for group in opt.param_groups:
                assert isinstance(group["lr"], Tensor) and group["lr"].dtype == group["params"][0].dtype
                assert all(opt.VELOCITY in opt.state[p] for p in group["params"])
            with graphs.state_put_back(graphs.training_tensors(net, opt), graph_steps.device), \
                    DispatchCounter() as counter:
                graph_steps.step(x, y)
            assert counter.syncs == [], f"a capture would fail on a host read: {counter.syncs}"
            stand_ins.captured.append(tuple(x.shape))
            outputs: list[Tensor] = []

            def replay():
                outputs[:] = graph_steps.step(x, y)

            return replay, outputs

        monkeypatch.setattr(graphs.StepGraphs, "_warm_up", warm_up)
        monkeypatch.setattr(graphs.StepGraphs, "_record", record)


# 80 images in batches of 32: two full batches and one of 16 per epoch; the
# rate 0.02, then 0.1 after the warm-up iteration, then 0.01 after iteration 2.
SMALL = ["--train-size", "80", "--batch-size", "32", "--warmup-iters", "1", "--warmup-lr", "0.02", "--lr", "0.1",
         "--milestones", "2", "--eval-every", "1"]


def _losses(out):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in read_jsonl(out / "metrics.jsonl")]


def _assert_same_state(a, b):
    """Two checkpoints' networks (weights, running statistics,
    num_batches_tracked) and optimizer states, value for value."""
    sa, sb = checkpoint.load(a), checkpoint.load(b)
    assert sa["step"] == sb["step"]
    assert sa["model"].keys() == sb["model"].keys()
    for name, t in sa["model"].items():
        assert torch.equal(t, sb["model"][name]), name
    assert sa["optimizer"]["state"].keys() == sb["optimizer"]["state"].keys()
    assert sa["optimizer"]["param_groups"] == sb["optimizer"]["param_groups"]
    for (key, state), other in zip(sa["optimizer"]["state"].items(), sb["optimizer"]["state"].values()):
        for name, t in state.items():
            assert torch.equal(t, other[name]), f"optimizer state {key}.{name}"


@pytest.mark.parametrize("sgd", ["caffe", "pytorch"])
def test_graph_step_plumbing_equals_eager_on_the_cpu(tmp_path, monkeypatch, sgd):
    argv = [*TINY, *SMALL, "--iters", "6", "--sgd", sgd, *(["--no-nesterov"] if sgd == "caffe" else [])]
    eager = run([*argv, "--out", str(tmp_path / "eager")])
    stand_ins = _StandIns(monkeypatch)
    config = resolve("quick", {**_given(argv), "out": str(tmp_path / "graphs")})
    config.cuda_graphs = True  # past validate, which refuses it on the CPU
    graphed = train(config)
    assert stand_ins.captured == [(32, 3, 32, 32), (16, 3, 32, 32)]  # one graph per batch shape, each captured once
    assert stand_ins.warm_ups == 2
    assert graphed["state_digests"] == eager["state_digests"]
    assert _losses(tmp_path / "graphs") == _losses(tmp_path / "eager")
    assert [r["lr"] for r in _losses(tmp_path / "graphs")][:3] == pytest.approx([0.02, 0.1, 0.01])
    _assert_same_state(tmp_path / "graphs" / "checkpoint.pt", tmp_path / "eager" / "checkpoint.pt")


def test_graph_step_plumbing_resumes_on_the_cpu(tmp_path, monkeypatch):
    argv = [*TINY, *SMALL, "--iters", "6", "--ckpt-every", "2"]
    eager = run([*argv, "--out", str(tmp_path / "eager")])
    stand_ins = _StandIns(monkeypatch)
    config = resolve("quick", {**_given(argv), "out": str(tmp_path / "cut")})
    config.cuda_graphs = True
    with pytest.raises(KeyboardInterrupt):
        train(config, interrupt_after=3)  # the checkpoint at 2 holds the rate as a tensor
    resumed = train(config, resume=tmp_path / "cut" / "checkpoint.pt")
    assert resumed["state_digests"] == eager["state_digests"]
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "eager")
    # Captured again after the resume, which starts at the epoch's last batch.
    assert stand_ins.captured == [(32, 3, 32, 32), (16, 3, 32, 32), (16, 3, 32, 32), (32, 3, 32, 32)]


def _given(argv):
    """The command line's options as TrainConfig fields."""
    return explicit_options(build_parser().parse_args(argv))


# --- on a GPU: captured training equals uncaptured training ------------------------------------------------------

on_gpu = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET,
                            reason="needs a CUDA device (and compiled Triton kernels, no TRITON_INTERPRET)")
GPU_RUNS = {  # backend: options (the Triton kernels take channels_last)
    "native": ["--backend", "native", "--sgd", "caffe", "--no-nesterov"],
    "triton": ["--backend", "triton", "--channels-last", "--sgd", "pytorch", "--nesterov"],
}


def _gpu_argv(backend):
    # Three iterations: two batches of 32 (rates 0.02, then 0.1) and the epoch's last batch of 16 (rate 0.01),
    # which takes a second graph.
    return ["--preset", "quick", "--device", "cuda", "--test-size", "32", *SMALL, "--iters", "3", "--ckpt-every", "3",
            *GPU_RUNS[backend]]


def _captured(run_dir) -> bool:
    """Whether the run captured its step (config.json: cuda_graphs as the run settled it; on CUDA the default)."""
    return json.loads((run_dir / "config.json").read_text())["cuda_graphs"]


@pytest.fixture
def deterministic_cudnn(monkeypatch):
    # The captured and the eager run must choose the same cuDNN algorithms,
    # and deterministic ones, for their results to agree bit for bit.
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)


@pytest.mark.gpu
@on_gpu
@pytest.mark.usefixtures("deterministic_cudnn")
@pytest.mark.parametrize("backend", list(GPU_RUNS))
def test_captured_training_equals_eager_training(tmp_path, backend):
    eager = run([*_gpu_argv(backend), "--no-cuda-graphs", "--out", str(tmp_path / "eager")])
    graphed = run([*_gpu_argv(backend), "--cuda-graphs", "--out", str(tmp_path / "graphs")])
    assert graphed["iters"] == eager["iters"] == 3
    assert _captured(tmp_path / "graphs") and not _captured(tmp_path / "eager")
    losses = _losses(tmp_path / "graphs")
    assert [r["lr"] for r in losses] == pytest.approx([0.02, 0.1, 0.01])
    assert losses == _losses(tmp_path / "eager")  # train loss and error of each iteration, test loss and error
    _assert_same_state(tmp_path / "graphs" / "checkpoint.pt", tmp_path / "eager" / "checkpoint.pt")
    state = checkpoint.load(tmp_path / "graphs" / "checkpoint.pt")
    assert {int(t) for k, t in state["model"].items() if k.endswith("num_batches_tracked")} == {3}


@pytest.mark.gpu
@on_gpu
@pytest.mark.usefixtures("deterministic_cudnn")
def test_captured_training_resumes_exactly(tmp_path):
    argv = [*_gpu_argv("native"), "--ckpt-every", "2"]  # checkpoints at 2 and 3
    run([*argv, "--no-cuda-graphs", "--out", str(tmp_path / "eager")])
    assert not _captured(tmp_path / "eager")
    with pytest.raises(KeyboardInterrupt):
        run([*argv, "--cuda-graphs", "--out", str(tmp_path / "cut")], interrupt_after=2)
    run(["--resume", str(tmp_path / "cut")])  # with --cuda-graphs, as saved; the last batch's graph captured now
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "eager")
    _assert_same_state(tmp_path / "cut" / "checkpoint.pt", tmp_path / "eager" / "checkpoint.pt")
