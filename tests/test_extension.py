"""Without the compiled extension the package still imports and the reference
backend works; only an op that needs a compiled kernel fails, naming the fix."""
import subprocess
import sys
import textwrap

import pytest

from fused_preact import _extension


def _run_without_extension(code: str) -> subprocess.CompletedProcess:
    # sys.modules[name] = None makes `import fused_preact._C` raise ImportError.
    prelude = "import sys; sys.modules['fused_preact._C'] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True)


def test_import_and_reference_backend_work_without_extension():
    result = _run_without_extension("""
        import torch
        import fused_preact
        from fused_preact import _extension
        from fused_preact.ops import bn_relu_conv2d
        assert not _extension.available()
        x = torch.randn(2, 3, 5, 5)
        y = bn_relu_conv2d(x, torch.randn(4, 3, 3, 3), torch.ones(3), torch.zeros(3), None, None, padding=1)
        assert y.shape == (2, 4, 5, 5)
        model = fused_preact.PreActResNet(8, backend="auto")
        model(torch.randn(2, 3, 8, 8)).sum().backward()
        print("ok")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_native_backend_without_extension_says_how_to_build():
    result = _run_without_extension("""
        import torch
        from fused_preact.ops import bn_relu_conv2d
        bn_relu_conv2d(torch.randn(2, 3, 5, 5), torch.randn(4, 3, 1, 1), None, None, None, None, backend="native")
    """)
    assert result.returncode != 0
    assert "ExtensionNotBuiltError" in result.stderr
    assert "pip install --no-build-isolation ." in result.stderr


def test_extension_is_built_in_this_environment():
    # The rest of the suite compares the compiled kernels; it must not silently
    # fall back to the reference because the build is missing.
    assert _extension.available(), _extension._IMPORT_ERROR


def test_a_library_built_from_older_sources_is_refused_naming_the_fix(monkeypatch):
    # An in-place build not redone after the sources gained an op: refused at
    # import, and load() says to rebuild, instead of a missing-op error later.
    monkeypatch.setattr(_extension, "_NEWEST_OP", "an_op_the_library_lacks")
    module, error = _extension._import()
    assert module is None
    assert "built from older sources (it has no fused_preact::an_op_the_library_lacks); rebuild it" in str(error)
    monkeypatch.setattr(_extension, "_MODULE", module)
    monkeypatch.setattr(_extension, "_IMPORT_ERROR", error)
    with pytest.raises(_extension.ExtensionNotBuiltError, match="older sources.*pip install --no-build-isolation"):
        _extension.load()
