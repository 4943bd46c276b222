"""The rules between params keys, each declaring the keys it reads: the loader runs a rule only when all of them
passed their own checks, so no rule ever sees a bad value."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.config.sections import Config


@dataclass(frozen=True)
class Rule:
    """A cross-key rule: the keys it reads (skipped when one of them failed its own check) and the check."""

    keys: tuple[str, ...]
    check: Callable[[Config], list[str]]


RULES: list[Rule] = []


def rule(*keys: str):
    """Register a cross-key rule reading `keys`."""

    def register(check):
        RULES.append(Rule(keys, check))
        return check

    return register


MAX_LENGTH_SECTIONS = ("sft", "preferences", "reward", "reference", "dpo")
SAMPLING_SECTIONS = ("sft", "preferences", "dpo", "ppo", "evaluate")


@rule("prepare.frac_positive", "prepare.frac_negative")
def _class_shares(config: Config) -> list[str]:
    prepare = config.prepare
    if prepare.frac_positive + prepare.frac_negative <= 1:
        return []
    return [
        f"prepare.frac_positive + prepare.frac_negative: {prepare.frac_positive} + {prepare.frac_negative} "
        "must lie in [0, 1] (the rest is neutral)"
    ]


@rule("model.base", "model.chat_template", "model.n_embd", "model.n_head")
def _scratch_model(config: Config) -> list[str]:
    model, errors = config.model, []
    if model.base == "scratch" and model.chat_template not in ("auto", "none"):
        errors.append(
            f"model.chat_template: {model.chat_template!r} needs a hub or local model.base whose tokenizer has the "
            "template's special tokens; the scratch tokenizer has none (use auto or none)"
        )
    if model.base == "scratch" and model.n_embd % model.n_head:
        errors.append(f"model.n_embd: {model.n_embd} is not divisible by model.n_head = {model.n_head}")
    return errors


@rule(
    "model.base",
    "model.n_positions",
    *(f"{s}.max_length" for s in MAX_LENGTH_SECTIONS),
    *(f"{s}.max_new_tokens" for s in SAMPLING_SECTIONS),
)
def _scratch_context(config: Config) -> list[str]:
    """What the scratch model's context can never hold (a hub model's is checked when it is loaded)."""
    model, errors = config.model, []
    if model.base != "scratch":
        return errors
    for section in MAX_LENGTH_SECTIONS:
        max_length = getattr(config, section).max_length
        if max_length > model.n_positions:
            errors.append(
                f"{section}.max_length: {max_length} exceeds model.n_positions = {model.n_positions}; "
                "lower it or enlarge the model"
            )
    for section in SAMPLING_SECTIONS:
        budget = getattr(config, section).max_new_tokens
        if budget >= model.n_positions:
            errors.append(
                f"{section}.max_new_tokens: {budget} new tokens can never fit model.n_positions = "
                f"{model.n_positions} (a prompt takes at least one); set it below {model.n_positions}"
            )
    return errors


@rule("judge.kind", "judge.path", "judge.label", "judge.penalize_repetition")
def _judge(config: Config) -> list[str]:
    judge, errors = config.judge, []
    if judge.penalize_repetition and judge.kind != "vader":
        errors.append(f"judge.penalize_repetition: applies to judge.kind vader, and it is {judge.kind!r}; set it false")
    if judge.kind not in ("vader", "verifier") and not judge.path:
        errors.append(f"judge.path: required for judge.kind {judge.kind!r} (a hub id or a save_pretrained directory)")
    if judge.kind == "classifier" and not judge.label:
        errors.append("judge.label: required for judge.kind 'classifier' (the label to score, e.g. POSITIVE)")
    return errors


@rule("preferences.bias_pattern", "preferences.bias_weight", "preferences.mode", "judge.format_pattern")
def _patterns(config: Config) -> list[str]:
    prefs, errors = config.preferences, []
    for key, pattern in (
        ("preferences.bias_pattern", prefs.bias_pattern),
        ("judge.format_pattern", config.judge.format_pattern),
    ):
        try:
            re.compile(pattern or "")
        except re.error as error:
            errors.append(f"{key}: {pattern!r} is not a regular expression ({error}); fix it or set it to null")
    if prefs.bias_weight and prefs.bias_pattern is None:
        errors.append(
            f"preferences.bias_weight: {prefs.bias_weight} with no preferences.bias_pattern to weigh; set the pattern "
            "the annotator favours, or the weight to 0"
        )
    if prefs.bias_pattern is not None and prefs.mode != "generate":
        errors.append(
            "preferences.bias_pattern: a biased annotator labels generated pairs, and preferences.mode is "
            f"{prefs.mode!r}; set it to null"
        )
    return errors


@rule("judge.kind", "prepare.source", "prepare.answer_column")
def _verifier_answers(config: Config) -> list[str]:
    prepare = config.prepare
    if (
        config.judge.kind != "verifier"
        or prepare.source in ("arithmetic", "calculator", "guess")
        or prepare.answer_column
    ):
        return []
    return [
        f"prepare.answer_column: judge.kind 'verifier' checks responses against reference answers, and "
        f"prepare.source {prepare.source!r} has none; name the dataset's answer column (GSM8K: answer) or use "
        "prepare.source: arithmetic"
    ]


@rule("ppo.reward_model_weight", "ppo.judge_weight", "env.kind", "env.reward_weight")
def _ppo_reward(config: Config) -> list[str]:
    if config.ppo.reward_model_weight or config.ppo.judge_weight:
        return []
    if config.env.kind != "none" and config.env.reward_weight:
        return []  # the environment's reward alone
    return [
        "ppo.reward_model_weight + ppo.judge_weight (+ env.reward_weight with an env.kind): all are 0, so RL has no "
        "reward; set reward_model_weight: 1 (RLHF), judge_weight: 1 (RLVR with a verifier judge), or an environment"
    ]


@rule("ppo.minibatch_size", "trainer.accumulate_grad_batches", "ppo.prompts_per_rollout", "ppo.num_generations")
def _ppo_batches(config: Config) -> list[str]:
    ppo, accumulate, errors = config.ppo, config.trainer.accumulate_grad_batches, []
    if ppo.minibatch_size % accumulate:
        errors.append(
            f"ppo.minibatch_size: {ppo.minibatch_size} is not divisible by trainer.accumulate_grad_batches = "
            f"{accumulate} (PPO splits each minibatch into that many micro-batches)"
        )
    rollout = ppo.prompts_per_rollout * ppo.num_generations
    if ppo.minibatch_size > rollout:
        errors.append(
            f"ppo.minibatch_size: {ppo.minibatch_size} exceeds the rollout batch, ppo.prompts_per_rollout x "
            f"ppo.num_generations = {rollout}; a minibatch is a slice of one rollout batch"
        )
    return errors


@rule("ppo.advantage_estimator", "ppo.num_generations", "ppo.whiten_rewards", "ppo.kl_in", "ppo.kl_control")
def _ppo_estimator(config: Config) -> list[str]:
    ppo, errors = config.ppo, []
    group = ppo.advantage_estimator in ("grpo", "dr_grpo", "rloo")
    if group and ppo.num_generations < 2:
        errors.append(
            f"ppo.num_generations: {ppo.num_generations} is too few for ppo.advantage_estimator "
            f"{ppo.advantage_estimator!r}, whose baseline is the other samples of the same prompt; set it to >= 2"
        )
    if group and ppo.whiten_rewards:
        errors.append(
            f"ppo.whiten_rewards: true does not apply to ppo.advantage_estimator "
            f"{ppo.advantage_estimator!r} (it scores whole sequences); set it to false"
        )
    if ppo.kl_in == "loss" and ppo.kl_control == "adaptive":
        errors.append(
            "ppo.kl_control: 'adaptive' adapts the reward's kl_coef, but ppo.kl_in is 'loss'; use fixed "
            "(the loss term's weight is ppo.kl_loss_coef)"
        )
    return errors


@rule("dpo.loss", "dpo.label_smoothing", "reference.max_length", "dpo.max_length", "dpo.kto_dataset")
def _dpo(config: Config) -> list[str]:
    dpo, errors = config.dpo, []
    if dpo.loss == "robust" and not dpo.label_smoothing < 0.5:
        errors.append(f"dpo.label_smoothing: {dpo.label_smoothing} must lie in [0, 0.5) for loss 'robust'")
    if dpo.kto_dataset is not None and dpo.loss != "kto":
        errors.append(
            f"dpo.kto_dataset: {dpo.kto_dataset!r} is unpaired feedback, which only dpo.loss: kto learns from (the "
            f"loss is {dpo.loss!r}); set dpo.loss: kto, or dpo.kto_dataset: null"
        )
    if config.reference.max_length != dpo.max_length:
        errors.append(
            f"reference.max_length: {config.reference.max_length} differs from dpo.max_length = {dpo.max_length}; "
            "the cached log-probs must cover exactly the pairs DPO trains on"
        )
    return errors


@rule("dpo.online_rounds", "dpo.loss", "dpo.kto_dataset", "env.kind", "trainer.strategy")
def _online_dpo(config: Config) -> list[str]:
    dpo = config.dpo
    if not dpo.online_rounds:
        return []
    errors, rounds = [], f"dpo.online_rounds: {dpo.online_rounds}"
    if dpo.loss == "kto" or dpo.kto_dataset is not None:
        errors.append(
            f"{rounds}: online rounds label pairs (best against worst), which dpo.loss 'kto' does not learn from; set "
            "dpo.loss to a paired loss (sigmoid, ipo, ...), or dpo.online_rounds: 0"
        )
    if config.env.kind != "none":
        errors.append(
            f"{rounds}: online rounds sample one response per prompt, not episodes (env.kind is "
            f"{config.env.kind!r}); set dpo.online_rounds: 0 (ppo trains in the environment)"
        )
    if config.trainer.strategy == "fsdp":
        errors.append(
            f"{rounds}: each round samples from the policy, which trainer.strategy fsdp shards across ranks; run "
            "online rounds under ddp, or offline (dpo.online_rounds: 0) under fsdp"
        )
    return errors


@rule("env.kind", "env.turn_tokens", "env.total_tokens")
def _env(config: Config) -> list[str]:
    env, errors = config.env, []
    parts = env.kind.split(":")
    builtin = ("none", "calculator", "guess")
    if env.kind not in builtin and not (len(parts) == 3 and parts[0] == "python" and all(parts[1:])):
        errors.append(f"env.kind: {env.kind!r} is not one of {', '.join(builtin)}, python:<module>:<Class>")
    if env.turn_tokens > env.total_tokens:
        errors.append(
            f"env.turn_tokens: {env.turn_tokens} exceeds env.total_tokens = {env.total_tokens}, the whole episode's "
            "budget; lower it or raise env.total_tokens"
        )
    return errors


@rule(
    "monitor.every_n_rollouts",
    "env.kind",
    "gates.max_kl",
    "gates.max_length_ratio",
    "gates.min_correlation",
    "gates.gold_drop",
)
def _monitor(config: Config) -> list[str]:
    monitor, errors = config.monitor, []
    set_gates = [f"gates.{gate}" for gate in config.gates.armed]
    if monitor.every_n_rollouts and config.env.kind != "none":
        errors.append(
            f"monitor.every_n_rollouts: the monitor samples single-turn responses, and env.kind is "
            f"{config.env.kind!r}; set it to 0 (docs/monitor.md)"
        )
    if set_gates and not monitor.every_n_rollouts:
        errors.append(
            f"{set_gates[0]}: a gate acts on what the monitor measures, and monitor.every_n_rollouts is 0; set it to "
            "the cadence to watch at (10 by default), or the gate to null"
        )
    return errors
