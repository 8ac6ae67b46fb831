"""The trainer's configuration: presets, command line, validation.

A run's configuration is resolved in three layers: DEFAULTS, then the
preset's recipe, then what the command line sets explicitly (every argparse
default is None, so "given" and "not given" stay distinguishable). The
result is validated once, printed, and saved with the run.
"""
import argparse
import ast
import dataclasses
import json
import re
from typing import Any, Callable, Optional

from .augment import NORMALIZATIONS
from .data import DATASETS


# Momentum SGD's two forms (train/optim.py): the velocity in gradient units
# (PyTorch, Torch7) or with the learning rate folded in (Caffe).
SGD_FORMS = ("pytorch", "caffe")


class ConfigError(ValueError):
    """A bad or inconsistent option; reported as one line."""


@dataclasses.dataclass
class TrainConfig:
    preset: str = "paper"
    # network: options left None are not passed to the factory at all, so a
    # network that does not take them still builds
    arch: str = "preact_resnet"
    depth: Optional[int] = None
    recompute: Optional[str] = None
    fused: Optional[bool] = None
    backend: Optional[str] = None
    model_args: dict = dataclasses.field(default_factory=dict)
    # data
    dataset: str = "cifar10"
    data_dir: str = "data"
    download: bool = True
    data_seed: int = 0
    train_size: Optional[int] = None
    test_size: Optional[int] = None
    normalize: str = "pixel-mean"
    crop_pad: int = 4
    flip: bool = True
    # optimisation; the length is epochs or iters, milestones in the same unit
    # as milestone_unit ("after that many epochs/iterations are done")
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    sgd: str = "pytorch"
    warmup_iters: int = 0
    warmup_lr: Optional[float] = None
    epochs: Optional[int] = None
    iters: Optional[int] = None
    milestones: list = dataclasses.field(default_factory=list)
    milestone_unit: str = "iters"
    lr_decay: float = 0.1
    # execution
    device: str = "auto"
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    cuda_graphs: Optional[bool] = None  # None: on wherever capture works (graphs.check_support)
    threads: Optional[int] = None
    seed: int = 0
    # bookkeeping
    out: Optional[str] = None
    eval_every: Optional[int] = None  # iterations; default one epoch
    ckpt_every: Optional[int] = None  # iterations; default every evaluation
    log_every: int = 20
    eval_batch_size: int = 500

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    # He et al. 2016 (Caffe): batch 128 (2 GPUs), SGD momentum 0.9, wd 1e-4,
    # lr 0.1 /10 at 32k and 48k iterations, stop at 64k; 0.01 for the first
    # 400 iterations; pad 4 + random crop + flip; per-pixel mean subtracted
    # (as in the first ResNet paper, which this one follows for CIFAR);
    # Caffe's momentum form, the lr folded into the velocity (train/optim.py).
    "paper": dict(dataset="cifar10", arch="preact_resnet", depth=164, batch_size=128, lr=0.1, momentum=0.9,
                  weight_decay=1e-4, nesterov=False, sgd="caffe", warmup_iters=400, warmup_lr=0.01, iters=64000,
                  milestones=[32000, 48000], milestone_unit="iters", normalize="pixel-mean", crop_pad=4, flip=True),
    # KaimingHe/resnet-1k-layers on fb.resnet.torch: batch 64 (2 GPUs),
    # nesterov, 200 epochs, /10 "at epochs 81 and 122" -- Lua's epochs count
    # from 1, so the drops come after 80 and 121 finished epochs; no warm-up;
    # per-channel mean/std with the official constants; flip, zero-pad-4 crop.
    "torch-official": dict(dataset="cifar10", arch="preact_resnet", depth=164, batch_size=64, lr=0.1, momentum=0.9,
                           weight_decay=1e-4, nesterov=True, warmup_iters=0, epochs=200, milestones=[80, 121],
                           milestone_unit="epochs", normalize="channel", crop_pad=4, flip=True),
    # The embedded offline set and a small net (ResNet-8, 78k parameters):
    # 48k training images, about 1-2 minutes on 2 CPU cores. One thread: the
    # layers are too small to gain from a second one, and OpenMP's spin-waiting
    # makes two threads up to 10x slower on a machine shared with other jobs
    # (--threads overrides).
    "quick": dict(dataset="shapes10", arch="preact_resnet", depth=8, train_size=4000, test_size=1000, batch_size=64,
                  lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True, warmup_iters=0, epochs=12,
                  milestones=[7, 10], milestone_unit="epochs", normalize="channel", crop_pad=2, flip=True,
                  eval_batch_size=250, device="cpu", threads=1),
}

# The configuration's options that are passed to the network factory (when
# set), and their flags: a --model-arg of the same name would be overridden.
FLAG_OF = {"depth": "--depth", "fused": "--no-fused", "recompute": "--recompute", "backend": "--backend"}

# Options whose change keeps a resumed run the same computation.
RESUMABLE_CHANGES = {"out", "epochs", "iters", "device", "compile", "cuda_graphs", "threads", "log_every",
                     "ckpt_every", "eval_every", "eval_batch_size", "data_dir", "download"}


class OneLineParser(argparse.ArgumentParser):
    """argparse's errors as one line (no usage block), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def int_argument(accept: Callable[[int], bool], expected: str) -> Callable[[str], int]:
    """An argparse type: an integer that `accept`s, else "must be <expected>, got TEXT"."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text}")
        return value

    return parse


_positive_int = int_argument(lambda v: v >= 1, "a positive integer")


def _milestones(text: str) -> list:
    try:
        values = [int(float(v)) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 32000,48000, got {text!r}")
    return values


def _model_arg(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a bare word is a string: shortcut=A


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="fused-preact-train", description="Train pre-activation ResNets as He et al. 2016 did.",
        epilog="presets: paper (Caffe recipe: batch 128, 64k iterations, lr /10 at 32k and 48k, 400 warm-up "
               "iterations at 0.01, Caffe's momentum form), torch-official (fb.resnet.torch recipe: batch 64, "
               "nesterov, 200 epochs, /10 after epochs 80 and 121), quick (embedded shapes10 data, ResNet-8 on "
               "the CPU, about 2 minutes). "
               "Every option overrides the preset; the resolved configuration is printed and saved as "
               "OUT/config.json. Exit status: 0 done, 1 diverged, 2 bad input, 3 I/O failure (a full disk), "
               "130/143 stopped by SIGINT/SIGTERM after saving a checkpoint (continue with --resume).")
    S = argparse.SUPPRESS
    p.add_argument("--preset", choices=list(PRESETS), default=None, help="recipe to start from (default: paper)")
    m = p.add_argument_group("network")
    m.add_argument("--arch", default=S, help="a name from fused_preact.list_models() (default: preact_resnet)")
    m.add_argument("--depth", type=_positive_int, default=S, help="passed as depth= to a family like preact_resnet")
    m.add_argument("--recompute", default=S, help="memory mode passed as recompute= (none, bn_relu, unit, segment)")
    m.add_argument("--no-fused", dest="fused", action="store_false", default=S, help="plain PyTorch modules")
    m.add_argument("--backend", default=S, help="fused op backend passed as backend= (auto, reference, native, ...)")
    m.add_argument("--model-arg", dest="model_args", type=_model_arg, action="append", default=S, metavar="KEY=VALUE",
                   help="any other factory option, e.g. shortcut=A (repeatable)")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", choices=DATASETS, default=S)
    d.add_argument("--data-dir", default=S, help="where CIFAR archives are (or are downloaded to); default ./data")
    d.add_argument("--no-download", dest="download", action="store_false", default=S)
    d.add_argument("--data-seed", type=int, default=S, help="seed of the embedded dataset")
    d.add_argument("--train-size", type=_positive_int, default=S, help="use the first N training images")
    d.add_argument("--test-size", type=_positive_int, default=S, help="use the first N test images")
    d.add_argument("--normalize", choices=NORMALIZATIONS, default=S)
    d.add_argument("--crop-pad", type=int, default=S, help="zero padding of the random crop (0: no crop)")
    d.add_argument("--no-flip", dest="flip", action="store_false", default=S)
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch-size", type=_positive_int, default=S, help="global batch (all processes)")
    o.add_argument("--lr", type=float, default=S)
    o.add_argument("--momentum", type=float, default=S)
    o.add_argument("--weight-decay", type=float, default=S)
    o.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=S)
    o.add_argument("--sgd", choices=SGD_FORMS, default=S,
                   help="momentum form: pytorch (v = m*v + g; w -= lr*v) or caffe (v = m*v + lr*g; w -= v; "
                        "they differ after an lr change); default: caffe for the paper preset, else pytorch")
    o.add_argument("--warmup-iters", type=int, default=S, help="iterations at --warmup-lr before --lr")
    o.add_argument("--warmup-lr", type=float, default=S)
    o.add_argument("--epochs", type=_positive_int, default=S)
    o.add_argument("--iters", type=_positive_int, default=S)
    o.add_argument("--milestones", type=_milestones, default=S,
                   help="lr x --lr-decay after these many epochs/iterations (the unit of --epochs/--iters given)")
    o.add_argument("--lr-decay", type=float, default=S)
    x = p.add_argument_group("execution")
    x.add_argument("--device", default=S, help="auto, cpu, cuda, cuda:N (default auto; quick: cpu)")
    x.add_argument("--amp", choices=["none", "bf16", "fp16"], default=S)
    x.add_argument("--channels-last", action="store_true", default=S)
    x.add_argument("--compile", action="store_true", default=S, help="torch.compile the model")
    x.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=S,
                   help="capture forward, backward and the SGD step in CUDA graphs and replay them (default: on "
                        "wherever that works: one GPU, not --amp fp16, not --compile; --no-cuda-graphs opts out)")
    x.add_argument("--threads", type=_positive_int, default=S, help="CPU threads (torch.set_num_threads)")
    x.add_argument("--seed", type=int, default=S)
    b = p.add_argument_group("run")
    b.add_argument("--out", default=S, help="run directory (default runs/<preset>-<dataset>-<arch>-seed<seed>)")
    b.add_argument("--eval-every", type=_positive_int, default=S,
                   help="iterations between evaluations (default: epoch)")
    b.add_argument("--ckpt-every", type=_positive_int, default=S, help="iterations between checkpoints "
                   "(default: every evaluation)")
    b.add_argument("--log-every", type=_positive_int, default=S)
    b.add_argument("--eval-batch-size", type=_positive_int, default=S)
    b.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue a run: its checkpoint file or run directory (default: --out)")
    b.add_argument("--rewind", action="store_true",
                   help="with --resume of an older checkpoint of a run, continue in that run's directory: its "
                        "metrics.jsonl is cut after the checkpoint and its checkpoint.pt replaced")
    b.add_argument("--eval-only", metavar="CHECKPOINT", default=None, help="evaluate a checkpoint on the test set")
    b.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    return p


def explicit_options(args: argparse.Namespace) -> dict[str, Any]:
    """What the command line set, as TrainConfig fields."""
    given = {k: v for k, v in vars(args).items()
             if k not in ("preset", "resume", "eval_only", "print_config", "rewind")}
    if "model_args" in given:
        given["model_args"] = dict(given["model_args"])
    return given


def resolve(preset: Optional[str], given: dict[str, Any]) -> TrainConfig:
    """DEFAULTS < preset < command line, then validate."""
    preset = preset or "paper"
    values = dict(PRESETS[preset])
    if "arch" in given and given["arch"] != values.get("arch"):
        # The preset's depth belongs to the preset's network.
        values.pop("depth", None)
    if "epochs" in given and "iters" in given:
        raise ConfigError("give either --epochs or --iters, not both")
    for length in ("epochs", "iters"):
        if length in given:  # the command line's length replaces the preset's
            values.pop("iters" if length == "epochs" else "epochs", None)
            if "milestones" in given:
                values["milestone_unit"] = length
    if "milestones" in given and "epochs" not in given and "iters" not in given:
        values["milestone_unit"] = "epochs" if values.get("epochs") is not None else "iters"
    values.update(given)
    config = TrainConfig(preset=preset, **values)
    validate(config)
    return config


def validate(c: TrainConfig) -> None:
    """Refuse a configuration the trainer cannot run, in one line (a value of
    the wrong type, from a hand-made checkpoint, included)."""
    try:
        _check(c)
    except (TypeError, AttributeError) as err:
        raise ConfigError(f"the configuration has a value of the wrong type ({err})") from None


def _check(c: TrainConfig) -> None:
    def need(ok: bool, message: str):
        if not ok:
            raise ConfigError(message)

    need((c.epochs is None) != (c.iters is None), "give either --epochs or --iters")
    need(c.out is None or c.out.strip() != "", "--out is empty (an unset shell variable?): give a run directory, "
                                               "or leave --out out for runs/<preset>-...")
    own = sorted(k for k in c.model_args if k in FLAG_OF and getattr(c, k) is not None)
    need(not own, f"--model-arg {', '.join(own)}=...: use {', '.join(FLAG_OF[k] for k in own)} (the configuration's "
                  f"own option, which --model-arg cannot override)")
    need(c.milestone_unit in ("epochs", "iters"), f"milestone_unit must be epochs or iters, got {c.milestone_unit!r}")
    need(all(isinstance(m, int) and m > 0 for m in c.milestones) and list(c.milestones) == sorted(set(c.milestones)),
         f"--milestones must be increasing positive numbers, got {c.milestones}")
    need(c.batch_size >= 2, f"--batch-size must be at least 2 (BatchNorm needs a batch), got {c.batch_size}")
    need(c.lr > 0, f"--lr must be positive, got {c.lr}")
    need(0 <= c.momentum < 1, f"--momentum must be in [0, 1), got {c.momentum}")
    need(c.weight_decay >= 0, f"--weight-decay must be >= 0, got {c.weight_decay}")
    need(not c.nesterov or c.momentum > 0, "--nesterov needs --momentum > 0")
    need(c.sgd in SGD_FORMS, f"--sgd must be one of {', '.join(SGD_FORMS)}, got {c.sgd!r}")
    need(not (c.nesterov and c.sgd == "caffe"), "--nesterov needs --sgd pytorch (Caffe's SGD solver has no "
                                                "Nesterov momentum)")
    need(0 < c.lr_decay <= 1, f"--lr-decay must be in (0, 1], got {c.lr_decay}")
    need(c.warmup_iters >= 0, f"--warmup-iters must be >= 0, got {c.warmup_iters}")
    need(c.warmup_iters == 0 or (c.warmup_lr is not None and c.warmup_lr > 0),
         "--warmup-iters needs a positive --warmup-lr")
    need(0 <= c.crop_pad <= 16, f"--crop-pad must be in [0, 16], got {c.crop_pad}")
    need(c.normalize in NORMALIZATIONS, f"--normalize must be one of {NORMALIZATIONS}, got {c.normalize!r}")
    need(c.dataset in DATASETS, f"--dataset must be one of {', '.join(DATASETS)}, got {c.dataset!r}")
    need(c.amp in ("none", "bf16", "fp16"), f"--amp must be none, bf16 or fp16, got {c.amp!r}")
    need(re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", c.device) is not None,
         f"--device must be auto, cpu, cuda or cuda:N, got {c.device!r}")
    need(not c.cuda_graphs or c.device != "cpu",
         "--cuda-graphs needs a CUDA device (a graph records GPU kernel launches), got --device cpu; "
         "drop --cuda-graphs to train on the CPU")
    need(not (c.cuda_graphs and c.amp == "fp16"),
         "--cuda-graphs does not work with --amp fp16: its loss scaler reads an overflow flag on the host every "
         "step, which a graph cannot hold; use --amp bf16 or none")
    need(not (c.cuda_graphs and c.compile), "--cuda-graphs and --compile exclude each other (a compiled network "
                                            "is not captured by hand here); pick one")
    from ..ops import backend_names  # late: registering backends may import heavier modules
    need(c.backend is None or c.backend in backend_names(),
         f"--backend must be one of {', '.join(backend_names())}, got {c.backend!r}")


def print_config(config: TrainConfig) -> None:
    print("configuration: " + json.dumps(config.to_dict(), sort_keys=True), flush=True)
