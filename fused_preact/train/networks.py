"""The network a configuration asks for, from fused_preact's model registry.

Only options the configuration actually sets are passed to the factory
(depth=, fused=, recompute=, backend= and --model-arg ones): a registered
network that has no such option still builds with its defaults, and one
that is given an option it does not take fails with one line naming the flag.
"""
import torch

from ..models import create_model, list_models
from .config import FLAG_OF, ConfigError, TrainConfig


def model_options(c: TrainConfig) -> dict:
    options = dict(c.model_args)
    for key in FLAG_OF:
        if getattr(c, key) is not None:
            options[key] = getattr(c, key)
    return options


def build_model(c: TrainConfig, num_classes: int) -> torch.nn.Module:
    names = list_models()
    if c.arch not in names:
        raise ConfigError(f"--arch {c.arch!r} is not a registered network; choose one of: {', '.join(names)}")
    options = model_options(c)
    try:
        return create_model(c.arch, num_classes, **options)
    except TypeError as err:
        # A factory without the keyword rejects it with a TypeError naming it.
        named = [k for k in options if repr(k) in str(err) or f"'{k}'" in str(err) or k in str(err)]
        flags = ", ".join(FLAG_OF.get(k, f"--model-arg {k}=...") for k in named) or "these options"
        raise ConfigError(f"network {c.arch!r} does not take {flags}: {err}") from err
    except ValueError as err:
        raise ConfigError(f"network {c.arch!r}: {err}") from err
