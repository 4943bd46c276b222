"""`make bench` measures what users run: each method through the stages' own wiring, on a tiny workload."""

from tests.defaults import ROOT


def test_bench_runs_each_method_through_the_stages_wiring(tmp_path, monkeypatch):
    """The bench builds no module or Trainer of its own: it calls each method's `fit_*`, as the stages do."""
    import ast

    from pipeline import bench

    source = (ROOT / "pipeline/bench.py").read_text()
    calls = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    called = {n.func.id for n in calls}
    assert {"fit_sft", "fit_reward", "fit_dpo", "fit_ppo"} <= called
    assert not {"build_trainer", "SFTModule", "RewardModule", "DPOModule", "PPOModule"} & called
    monkeypatch.setattr(bench, "ROWS", 32)
    monkeypatch.setattr(bench, "PPO_ROLLOUTS", 2)
    work = bench.workload("scratch", tmp_path)
    for stage in ("sft", "reward", "dpo_packed", "ppo"):
        out = bench.run_stage(stage, work)
        assert out["tokens"] > 0 and out["tokens_per_s"] > 0, stage
    assert out["rollouts_per_s"] > 0
