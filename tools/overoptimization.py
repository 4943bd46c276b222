"""Report command (not a DVC stage): the over-optimisation demonstration of docs/monitor.md, three ways over seeds.

    python -m tools.preset overoptimization          # a gold judge that penalises repetition, no KL penalty
    python -m tools.overoptimization run             # seeds 1234 1 2 x (ungated, stop, ensemble): dvc repro ppo
    python -m tools.overoptimization report          # reports/overoptimization.md and .png

`run` sets the keys of each way in `params.yaml` (its text is restored afterwards), runs `dvc repro ppo` (DVC's cache
reruns only what a way changes: the gates rerun ppo alone, the ensemble the reward model and ppo) and keeps each
run's `reports/ppo.json` and `reports/plots/ppo_monitor.csv` under `reports/overoptimization/s<seed>-<way>/`.
`report` reads those: every figure is the monitor's (the same validation prompts, seed and sampling at every
measurement), so a stopped run's model is scored exactly where it was measured.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
from ruamel.yaml import YAML

from pipeline.eval.figures import save_png
from pipeline.eval.policies import mean_ci95
from pipeline.files import atomic_path, write_text

RUNS = Path("reports/overoptimization")
WAYS: dict[str, dict[str, object]] = {
    "ungated": {"gates.gold_drop": None, "gates.on_trip": "warn", "reward.ensemble": 1, "ppo.ensemble_combine": "mean"},
    "stop": {"gates.gold_drop": 0.1, "gates.on_trip": "stop", "reward.ensemble": 1, "ppo.ensemble_combine": "mean"},
    "ensemble": {
        "gates.gold_drop": None,
        "gates.on_trip": "warn",
        "reward.ensemble": 5,
        "ppo.ensemble_combine": "mean_minus_std",
    },
}
MARGIN = 0.05  # the gold-score differences the demonstration must show (issue 37)


def with_overrides(params: str, overrides: Mapping[str, object]) -> str:
    """`params.yaml`'s text with dotted keys set (comments kept); an unknown key is an error naming it."""
    yaml = YAML()
    yaml.preserve_quotes = True
    document = yaml.load(params)
    for key, value in overrides.items():
        *sections, name = key.split(".")
        node = document
        for section in sections:
            node = node[section]
        if name not in node:
            raise KeyError(f"{key}: not a params.yaml key")
        node[name] = value
    out = io.StringIO()
    yaml.dump(document, out)
    return out.getvalue()


def run(seeds: Sequence[int], ways: Sequence[str]) -> None:
    params = Path("params.yaml")
    original = params.read_text()
    try:
        for seed in seeds:
            for way in ways:
                write_text(with_overrides(original, {"seed": seed, **WAYS[way]}), params)
                print(f"overoptimization: seed {seed}, {way}: dvc repro ppo", flush=True)
                subprocess.run(["dvc", "repro", "ppo"], check=True)
                target = RUNS / f"s{seed}-{way}"
                target.mkdir(parents=True, exist_ok=True)
                for source in ("reports/ppo.json", "reports/plots/ppo_monitor.csv"):
                    with atomic_path(target / Path(source).name) as tmp:
                        shutil.copyfile(source, tmp)
    finally:
        write_text(original, params)


def run_record(report: Mapping[str, float], monitor: pd.DataFrame) -> dict[str, float]:
    """One run's figures: its gold peak, the model it wrote (the last policy, or a stopped run's best) and the trip.

    Args:
        report: the run's `reports/ppo.json`.
        monitor: its `reports/plots/ppo_monitor.csv` (one row per measurement, `step` the rollout).
    """
    model_step = report.get("gates/model_step", monitor["step"].iloc[-1])
    model = monitor.loc[monitor["step"] == model_step].iloc[-1]
    return {
        "peak_gold": report["monitor/gold_best"],
        "peak_step": report["monitor/best_step"],
        "model_gold": float(model["monitor_gold"]),
        "model_kl": float(model["monitor_kl"]),
        "model_proxy": float(model["monitor_proxy"]),
        "model_step": float(model_step),
        "trip_step": report.get("gates/gold_drop_step", float("nan")),
    }


def read_runs(root: Path) -> pd.DataFrame:
    """Every `s<seed>-<way>` folder under `root` as a row of `run_record` with its seed and way."""
    rows = []
    for folder in sorted(root.glob("s*-*")):
        seed, way = folder.name[1:].split("-", 1)
        record = run_record(json.loads((folder / "ppo.json").read_text()), pd.read_csv(folder / "ppo_monitor.csv"))
        rows.append({"seed": int(seed), "way": way, **record})
    if not rows:
        raise SystemExit(f"overoptimization: no runs under {root}; run `python -m tools.overoptimization run` first")
    return pd.DataFrame(rows)


def _cell(values: pd.Series, digits: int = 3) -> str:
    values = values.dropna()
    if values.empty:
        return "-"
    mean, ci = mean_ci95(values.tolist())
    return f"{mean:.{digits}f}" if len(values) < 2 else f"{mean:.{digits}f} ± {ci:.{digits}f}"


def checks(runs: pd.DataFrame) -> list[tuple[str, bool, str]]:
    """The demonstration's three claims (issue 37), each with whether the means show it and the figures."""
    by_way = {way: frame.set_index("seed") for way, frame in runs.groupby("way")}
    out = []
    ungated = by_way.get("ungated")
    if ungated is not None:
        drop = mean_ci95((ungated["peak_gold"] - ungated["model_gold"]).tolist())[0]
        out.append(
            (
                f"ungated: the final gold score at least {MARGIN} below its own peak",
                drop >= MARGIN,
                f"peak {_cell(ungated['peak_gold'])}, final {_cell(ungated['model_gold'])}, drop {drop:.3f}",
            )
        )
    if ungated is not None and "stop" in by_way:
        stop = by_way["stop"]
        peak, peak_ci = mean_ci95(ungated["peak_gold"].tolist())
        stopped = mean_ci95(stop["model_gold"].tolist())[0]
        final = mean_ci95(ungated["model_gold"].tolist())[0]
        within = abs(stopped - peak) <= (peak_ci if peak_ci == peak_ci else 0.0)
        out.append(
            (
                f"stop: its model within the ungated peak's interval and at least {MARGIN} above the ungated final",
                within and stopped - final >= MARGIN,
                f"stopped model {_cell(stop['model_gold'])} vs peak {_cell(ungated['peak_gold'])}; "
                f"{stopped - final:+.3f} over the ungated final",
            )
        )
    if ungated is not None and "ensemble" in by_way:
        ensemble = by_way["ensemble"]
        gain = mean_ci95(ensemble["model_gold"].tolist())[0] - mean_ci95(ungated["model_gold"].tolist())[0]
        out.append(
            (
                "ensemble: its final gold score at least the single reward model's",
                gain >= 0,
                f"{_cell(ensemble['model_gold'])} vs {_cell(ungated['model_gold'])} ({gain:+.3f})",
            )
        )
    return out


def report_markdown(runs: pd.DataFrame, setting: str) -> str:
    lines = [
        "# Over-optimisation, caught: three ways over seeds",
        "",
        setting,
        "",
        f"Seeds: {', '.join(str(s) for s in sorted(runs['seed'].unique()))}. Every figure is the monitor's (the first "
        "64 validation prompts, one fixed sampling seed), mean ± the half-width of a normal 95 % interval over the "
        "seeds. *Model*: the policy the stage wrote (the last one, or a stopped run's best-gold policy).",
        "",
        "| way | gold peak | peak rollout | model gold | model KL | model rollout | gold_drop trip rollout |",
        "|---|---|---|---|---|---|---|",
    ]
    for way in [w for w in WAYS if w in set(runs["way"])]:
        frame = runs[runs["way"] == way]
        lines.append(
            f"| {way} | {_cell(frame['peak_gold'])} | {_cell(frame['peak_step'], 1)} | {_cell(frame['model_gold'])} | "
            f"{_cell(frame['model_kl'], 1)} | {_cell(frame['model_step'], 1)} | {_cell(frame['trip_step'], 1)} |"
        )
    lines += [
        "",
        "A stopped run trains exactly as the ungated run of its seed until its trip (the monitor draws from its own "
        "random state), so the model it keeps is that run's own best measurement, not a rerun of it.",
        "",
        "![the monitor's gold and proxy by rollout](overoptimization.png)",
    ]
    lines += ["", "## The claims", ""]
    for claim, holds, figures in checks(runs):
        lines.append(f"- **{'holds' if holds else 'does not hold'}**: {claim} ({figures})")
    lines += [
        "",
        "## Per seed",
        "",
        "| seed | way | gold peak (rollout) | model gold | model KL | model rollout | trip |",
    ]
    lines.append("|---|---|---|---|---|---|---|")
    order = {way: i for i, way in enumerate(WAYS)}
    for row in runs.sort_values(["seed", "way"], key=lambda c: c.map(order) if c.name == "way" else c).itertuples():
        trip = "-" if math.isnan(row.trip_step) else f"{row.trip_step:.0f}"
        lines.append(
            f"| {row.seed} | {row.way} | {row.peak_gold:.3f} ({row.peak_step:.0f}) | {row.model_gold:.3f} | "
            f"{row.model_kl:.1f} | {row.model_step:.0f} | {trip} |"
        )
    return "\n".join(lines) + "\n"


def plot(root: Path, runs: pd.DataFrame, path: Path) -> None:
    """The monitor's gold and proxy by rollout, mean over seeds, one line per way."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for way in [w for w in WAYS if w in set(runs["way"]) and w != "stop"]:
        curves = [pd.read_csv(folder / "ppo_monitor.csv") for folder in sorted(root.glob(f"s*-{way}"))]
        joined = pd.concat(curves).groupby("step")
        for ax, column in zip(axes, ("monitor_gold", "monitor_proxy"), strict=True):
            ax.plot(joined[column].mean().index, joined[column].mean().values, marker=".", label=way)
    stopped = runs[runs["way"] == "stop"]
    if len(stopped):  # a stopped run is the ungated one up to its trip: its kept model is what it adds
        axes[0].scatter(
            stopped["model_step"], stopped["model_gold"], marker="*", s=120, color="red", zorder=3,
            label="stop: the model kept (each seed)",
        )  # fmt: skip
    for ax, title in zip(axes, ("the gold judge", "the proxy (the RL reward's score)"), strict=True):
        ax.set_xlabel("rollout")
        ax.set_title(f"Monitor: {title}, mean over seeds")
        ax.grid(alpha=0.3)
        ax.legend()
    save_png(fig, path)


SETTING = (
    "The setting (`presets/overoptimization.yaml`): the embedded task judged by VADER times the response's share of "
    "distinct word bigrams (`judge.penalize_repetition`: repeated praise earns nothing), PPO with no KL penalty for 80 "
    "rollouts, the monitor every 5. The reward model learned from SFT's fluent samples and never saw repetition. The "
    "ways: *ungated*; *stop*: `gates.gold_drop: 0.1` (about two standard errors of the monitor's gold mean), "
    "`gates.on_trip: stop`; *ensemble*: `reward.ensemble: 5`, `ppo.ensemble_combine: mean_minus_std`."
)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.overoptimization", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("run", "report"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1, 2])
    parser.add_argument("--ways", nargs="+", choices=list(WAYS), default=list(WAYS))
    parser.add_argument("--markdown", default="reports/overoptimization.md")
    parser.add_argument("--plot", default="reports/overoptimization.png")
    args = parser.parse_args()
    if args.command == "run":
        run(args.seeds, args.ways)
        return
    runs = read_runs(RUNS)
    text = report_markdown(runs, SETTING)
    write_text(text, args.markdown)
    plot(RUNS, runs, Path(args.plot))
    print(text)


if __name__ == "__main__":
    sys.exit(main())
