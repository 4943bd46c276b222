"""The bench's configs are the loaded params with its sparse overrides, validated as any params file is (a new
required key once broke `make bench` unnoticed, when it wrote its configs out in full)."""

from pipeline.bench.workloads import OVERRIDES, bench_config
from pipeline.config import flatten, load_config, read_params
from tests.defaults import ROOT


def test_the_bench_config_is_the_params_with_its_overrides_and_nothing_else():
    raw = read_params(ROOT / "params.yaml")
    config = bench_config(raw, {"base": "scratch", "dropout": 0.0}, steps=128, packing=True, rollouts=8)
    expected = flatten(load_config(raw))
    for section in set(OVERRIDES) - {"training"}:
        shared = OVERRIDES["training"] if section in ("sft", "reward", "dpo") else {}
        expected.update({f"{section}.{key}": value for key, value in {**shared, **OVERRIDES[section]}.items()})
    for section in ("sft", "reward", "dpo"):
        expected.update({f"{section}.max_steps": 128, f"{section}.val_every_n_steps": 128, f"{section}.packing": True})
    expected.update({"ppo.rollouts": 8, "model.base": "scratch", "model.dropout": 0.0})
    assert flatten(config) == expected
    assert config.sft.lr == 1e-4 and config.sft.weight_decay != load_config(raw).sft.weight_decay  # overrides won


def test_the_bench_overrides_keys_the_params_have():
    raw = read_params(ROOT / "params.yaml")
    for section, values in OVERRIDES.items():
        for key in values:
            where = ("sft", "reward", "dpo") if section == "training" else (section,)
            assert all(key in raw[name] for name in where), f"{section}.{key}"
