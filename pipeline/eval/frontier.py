"""The reward-vs-KL frontier across a sweep of pipeline runs (the DPO paper's Figure 2, on our gold judge).

Each finished pipeline run (an MLflow parent run whose `evaluate` stage logged headline metrics) contributes
points: its online-RL policy at `ppo.kl_coef` (named by `ppo.advantage_estimator`: ppo, grpo, rloo, ...), its
offline policy at `dpo.beta` (named by `dpo.loss`: dpo, ipo, simpo, ...), and Best-of-N at each N. Runs that differ
only in seed are averaged (mean, and a 95 % interval over seeds); a policy that two runs of one seed share (the same
PPO under two DPO betas) counts once. A point is Pareto-optimal when no other point has at most its KL and at least
its gold score, one of them strictly. A point whose policy tripped a gate (in ppo's training: the parent run's tag
`gates.tripped`; on the test prompts: `gates.evaluate`) is marked, with the seeds it tripped in. `seed_summary`
gives the headline table: each policy's metrics over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from pipeline.eval.figures import save_png

METHODS = {"ppo": "ppo.kl_coef", "dpo": "dpo.beta"}
HEADLINE = ("gold_score", "kl", "win_rate", "lc_win_rate", "length")
# The params that shape each policy: runs of one seed agreeing on them produced the same policy.
SHAPED_BY = {
    "sft": ("prepare.", "model.", "sft.", "judge."),
    "ppo": ("ppo.",),
    "dpo": ("dpo.", "preferences."),
    "bon": ("evaluate.",),
}


def method_name(policy: str, params: Mapping) -> str:
    """`ppo` / `dpo` named by the estimator / loss that trained them (gae -> ppo, sigmoid -> dpo; KTO on a
    desirable-to-undesirable imbalance as `kto 1:10`; online rounds as `online dpo x3`)."""
    if policy == "ppo":
        estimator = str(params.get("ppo.advantage_estimator", "gae"))
        return "ppo" if estimator == "gae" else estimator
    if policy == "dpo":
        loss = str(params.get("dpo.loss", "sigmoid"))
        fraction = float(params.get("dpo.kto_desirable_fraction", 1.0))
        if loss == "kto" and fraction < 1:  # an imbalance is a different method, not another beta
            return f"kto 1:{1 / fraction:.3g}"
        name = "dpo" if loss == "sigmoid" else loss
        rounds = int(params.get("dpo.online_rounds", 0))
        return f"online {name} x{rounds}" if rounds else name
    return policy


def _shape(policy: str, params: Mapping) -> tuple:
    prefixes = SHAPED_BY["bon" if policy.startswith("bon") else policy]
    return tuple(sorted((k, str(v)) for k, v in params.items() if k.startswith(prefixes)))


def frontier_points(runs: Sequence[Mapping]) -> pd.DataFrame:
    """One row per (run, method): run_group, method, knob, value, seed, kl, gold_score, tripped.

    Args:
        runs: dicts with `run_group`, `params` (flattened params.yaml keys), `metrics` (`<policy>/<metric>`) and,
            optionally, the parent run's `tags`.
    """
    rows = []
    for run in runs:
        params, metrics = run["params"], run["metrics"]
        policies = {name: METHODS[name] for name in METHODS}
        policies.update({p.split("/")[0]: "N" for p in metrics if p.startswith("bon")})
        for policy, knob in policies.items():
            if f"{policy}/gold_score" not in metrics:
                continue
            if policy.startswith("bon"):
                method = "best-of-n"
                value = float(policy.split("_")[1]) if "_" in policy else float(params["evaluate.best_of_n"])
            else:
                method, value = method_name(policy, params), float(params[knob])
            rows.append(
                {
                    "run_group": run["run_group"],
                    "method": method,
                    "knob": knob,
                    "value": value,
                    "seed": params.get("seed"),
                    "shape": _shape(policy, params),
                    "kl": metrics[f"{policy}/kl"],
                    "gold_score": metrics[f"{policy}/gold_score"],
                    "tripped": _tripped(policy, run.get("tags", {})),
                }
            )
    columns = ["run_group", "method", "knob", "value", "seed", "shape", "kl", "gold_score", "tripped"]
    points = pd.DataFrame(rows, columns=columns).drop_duplicates(["method", "value", "shape", "seed"])
    return points.drop(columns="shape")


def _tripped(policy: str, tags: Mapping[str, str]) -> bool:
    """Whether `policy` tripped a gate in the run whose parent carries `tags`."""
    evaluated = {entry.split(":")[0] for entry in tags.get("gates.evaluate", "").split(", ") if entry}
    return policy in evaluated or (policy == "ppo" and bool(tags.get("gates.tripped")))


def aggregate(points: pd.DataFrame) -> pd.DataFrame:
    """Average points of the same method and knob value over seeds, with 95 % intervals and the runs named."""

    grouped = points.groupby(["method", "knob", "value"], as_index=False)
    table = grouped.agg(
        kl=("kl", "mean"),
        kl_ci95=("kl", _ci95),
        gold_score=("gold_score", "mean"),
        gold_ci95=("gold_score", _ci95),
        seeds=("seed", "nunique"),
        tripped=("tripped", "sum"),
        runs=("run_group", lambda g: ", ".join(sorted(set(g)))),
    )
    table["pareto"] = pareto_mask(table["kl"].tolist(), table["gold_score"].tolist())
    return table.sort_values(["method", "kl"]).reset_index(drop=True)


def _ci95(values: pd.Series) -> float:
    return 1.96 * values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def seed_summary(runs: Sequence[Mapping]) -> pd.DataFrame:
    """Each distinct policy (SFT; the RL policy per estimator and kl_coef; the offline one per loss and beta;
    Best-of-N per N) with the mean and 95 % interval over seeds of its headline metrics.

    Returns:
        One row per policy: policy, seeds, and `<metric>` / `<metric>_ci95` for each of HEADLINE.
    """
    rows = []
    for run in runs:
        params, metrics = run["params"], run["metrics"]
        for policy in sorted({key.split("/")[0] for key in metrics if key.endswith("/gold_score")}):
            if policy == "sft":
                label = "sft"
            elif policy.startswith("bon"):
                label = f"best-of-{policy.split('_')[1] if '_' in policy else params['evaluate.best_of_n']}"
            elif policy in METHODS:
                knob = METHODS[policy]
                label = f"{method_name(policy, params)} {knob.split('.')[1]}={float(params[knob]):g}"
            else:
                continue
            rows.append(
                {
                    "policy": label,
                    "shape": _shape(policy, params),
                    "seed": params.get("seed"),
                    **{name: metrics.get(f"{policy}/{name}", math.nan) for name in HEADLINE},
                }
            )
    points = pd.DataFrame(rows, columns=["policy", "shape", "seed", *HEADLINE])
    points = points.drop_duplicates(["policy", "shape", "seed"])
    if points.groupby("policy")["shape"].nunique().gt(1).any():  # same label, other params: tell them apart
        variant = points.groupby("policy")["shape"].transform(lambda s: s.rank(method="dense").astype(int))
        points["policy"] = [p if v == 1 else f"{p} #{v}" for p, v in zip(points["policy"], variant, strict=True)]
    spec = {"seeds": ("seed", "nunique")}
    for name in HEADLINE:
        spec.update({name: (name, "mean"), f"{name}_ci95": (name, _ci95)})
    table = points.groupby("policy", as_index=False).agg(**spec)
    order = {"sft": 0, "best": 1, "dpo": 2}
    return table.sort_values(
        "policy", key=lambda c: c.map(lambda p: order.get(p.split("-")[0].split()[0], 3)), kind="stable"
    ).reset_index(drop=True)


def seeds_markdown(table: pd.DataFrame) -> str:
    """reports/seeds.md: the headline metrics of every policy, mean ± 95 % interval over seeds."""
    lines = [
        "# Results over seeds",
        "",
        "Each policy on the held-out test prompts, mean ± 95 % interval (1.96 standard errors) over seeds. Gold score "
        "is the judge's mean; KL is the sequence KL to SFT (nats); win-rates are against SFT under the judge, raw "
        "and length-controlled; length in tokens.",
        "",
        "| policy | seeds | gold score | KL | win-rate | LC win-rate | length |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in table.to_dict("records"):
        cells = [f"{row[name]:.3f} ± {row[f'{name}_ci95']:.3f}" for name in ("gold_score",)]
        cells += [f"{row['kl']:.2f} ± {row['kl_ci95']:.2f}"]
        cells += [f"{row[name]:.3f} ± {row[f'{name}_ci95']:.3f}" for name in ("win_rate", "lc_win_rate")]
        cells += [f"{row['length']:.1f} ± {row['length_ci95']:.1f}"]
        lines.append(f"| {row['policy']} | {row['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pareto_mask(kl: Sequence[float], gold: Sequence[float]) -> list[bool]:
    """True for points no other point dominates (KL <= and gold >=, one strictly)."""
    return [
        not any(
            (k2 <= k1 and g2 >= g1) and (k2 < k1 or g2 > g1)
            for j, (k2, g2) in enumerate(zip(kl, gold, strict=True))
            if j != i
        )
        for i, (k1, g1) in enumerate(zip(kl, gold, strict=True))
    ]


def frontier_markdown(table: pd.DataFrame) -> str:
    """reports/frontier.md: every averaged point, Pareto-optimal ones marked and named."""
    lines = [
        "# Reward-KL frontier",
        "",
        "Mean gold score (VADER, held-out prompts) against sequence KL to SFT, per method and knob value, "
        "averaged over seeds (± 95 % interval over seeds when more than one).",
        "",
        "| method | knob | value | KL | gold score | seeds | Pareto | gate tripped | runs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table.itertuples():
        tripped = f"**{row.tripped} of {row.seeds}**" if row.tripped else ""
        lines.append(
            f"| {row.method} | {row.knob} | {row.value:g} | {row.kl:.2f} ± {row.kl_ci95:.2f} "
            f"| {row.gold_score:.3f} ± {row.gold_ci95:.3f} | {row.seeds} | {'**yes**' if row.pareto else ''} "
            f"| {tripped} | {row.runs} |"
        )
    best = table[table["pareto"]]
    lines += [
        "",
        "Pareto-optimal: " + "; ".join(f"{r.method} {r.knob}={r.value:g} ({r.runs})" for r in best.itertuples()),
    ]
    return "\n".join(lines) + "\n"


def plot_frontier(table: pd.DataFrame, path: str | Path) -> None:
    """Gold score vs KL per method (error bars over seeds, Pareto points circled), saved as PNG atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, group in table.groupby("method"):
        group = group.sort_values("kl")
        ax.errorbar(
            group["kl"],
            group["gold_score"],
            xerr=group["kl_ci95"],
            yerr=group["gold_ci95"],
            marker="o",
            capsize=3,
            label=method,
        )
        for row in group.itertuples():
            ax.annotate(
                f"{row.value:g}", (row.kl, row.gold_score), textcoords="offset points", xytext=(4, -10), fontsize=8
            )
    best = table[table["pareto"]]
    ax.scatter(best["kl"], best["gold_score"], s=160, facecolors="none", edgecolors="black", label="Pareto-optimal")
    tripped = table[table["tripped"] > 0]
    if len(tripped):
        ax.scatter(tripped["kl"], tripped["gold_score"], s=90, marker="x", color="red", label="a gate tripped")
    ax.set_xlabel("KL to SFT (nats per sequence)")
    ax.set_ylabel("mean gold score (VADER)")
    ax.set_title("Reward-KL frontier (offline over beta, online RL over kl_coef, Best-of-N over N)")
    ax.grid(alpha=0.3)
    ax.legend()
    save_png(fig, path)
