"""Imports point downward: fused_preact.triton_kernels (the kernels, their
launchers, and the offline compile of them) imports nothing of fused_preact
outside itself (not the ops and their backends and autograd, the models, the
drivers such as fused_preact.aot). Read from the source with ast, nothing
imported: an import at module level or inside a function, absolute
(fused_preact.X) or relative (..X), counts alike."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "fused_preact"
LAYER = f"{PACKAGE}.triton_kernels"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST, name: str, is_package: bool):
    """(line, the module an import statement names, the statement as written)
    for every import in `tree`, the source of module `name`; relative ones
    resolved. `from P import a, b` names P.a and P.b where P is fused_preact
    itself (a, b are its modules), P otherwise."""
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, f"import {alias.name}"
        elif isinstance(node, ast.ImportFrom):
            written = f"from {'.' * node.level}{node.module or ''} import {', '.join(a.name for a in node.names)}"
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)] if node.level - 1 <= len(base) else []
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source == PACKAGE:
                for alias in node.names:
                    yield node.lineno, f"{PACKAGE}.{alias.name}", written
            else:
                yield node.lineno, source, written


def outside_imports(source: str, name: str, is_package: bool = False) -> list[str]:
    """The imports of fused_preact modules outside the layer in a module's source."""
    return [f"{name}:{line}: `{written}` imports {target}"
            for line, target, written in imported(ast.parse(source), name, is_package)
            if (target == PACKAGE or target.startswith(PACKAGE + "."))
            and not (target == LAYER or target.startswith(LAYER + "."))]


MODULES = sorted((ROOT / "fused_preact" / "triton_kernels").rglob("*.py"))


def test_the_layer_is_found():
    names = {module_name(p) for p in MODULES}
    assert {LAYER, f"{LAYER}.offline", f"{LAYER}.conv_forward"} <= names, names


@pytest.mark.parametrize("path", MODULES, ids=[module_name(p) for p in MODULES])
def test_triton_kernels_import_nothing_above(path):
    offending = outside_imports(path.read_text(), module_name(path), path.name == "__init__.py")
    assert not offending, (f"{module_name(path)} imports outside {LAYER} (the lower layer must not import "
                           "the ops, models or drivers above it):\n" + "\n".join(offending))


@pytest.mark.parametrize("source, caught", [
    ("from ..ops.backends import Conv", True),
    ("from .. import ops", True),
    ("from .. import triton_kernels", False),
    ("def f():\n    from ..ops.dropout import Dropout", True),
    ("import fused_preact.ops.backends", True),
    ("import fused_preact", True),
    ("from fused_preact import aot_layers", True),
    ("from fused_preact.models import PreActResNet", True),
    ("from fused_preact.triton_kernels.pieces import Pieces", False),
    ("from fused_preact import triton_kernels", False),
    ("from . import batch_stats\nfrom .pieces import Pieces", False),
    ("import torch\nimport triton.language as tl\nfrom triton.runtime import driver", False),
])
def test_the_check_catches(source, caught):
    """The check itself, on a module fused_preact.triton_kernels.example."""
    assert bool(outside_imports(source, f"{LAYER}.example")) == caught, source
