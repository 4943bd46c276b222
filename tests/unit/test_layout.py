"""Keep the architecture honest: direction stages -> pipeline, the imports allowed between pipeline's packages, and
dvc.yaml in step with the code."""

import ast
import dataclasses
from pathlib import Path
from typing import get_type_hints

import pytest
import yaml

from pipeline.config import Config, is_runtime
from stages.common import tracked_params

ROOT = Path(__file__).resolve().parents[2]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def _files(name: str) -> list[Path]:
    """The project files importing `name` (`pipeline.data.batches`) runs: the module, or the package's `__init__`,
    and the `__init__` of every package above it."""
    parts = name.split(".")
    found = [ROOT.joinpath(*parts[:i], "__init__.py") for i in range(1, len(parts))]
    module = ROOT.joinpath(*parts)
    found.append(module.with_suffix(".py") if module.with_suffix(".py").exists() else module / "__init__.py")
    return [path for path in found if path.exists() and not _docstring_only(path)]


def _docstring_only(path: Path) -> bool:
    """A package `__init__` holding only its docstring runs nothing a stage depends on."""
    body = ast.parse(path.read_text()).body
    return all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)


def _closure(path: Path) -> set[str]:
    """Project files a module pulls in, transitively."""
    seen, todo = set(), [path]
    while todo:
        current = todo.pop()
        for name in _imports(current):
            if name.split(".")[0] not in ("pipeline", "stages"):
                continue
            for target in _files(name):
                rel = target.relative_to(ROOT).as_posix()
                if rel not in seen:
                    seen.add(rel)
                    todo.append(target)
    return seen


MODULES = sorted((ROOT / "pipeline").rglob("*.py"))
# The packages of pipeline/, lowest first, and the ones each may import: the one place the layering is written.
FOUNDATION = {"config", "files"}
ALLOWED = {
    "config": set(),
    "files": set(),
    "data": FOUNDATION,
    "models": FOUNDATION | {"data"},
    "tasks": FOUNDATION | {"data", "models"},
    "losses": set(),
    "train": FOUNDATION | {"data", "models", "losses"},
    "eval": FOUNDATION | {"data", "models"},
    "track": FOUNDATION,
    "bench": FOUNDATION | {"data", "models", "tasks", "losses", "train", "eval", "track"},
}


def _package(path: Path) -> str:
    """`pipeline/models/lora.py` -> `models`; `pipeline/files.py` -> `files`; `pipeline/__init__.py` -> ``."""
    parts = path.relative_to(ROOT / "pipeline").with_suffix("").parts
    return "" if parts == ("__init__",) else parts[0]


@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_pipeline_never_imports_stages_nor_reads_argv_or_env(module):
    assert not any(name.split(".")[0] == "stages" for name in _imports(module))
    source = module.read_text()
    assert "os.environ" not in source and "sys.argv" not in source and "getenv" not in source


@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_pipeline_packages_import_only_the_packages_below_them(module):
    own = _package(module)
    assert own in ALLOWED or own == "", f"{module}: package {own!r} has no entry in ALLOWED"
    used = {name.split(".")[1] for name in _imports(module) if name.startswith("pipeline.")}
    forbidden = used - ALLOWED.get(own, set()) - {own}
    assert not forbidden, f"{module.relative_to(ROOT)} ({own}) imports {sorted(forbidden)}; allowed: {ALLOWED[own]}"


def test_every_module_is_in_a_package_and_no_file_escapes_the_layout_check():
    assert {_package(path) for path in MODULES} - {""} == set(ALLOWED)
    assert len(MODULES) > 30  # the walk is recursive


@pytest.mark.parametrize("name", sorted(DVC))
def test_stage_deps_list_every_project_module_it_imports(name):
    script = ROOT / "stages" / f"{name}.py"
    needed = _closure(script) | {f"stages/{name}.py"}
    missing = needed - set(DVC[name]["deps"])
    assert not missing, f"dvc.yaml stage {name} misses deps {sorted(missing)}"


def _keys() -> dict[str, dataclasses.Field]:
    """Every params key (`sft.lr`, `seed`) and its field."""
    keys = {}
    for section in dataclasses.fields(Config):
        kind = get_type_hints(Config)[section.name]
        if dataclasses.is_dataclass(kind):
            keys.update({f"{section.name}.{item.name}": item for item in dataclasses.fields(kind)})
        else:
            keys[section.name] = section
    return keys


@pytest.mark.parametrize("name", sorted(DVC))
def test_stage_params_are_config_sections_or_keys_and_include_its_own(name):
    sections = {f.name for f in dataclasses.fields(Config)}
    listed = set(DVC[name]["params"])
    assert listed <= sections | set(_keys())
    assert name in listed
    assert f"python -m stages.{name}" == DVC[name]["cmd"]


@pytest.mark.parametrize("name", sorted(DVC))
def test_no_stage_tracks_a_runtime_knob(name):
    covered = {key for key in _keys() for entry in DVC[name]["params"] if key == entry or key.startswith(f"{entry}.")}
    runtime = {key for key, item in _keys().items() if is_runtime(item)}
    assert runtime == {"trainer.checkpoint_every_n_steps", "trainer.keep_checkpoints"}
    assert not covered & runtime, f"dvc.yaml stage {name} tracks runtime knobs {sorted(covered & runtime)}"


@pytest.mark.parametrize("name", sorted(DVC))
def test_stage_logs_exactly_the_params_dvc_tracks(name):
    tree = ast.parse((ROOT / "stages" / f"{name}.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "stage"]
    assert len(calls) == 1
    assert ast.literal_eval(calls[0].args[0]) == name
    assert tracked_params(name, ROOT / "dvc.yaml") == DVC[name]["params"]  # read from dvc.yaml itself
