"""Reward hacking seen while it happens: the proxy reward against the gold judge during online RL, and the gates that
act on it.

Every `monitor.every_n_rollouts` rollouts (and after the last) the policy samples one fixed batch of validation
prompts with one fixed seed, so two measurements differ only by the policy. Its samples are scored by the proxy
(what RL maximises: the reward model's normalised score and the judge's, weighted as in the RL reward, without
the KL term) and by the gold judge; `monitor_metrics` turns the scores into the `monitor/*` metrics, the first
measurement (before any update: the SFT policy) being the baseline that lengths and standardised scores are read
against. `check_gates` reads the measurements so far against `gates.*` (Gao et al. 2022: the gold score peaks and
falls while the proxy keeps rising). Both are pure, so the thresholds are tested on constructed runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import pandas as pd

from pipeline.config import GatesConfig

MONITOR_KEYS = (
    "monitor/proxy",
    "monitor/gold",
    "monitor/spearman",
    "monitor/kl",
    "monitor/length",
    "monitor/length_ratio",
    "monitor/gap",
)


def monitor_metrics(
    proxy: Sequence[float],
    gold: Sequence[float],
    kl: Sequence[float],
    lengths: Sequence[float],
    baseline: Mapping[str, float] | None,
) -> dict[str, float]:
    """One measurement from per-sample scores: the proxy's and the gold judge's means (and spreads), their Spearman
    rank correlation across the samples (NaN when either is constant), the mean sequence KL to the reference, the
    mean response length and its ratio to the baseline's, and the gap: the proxy's rise since the baseline minus
    the gold score's, each in the baseline's standard deviations. `baseline` None: this is the baseline."""
    frame = pd.DataFrame({"proxy": proxy, "gold": gold, "kl": kl, "length": lengths}, dtype=float)
    metrics = {
        "monitor/proxy": float(frame["proxy"].mean()),
        "monitor/gold": float(frame["gold"].mean()),
        "monitor/proxy_std": float(frame["proxy"].std()),
        "monitor/gold_std": float(frame["gold"].std()),
        "monitor/spearman": _spearman(frame["proxy"], frame["gold"]),
        "monitor/kl": float(frame["kl"].mean()),
        "monitor/length": float(frame["length"].mean()),
    }
    base = baseline or metrics
    metrics["monitor/length_ratio"] = metrics["monitor/length"] / base["monitor/length"]
    metrics["monitor/gap"] = _rise(metrics, base, "proxy") - _rise(metrics, base, "gold")
    return metrics


def _spearman(a: pd.Series, b: pd.Series) -> float:
    if a.nunique() < 2 or b.nunique() < 2:
        return float("nan")  # a constant score ranks nothing
    return float(a.corr(b, method="spearman"))


def _rise(metrics: Mapping[str, float], base: Mapping[str, float], name: str) -> float:
    spread = base[f"monitor/{name}_std"]
    return (metrics[f"monitor/{name}"] - base[f"monitor/{name}"]) / spread if spread > 0 else 0.0


@dataclass(frozen=True)
class Trip:
    """A gate that tripped: which, its threshold, the value that crossed it, and the rollout it was measured at."""

    gate: str
    threshold: float
    value: float
    step: int

    def describe(self) -> str:
        what = {
            "max_kl": "the monitored KL to the reference (nats) exceeds",
            "max_length_ratio": "the monitored response length over SFT's exceeds",
            "min_correlation": "the Spearman correlation of proxy and gold fell below",
            "gold_drop": "the gold score fell below its best (while the proxy rose) by more than",
        }[self.gate]
        return f"gates.{self.gate}: {what} {self.threshold:g} at rollout {self.step} (value {self.value:.4g})"

    def as_dict(self) -> dict[str, float | str | int]:
        return asdict(self)


class GateTripped(RuntimeError):
    """A gate with `gates.on_trip: fail`: the stage fails and writes nothing."""


def check_gates(history: Sequence[Mapping[str, float]], gates: GatesConfig) -> list[Trip]:
    """The gates the latest measurement of `history` (each with its `step`) trips. A NaN correlation (constant
    scores) trips nothing: it measures nothing."""
    if not history:
        return []
    latest, trips = history[-1], []
    step = int(latest["step"])
    if gates.max_kl is not None and latest["monitor/kl"] > gates.max_kl:
        trips.append(Trip("max_kl", gates.max_kl, latest["monitor/kl"], step))
    if gates.max_length_ratio is not None and latest["monitor/length_ratio"] > gates.max_length_ratio:
        trips.append(Trip("max_length_ratio", gates.max_length_ratio, latest["monitor/length_ratio"], step))
    if gates.min_correlation is not None and latest["monitor/spearman"] < gates.min_correlation:
        trips.append(Trip("min_correlation", gates.min_correlation, latest["monitor/spearman"], step))
    if gates.gold_drop is not None:
        best = best_point(history)
        drop = best["monitor/gold"] - latest["monitor/gold"]
        if drop > gates.gold_drop and latest["monitor/proxy"] > best["monitor/proxy"]:
            trips.append(Trip("gold_drop", gates.gold_drop, drop, step))
    return trips


def tripped_gates(report: Mapping[str, float]) -> list[tuple[str, int]]:
    """(gate, rollout) of each gate a stage report (`Watch.report`) says tripped."""
    names = [f.name for f in fields(GatesConfig) if f.name != "on_trip"]
    return [(name, int(report[f"gates/{name}_step"])) for name in names if f"gates/{name}_step" in report]


def best_point(history: Sequence[Mapping[str, float]]) -> Mapping[str, float]:
    """The measurement with the highest gold score (the earliest of equals)."""
    return max(history, key=lambda point: point["monitor/gold"])


@dataclass(frozen=True)
class MonitorSpec:
    """What a run's monitor samples (`prompt_ids`, with `seed`), how often (`every` rollouts), and its gates."""

    prompt_ids: list[list[int]]
    every: int
    gates: GatesConfig
    seed: int

    @property
    def may_stop(self) -> bool:
        return self.gates.on_trip == "stop" and bool(self.gates.armed)


class Watch:
    """The monitor's state over a run: its measurements (`history`, each with its `step`), the gates tripped (each
    once, at its first trip), and, when a gate may stop the run, the weights of the best-gold policy measured."""

    def __init__(self, spec: MonitorSpec) -> None:
        self.spec = spec
        self.history: list[dict[str, float]] = []
        self.trips: list[Trip] = []
        self.best_step: int | None = None
        self.best_state: dict | None = None
        self.stopped_at: int | None = None

    def record(self, point: dict[str, float], weights: Mapping) -> list[Trip]:
        """Add a measurement (`weights`: the measured policy's state dict, copied to the host if it is the best
        yet and the run may stop); the gates it trips for the first time."""
        self.history.append(point)
        if self.spec.may_stop and best_point(self.history) is point:
            self.best_step = int(point["step"])
            self.best_state = {key: value.detach().to("cpu", copy=True) for key, value in weights.items()}
        tripped = {trip.gate for trip in self.trips}
        new = [trip for trip in check_gates(self.history, self.spec.gates) if trip.gate not in tripped]
        self.trips += new
        return new

    def act(self, new: Sequence[Trip]) -> bool:
        """`gates.on_trip` on the new trips: raise `GateTripped` (fail), or whether training stops (stop)."""
        if not new:
            return False
        if self.spec.gates.on_trip == "fail":
            raise GateTripped(
                "; ".join(trip.describe() for trip in new) + ". gates.on_trip is fail: the stage wrote nothing; "
                "loosen the gate, or set gates.on_trip: stop to keep the best policy measured (docs/monitor.md)"
            )
        if self.spec.gates.on_trip == "stop":
            self.stopped_at = new[0].step
            return True
        return False

    def report(self) -> dict[str, float]:
        """The stage report's `monitor/*` (first, best and last measurements) and `gates/*` figures."""
        if not self.history:
            return {}
        first, best, last = self.history[0], best_point(self.history), self.history[-1]
        out = {f"{key}_start": first[key] for key in MONITOR_KEYS}
        out.update({f"{key}_final": last[key] for key in MONITOR_KEYS})
        out.update({"monitor/gold_best": best["monitor/gold"], "monitor/best_step": best["step"]})
        out["gates/tripped"] = float(len(self.trips))
        for trip in self.trips:
            out[f"gates/{trip.gate}_step"] = float(trip.step)
            out[f"gates/{trip.gate}_value"] = trip.value
        if self.stopped_at is not None:
            out["gates/stopped_at"] = float(self.stopped_at)
            out["gates/model_step"] = float(self.best_step)
        return out

    def state_dict(self) -> dict:
        return {
            "history": self.history,
            "trips": [trip.as_dict() for trip in self.trips],
            "best_step": self.best_step,
            "best_state": self.best_state,
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.history = list(state["history"])
        self.trips = [Trip(**trip) for trip in state["trips"]]
        self.best_step, self.best_state = state["best_step"], state["best_state"]
