"""The documentation runs as written: every Python example in README.md and
docs/*.md (a page's blocks in order, in one namespace, as a reader pastes
them), every command line of the trainer (parsed and validated with
--print-config) and every option the pages give another module's command
line. Also what the pages promise about the tree: the code map names every
file, every relative link resolves, the README stays short and no source
file passes 400 lines."""
import contextlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PAGE_IDS = [str(p.relative_to(ROOT)) for p in PAGES]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
# Test dependencies an example may import: skipped (named) where absent, as the other tests do.
OPTIONAL = ("torchvision", "timm", "pytorchcv", "onnx", "onnxscript")


def blocks(page: Path, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(page.read_text()) if lang == language]


def test_every_page_is_found():
    assert {"README.md", "docs/op.md", "docs/backends.md", "docs/recompute.md", "docs/trainer.md",
            "docs/networks.md", "docs/convert.md", "docs/benchmarks.md", "docs/development.md"} <= set(PAGE_IDS)


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_python_examples_run(page, tmp_path, monkeypatch, one_thread):
    code = blocks(page, "python")
    if not code:
        pytest.skip(f"{page.name} has no Python example")
    for module in OPTIONAL:
        if any(re.search(rf"^\s*(import|from) {module}\b", c, re.M) for c in code):
            pytest.importorskip(module, reason="a test dependency: pip install -r requirements-test.txt")
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    namespace: dict = {"__name__": "__docs__"}
    for i, source in enumerate(code):
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            exec(compile(source, f"{page.name}, Python example {i + 1}", "exec"), namespace)


def command_lines(page: Path) -> list[list[str]]:
    """The shell command lines of a page's bash blocks (continuations joined,
    comments dropped) and of its inline code that starts with `python`, each
    split into words; `a && b` gives two."""
    inline = [" ".join(span.split()) for span in re.findall(r"(?<!`)`(python [^`]+)`", page.read_text())]
    lines = []
    for body in blocks(page, "bash") + inline:
        for line in body.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                lines += [shlex.split(part) for part in line.split("&&")]
    return lines


def module_invocations(words: list[str]):
    """(module or script, its arguments) of `python -m M ...`, `torchrun ... -m M ...`, `python benchmarks/X.py ...`."""
    if words[:1] not in (["python"], ["torchrun"]):
        return None
    if "-m" in words:
        i = words.index("-m")
        return words[i + 1], words[i + 2:]
    if words[0] == "python" and len(words) > 1 and words[1].endswith(".py"):
        return words[1], words[2:]
    return None


INVOCATIONS = [(page, *inv) for page in PAGES for words in command_lines(page)
               if (inv := module_invocations(words)) and inv[0].startswith(("fused_preact", "benchmarks/"))]


def test_the_pages_have_command_lines():
    assert any(target == "fused_preact.train" for _, target, _ in INVOCATIONS)
    assert any(target == "fused_preact.aot" for _, target, _ in INVOCATIONS)


@pytest.mark.parametrize("page,argv", [(p, a) for p, t, a in INVOCATIONS if t == "fused_preact.train"],
                         ids=lambda v: v.name if isinstance(v, Path) else " ".join(v))
def test_trainer_command_lines_parse(page, argv, capsys):
    from fused_preact.train.__main__ import run

    run(argv + ["--print-config"])  # a renamed option, a preset or a network that is gone: an error here


@pytest.fixture(scope="module")
def help_text():
    cache: dict = {}

    def get(target: str) -> str:
        if target not in cache:
            command = [sys.executable, "-m", target] if not target.endswith(".py") else [sys.executable, target]
            env = dict(os.environ, TRITON_INTERPRET="0")  # the offline drivers refuse the interpreter
            done = subprocess.run(command + ["--help"], cwd=ROOT, capture_output=True, text=True, env=env,
                                  timeout=300)
            assert done.returncode == 0, f"{' '.join(command)} --help failed:\n{done.stderr[-2000:]}"
            cache[target] = done.stdout
        return cache[target]
    return get


@pytest.mark.parametrize("page,target,argv", [inv for inv in INVOCATIONS if inv[1] != "fused_preact.train"],
                         ids=lambda v: v.name if isinstance(v, Path) else v if isinstance(v, str) else "")
def test_other_command_lines_name_real_options(page, target, argv, help_text):
    text = help_text(target)
    for option in (a.split("=", 1)[0] for a in argv if a.startswith("--")):
        assert re.search(rf"{re.escape(option)}\b", text), f"{page.name}: `{target}` has no option {option}"


def code_map() -> list[str]:
    text = (ROOT / "docs" / "development.md").read_text()
    body = FENCE.search(text.split("## Code map", 1)[1]).group(2)  # the section's first block
    return [line.split()[0] for line in body.splitlines() if line and not line.startswith(" ")]


def test_code_map_matches_the_tree():
    entries = code_map()
    missing = [e for e in entries if not (ROOT / e).exists()]
    assert not missing, f"the code map names paths that do not exist: {missing}"
    files = [p.relative_to(ROOT).as_posix() for p in (ROOT / "fused_preact").rglob("*.py")]
    files += [p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*") if p.is_file()]
    unmapped = [f for f in files if not any(f == e or (e.endswith("/") and f.startswith(e)) for e in entries)]
    assert not unmapped, f"files the code map does not name: {unmapped}"


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            path = target.split("#", 1)[0]
            if path and "://" not in target and not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken


@pytest.mark.parametrize("page,kind", [("README.md", "HEADLINE"), ("docs/benchmarks.md", "DETAILS")])
def test_generated_sections_are_what_report_py_writes(page, kind):
    """The results sections are benchmarks/report.py's output for the committed
    benchmarks/results/cpu.json, not hand edits (regenerate: docs/benchmarks.md)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    source = "benchmarks/results/cpu.json"
    meta, rows = report.load([ROOT / source])
    body = (report.headline if kind == "HEADLINE" else report.details)(meta, rows, source)
    start, end = getattr(report, kind)
    text = (ROOT / page).read_text()
    assert text[text.index(start) + len(start):text.index(end)].strip() == body.strip(), \
        f"{page}: the generated section differs from what benchmarks/report.py writes from {source}"


def test_readme_stays_short():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= 250, f"README.md has {lines} lines; the detail belongs in docs/"


def test_no_source_file_passes_400_lines():
    sources = [p for d in ("fused_preact", "tests", "benchmarks", "csrc") for p in (ROOT / d).rglob("*")
               if p.suffix in (".py", ".h", ".cpp", ".cu", ".cuh", ".sh") and "__pycache__" not in p.parts]
    long = {p.relative_to(ROOT).as_posix(): n for p in sources if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"files over 400 lines: {long}"
