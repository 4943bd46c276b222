"""Small report writers: metric curves as CSV for `dvc plots`, and sample tables."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from pipeline.eval.figures import save_png
from pipeline.files import atomic_path


def write_curve(rows: Sequence[dict[str, float]], path: str | Path) -> None:
    """Write per-step metric rows as CSV (one `step` column, one column per metric), atomically."""
    frame = pd.DataFrame(list(rows)) if rows else pd.DataFrame({"step": []})
    if "step" in frame:
        frame = frame.groupby("step", as_index=False).last()
        frame = frame[["step", *sorted(c for c in frame.columns if c != "step")]]
    frame.columns = [c.replace("/", "_") for c in frame.columns]
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


HEADLINE = ("gold_score", "kl", "win_rate", "lc_win_rate", "length")


def eval_markdown(
    results: dict, metrics: dict[str, float], prompts: list[str], n_shown: int, *, first_turn_only: bool = False
) -> str:
    """reports/eval.md: the policy table and, for the first test prompts, every policy's completion.
    `first_turn_only`: an environment plays the task; this table is one turn from its first observation."""
    episodes = (
        " With an environment (`env.kind`) each sample is one turn from the episode's first observation (often a tool "
        "call), not the task: the task's figures are the episodes' (`<policy>/env/*`, in the environment's section)."
    )
    lines = [
        "# Evaluation on held-out test prompts",
        "",
        f"{len(prompts)} prompts, one sample per policy and prompt (same seed and sampling). Win-rates are against "
        "SFT on the same prompt, ties count half; the length-controlled win-rate (LC) is the gold win-rate at equal "
        "length (a logistic regression on the length difference, as AlpacaEval-LC). KL is the sampled sequence KL "
        "to SFT in nats (Best-of-N: analytic)." + (episodes if first_turn_only else ""),
        "",
        "| policy | gold score (95 % CI) | RM score | KL | win-rate (gold) | LC win-rate (gold) | win-rate (RM) "
        "| length | EOS rate | distinct-1 | distinct-2 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in results:
        m = {key.split("/", 1)[1]: value for key, value in metrics.items() if key.split("/", 1)[0] == name}
        lines.append(
            f"| {name} | {m['gold_score']:.3f} ± {m['gold_score_ci95']:.3f} | {m['reward']:.2f} | {m['kl']:.2f} "
            f"| {m['win_rate']:.3f} | {m['lc_win_rate']:.3f} | {m['rm_win_rate']:.3f} | {m['length']:.1f} "
            f"| {m['eos_rate']:.2f} "
            f"| {m['distinct_1']:.3f} | {m['distinct_2']:.3f} |"
        )
    lines += ["", "## Samples", ""]
    for i, prompt in enumerate(prompts[:n_shown]):
        lines += [f"**Prompt:** {prompt}", ""]
        lines += [f"- *{name}* (gold {res.gold[i]:+.2f}): {res.texts[i].strip()}" for name, res in results.items()]
        lines.append("")
    return "\n".join(lines)


def plot_gold_vs_kl(points: dict[str, tuple[float, float]], path: str | Path, title: str) -> None:
    """Scatter of gold score against KL, one labelled point per policy, saved as PNG atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (kl, gold) in points.items():
        ax.scatter([kl], [gold], s=40)
        ax.annotate(name, (kl, gold), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("KL to SFT (nats per sequence)")
    ax.set_ylabel("mean gold score (the judge's)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    save_png(fig, path)


def plot_overoptimization(
    history: Sequence[dict[str, float]],
    path: str | Path,
    monitor: Sequence[dict[str, float]] = (),
    trips: Sequence[tuple[str, int]] = (),
) -> None:
    """Gold score and reward-model score against KL along RL training (Gao et al. 2022), saved as PNG atomically.

    Where the reward model's score keeps rising while the gold score stalls or falls, the policy is exploiting the
    reward model. Both scores are standardised over the run so they share one axis. With the monitor's
    measurements (`monitor`), a second panel draws its proxy and gold means by rollout, each tripped gate
    (`trips`: name, rollout) a vertical line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = pd.DataFrame(list(history))
    fig, axes = plt.subplots(1, 2 if monitor else 1, figsize=(11 if monitor else 6, 4), squeeze=False)
    ax = axes[0][0]
    for column, label in (("objective/scores", "reward model (normalised)"), ("objective/gold_scores", "gold judge")):
        values = frame[column]
        ax.plot(frame["objective/kl"], (values - values.mean()) / (values.std() or 1.0), marker=".", label=label)
    ax.set_xlabel("KL to the reference (nats per sequence)")
    ax.set_ylabel("score, standardised over training")
    ax.set_title("Over-optimisation: proxy vs gold reward along training")
    ax.legend()
    ax.grid(alpha=0.3)
    if monitor:
        ax = axes[0][1]
        points = pd.DataFrame(list(monitor))
        for column, label in (("monitor/proxy", "proxy (RL reward)"), ("monitor/gold", "gold judge")):
            values = points[column]
            ax.plot(points["step"], (values - values.iloc[0]) / (values.std() or 1.0), marker="o", label=label)
        for gate, step in trips:
            ax.axvline(step, color="red", linestyle="--", alpha=0.6)
            ax.annotate(gate, (step, ax.get_ylim()[1]), color="red", fontsize=8, ha="right", va="top", rotation=90)
        ax.set_xlabel("rollout")
        ax.set_ylabel("rise since SFT, standardised")
        ax.set_title("Monitor: held-out proxy vs gold (gates tripped in red)")
        ax.legend()
        ax.grid(alpha=0.3)
    save_png(fig, path)
