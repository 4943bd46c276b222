"""The over-optimisation demonstration's report: what each run wrote, and the three claims read from it."""

import math

import pandas as pd
import pytest
from ruamel.yaml import YAML

from pipeline.config import load_config
from tests.defaults import ROOT
from tools.overoptimization import WAYS, checks, read_runs, run_record, with_overrides


def _monitor(golds, kls):
    steps = [10.0 * i for i in range(len(golds))]
    return pd.DataFrame(
        {"step": steps, "monitor_gold": golds, "monitor_kl": kls, "monitor_proxy": [0.1 * i for i in range(len(golds))]}
    )


def test_a_stopped_run_is_read_at_the_model_it_wrote():
    monitor = _monitor([0.2, 0.9, 0.7], [0.0, 5.0, 9.0])
    report = {
        "monitor/gold_best": 0.9,
        "monitor/best_step": 10.0,
        "gates/model_step": 10.0,
        "gates/gold_drop_step": 20.0,
    }
    record = run_record(report, monitor)
    assert (record["model_gold"], record["model_kl"], record["model_step"], record["trip_step"]) == (
        0.9,
        5.0,
        10.0,
        20.0,
    )
    ungated = run_record({"monitor/gold_best": 0.9, "monitor/best_step": 10.0}, monitor)
    assert (ungated["model_gold"], ungated["model_step"]) == (0.7, 20.0) and math.isnan(ungated["trip_step"])


def _write(root, seed, way, golds, report):
    folder = root / f"s{seed}-{way}"
    folder.mkdir(parents=True)
    _monitor(golds, [1.0] * len(golds)).to_csv(folder / "ppo_monitor.csv", index=False)
    pd.Series(report).to_json(folder / "ppo.json")


def test_the_three_claims_from_constructed_runs(tmp_path):
    for seed, shift in ((1, 0.0), (2, 0.01)):
        peak = 0.9 + shift
        _write(tmp_path, seed, "ungated", [0.2, peak, 0.7], {"monitor/gold_best": peak, "monitor/best_step": 10.0})
        stopped = {"monitor/gold_best": peak, "monitor/best_step": 10.0, "gates/model_step": 10.0}
        _write(tmp_path, seed, "stop", [0.2, peak, 0.8], {**stopped, "gates/gold_drop_step": 20.0})
        _write(tmp_path, seed, "ensemble", [0.2, 0.8, 0.75], {"monitor/gold_best": 0.8, "monitor/best_step": 10.0})
    runs = read_runs(tmp_path)
    assert sorted(set(runs["way"])) == sorted(WAYS) and len(runs) == 6
    claims = checks(runs)
    assert [holds for _, holds, _ in claims] == [True, True, True]
    assert "drop 0.205" in claims[0][2]  # mean peak 0.905 - final 0.7
    # an ensemble below the single model, and a stop that kept a worse policy, fail their claims
    _write(tmp_path, 3, "ensemble", [0.2, 0.3, 0.1], {"monitor/gold_best": 0.3, "monitor/best_step": 10.0})
    _write(tmp_path, 3, "ungated", [0.2, 0.9, 0.7], {"monitor/gold_best": 0.9, "monitor/best_step": 10.0})
    _write(
        tmp_path, 3, "stop", [0.2, 0.9, 0.72],
        {"monitor/gold_best": 0.72, "monitor/best_step": 20.0, "gates/model_step": 20.0},
    )  # fmt: skip
    assert [holds for _, holds, _ in checks(read_runs(tmp_path))] == [True, False, False]


def test_each_way_sets_valid_params_keys():
    text = (ROOT / "params.yaml").read_text()
    for way, keys in WAYS.items():
        config = load_config(YAML().load(with_overrides(text, {"seed": 7, **keys, "gates.gold_drop": 0.05})))
        assert config.seed == 7 and config.reward.ensemble == keys["reward.ensemble"], way
    with pytest.raises(KeyError, match=r"gates\.gold_dorp: not a params\.yaml key"):
        with_overrides(text, {"gates.gold_dorp": 0.1})
