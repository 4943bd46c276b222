"""`evaluate`: SFT, PPO, DPO and Best-of-N on the held-out test prompts, against the gold judge and SFT."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import pandas as pd

from pipeline.config import Config
from pipeline.data.schemas import PROMPT_COMPLETION, read_table
from pipeline.data.tokenization import load_tokenizer
from pipeline.eval.environments import evaluate_in_environment, transcripts_markdown, transcripts_table
from pipeline.eval.gates import act_on, evaluate_gates, gates_markdown, gates_tag
from pipeline.eval.policies import evaluate_policies, samples_table
from pipeline.eval.reports import HEADLINE, eval_markdown
from pipeline.methods.environments import episode_spec, episode_starts
from pipeline.methods.judging import gold_judge
from pipeline.methods.outcome import Outcome
from pipeline.models.build import build_causal_lm, build_reward_model, frozen, inference_device


@dataclass
class Evaluation(Outcome):
    points: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Each policy's (KL to SFT, gold score): the frontier plot and its CSV."""
    markdown: str = ""
    """reports/eval.md."""
    headline: dict[str, float] = field(default_factory=dict)
    """The metrics the pipeline's parent MLflow run carries, so the runs table compares experiments row by row."""

    def points_table(self) -> pd.DataFrame:
        return pd.DataFrame([{"policy": n, "kl": kl, "gold_score": g} for n, (kl, g) in self.points.items()])


def run_evaluate(
    cfg: Config,
    *,
    data_dir: str,
    sft_dir: str,
    ppo_dir: str,
    dpo_dir: str,
    reward_dir: str,
    ppo_report: Mapping[str, float] | None = None,
) -> Evaluation:
    """Every policy on the test prompts (and in the environment, with one); the gates on each
    (`pipeline.eval.gates`), beside those `ppo_report` (reports/ppo.json) says tripped in training."""
    device = inference_device()
    tokenizer = load_tokenizer(sft_dir, trust_remote_code=cfg.model.trust_remote_code)
    load = lambda path: frozen(build_causal_lm(cfg.model, tokenizer, path=path), device)  # noqa: E731
    reward_model = frozen(build_reward_model(cfg.model, tokenizer, reward_dir), device)
    test = read_table(f"{data_dir}/test.parquet", PROMPT_COMPLETION)
    prompts = test["prompt"].tolist()
    judge = gold_judge(cfg, [(f"{data_dir}/test.parquet", test)])
    policies = {"sft": load(sft_dir), "ppo": load(ppo_dir), "dpo": load(dpo_dir)}
    results, metrics = evaluate_policies(
        {"ppo": policies["ppo"], "dpo": policies["dpo"]},
        policies["sft"],
        reward_model,
        judge,
        tokenizer,
        prompts,
        cfg.evaluate,
        seed=cfg.seed,
        compiled=cfg.generation.compile,
    )
    trips = evaluate_gates(metrics, cfg.gates, results)
    act_on(trips, cfg.gates)  # on_trip fail: nothing is written
    if cfg.gates.armed:  # only then: with every gate off the metrics are exactly what they were
        metrics.update({f"{name}/gates_tripped": float(sum(t.policy == name for t in trips)) for name in results})
    tables = {"samples/evaluate.json": samples_table(results, prompts)}
    spec = episode_spec(cfg.env, tokenizer)
    markdown = eval_markdown(results, metrics, prompts, cfg.evaluate.n_shown_samples, first_turn_only=spec is not None)
    if spec is not None:
        played_metrics, played = evaluate_in_environment(
            policies,
            tokenizer,
            spec,
            episode_starts(test),
            cfg.evaluate,
            seed=cfg.seed,
        )
        metrics.update(played_metrics)
        tables["samples/episodes.json"] = transcripts_table(played)
        ceiling = getattr(spec.make_env(), "ceiling", None)
        markdown += "\n\n" + transcripts_markdown(played, played_metrics, cfg.evaluate.n_shown_samples, ceiling)
    gates = gates_markdown(trips, ppo_report or {}, cfg.gates)
    markdown += "\n\n" + gates if gates else ""
    return Evaluation(
        metrics,
        tables=tables,
        points={name: (metrics[f"{name}/kl"], metrics[f"{name}/gold_score"]) for name in results},
        markdown=markdown,
        headline={k: v for k, v in metrics.items() if k.split("/")[1] in HEADLINE},
        tags={"gates.evaluate": gates_tag(trips)} if trips else {},
    )
