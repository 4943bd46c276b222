"""`make bench` measures what users run: each method through the stages' own wiring, on a tiny workload, and the
DPO memory probe through the DPO module."""

import ast

from pipeline.bench import memory, workloads
from pipeline.config import read_params
from pipeline.models import logprobs
from tests.defaults import ROOT, default_section


def _called(path: str) -> set[str]:
    tree = ast.parse((ROOT / path).read_text())
    calls = [node.func for node in ast.walk(tree) if isinstance(node, ast.Call)]
    return {f.id if isinstance(f, ast.Name) else f.attr for f in calls if isinstance(f, ast.Name | ast.Attribute)}


def test_bench_runs_each_method_through_the_stages_wiring(tmp_path):
    """The bench builds no module or Trainer of its own: it calls each method's `fit_*`, as the stages do."""
    called = _called("pipeline/bench/workloads.py")
    assert {"fit_sft", "fit_reward", "fit_dpo", "fit_ppo"} <= called
    assert not {"build_trainer", "SFTModule", "RewardModule", "DPOModule", "PPOModule"} & called
    work = workloads.workload("scratch", tmp_path, read_params(ROOT / "params.yaml"), rows=32)
    work.rollouts = 2
    for stage in ("sft", "reward", "dpo_packed", "episodes", "ppo"):
        out = workloads.run_stage(stage, work)
        assert out["tokens"] > 0 and out["tokens_per_s"] > 0, stage
        if stage == "episodes":  # several turns each, measured against one turn of the same length
            assert out["turns"] > 1 and out["multi_vs_single"] > 0
    assert out["rollouts_per_s"] > 0


def test_the_memory_probe_steps_the_dpo_module_on_either_logits_path(monkeypatch):
    """One `DPOModule.training_step` and backward: chunked (lean) or through full logits, as asked; the full-logits
    variant restores the product's threshold afterwards."""
    assert "training_step" in _called("pipeline/bench/memory.py")
    monkeypatch.setattr(memory, "MEMORY_VOCAB", logprobs.LEAN_MIN_VOCAB + 8)  # the lean path, at a small size
    monkeypatch.setattr(memory, "MEMORY_TOKENS", 16)
    chunked, lean_token_logps = [], logprobs.lean_token_logps
    monkeypatch.setattr(logprobs, "lean_token_logps", lambda *a, **k: chunked.append(1) or lean_token_logps(*a, **k))
    threshold = logprobs.LEAN_MIN_VOCAB
    for lean in (True, False):
        chunked.clear()
        out = memory.dpo_memory_step(lean, default_section("dpo"))
        assert bool(chunked) == lean
        assert out["peak_mb"] >= 0 and out["wall_s"] > 0 and out["parameters"] > 8 * logprobs.LEAN_MIN_VOCAB
    assert threshold == logprobs.LEAN_MIN_VOCAB
