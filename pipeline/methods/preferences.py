"""`preferences`: preference pairs from SFT samples labelled by the simulated annotator, or from a dataset; screened
(lengths, held-out prompts) before any stage trains on them. With an environment (`env.kind`), the samples are
first turns, each judged by the episode it starts (`episode_pairs`)."""

from __future__ import annotations

import dataclasses
import time

from pipeline.config import Config
from pipeline.data.schemas import PROMPT_COMPLETION, read_table
from pipeline.data.tokenization import load_tokenizer
from pipeline.methods.environments import episode_spec, episode_starts
from pipeline.methods.judging import gold_judge
from pipeline.methods.outcome import Outcome
from pipeline.models.build import build_causal_lm, inference_device
from pipeline.models.judges import VerifierJudge
from pipeline.tasks.preferences import checked_pairs, dataset_pairs, episode_pairs, generate_pairs


def run_preferences(cfg: Config, *, data_dir: str, sft_dir: str) -> Outcome:
    """The kept pairs per split (`Outcome.splits`), with what was generated, kept and dropped as metrics."""
    prefs = cfg.preferences
    tokenizer = load_tokenizer(sft_dir, trust_remote_code=cfg.model.trust_remote_code)
    metrics: dict[str, float] = {}
    start = time.perf_counter()
    if prefs.mode == "generate":
        model = build_causal_lm(cfg.model, tokenizer, path=sft_dir).to(inference_device())
        frames = {name: read_table(f"{data_dir}/{name}.parquet", PROMPT_COMPLETION) for name in ("train", "val")}
        judge = gold_judge(cfg, [(f"{data_dir}/{name}.parquet", frame) for name, frame in frames.items()])
        # the environment as defined, its tools always given: env.tools false is a ppo and evaluate baseline
        spec = episode_spec(dataclasses.replace(cfg.env, tools=True), tokenizer)
        splits = {}
        for offset, (name, count) in enumerate((("train", prefs.train_prompts), ("val", prefs.val_prompts))):
            seed = cfg.seed + offset
            if spec is not None:  # first turns, each judged by the episode it starts in the environment
                rows = episode_starts(frames[name])[:count]
                splits[name], stats = episode_pairs(model, tokenizer, rows, prefs, judge, spec, seed=seed)
            else:
                prompts = list(frames[name]["prompt"].unique()[:count])
                compiled = cfg.generation.compile
                splits[name], stats = generate_pairs(
                    model, tokenizer, prompts, prefs, judge, seed=seed, compiled=compiled
                )
            metrics.update({f"{name}/{key}": value for key, value in stats.items()})
    else:
        splits = dataset_pairs(prefs, cfg.seed, tokenizer)
    metrics["perf/wall_s"] = time.perf_counter() - start
    held_out = frozenset(read_table(f"{data_dir}/test.parquet", PROMPT_COMPLETION)["prompt"])
    kept, tables = {}, {}
    answers = judge.answers if prefs.mode == "generate" and isinstance(judge, VerifierJudge) else None
    for name, frame in splits.items():
        if answers:  # a verifier labelled these pairs: each carries its prompt's reference answer
            frame = frame.assign(answer=frame["prompt"].map(answers))
        kept[name], counts = checked_pairs(frame, tokenizer, prefs, name, held_out)
        metrics.update({f"{name}/{key}": value for key, value in counts.items()})
        tables[f"samples/{name}_pairs.json"] = kept[name].head(30)
    return Outcome(metrics, tables=tables, splits=kept)
