"""`make deps`: rewrite each stage's code deps in `dvc.yaml` from its imports, so a stage reruns exactly when code
it runs changed. The layout test fails when `dvc.yaml` is stale; this fixes it. Data deps are kept as they are."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "stages" / "__init__.py"
"""Hands a stage's process to a warm server when one is set (tools/warm.py): it decides how the process starts,
never what the stage computes, so it is no stage's dep (a change to it reruns nothing)."""


def imports(path: Path) -> set[str]:
    """The modules `path` imports when it runs (`from a.b import c` -> `a.b`; `import a.b` -> `a.b`); those under
    `if TYPE_CHECKING:` are for type checkers only: a stage never runs them, so they are no dep of it."""
    names = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of `tree` but the bodies of `if TYPE_CHECKING:` blocks (their `else:` runs)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _files(name: str) -> list[Path]:
    """The project files importing `name` (`pipeline.data.batches`) runs: the module, or the package's `__init__`,
    and the `__init__` of every package above it."""
    parts = name.split(".")
    found = [ROOT.joinpath(*parts[:i], "__init__.py") for i in range(1, len(parts))]
    module = ROOT.joinpath(*parts)
    found.append(module.with_suffix(".py") if module.with_suffix(".py").exists() else module / "__init__.py")
    return [path for path in found if path.exists() and path != LAUNCHER and not _docstring_only(path)]


def _docstring_only(path: Path) -> bool:
    """A package `__init__` holding only its docstring runs nothing a stage depends on."""
    body = ast.parse(path.read_text()).body
    return all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)


def closure(path: Path) -> set[str]:
    """Project files (relative, posix) a module pulls in, transitively."""
    seen, todo = set(), [path]
    while todo:
        current = todo.pop()
        for name in imports(current):
            if name.split(".")[0] not in ("pipeline", "stages"):
                continue
            for target in _files(name):
                rel = target.relative_to(ROOT).as_posix()
                if rel not in seen:
                    seen.add(rel)
                    todo.append(target)
    return seen


def code_deps(stage: str) -> list[str]:
    """The stage's script, then every project file it imports, sorted."""
    script = f"stages/{stage}.py"
    return [script, *sorted(closure(ROOT / script) - {script})]


def rewrite(text: str) -> str:
    """`dvc.yaml` text with each stage's `.py` deps replaced by `code_deps`, everything else as it was."""
    stages = yaml.safe_load(text)["stages"]
    out, stage, in_deps = [], None, False
    for line in text.splitlines():
        if match := re.fullmatch(r"  (\w+):", line):
            stage, in_deps = match.group(1), False
        if line == "    deps:" and stage in stages:
            in_deps = True
            out.append(line)
            data = [dep for dep in stages[stage]["deps"] if not dep.endswith(".py")]
            out.extend(f"      - {dep}" for dep in code_deps(stage) + data)
            continue
        if in_deps and line.startswith("      - "):
            continue
        in_deps = False
        out.append(line)
    return "\n".join(out) + "\n"


def main() -> None:
    path = ROOT / "dvc.yaml"
    path.write_text(rewrite(path.read_text()))


if __name__ == "__main__":
    main()
