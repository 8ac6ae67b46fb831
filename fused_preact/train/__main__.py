"""Command line: python -m fused_preact.train (console script fused-preact-train).

    python -m fused_preact.train --preset quick                  # embedded data, CPU, ~2 min
    python -m fused_preact.train --preset paper --depth 1001     # the paper's CIFAR-10 recipe
    torchrun --nproc_per_node 2 -m fused_preact.train --preset torch-official --depth 1001
    python -m fused_preact.train --resume runs/paper-cifar10-preact_resnet1001-seed0
    python -m fused_preact.train --eval-only runs/.../checkpoint.pt

Errors end the program with one line on stderr. Exit status:
0 done, 1 diverged, 2 bad input (options, paths, data, checkpoints), 3 an
I/O failure such as a full disk, 130/143 stopped by SIGINT/SIGTERM after
saving a checkpoint (130 also for a second Ctrl-C, which does not save).
"""
import sys
from typing import Optional

from . import checkpoint
from .config import ConfigError, build_parser, explicit_options, print_config, resolve, validate
from .data import DataError
from .distributed import DeviceError
from .evaluation import evaluate_checkpoint
from .loop import TrainingDiverged, train
from .stopping import Interrupted


def run(argv: Optional[list[str]] = None, **hooks) -> dict:
    """Parse, resolve and run; raises the trainer's errors (main() prints them)."""
    args = build_parser().parse_args(argv)
    given = explicit_options(args)
    if args.eval_only is not None:
        if args.resume is not None:
            raise ConfigError("--eval-only and --resume exclude each other")
        unused = sorted(set(given) - {"device", "eval_batch_size", "data_dir", "download"})
        if unused:
            raise ConfigError(f"--eval-only takes the run's configuration from the checkpoint; drop "
                              f"{', '.join('--' + k.replace('_', '-') for k in unused)}")
        return evaluate_checkpoint(checkpoint.find(args.eval_only), given.get("device", "auto"),
                                   given.get("eval_batch_size"), given.get("data_dir"), given.get("download", True))
    resume = None
    if args.resume is not None:
        where = args.resume or given.get("out")
        if not where:
            raise ConfigError("--resume needs a checkpoint or run directory (or --out)")
        resume = checkpoint.find(where)
        saved = checkpoint.load(resume)["config"]
        config = checkpoint.resumed_config(saved, given, args.preset)
        if "out" not in given:
            config.out = str(resume.parent)
        validate(config)
    else:
        config = resolve(args.preset, given)
    if args.print_config:
        print_config(config)
        return {"config": config.to_dict()}
    return train(config, resume, rewind=args.rewind, **hooks)


def main(argv: Optional[list[str]] = None, **hooks) -> int:
    """run() with its errors as one line and an exit status; hooks: train()'s, for tests."""
    try:
        run(argv, **hooks)
    except (ConfigError, DataError, DeviceError) as err:
        print(f"fused-preact-train: error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"fused-preact-train: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a file that cannot be written or read (read-only, disk full, ...)
        print(f"fused-preact-train: error: {err}", file=sys.stderr)
        return 3
    except Interrupted as err:  # saved; the message is printed
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
