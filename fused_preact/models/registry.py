"""Networks by name, the convention timm users know:

    model = fused_preact.create_model("preact_resnet164", num_classes=100, recompute="unit")
    fused_preact.list_models()          # every registered name
    fused_preact.list_models("*164*")   # names matching a glob

Each name maps to a factory `factory(num_classes=..., **options) -> nn.Module`;
`register_model` adds one (model modules register theirs at import).
"""
import fnmatch
from typing import Callable, Optional

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str, factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    if name in _MODELS:
        raise ValueError(f"register_model: a model named {name!r} is already registered")
    _MODELS[name] = factory
    return factory


def list_models(pattern: Optional[str] = None) -> list[str]:
    """Registered names, sorted; only those matching the glob `pattern` if
    given. The glob matches the whole name (fnmatch, as timm's list_models):
    "preact*" lists the pre-activation nets, "preact" only a net of that name."""
    names = sorted(_MODELS)
    return names if pattern is None else [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def create_model(name: str, num_classes: Optional[int] = None, **options) -> nn.Module:
    """The network registered as `name`, with `num_classes` outputs (default:
    the network's own, 10 for CIFAR nets, 1000 for ImageNet nets); `options`
    go to its factory (e.g. fused, recompute, backend, shortcut)."""
    if name not in _MODELS:
        close = fnmatch.filter(_MODELS, f"*{name}*")
        hint = f"; did you mean one of {sorted(close)}?" if close else "; see fused_preact.list_models()"
        raise ValueError(f"create_model: unknown model name {name!r}{hint}")
    if num_classes is not None:
        options["num_classes"] = num_classes
    return _MODELS[name](**options)
