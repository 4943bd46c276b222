"""The reward-hacking monitor's figures and its gates (`pipeline.train.monitor`), on constructed runs and by hand."""

import math

import pytest
import torch

from pipeline.eval.gates import (
    GateTripped,
    Trip,
    act_on,
    check_gates,
    evaluate_gates,
    gates_markdown,
    monitor_metrics,
    tripped_gates,
)
from pipeline.train.monitor import MonitorSpec, Watch
from tests.defaults import default_section

OFF = default_section("gates")


def gates(**thresholds):
    return default_section("gates", **thresholds)


def point(step, *, proxy=0.0, gold=0.0, kl=0.0, length_ratio=1.0, spearman=0.5):
    return {
        "step": float(step),
        "monitor/proxy": proxy,
        "monitor/gold": gold,
        "monitor/kl": kl,
        "monitor/length_ratio": length_ratio,
        "monitor/spearman": spearman,
        "monitor/length": 10.0 * length_ratio,
        "monitor/gap": proxy - gold,
    }


def test_a_measurement_by_hand():
    base = monitor_metrics([1.0, 2.0, 3.0, 4.0], [0.1, 0.3, 0.2, 0.4], [0.0] * 4, [10, 10, 12, 8], None)
    # Spearman of ranks (1, 2, 3, 4) and (1, 3, 2, 4): 1 - 6 * (0 + 1 + 1 + 0) / (4 * 15) = 0.8
    assert base["monitor/spearman"] == pytest.approx(0.8)
    assert (base["monitor/proxy"], base["monitor/gold"], base["monitor/length"]) == pytest.approx((2.5, 0.25, 10.0))
    assert base["monitor/length_ratio"] == 1.0 and base["monitor/gap"] == 0.0  # the baseline against itself
    later = monitor_metrics([3.0, 4.0, 5.0, 6.0], [0.1, 0.3, 0.2, 0.4], [2.0, 4.0, 0.0, 2.0], [15] * 4, base)
    proxy_std = torch.tensor([1.0, 2.0, 3.0, 4.0]).std().item()  # sample std, as the baseline's spread
    assert later["monitor/gap"] == pytest.approx(2.0 / proxy_std - 0.0)  # the proxy rose 2, the gold not at all
    assert (later["monitor/kl"], later["monitor/length_ratio"]) == pytest.approx((2.0, 1.5))
    constant = monitor_metrics([1.0, 2.0, 3.0], [0.5, 0.5, 0.5], [0.0] * 3, [4] * 3, None)
    assert math.isnan(constant["monitor/spearman"])  # a constant gold score ranks nothing


@pytest.mark.parametrize(
    ("threshold", "latest", "tripped"),
    [
        ({"max_kl": 5.0}, point(3, kl=5.0), None),  # at the threshold: not past it
        ({"max_kl": 5.0}, point(3, kl=5.01), ("max_kl", 5.01)),
        ({"max_length_ratio": 1.5}, point(3, length_ratio=1.6), ("max_length_ratio", 1.6)),
        ({"max_length_ratio": 1.5}, point(3, length_ratio=1.4), None),
        ({"min_correlation": 0.2}, point(3, spearman=0.1), ("min_correlation", 0.1)),
        ({"min_correlation": 0.2}, point(3, spearman=float("nan")), None),  # nothing measured, nothing tripped
    ],
)
def test_each_threshold_gate_trips_past_its_threshold_only(threshold, latest, tripped):
    trips = check_gates([point(0), latest], gates(**threshold))
    assert [(t.gate, t.value) for t in trips] == ([tripped] if tripped else [])
    assert all(t.step == 3 and t.threshold == next(iter(threshold.values())) for t in trips)


def test_the_gold_drop_gate_needs_the_gold_below_its_best_while_the_proxy_rose():
    run = [point(0, proxy=0.0, gold=0.2), point(10, proxy=1.0, gold=0.5), point(20, proxy=2.0, gold=0.4)]
    assert check_gates(run, gates(gold_drop=0.1)) == []  # 0.1 below the best: not more than the margin
    run.append(point(30, proxy=3.0, gold=0.35))
    assert check_gates(run, gates(gold_drop=0.1)) == [Trip("gold_drop", 0.1, pytest.approx(0.15), 30)]
    fell_together = [*run[:2], point(20, proxy=0.5, gold=0.1)]  # the proxy fell too: a bad policy, not hacking
    assert check_gates(fell_together, gates(gold_drop=0.1)) == []
    assert check_gates(run, OFF) == []  # every gate null: nothing trips


def spec(on_trip, **thresholds):
    return MonitorSpec([[1, 2]], every=10, gates=gates(on_trip=on_trip, **thresholds), seed=0)


def test_warn_records_each_gate_once_and_goes_on():
    watch = Watch(spec("warn", max_kl=1.0))
    assert watch.act(watch.record(point(0, kl=0.0), {})) is False
    first = watch.record(point(10, kl=2.0), {})
    assert watch.act(first) is False and [t.step for t in first] == [10]
    assert watch.record(point(20, kl=3.0), {}) == []  # still past it: the first trip is the one recorded
    report = watch.report()
    assert (report["gates/tripped"], report["gates/max_kl_step"], report["gates/max_kl_value"]) == (1.0, 10.0, 2.0)
    assert "gates/stopped_at" not in report and tripped_gates(report) == [("max_kl", 10)]


def test_stop_keeps_the_weights_of_the_best_gold_measurement_and_records_both_steps():
    watch = Watch(spec("stop", gold_drop=0.1))
    weights = {"w": torch.zeros(2)}
    watch.record(point(0, gold=0.2), weights)
    weights["w"] += 1.0  # the policy moves on
    watch.record(point(10, proxy=1.0, gold=0.5), weights)
    weights["w"] += 1.0
    assert watch.act(watch.record(point(20, proxy=2.0, gold=0.3), weights)) is True
    assert watch.best_step == 10 and torch.equal(watch.best_state["w"], torch.ones(2))  # a copy, not the live tensor
    report = watch.report()
    assert (report["gates/stopped_at"], report["gates/model_step"], report["monitor/best_step"]) == (20.0, 10.0, 10.0)
    restored = Watch(watch.spec)
    restored.load_state_dict(watch.state_dict())  # what a checkpoint carries over a resume
    assert restored.trips == watch.trips and restored.history == watch.history and restored.best_step == 10
    assert restored.stopped_at == 20 and torch.equal(restored.best_state["w"], torch.ones(2))


def test_fail_names_the_gate_its_threshold_the_value_and_the_step():
    watch = Watch(spec("fail", max_length_ratio=1.5))
    watch.record(point(0), {})
    with pytest.raises(
        GateTripped, match=r"gates.max_length_ratio: .* exceeds 1.5 at rollout 10 \(value 2\.25\).*wrote nothing"
    ):
        watch.act(watch.record(point(10, length_ratio=2.25), {}))


def test_weights_are_copied_only_when_a_gate_may_stop_the_run():
    for watch in (Watch(spec("warn", max_kl=1.0)), Watch(spec("stop"))):
        watch.record(point(0, gold=1.0), {"w": torch.zeros(2)})
        assert watch.best_state is None


def test_evaluate_gates_every_policy_but_sft_on_kl_and_length_and_reports_them():
    metrics = {"sft/kl": 0.0, "sft/length": 10.0, "ppo/kl": 5.0, "ppo/length": 12.0, "dpo/kl": 2.0, "dpo/length": 20.0}
    set_gates = gates(max_kl=4.0, max_length_ratio=1.5)
    trips = evaluate_gates(metrics, set_gates, ["sft", "ppo", "dpo"])
    assert [(t.policy, t.gate, t.value) for t in trips] == [("ppo", "max_kl", 5.0), ("dpo", "max_length_ratio", 2.0)]
    act_on(trips, set_gates)  # warn: marked, nothing raised
    with pytest.raises(
        GateTripped,
        match=r"gates.max_kl: the KL to the reference \(nats\) of ppo is 5, past 4; .*length over SFT's of dpo",
    ):
        act_on(trips, gates(on_trip="fail", max_kl=4.0, max_length_ratio=1.5))
    training = {"gates/gold_drop_step": 30.0, "gates/stopped_at": 30.0, "gates/model_step": 20.0}
    markdown = gates_markdown(trips, training, set_gates)
    assert "Set: `max_kl: 4`, `max_length_ratio: 1.5` (`on_trip: warn`" in markdown
    assert (
        "- **tripped** on the test prompts: gates.max_kl: the KL to the reference (nats) of ppo is 5, past 4"
        in markdown
    )
    assert (
        "in ppo's training: `gold_drop` at rollout 30; training stopped there, the saved policy is rollout 20's"
        in markdown
    )
    assert gates_markdown([], {}, OFF) == ""  # nothing set, nothing tripped: eval.md as it was
