"""Every policy in the environment (`env.kind`): the test rows played as whole episodes, as `ppo` trains them.

Per policy: `pass_at_1` (the share of episodes the environment rewarded, over `evaluate.pass_k` episodes per row,
or one) and `pass_at_<k>` (the unbiased estimator over them), the mean reward, turns, tool calls and call errors per
episode, and the share of episodes each budget or the timeout ended. With a tool (`calculator`), the same policies
play once more with the tool taken away (`<policy>/no_tool/*`: a call is then read as the answer), so the tool's
value is a number. Transcripts go to reports/eval.md whole, and to MLflow turn by turn.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import torch

from pipeline.config import EvaluateConfig
from pipeline.envs.episodes import Episode, EpisodeSpec, episode_stats, run_episodes
from pipeline.eval.policies import pass_at_k
from pipeline.models.generation import SamplingParams


@dataclasses.dataclass
class Played:
    """One policy's episodes: `pass_k` per row, row-major."""

    episodes: list[Episode]
    per_row: int


def play(
    policy: torch.nn.Module,
    tokenizer,
    spec: EpisodeSpec,
    rows: Sequence[Mapping[str, Any]],
    cfg: EvaluateConfig,
    *,
    seed: int,
) -> Played:
    per_row = max(cfg.pass_k, 1)
    params = SamplingParams(spec.budgets.turn_tokens, cfg.temperature, cfg.top_k, cfg.top_p)
    repeated = [row for row in rows for _ in range(per_row)]
    episodes = run_episodes(
        policy,
        tokenizer,
        spec.make_env,
        repeated,
        spec.budgets,
        params,
        seed=seed,
        batch_size=cfg.batch_size,
        tool_stops=spec.tool_stops,
        timeout_s=spec.timeout_s,
        kind=spec.kind,
    )
    return Played(episodes, per_row)


def played_metrics(played: Played) -> dict[str, float]:
    """pass@1, pass@k (k episodes per row) and the episodes' own metrics (`episode_stats`, without `env/`)."""
    k, episodes = played.per_row, played.episodes
    wins = [sum(e.reward > 0 for e in episodes[i : i + k]) for i in range(0, len(episodes), k)]
    metrics = {"pass_at_1": statistics.fmean(pass_at_k(k, c, 1) for c in wins)}
    if k > 1:
        metrics[f"pass_at_{k}"] = statistics.fmean(pass_at_k(k, c, k) for c in wins)
    metrics.update({key.split("/", 1)[1]: value for key, value in episode_stats(episodes).items()})
    return metrics


def evaluate_in_environment(
    policies: Mapping[str, torch.nn.Module],
    tokenizer,
    spec: EpisodeSpec,
    rows: Sequence[Mapping[str, Any]],
    cfg: EvaluateConfig,
    *,
    seed: int,
) -> tuple[dict[str, float], dict[str, Played]]:
    """`<policy>/env/*` for every policy; `<policy>/env/no_tool/*` too when the environment has a variant without
    its tools (`spec.make_bare`). Returns the metrics and each policy's episodes."""
    metrics, played = {}, {}
    for name, policy in policies.items():
        played[name] = play(policy, tokenizer, spec, rows, cfg, seed=seed)
        metrics.update({f"{name}/env/{key}": value for key, value in played_metrics(played[name]).items()})
        if spec.make_bare is not None:
            bare = dataclasses.replace(spec, make_env=spec.make_bare, tool_stops=())
            alone = played_metrics(play(policy, tokenizer, bare, rows, cfg, seed=seed))
            metrics.update({f"{name}/env/no_tool/{key}": value for key, value in alone.items()})
    return metrics, played


def transcripts_table(played: Mapping[str, Played]) -> pd.DataFrame:
    """Every turn of the first episode of each row, per policy: (policy, row, turn, role, text, reward)."""
    rows = []
    for name, result in played.items():
        for index in range(0, len(result.episodes), result.per_row):
            episode = result.episodes[index]
            for turn, (role, text) in enumerate(episode.transcript):
                rows.append(
                    {
                        "policy": name,
                        "row": index // result.per_row,
                        "turn": turn,
                        "role": role,
                        "text": text,
                        "reward": episode.reward,
                    }
                )
    return pd.DataFrame(rows)


def transcripts_markdown(
    played: Mapping[str, Played],
    metrics: Mapping[str, float],
    n_shown: int,
    ceiling: tuple[str, float, float] | None = None,
) -> str:
    """The environment's section of reports/eval.md: a table of each policy's episode metrics (and the optimal
    policy's `ceiling`, name, success rate and mean turns, when the environment knows it), whole transcripts."""
    names = list(played)
    k = next(iter(played.values())).per_row if played else 1
    lines = [
        "## In the environment",
        "",
        f"Each test row played as a whole episode, {k} per row and policy (pass@1 over them"
        + (f", pass@{k} by the unbiased estimator" if k > 1 else "")
        + "). Turns, tool calls and call errors are per episode; truncated: the share of episodes a budget ended.",
        "",
        "| policy | pass@1 | " + (f"pass@{k} | " if k > 1 else "") + "no tool pass@1 | turns | tool calls | call "
        "errors | truncated (turns / tokens / total) | timeouts |",
        "|---|---|" + ("---|" if k > 1 else "") + "---|---|---|---|---|---|",
    ]
    for name in names:
        m = {key.split("/env/", 1)[1]: v for key, v in metrics.items() if key.startswith(f"{name}/env/")}
        bare = f"{m['no_tool/pass_at_1']:.3f}" if "no_tool/pass_at_1" in m else "-"
        passed_k = f"{m[f'pass_at_{k}']:.3f} | " if k > 1 else ""
        lines.append(
            f"| {name} | {m['pass_at_1']:.3f} | {passed_k}{bare} | {m['turns']:.2f} | {m['tool_calls']:.2f} "
            f"| {m['call_errors']:.2f} | {m['truncated_turns']:.2f} / {m['truncated_tokens']:.2f} / "
            f"{m['truncated_total']:.2f} | {m['timeouts']:.2f} |"
        )
    if ceiling is not None:
        name, success, turns = ceiling
        unknown = "- | " if k > 1 else ""  # pass@k, no tool: not known
        lines.append(f"| optimal ({name}) | {success:.3f} | {unknown}- | {turns:.2f} | - | - | - | - |")
    lines += ["", "### Transcripts", ""]
    for name, result in played.items():
        for index in range(0, min(n_shown * result.per_row, len(result.episodes)), result.per_row):
            episode = result.episodes[index]
            lines += [f"**{name}**, row {index // result.per_row} (reward {episode.reward:g}):", "", "```"]
            lines += [f"[{role}] {text}" for role, text in episode.transcript]
            lines += ["```", ""]
    return "\n".join(lines)
