"""The repository's layering rules (docs/design.md, section 2), checked from the source text.

- No import circle inside or across ``tisdpo_kernels`` and ``tisdpo``, counting imports placed inside functions
  (an import in a function hides a circle from Python, not from a reader). ``from pkg import submodule`` is an edge
  to that submodule; a package's ``__init__`` is not an edge of its submodules (Python imports parents implicitly).
- The oracle is only an oracle: ``tisdpo_kernels/reference.py`` is imported by tests, benchmark tests and the
  self-check ``python -m tisdpo_kernels`` only, never by library code.
- No line points to a document or an issue outside the repository, and every relative Markdown link resolves.
"""

from __future__ import annotations

import ast
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("tisdpo_kernels", "tisdpo")
SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", ".benchmarks", "build", "dist", ".eggs", ".ruff_cache"}
TEXT_EXTENSIONS = (".py", ".md", ".sh", ".yaml", ".yml", ".toml", ".cfg", ".txt", ".json")


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _python_files(top: str):
    for root, dirs, files in os.walk(os.path.join(REPO, top)):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for f in sorted(files):
            if f.endswith(".py"):
                yield os.path.join(root, f)


def _imports(path: str, modules: set[str]) -> set[str]:
    """The project modules ``path`` imports, anywhere in the file (functions included)."""
    mod = _module_name(path)
    package = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            subs = [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in modules]
            targets = subs if subs and len(subs) == len(node.names) else [source] + subs
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a non-module attribute path
                target = target.rpartition(".")[0]
            if target and target != mod:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in _python_files(pkg)]
    modules = {_module_name(p) for p in files}
    return {_module_name(p): _imports(p, modules) for p in files}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    cycles = _cycles(_graph())
    assert not cycles, f"import circles (function-level imports counted): {cycles}"


def test_production_code_never_imports_the_oracle():
    allowed = {"tisdpo_kernels.__main__", "tisdpo_kernels.reference"}
    offenders = sorted(m for m, deps in _graph().items() if "tisdpo_kernels.reference" in deps and m not in allowed)
    assert not offenders, f"library modules import the oracle tisdpo_kernels.reference: {offenders}"
    for path in _python_files("benchmarks"):  # benchmark tests may compare against it; the suites' code may not
        if not os.path.basename(path).startswith("test_"):
            assert "tisdpo_kernels.reference" not in open(path, encoding="utf-8").read(), path


def _text_files():
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info") and not d.startswith(".venv")]
        for f in sorted(files):
            if f.endswith(TEXT_EXTENSIONS) or f == "run":
                yield os.path.join(root, f)


# Pointers to text that is not in the repository: issue numbers and "the review" (pointers to tracker threads
# users cannot read), and, checked by name below, a Markdown document or `../` path that is not in the repository
# (in code, only upper-case document names such as README.md count: lower-case ones are files the code writes).
OUTSIDE_POINTERS = re.compile(r"(?i:\bissues? #?\d+|\bthe review\b)|\bsince #\d+|\(#\d+\)|\b[A-Z]{3,} §")
MARKDOWN_NAME = re.compile(r"(?<![\w/.-])((?:\.\./|[\w-]+/)*[\w-]+\.md)\b")
PARENT_PATH = re.compile(r"(?<![\w.])\.\./[\w.-]+")


def _markdown_names() -> set[str]:
    return {os.path.basename(p) for p in _text_files() if p.endswith(".md")}


def _outside(line: str, path: str, names: set[str]) -> bool:
    """Whether ``line`` of the file ``path`` points to a document outside the repository."""
    if OUTSIDE_POINTERS.search(line):
        return True
    for name in MARKDOWN_NAME.findall(line):
        if not path.endswith(".md") and not os.path.basename(name)[:-3].isupper():
            continue
        here = os.path.normpath(os.path.join(os.path.dirname(path), name))
        if not (os.path.basename(name) in names or os.path.exists(os.path.join(REPO, name)) or os.path.exists(here)):
            return True
    targets = (os.path.normpath(os.path.join(os.path.dirname(path), m)) for m in PARENT_PATH.findall(line))
    return any(not (t.startswith(REPO + os.sep) and os.path.exists(t)) for t in targets)


def test_no_pointer_outside_the_repository():
    names = _markdown_names()
    hits = []
    for path in _text_files():
        if os.path.samefile(path, __file__):  # its own examples
            continue
        try:
            lines = open(path, encoding="utf-8").read().splitlines()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(lines, 1):
            if _outside(line, path, names):
                hits.append(f"{os.path.relpath(path, REPO)}:{number}: {line.strip()[:100]}")
    assert not hits, "lines pointing outside the repository:\n" + "\n".join(hits)


@pytest.mark.parametrize("line,bad", [("see NOTES.md section 1", True), ("(issue 12)", True),
                                      ("by the review's count", True), ("docs/design.md, section 3", False),
                                      ("issue_id = 3", False), ("see ../../notes/plan", True),
                                      ("README.md", False)])
def test_pointer_pattern(line, bad):
    assert _outside(line, __file__, _markdown_names()) == bad


def test_markdown_links_resolve():
    link = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")
    broken = []
    for path in _text_files():
        if not path.endswith(".md"):
            continue
        for target, _ in link.findall(open(path, encoding="utf-8").read()):
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            if not os.path.exists(os.path.join(os.path.dirname(path), target)):
                broken.append(f"{os.path.relpath(path, REPO)} -> {target}")
    assert not broken, f"broken relative links: {broken}"
