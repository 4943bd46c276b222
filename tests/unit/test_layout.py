"""Keep the architecture honest: direction stages -> pipeline, and dvc.yaml in step with the code."""

import ast
import dataclasses
from pathlib import Path

import pytest
import yaml

from pipeline.config import Config

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


def _closure(path: Path) -> set[str]:
    """Project files a module pulls in, transitively."""
    seen, todo = set(), [path]
    while todo:
        current = todo.pop()
        for name in _imports(current):
            if name.split(".")[0] in ("pipeline", "stages"):
                target = ROOT / (name.replace(".", "/") + ".py")
                rel = target.relative_to(ROOT).as_posix()
                if target.exists() and rel not in seen:
                    seen.add(rel)
                    todo.append(target)
    return seen


@pytest.mark.parametrize("module", sorted((ROOT / "pipeline").glob("*.py")), ids=lambda p: p.name)
def test_pipeline_never_imports_stages_nor_reads_argv_or_env(module):
    assert not any(name.split(".")[0] == "stages" for name in _imports(module))
    source = module.read_text()
    assert "os.environ" not in source and "sys.argv" not in source and "getenv" not in source


@pytest.mark.parametrize("name", sorted(DVC))
def test_stage_deps_list_every_project_module_it_imports(name):
    script = ROOT / "stages" / f"{name}.py"
    needed = _closure(script) | {f"stages/{name}.py"}
    missing = needed - set(DVC[name]["deps"])
    assert not missing, f"dvc.yaml stage {name} misses deps {sorted(missing)}"


@pytest.mark.parametrize("name", sorted(DVC))
def test_stage_params_are_config_sections_and_include_its_own(name):
    sections = {f.name for f in dataclasses.fields(Config)}
    listed = set(DVC[name]["params"])
    assert listed <= sections
    assert name in listed
    assert f"python -m stages.{name}" == DVC[name]["cmd"]


@pytest.mark.parametrize("name", sorted(DVC))
def test_stage_logs_exactly_the_params_dvc_tracks(name):
    tree = ast.parse((ROOT / "stages" / f"{name}.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "stage"]
    assert len(calls) == 1
    assert ast.literal_eval(calls[0].args[0]) == name
    assert ast.literal_eval(calls[0].args[1]) == DVC[name]["params"]
