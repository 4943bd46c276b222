"""The reward-hacking monitor's state over an RL run (`Watch`): its measurements, the gates tripped, the best-gold
policy's weights. What a measurement is and when a gate trips are pure functions of `pipeline.eval.gates`.

Every `monitor.every_n_rollouts` rollouts (and after the last) the policy samples one fixed batch of validation
prompts with one fixed seed, so two measurements differ only by the policy (`PPOModule.measure`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pipeline.config import GatesConfig
from pipeline.eval.gates import MONITOR_KEYS, GateTripped, Trip, best_point, check_gates


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
            "stopped_at": self.stopped_at,  # a run killed after a stop, before its outputs, still saves the best
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.history = list(state["history"])
        self.trips = [Trip(**trip) for trip in state["trips"]]
        self.best_step, self.best_state, self.stopped_at = state["best_step"], state["best_state"], state["stopped_at"]
