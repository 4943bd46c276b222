"""Typed configuration: one frozen dataclass per `params.yaml` section (`sections`), the loader that builds them
(`loader`), the rules between keys (`rules`) and the reference generated from the fields' own docs (`reference`).

`load_config(raw)` turns the parsed YAML mapping into a `Config`. Each key is checked alone first: unknown, missing,
ill-typed, or outside the bound declared at its field (`bounded(">= 1")`); the cross-key rules then run on the keys
that passed. Every problem is collected before one `ConfigError` names each key (`sft.lr: ...`), so a user fixes a
params file in one pass, and a bad value gives one error, never an exception of another kind. Closed sets are
`Literal[...]`; nothing is silently repaired. The one leniency: a float field accepts a numeric string such as
``"3e-4"``, because YAML 1.1 (PyYAML, and `dvc exp run -S`) reads an exponent without a dot as a string; that is a
spelling of the same number, not a repair.
"""

from pipeline.config.loader import ConfigError, flatten, load_config, read_params, within
from pipeline.config.sections import (
    Config,
    DPOConfig,
    EnvConfig,
    EvaluateConfig,
    GatesConfig,
    JudgeConfig,
    ModelConfig,
    MonitorConfig,
    PPOConfig,
    PreferencesConfig,
    PrepareConfig,
    ReferenceConfig,
    RewardConfig,
    SamplerConfig,
    SFTConfig,
    TrainerConfig,
    TrainingConfig,
    bounded,
    is_runtime,
    runtime,
)

__all__ = [
    "Config", "ConfigError", "DPOConfig", "EnvConfig", "EvaluateConfig", "GatesConfig", "JudgeConfig", "ModelConfig",
    "MonitorConfig", "PPOConfig",
    "PreferencesConfig", "PrepareConfig", "ReferenceConfig", "RewardConfig", "SFTConfig", "SamplerConfig",
    "TrainerConfig", "TrainingConfig", "bounded", "flatten", "is_runtime", "load_config", "read_params", "runtime",
    "within",
]  # fmt: skip
