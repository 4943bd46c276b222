"""The benchmark's fixed PPO settings stay a complete, valid `ppo` section as the config grows (a new required
field once broke `make bench` unnoticed)."""

import dataclasses

from pipeline.bench import ppo_config
from pipeline.config import load_config, read_params
from tests.defaults import ROOT


def test_bench_ppo_settings_pass_the_params_validation():
    raw = read_params(ROOT / "params.yaml")
    raw["ppo"] = dataclasses.asdict(ppo_config())
    assert load_config(raw).ppo == ppo_config()
