"""The gates, as pure functions: what a monitor measurement is (`monitor_metrics`), which gates a run's measurements
trip (`check_gates`, Gao et al. 2022: the gold score peaks and falls while the proxy keeps rising), and the KL and
length gates `evaluate` applies to every policy it scores (`evaluate_gates`: DPO and Best-of-N have no
training-time monitor; the test prompts are where they are measured). `pipeline.train.monitor` keeps a run's
measurements and acts on its trips.

A measurement's proxy is what RL maximises (the reward model's normalised score and the judge's, weighted as in the
RL reward, without the KL term); the first measurement (before any update: the SFT policy) is the baseline that
lengths and standardised scores are read against.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import pandas as pd

from pipeline.config import GatesConfig
from pipeline.eval.policies import spearman

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
        "monitor/spearman": spearman(frame["proxy"], frame["gold"]),
        "monitor/kl": float(frame["kl"].mean()),
        "monitor/length": float(frame["length"].mean()),
    }
    base = baseline or metrics
    metrics["monitor/length_ratio"] = metrics["monitor/length"] / base["monitor/length"]
    metrics["monitor/gap"] = _rise(metrics, base, "proxy") - _rise(metrics, base, "gold")
    return metrics


def _rise(metrics: Mapping[str, float], base: Mapping[str, float], name: str) -> float:
    spread = base[f"monitor/{name}_std"]
    return (metrics[f"monitor/{name}"] - base[f"monitor/{name}"]) / spread if spread > 0 else 0.0


WATCHES = {
    "max_kl": "the KL to the reference (nats)",
    "max_length_ratio": "the response length over SFT's",
    "min_correlation": "the Spearman correlation of proxy and gold",
    "gold_drop": "the gold score's fall below its best (while the proxy rose)",
}
"""What each gate watches, in the words its trips are reported in."""
CROSSES = {"max_kl": "exceeds", "max_length_ratio": "exceeds", "min_correlation": "fell below", "gold_drop": "exceeds"}


@dataclass(frozen=True)
class Trip:
    """A gate that tripped: which, its threshold, the value that crossed it, and the rollout it was measured at."""

    gate: str
    threshold: float
    value: float
    step: int

    def describe(self) -> str:
        return (
            f"gates.{self.gate}: {WATCHES[self.gate]} {CROSSES[self.gate]} {self.threshold:g} at rollout {self.step} "
            f"(value {self.value:.4g})"
        )

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
    return [(name, int(report[f"gates/{name}_step"])) for name in GatesConfig.names() if f"gates/{name}_step" in report]


def best_point(history: Sequence[Mapping[str, float]]) -> Mapping[str, float]:
    """The measurement with the highest gold score (the earliest of equals)."""
    return max(history, key=lambda point: point["monitor/gold"])


@dataclass(frozen=True)
class PolicyTrip:
    policy: str
    gate: str
    threshold: float
    value: float

    def describe(self) -> str:
        return f"gates.{self.gate}: {WATCHES[self.gate]} of {self.policy} is {self.value:.4g}, past {self.threshold:g}"


def evaluate_gates(metrics: Mapping[str, float], gates: GatesConfig, policies: Iterable[str]) -> list[PolicyTrip]:
    """The KL and length gates each policy but SFT trips on the test prompts (`<policy>/kl`, `<policy>/length`)."""
    trips = []
    for policy in policies:
        if policy == "sft":
            continue
        kl, ratio = metrics[f"{policy}/kl"], metrics[f"{policy}/length"] / metrics["sft/length"]
        if gates.max_kl is not None and kl > gates.max_kl:
            trips.append(PolicyTrip(policy, "max_kl", gates.max_kl, kl))
        if gates.max_length_ratio is not None and ratio > gates.max_length_ratio:
            trips.append(PolicyTrip(policy, "max_length_ratio", gates.max_length_ratio, ratio))
    return trips


def act_on(trips: Sequence[PolicyTrip], gates: GatesConfig) -> None:
    """`gates.on_trip: fail` fails evaluate on any trip (raising `GateTripped`); warn and stop mark them."""
    if trips and gates.on_trip == "fail":
        raise GateTripped(
            "; ".join(trip.describe() for trip in trips) + " (test prompts). gates.on_trip is fail: evaluate wrote "
            "nothing; loosen the gate or set gates.on_trip: warn to report the policy as tripped (docs/monitor.md)"
        )


def gates_tag(trips: Sequence[PolicyTrip]) -> str:
    """The MLflow tag `gates.evaluate` of the stage's and the pipeline's runs: `dpo:max_kl, ppo:max_length_ratio`."""
    return ", ".join(f"{trip.policy}:{trip.gate}" for trip in trips)


def gates_markdown(trips: Sequence[PolicyTrip], training: Mapping[str, float], gates: GatesConfig) -> str:
    """reports/eval.md's section on the gates: what is set, what tripped in evaluate and in ppo's training."""
    trained = tripped_gates(training)
    if not (gates.armed or trained):
        return ""
    lines = ["## Gates", ""]
    armed = ", ".join(f"`{name}: {getattr(gates, name):g}`" for name in gates.armed)
    lines.append(f"Set: {armed or 'none'} (`on_trip: {gates.on_trip}`; docs/monitor.md).")
    lines.append("")
    lines += [f"- **tripped** on the test prompts: {trip.describe()}" for trip in trips]
    for gate, step in trained:
        stopped = training.get("gates/stopped_at")
        action = (
            f"; training stopped there, the saved policy is rollout {training['gates/model_step']:g}'s"
            if (stopped is not None)
            else ""
        )
        lines.append(f"- **tripped** in ppo's training: `{gate}` at rollout {step}{action}")
    if not trips and not trained:
        lines.append("No gate tripped.")
    return "\n".join(lines) + "\n"
