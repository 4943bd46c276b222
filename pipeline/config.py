"""Typed configuration: one frozen dataclass per `params.yaml` section, and the loader that builds them.

`load_config(raw)` turns the parsed YAML mapping into a `Config`. It rejects unknown, missing and ill-typed keys
and collects *every* problem before raising one `ConfigError` that names each key (`sft.lr: ...`), so a user fixes
a params file in one pass. Closed sets are `Literal[...]`; nothing is silently repaired. The one leniency: a float
field accepts a numeric string such as ``"3e-4"``, because YAML 1.1 (PyYAML, and `dvc exp run -S`) reads an
exponent without a dot as a string; that is a spelling of the same number, not a repair.
"""

from __future__ import annotations

import dataclasses
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """Raised with every problem found in a params mapping, one per line."""


@dataclass(frozen=True)
class ModelConfig:
    base: str
    """`scratch` (a fresh GPT-2 sized below, with the tokenizer `prepare` trains), a hub id or a local directory."""
    trust_remote_code: bool
    """Passed to `from_pretrained`; keep false unless you trust the repository's code."""
    n_layer: int
    """Scratch model only: transformer blocks."""
    n_head: int
    """Scratch model only: attention heads (must divide `n_embd`)."""
    n_embd: int
    """Scratch model only: hidden width."""
    n_positions: int
    """Scratch model only: context length in tokens."""
    dropout: float
    """Scratch model only: residual, embedding and attention dropout."""
    chat_template: str
    """`auto` (the tokenizer's chat template when it has one), `none` (plain text), or a path to a Jinja file.
    With a template, prompts are rendered with `apply_chat_template(..., add_generation_prompt=True)` and every
    completion ends with the template's end-of-turn token, which becomes the tokenizer's EOS."""
    lora_r: int
    """LoRA rank for every trained stage (0: full fine-tuning). Stages train adapters (and the reward/value score
    head) and write merged, self-contained weights; the reference is the policy with its adapters disabled."""
    lora_alpha: int
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)."""
    lora_dropout: float
    """Dropout on the LoRA branch."""
    lora_target_modules: str
    """`all-linear` (every linear layer of the blocks, not the output head) or comma-separated module names
    (`q_proj,v_proj`, `c_attn`)."""


@dataclass(frozen=True)
class TrainerConfig:
    accelerator: str
    """Lightning accelerator: `auto`, `cpu`, `gpu`, `cuda`, `mps`."""
    devices: int | str
    """Devices per node (`auto` or a count)."""
    strategy: str
    """Lightning strategy: `auto`, `ddp`, `ddp_spawn`, `fsdp`, `deepspeed_stage_2`, ..."""
    precision: str
    """Lightning precision: `32-true`, `bf16-mixed`, `16-mixed`, `bf16-true`."""
    num_nodes: int
    """Nodes for multi-node DDP/FSDP."""
    log_every_n_steps: int
    """How often training metrics are logged."""
    accumulate_grad_batches: int
    """Micro-batches per optimizer step: the effective batch is batch_size x this x devices (PPO: minibatch_size
    is split into this many micro-batches)."""
    gradient_checkpointing: bool
    """Recompute activations in the backward pass instead of storing them (less memory, ~30 % more compute)."""
    compile: bool
    """`torch.compile` the model's transformer body (dynamic shapes) in every trained stage; generation still runs
    eagerly. Measured on CPU it loses (see the README's benchmark): leave it off there; try it on GPUs."""
    checkpoint_every_n_steps: int
    """sft, reward, dpo: optimizer steps (ppo: rollouts) between mid-stage checkpoints a killed stage resumes from
    (0: none). They live in `.checkpoints/<stage>/<key>/`, outside the DVC outputs."""
    keep_checkpoints: bool
    """Keep a stage's checkpoints after its outputs are written (default: remove them)."""


@dataclass(frozen=True)
class PrepareConfig:
    source: Literal["synthetic", "dataset"]
    """`synthetic`: the embedded movie-review task. `dataset`: `datasets.load_dataset` on the keys below."""
    n_train: int
    """Synthetic: training reviews (the split is by prompt, so prompts never cross splits)."""
    n_val: int
    """Validation reviews."""
    n_test: int
    """Held-out test prompts used by evaluation."""
    frac_positive: float
    """Synthetic: fraction of positive continuations (negative alike; the rest are neutral)."""
    frac_negative: float
    """Synthetic: fraction of negative continuations."""
    tokenizer_vocab_size: int
    """Scratch model: byte-level BPE vocabulary size (the trained tokenizer may be smaller)."""
    dataset_path: str | None
    """Dataset source: a hub id (`stanfordnlp/imdb`), a builder (`json`, `parquet`) or a local directory."""
    dataset_name: str | None
    """Dataset configuration name, if any."""
    data_files: str | None
    """Local files for the `json`/`parquet` builders."""
    dataset_split: str
    """Split to read; train/val/test are carved from it by prompt."""
    prompt_column: str
    """Column holding the prompt (or the whole text when `completion_column` is null)."""
    completion_column: str | None
    """Column holding the completion; null splits `prompt_column` after `prompt_words` words (IMDb style)."""
    prompt_words: int
    """Words kept as the prompt when `completion_column` is null."""
    completion_words: int | None
    """When `completion_column` is null: keep at most this many words after the prompt (whole IMDb reviews run to
    hundreds of tokens; null keeps the rest of the text)."""
    messages_column: str | None
    """Conversational data: a column of `{role, content}` turn lists. The prompt is every turn before the last
    assistant turn, the completion that turn's content; `prompt_column`/`completion_column` are then not read."""


@dataclass(frozen=True)
class TrainingConfig:
    """Keys every Lightning-trained stage (sft, reward, dpo) shares."""

    lr: float
    """Peak AdamW learning rate."""
    weight_decay: float
    """AdamW weight decay (not applied to biases and norms)."""
    warmup_steps: int
    """Linear warm-up steps before cosine decay."""
    batch_size: int
    """Examples (sft) or pairs (reward, dpo) per optimizer step, per device."""
    max_steps: int
    """Optimizer steps."""
    val_every_n_steps: int
    """Validation interval in steps."""
    max_length: int
    """Prompt + completion + EOS tokens; longer rows are an error, not truncated."""
    grad_clip: float
    """Gradient-norm clip (0 disables)."""
    disable_dropout: bool
    """Set every dropout of the model to 0 while training (TRL's default for reward, DPO and PPO: dropout makes
    the policy's log-probs noisy against a reference computed without it)."""
    packing: bool
    """Padding-free batches: each batch's sequences (reward, dpo: chosen and rejected alike) concatenated into rows
    1, 2 or 4 times as wide as its longest (whichever leaves the fewest padding slots), positions restarting per
    sequence, attention block-diagonal (same losses and gradients as padded, to float rounding)."""


@dataclass(frozen=True)
class SFTConfig(TrainingConfig):
    n_samples: int
    """Completions sampled on validation prompts at the end, logged as an artifact."""
    max_new_tokens: int
    """Sampling budget (new tokens) of those completions; the model's context caps it per prompt."""
    on_invalid: Literal["drop", "fail"]
    """Rows longer than `max_length` or with an empty completion: stop with an error naming them, or drop them
    (counted in reports/sft.json as data/dropped_rows)."""


@dataclass(frozen=True)
class PreferencesConfig:
    mode: Literal["generate", "dataset"]
    """`generate`: sample K completions per prompt from `models/sft`, label pairs with the simulated annotator.
    `dataset`: read human pairs through the column mapping below."""
    k: int
    """Generate: completions sampled per prompt; every pair among them is a candidate."""
    train_prompts: int
    """Generate: train prompts used (the first distinct ones of the prepared train split)."""
    val_prompts: int
    """Generate: validation prompts used."""
    max_new_tokens: int
    """Generate: sampling budget per completion."""
    temperature: float
    """Generate: sampling temperature."""
    top_k: int
    """Generate: top-k filter (0 disables)."""
    top_p: float
    """Generate: nucleus filter (1.0 disables)."""
    batch_size: int
    """Generate: sequences per `generate` call."""
    tau: float
    """Bradley-Terry annotator temperature: P(a > b) = sigmoid((gold_a - gold_b) / tau); 0 is deterministic."""
    min_gold_gap: float
    """Generate: pairs whose gold scores differ by at most this are dropped (0 drops exact ties)."""
    max_length: int
    """Prompt + response + EOS tokens; longer pairs are invalid."""
    on_invalid: Literal["drop", "fail"]
    """What to do with invalid pairs (empty, identical, repeating the prompt, extra EOS, over-long)."""
    dataset_path: str | None
    """Dataset: hub id (`Anthropic/hh-rlhf`) or builder (`json`, `parquet`)."""
    dataset_name: str | None
    """Dataset: configuration name."""
    data_files: str | None
    """Dataset: local files for the json/parquet builders."""
    dataset_split: str
    """Dataset: split read; train/val are carved from it by prompt."""
    prompt_column: str | None
    """Dataset: prompt column; null when chosen/rejected hold whole dialogues (HH: split at the last
    `Assistant:` turn)."""
    chosen_column: str
    """Dataset: preferred response (or dialogue) column."""
    rejected_column: str
    """Dataset: dispreferred response (or dialogue) column."""
    val_fraction: float
    """Dataset: share of prompts held out for validation."""


@dataclass(frozen=True)
class RewardConfig(TrainingConfig):
    margin: float
    """Bradley-Terry margin: loss = -log sigmoid(r_chosen - r_rejected - margin) (0 disables)."""
    center_coef: float
    """Reward centering: + coef * (r_chosen + r_rejected)^2 keeps rewards near 0 (Eisenstein et al. 2023)."""


@dataclass(frozen=True)
class ReferenceConfig:
    batch_size: int
    """Pairs per forward pass when caching the reference (SFT) log-probs."""
    max_length: int
    """Prompt + response + EOS tokens (as in DPO, which reads these log-probs)."""
    packing: bool
    """Padding-free batches, as `dpo.packing` (the cached values then differ from padded ones by float rounding
    only)."""


@dataclass(frozen=True)
class DPOConfig(TrainingConfig):
    loss: Literal["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo"]
    """Loss variant: sigmoid (DPO), ipo (Azar et al.), hinge (SLiC), robust (Chowdhury et al.), or the
    reference-free simpo (Meng et al. 2024; beta is its reward scale, ~2) and orpo (Hong et al. 2024), which read no
    cached reference log-probs."""
    beta: float
    """KL-constraint strength: higher keeps the policy closer to the reference."""
    label_smoothing: float
    """Assumed label-flip rate for sigmoid (cDPO) and robust; 0 is plain DPO."""
    simpo_gamma: float
    """SimPO's target reward margin gamma."""
    orpo_lambda: float
    """ORPO's weight of the odds-ratio term (beside the chosen response's NLL)."""
    kl_prompts: int
    """Validation prompts sampled at the end to measure objective/kl against the reference."""
    max_new_tokens: int
    """Sampling budget for the objective/kl samples."""


@dataclass(frozen=True)
class PPOConfig:
    lr: float
    """Policy learning rate (AdamW, warm-up then cosine over the rollouts)."""
    value_lr: float
    """Value-model learning rate."""
    warmup_rollouts: int
    """Rollouts of linear learning-rate warm-up."""
    rollouts: int
    """Rollout batches (each: sample, score, then `ppo_epochs` passes of minibatch updates)."""
    prompts_per_rollout: int
    """Prompts sampled per rollout batch (`num_generations` responses each)."""
    num_generations: int
    """Responses sampled per prompt; the group estimators (grpo, dr_grpo, rloo) need >= 2."""
    advantage_estimator: Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp"]
    """gae: PPO with a value model; grpo / dr_grpo / rloo: group baselines, no value model; reinforce_pp: REINFORCE++
    (batch-whitened returns), no value model."""
    minibatch_size: int
    """Sequences per PPO update."""
    ppo_epochs: int
    """Passes over each rollout batch."""
    max_new_tokens: int
    """Response budget; a response that hits it without EOS gets `missing_eos_penalty`."""
    temperature: float
    """Sampling temperature (log-probs are computed at the same temperature)."""
    top_k: int
    """Top-k filter while sampling (0 disables; keep 0 for an unbiased KL)."""
    top_p: float
    """Nucleus filter while sampling (1.0 disables)."""
    gamma: float
    """GAE discount."""
    lam: float
    """GAE lambda."""
    cliprange: float
    """Policy-ratio clip."""
    cliprange_value: float
    """Value clip around the rollout's values."""
    vf_coef: float
    """Weight of the value loss."""
    kl_coef: float
    """Per-token KL penalty (the initial value when `kl_control` is adaptive)."""
    kl_estimator: Literal["k1", "k2", "k3"]
    """Per-token KL estimator in the reward penalty."""
    kl_in: Literal["reward", "loss"]
    """Where the KL to the reference goes: a per-token penalty in the reward (`kl_coef`), or a k3 term in the loss
    (`kl_loss_coef`, as GRPO does)."""
    kl_loss_coef: float
    """Weight of the k3 KL loss term when `kl_in` is loss."""
    kl_control: Literal["fixed", "adaptive"]
    """Keep `kl_coef` fixed, or adapt it towards `kl_target` (Ziegler et al. 2019)."""
    kl_target: float
    """Adaptive control: target sequence KL (nats)."""
    kl_horizon: int
    """Adaptive control: horizon in samples."""
    whiten_rewards: bool
    """Whiten per-token rewards (keeping their mean) before GAE."""
    reward_clip: float
    """Clip normalised scores to +-this (0 disables)."""
    missing_eos_penalty: float
    """Subtracted from the normalised score of responses that never produced EOS."""
    grad_clip: float
    """Gradient-norm clip for policy and value models (0 disables)."""
    disable_dropout: bool
    """Set every dropout of policy and value model to 0 (keeps rollout, training and reference log-probs consistent)."""
    max_ratio: float
    """Health gate: stop when a minibatch's mean importance ratio exceeds this."""
    min_eos_rate: float
    """Health gate: stop when fewer rollout responses than this end with EOS."""
    n_logged_samples: int
    """Rollout samples logged as a table artifact."""


@dataclass(frozen=True)
class EvaluateConfig:
    max_new_tokens: int
    """Response budget for every policy."""
    temperature: float
    """Sampling temperature, the same for every policy (1.0 keeps the KL estimate unbiased)."""
    top_k: int
    """Top-k filter (0 disables)."""
    top_p: float
    """Nucleus filter (1.0 disables)."""
    best_of_n: int
    """N of the Best-of-N baseline (SFT samples ranked by the reward model); smaller powers of 2 are reported too."""
    batch_size: int
    """Sequences per generate / scoring call."""
    n_shown_samples: int
    """Test prompts whose completions by every policy appear in reports/eval.md."""


@dataclass(frozen=True)
class SamplerConfig:
    compile: bool
    """Sample (preferences, PPO rollouts, DPO's frontier, evaluation) with a static KV cache and a compiled decode
    step: the same tokens for the same seed, one compile per batch size (CUDA graphs on GPU). After ~10-15 s of
    compiling per batch size, the benchmark samples 1.07-1.39x faster on a 2-core CPU and 1.4-1.8x on an H200 (see
    the README's benchmark)."""


@dataclass(frozen=True)
class JudgeConfig:
    kind: Literal["vader", "classifier", "reward_model"]
    """The gold judge: `vader` (the embedded task's sentiment lexicon), `classifier` (a Hugging Face
    sequence-classification model, scored on `label`), `reward_model` (a one-logit `save_pretrained` model)."""
    path: str | None
    """classifier / reward_model: a hub id (`lvwerra/distilbert-imdb`) or a local `save_pretrained` directory."""
    label: str | None
    """classifier: the label whose score is the gold score (one of the model's `id2label`, e.g. `POSITIVE`)."""
    score: Literal["log_odds", "probability"]
    """classifier: `log_odds` (logit of `label` minus the log-sum-exp of the others) or its `probability`."""
    include_prompt: bool
    """classifier: score prompt + response as one text (false: the response alone, as VADER does)."""
    batch_size: int
    """Texts per judge forward pass."""
    max_length: int
    """Judge tokens per text; longer inputs are truncated (hub classifiers stop at 512)."""
    trust_remote_code: bool
    """Passed to the judge's `from_pretrained`; keep false unless you trust the repository's code."""


@dataclass(frozen=True)
class Config:
    seed: int
    """Drives every random choice of every stage."""
    model: ModelConfig
    trainer: TrainerConfig
    prepare: PrepareConfig
    sft: SFTConfig
    preferences: PreferencesConfig
    reward: RewardConfig
    reference: ReferenceConfig
    dpo: DPOConfig
    ppo: PPOConfig
    evaluate: EvaluateConfig
    generation: SamplerConfig
    judge: JudgeConfig


def read_params(path: str | Path) -> dict[str, Any]:
    """Parse a params YAML file into a mapping, naming the file on a syntax error."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: params file not found; run from the project root") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    return raw


def load_config(raw: Mapping[str, Any]) -> Config:
    """Build a `Config` from a parsed params mapping; raise one `ConfigError` listing every problem."""
    errors: list[str] = []
    config = _build(Config, raw, "", errors)
    if not errors:
        errors += _semantic_errors(config)
    if errors:
        raise ConfigError("invalid params:\n  " + "\n  ".join(errors))
    return config


def _semantic_errors(config: Config) -> list[str]:
    """Cross-key rules that types cannot express."""
    errors = []
    prepare, model = config.prepare, config.model
    if not 0 <= prepare.frac_positive + prepare.frac_negative <= 1:
        errors.append(
            f"prepare.frac_positive + prepare.frac_negative: {prepare.frac_positive} + {prepare.frac_negative} "
            "must lie in [0, 1] (the rest is neutral)"
        )
    if model.base == "scratch" and model.chat_template not in ("auto", "none"):
        errors.append(
            f"model.chat_template: {model.chat_template!r} needs a hub or local model.base whose tokenizer has the "
            "template's special tokens; the scratch tokenizer has none (use auto or none)"
        )
    if model.base == "scratch" and model.n_embd % model.n_head:
        errors.append(f"model.n_embd: {model.n_embd} is not divisible by model.n_head = {model.n_head}")
    for key, number in flatten(config).items():
        if isinstance(number, int | float) and not isinstance(number, bool) and not _within(number, bound(key)):
            errors.append(f"{key}: {number} is out of range; it must be {bound(key)}")
    if model.base == "scratch":
        for section in ("sft", "preferences", "reward", "reference", "dpo"):
            max_length = getattr(config, section).max_length
            if max_length > model.n_positions:
                errors.append(
                    f"{section}.max_length: {max_length} exceeds model.n_positions = {model.n_positions}; "
                    "lower it or enlarge the model"
                )
        for section in ("sft", "preferences", "dpo", "ppo", "evaluate"):
            budget = getattr(config, section).max_new_tokens
            if budget >= model.n_positions:
                errors.append(
                    f"{section}.max_new_tokens: {budget} new tokens can never fit model.n_positions = "
                    f"{model.n_positions} (a prompt takes at least one); set it below {model.n_positions}"
                )
    errors += _judge_errors(config.judge)
    if config.trainer.accumulate_grad_batches < 1:
        errors.append(f"trainer.accumulate_grad_batches: {config.trainer.accumulate_grad_batches} must be at least 1")
    if model.lora_r < 0 or (model.lora_r and model.lora_alpha <= 0):
        errors.append(f"model.lora_r / model.lora_alpha: {model.lora_r} / {model.lora_alpha}: the rank must be >= 0 "
                      "(0 turns LoRA off) and alpha positive")  # fmt: skip
    if not 0 <= model.lora_dropout < 1:
        errors.append(f"model.lora_dropout: {model.lora_dropout} must lie in [0, 1)")
    errors += _ppo_errors(config.ppo, config.trainer.accumulate_grad_batches)
    dpo = config.dpo
    if dpo.loss == "robust" and not dpo.label_smoothing < 0.5:
        errors.append(f"dpo.label_smoothing: {dpo.label_smoothing} must lie in [0, 0.5) for loss 'robust'")
    if config.reference.max_length != dpo.max_length:
        errors.append(
            f"reference.max_length: {config.reference.max_length} differs from dpo.max_length = {dpo.max_length}; "
            "the cached log-probs must cover exactly the pairs DPO trains on"
        )
    return errors


def _ppo_errors(ppo: PPOConfig, accumulate: int) -> list[str]:
    errors = []
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
    group = ppo.advantage_estimator in ("grpo", "dr_grpo", "rloo")
    if group and ppo.num_generations < 2:
        errors.append(
            f"ppo.num_generations: {ppo.num_generations} is too few for ppo.advantage_estimator "
            f"{ppo.advantage_estimator!r}, whose baseline is the other samples of the same prompt; set it to >= 2"
        )
    if group and ppo.whiten_rewards:
        errors.append(f"ppo.whiten_rewards: true does not apply to ppo.advantage_estimator "
                      f"{ppo.advantage_estimator!r} (it scores whole sequences); set it to false")  # fmt: skip
    if ppo.kl_in == "loss" and ppo.kl_control == "adaptive":
        errors.append("ppo.kl_control: 'adaptive' adapts the reward's kl_coef, but ppo.kl_in is 'loss'; use fixed "
                      "(the loss term's weight is ppo.kl_loss_coef)")  # fmt: skip
    return errors


def _judge_errors(judge: JudgeConfig) -> list[str]:
    errors = []
    if judge.kind != "vader" and not judge.path:
        errors.append(f"judge.path: required for judge.kind {judge.kind!r} (a hub id or a save_pretrained directory)")
    if judge.kind == "classifier" and not judge.label:
        errors.append("judge.label: required for judge.kind 'classifier' (the label to score, e.g. POSITIVE)")
    return errors


# The range of every numeric params key: by full key, else by its name in any section. A unit test keeps every
# numeric field of `Config` in this table, so a new key cannot arrive without its bound.
BOUNDS = {
    "seed": ">= 0", "n_layer": ">= 1", "n_head": ">= 1", "n_embd": ">= 1", "n_positions": ">= 1",
    "dropout": "in [0, 1)", "lora_r": ">= 0", "lora_alpha": ">= 1", "lora_dropout": "in [0, 1)",
    "devices": ">= 1", "num_nodes": ">= 1", "log_every_n_steps": ">= 1", "accumulate_grad_batches": ">= 1",
    "checkpoint_every_n_steps": ">= 0",
    "n_train": ">= 1", "n_val": ">= 1", "n_test": ">= 1", "frac_positive": "in [0, 1]", "frac_negative": "in [0, 1]",
    "tokenizer_vocab_size": ">= 260", "prompt_words": ">= 1", "completion_words": ">= 1",
    "lr": "> 0", "value_lr": "> 0", "weight_decay": ">= 0", "warmup_steps": ">= 0", "batch_size": ">= 1",
    "max_steps": ">= 1", "val_every_n_steps": ">= 1", "max_length": ">= 2", "grad_clip": ">= 0",
    "n_samples": ">= 0", "k": ">= 2", "train_prompts": ">= 1", "val_prompts": ">= 1", "max_new_tokens": ">= 1",
    "temperature": ">= 0", "ppo.temperature": "> 0", "top_k": ">= 0", "top_p": "in (0, 1]", "tau": ">= 0",
    "min_gold_gap": ">= 0", "val_fraction": "in [0, 1)", "margin": ">= 0", "center_coef": ">= 0",
    "beta": "> 0", "label_smoothing": "in [0, 1)", "simpo_gamma": ">= 0", "orpo_lambda": "> 0",
    "kl_prompts": ">= 1", "warmup_rollouts": ">= 0",
    "rollouts": ">= 1", "prompts_per_rollout": ">= 1", "minibatch_size": ">= 1", "ppo_epochs": ">= 1",
    "num_generations": ">= 1", "kl_loss_coef": ">= 0",
    "gamma": "in [0, 1]", "lam": "in [0, 1]", "cliprange": "> 0", "cliprange_value": "> 0", "vf_coef": ">= 0",
    "kl_coef": ">= 0", "kl_target": "> 0", "kl_horizon": ">= 1", "reward_clip": ">= 0",
    "missing_eos_penalty": ">= 0", "max_ratio": "> 1", "min_eos_rate": "in [0, 1]", "n_logged_samples": ">= 0",
    "best_of_n": ">= 2", "n_shown_samples": ">= 0", "judge.max_length": ">= 8",
}  # fmt: skip


def bound(key: str) -> str:
    """The range `key` (`sft.lr`) must lie in, as written in `BOUNDS`."""
    return BOUNDS.get(key) or BOUNDS[key.rsplit(".", 1)[-1]]


def _within(number: float, rule: str) -> bool:
    if rule.startswith((">", "<")):
        op, limit = rule.split()
        return {">": number > float(limit), ">=": number >= float(limit)}[op]
    low, high = (float(x) for x in rule[4:-1].split(","))
    above = number >= low if rule[3] == "[" else number > low
    below = number <= high if rule[-1] == "]" else number < high
    return above and below


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a config dataclass into dotted keys (`sft.lr`) for tracking."""
    flat: dict[str, Any] = {}
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        key = f"{prefix}{item.name}"
        if dataclasses.is_dataclass(value):
            flat.update(flatten(value, key + "."))
        else:
            flat[key] = value
    return flat


_FLOAT_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _build(cls: type, raw: Any, prefix: str, errors: list[str]) -> Any:
    where = prefix.rstrip(".") or "params"
    if not isinstance(raw, Mapping):
        errors.append(f"{where}: expected a mapping, got {_describe(raw)}")
        return None
    hints = get_type_hints(cls)
    names = [item.name for item in dataclasses.fields(cls)]
    for key in raw:
        if key not in hints:
            errors.append(f"{prefix}{key}: unknown key; valid keys here: {', '.join(names)}")
    values: dict[str, Any] = {}
    for name in names:
        key = f"{prefix}{name}"
        if name not in raw:
            errors.append(f"{key}: missing")
            continue
        values[name] = _coerce(hints[name], raw[name], key, errors)
    if len(values) < len(names):
        return None
    return cls(**values)


def _coerce(kind: Any, value: Any, key: str, errors: list[str]) -> Any:
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, key + ".", errors)
    origin = get_origin(kind)
    if origin is Literal:
        options = get_args(kind)
        if value not in options:
            errors.append(f"{key}: {value!r} is not one of {', '.join(repr(o) for o in options)}")
        return value
    if origin in (Union, types.UnionType):
        for option in get_args(kind):
            if option is type(None) and value is None:
                return None
            if option is not type(None) and _matches(option, value):
                return _coerce(option, value, key, [])
        errors.append(f"{key}: expected {_name(kind)}, got {_describe(value)}")
        return value
    if not _matches(kind, value):
        errors.append(f"{key}: expected {_name(kind)}, got {_describe(value)}")
        return value
    return float(value) if kind is float else value


def _matches(kind: Any, value: Any) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        if isinstance(value, str):
            return bool(_FLOAT_TEXT.match(value))
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    if get_origin(kind) is Literal:
        return value in get_args(kind)
    return False


def _name(kind: Any) -> str:
    if get_origin(kind) in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _name(a) for a in get_args(kind))
    return getattr(kind, "__name__", str(kind))


def _describe(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"
