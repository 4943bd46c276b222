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
from tests.defaults import ROOT
from tools.deps import closure, code_deps, imports, rewrite

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


MODULES = sorted((ROOT / "pipeline").rglob("*.py"))
# The packages of pipeline/, lowest first, and the ones each may import: the one place the layering is written.
FOUNDATION = {"config", "files"}
ALLOWED = {
    "config": set(),
    "files": set(),
    "data": FOUNDATION,
    "models": FOUNDATION | {"data"},
    "tasks": FOUNDATION | {"data", "models", "envs"},
    "losses": set(),
    "train": FOUNDATION | {"data", "models", "losses", "envs", "eval"},
    "envs": FOUNDATION | {"data", "models"},
    "eval": FOUNDATION | {"data", "models", "envs"},
    "track": FOUNDATION,
    "methods": FOUNDATION | {"data", "models", "tasks", "envs", "train", "eval"},
    # The bench reaches no loss function: it measures the methods through their own modules and `fit_*`.
    "bench": FOUNDATION | {"data", "models", "tasks", "envs", "train", "eval", "methods"},
}


def _package(path: Path) -> str:
    """`pipeline/models/lora.py` -> `models`; `pipeline/files.py` -> `files`; `pipeline/__init__.py` -> ``."""
    parts = path.relative_to(ROOT / "pipeline").with_suffix("").parts
    return "" if parts == ("__init__",) else parts[0]


@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_pipeline_never_imports_stages_nor_reads_argv_or_env(module):
    assert not any(name.split(".")[0] == "stages" for name in imports(module))
    source = module.read_text()
    assert "os.environ" not in source and "sys.argv" not in source and "getenv" not in source


@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_pipeline_packages_import_only_the_packages_below_them(module):
    own = _package(module)
    assert own in ALLOWED or own == "", f"{module}: package {own!r} has no entry in ALLOWED"
    used = {name.split(".")[1] for name in imports(module) if name.startswith("pipeline.")}
    forbidden = used - ALLOWED.get(own, set()) - {own}
    assert not forbidden, f"{module.relative_to(ROOT)} ({own}) imports {sorted(forbidden)}; allowed: {ALLOWED[own]}"


def test_every_module_is_in_a_package_and_no_file_escapes_the_layout_check():
    assert {_package(path) for path in MODULES} - {""} == set(ALLOWED)
    assert len(MODULES) > 30  # the walk is recursive


@pytest.mark.parametrize("name", sorted(DVC))
def test_stage_deps_list_every_project_module_it_imports(name):
    script = ROOT / "stages" / f"{name}.py"
    needed = closure(script) | {f"stages/{name}.py"}
    missing = needed - set(DVC[name]["deps"])
    assert not missing, f"dvc.yaml stage {name} misses deps {sorted(missing)}: run `make deps`"
    listed = [dep for dep in DVC[name]["deps"] if dep.endswith(".py")]
    assert listed == code_deps(name), f"dvc.yaml stage {name} lists code it does not run: run `make deps`"


def test_make_deps_leaves_an_up_to_date_dvc_yaml_unchanged():
    text = (ROOT / "dvc.yaml").read_text()
    assert rewrite(text) == text
    stale = text.replace("      - stages/sft.py\n", "", 1)
    assert rewrite(stale) == text  # and it puts a missing dep back


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


@pytest.mark.parametrize("name", sorted(DVC))
def test_stage_entry_point_leaves_through_run_main(name):
    # `run_main` skips the interpreter's teardown once the stage has returned (1.6-1.9 s of every stage process).
    tree = ast.parse((ROOT / "stages" / f"{name}.py").read_text())
    guard = tree.body[-1]
    assert isinstance(guard, ast.If) and ast.unparse(guard.test) == "__name__ == '__main__'"
    assert [ast.unparse(statement) for statement in guard.body] == ["run_main(main)"]


def test_stages_holds_the_dags_entry_points_and_their_runtime_only():
    from stages import dag_stages

    entry_points = {f"{name}.py" for name in dag_stages()}
    runtime = {"__init__.py", "common.py", "checkpoints.py", "reaper.py"}
    assert {path.name for path in (ROOT / "stages").glob("*.py")} == entry_points | runtime
    assert all(DVC[name]["cmd"] == f"python -m stages.{name}" for name in dag_stages())


def test_unit_tests_start_no_process_or_server():
    # Processes and servers belong to tests/integration and tests/e2e: the unit tier stays fast and self-contained.
    for path in (ROOT / "tests" / "unit").glob("*.py"):
        started = {"subprocess", "multiprocessing"} & {name.split(".")[0] for name in imports(path)}
        nodes = ast.walk(ast.parse(path.read_text()))
        calls = {node.func.id for node in nodes if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
        assert not started and "start_warm_server" not in calls, (path.name, started)
