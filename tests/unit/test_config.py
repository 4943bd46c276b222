import pytest

from pipeline.config import ConfigError, flatten, load_config, read_params
from tests.defaults import ROOT


@pytest.fixture
def raw():
    return read_params(ROOT / "params.yaml")


def test_project_params_load(raw):
    config = load_config(raw)
    assert config.model.base == "scratch"
    assert isinstance(config.sft.lr, float)
    assert flatten(config)["sft.lr"] == config.sft.lr


def test_unknown_key_is_named_with_valid_keys(raw):
    raw["sft"]["learning_rate"] = 0.1
    with pytest.raises(ConfigError, match=r"sft\.learning_rate: unknown key; valid keys here: lr, weight_decay"):
        load_config(raw)


def test_missing_key_is_named(raw):
    del raw["sft"]["lr"]
    with pytest.raises(ConfigError, match=r"sft\.lr: missing"):
        load_config(raw)


def test_ill_typed_keys_all_reported_at_once(raw):
    raw["sft"]["batch_size"] = "32"
    raw["model"]["trust_remote_code"] = "yes"
    raw["prepare"]["source"] = "hub"
    raw["seed"] = 1.5
    with pytest.raises(ConfigError) as info:
        load_config(raw)
    message = str(info.value)
    assert "sft.batch_size: expected int, got str '32'" in message
    assert "model.trust_remote_code: expected bool, got str 'yes'" in message
    assert "prepare.source: 'hub' is not one of 'synthetic', 'dataset'" in message
    assert "seed: expected int, got float 1.5" in message


def test_optional_and_union_types(raw):
    raw["prepare"]["completion_column"] = 3
    raw["trainer"]["devices"] = [0, 1]
    with pytest.raises(ConfigError) as info:
        load_config(raw)
    assert "prepare.completion_column: expected str or null, got int 3" in str(info.value)
    assert "trainer.devices: expected int or str, got list [0, 1]" in str(info.value)


def test_bool_is_not_an_int(raw):
    raw["sft"]["max_steps"] = True
    with pytest.raises(ConfigError, match=r"sft\.max_steps: expected int, got bool True"):
        load_config(raw)


def test_yaml11_exponent_string_reads_as_float(raw):
    raw["sft"]["lr"] = "3e-4"
    assert load_config(raw).sft.lr == pytest.approx(3e-4)
    raw["sft"]["lr"] = "fast"
    with pytest.raises(ConfigError, match=r"sft\.lr: expected float, got str 'fast'"):
        load_config(raw)


def test_section_must_be_a_mapping(raw):
    raw["sft"] = 5
    with pytest.raises(ConfigError, match=r"sft: expected a mapping, got int 5"):
        load_config(raw)


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("sft: [unclosed\n")
    with pytest.raises(ConfigError, match=r"params\.yaml: not valid YAML"):
        read_params(path)


def test_cross_key_rules(raw):
    raw["prepare"]["frac_positive"] = 0.7
    raw["prepare"]["frac_negative"] = 0.5
    raw["sft"]["batch_size"] = 0
    raw["sft"]["max_length"] = 500
    with pytest.raises(ConfigError) as info:
        load_config(raw)
    message = str(info.value)
    assert "prepare.frac_positive + prepare.frac_negative: 0.7 + 0.5 must lie in [0, 1]" in message
    assert "sft.batch_size: 0 is out of range; it must be >= 1" in message
    assert "sft.max_length: 500 exceeds model.n_positions = 128" in message


def test_every_numeric_key_has_a_bound_and_all_violations_are_named_at_once(raw):
    import dataclasses

    config = load_config(raw)
    for section in [config, *(getattr(config, f.name) for f in dataclasses.fields(config))]:
        if not dataclasses.is_dataclass(section):
            continue
        for item in dataclasses.fields(section):
            value = getattr(section, item.name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                assert item.metadata.get("bound"), f"{type(section).__name__}.{item.name} declares no bound"
    raw["ppo"].update(minibatch_size=0, top_p=1.5, gamma=-0.1, temperature=0.0)
    raw["preferences"].update(k=1, tau=-1.0)
    raw["evaluate"]["best_of_n"] = 1
    raw["model"]["dropout"] = 1.0
    with pytest.raises(ConfigError) as info:
        load_config(raw)
    message = str(info.value)
    for line in (
        "ppo.minibatch_size: 0 is out of range; it must be >= 1",
        "ppo.top_p: 1.5 is out of range; it must be in (0, 1]",
        "ppo.gamma: -0.1 is out of range; it must be in [0, 1]",
        "ppo.temperature: 0.0 is out of range; it must be > 0",
        "preferences.k: 1 is out of range; it must be >= 2",
        "preferences.tau: -1.0 is out of range; it must be >= 0",
        "evaluate.best_of_n: 1 is out of range; it must be >= 2",
        "model.dropout: 1.0 is out of range; it must be in [0, 1)",
    ):
        assert line in message


def test_minibatch_cannot_exceed_the_rollout_batch(raw):
    raw["ppo"].update(minibatch_size=128, prompts_per_rollout=64)
    with pytest.raises(
        ConfigError,
        match=r"ppo\.minibatch_size: 128 exceeds the rollout batch, "
        r"ppo\.prompts_per_rollout x ppo\.num_generations = 64",
    ):
        load_config(raw)
    raw["ppo"]["num_generations"] = 2  # 64 prompts x 2 samples
    assert load_config(raw).ppo.minibatch_size == 128


def test_critic_free_estimator_rules_name_their_keys(raw):
    raw["ppo"].update(
        advantage_estimator="grpo", num_generations=1, whiten_rewards=True, kl_in="loss", kl_control="adaptive"
    )
    with pytest.raises(ConfigError) as error:
        load_config(raw)
    message = str(error.value)
    for line in (
        "ppo.num_generations: 1 is too few for ppo.advantage_estimator 'grpo', whose baseline is the other "
        "samples of the same prompt; set it to >= 2",
        "ppo.whiten_rewards: true does not apply to ppo.advantage_estimator 'grpo'",
        "ppo.kl_control: 'adaptive' adapts the reward's kl_coef, but ppo.kl_in is 'loss'",
    ):
        assert line in message
    raw["ppo"].update(advantage_estimator="reinforce_pp", kl_control="fixed")  # works per sample: one is enough
    assert load_config(raw).ppo.advantage_estimator == "reinforce_pp"


def test_a_sampling_budget_that_can_never_fit_the_scratch_models_context_is_named(raw):
    raw["model"]["n_positions"] = 32
    for section in ("sft", "preferences", "reward", "reference", "dpo"):
        raw[section]["max_length"] = 32
    raw["ppo"]["max_new_tokens"] = 32  # the prompt takes at least one position
    raw["sft"]["max_new_tokens"] = 40
    raw["evaluate"]["max_new_tokens"] = 31  # fits: the sampler caps it per prompt
    with pytest.raises(ConfigError) as info:
        load_config(raw)
    message = str(info.value)
    assert "ppo.max_new_tokens: 32 new tokens can never fit model.n_positions = 32" in message
    assert "sft.max_new_tokens: 40 new tokens can never fit" in message
    assert message.count("can never fit") == 4  # ppo, sft, and preferences / dpo at their default 48


def test_a_bad_value_gives_one_error_naming_its_key_and_no_rule_reads_it(raw):
    raw["trainer"]["accumulate_grad_batches"] = 0  # a rule divides by it: it must never run on this value
    raw["model"].update(lora_r=-1, lora_dropout=1.5)
    with pytest.raises(ConfigError) as info:
        load_config(raw)
    assert str(info.value).splitlines()[1:] == [
        "  model.lora_r: -1 is out of range; it must be >= 0",
        "  model.lora_dropout: 1.5 is out of range; it must be in [0, 1)",
        "  trainer.accumulate_grad_batches: 0 is out of range; it must be >= 1",
    ]


def test_the_params_reference_is_generated_from_the_fields_and_committed_fresh(raw):
    from pipeline.config.reference import params_reference

    page = params_reference(raw)
    assert "| `trainer.accumulate_grad_batches` | int | >= 1 | `1` | Micro-batches per optimizer step" in page
    assert "| `dpo.loss` | `sigmoid` \\| `ipo`" in page
    assert (ROOT / "docs/params.md").read_text() == page, "docs/params.md is stale: run `make docs`"


def test_biased_annotator_keys_are_checked(raw):
    raw["preferences"]["bias_pattern"] = "minutes("
    raw["judge"]["format_pattern"] = "[0-9"
    with pytest.raises(ConfigError) as info:
        load_config(raw)
    assert "preferences.bias_pattern: 'minutes(' is not a regular expression" in str(info.value)
    assert "judge.format_pattern: '[0-9' is not a regular expression" in str(info.value)
    raw = read_params(ROOT / "params.yaml")
    raw["preferences"]["bias_weight"] = 0.3
    with pytest.raises(ConfigError, match=r"preferences\.bias_weight: 0\.3 with no preferences\.bias_pattern"):
        load_config(raw)
    raw["preferences"].update(bias_pattern="minutes", mode="dataset")
    with pytest.raises(ConfigError, match=r"preferences\.bias_pattern: a biased annotator labels generated pairs"):
        load_config(raw)
    raw["preferences"]["mode"] = "generate"
    assert load_config(raw).preferences.bias_pattern == "minutes"


def test_unpaired_feedback_needs_the_kto_loss(raw):
    raw["dpo"]["kto_dataset"] = "json"
    with pytest.raises(ConfigError, match=r"dpo\.kto_dataset: 'json' is unpaired feedback, which only dpo\.loss: kto"):
        load_config(raw)
    raw["dpo"]["loss"] = "kto"
    assert load_config(raw).dpo.kto_dataset == "json"
