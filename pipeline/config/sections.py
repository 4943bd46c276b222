"""One frozen dataclass per `params.yaml` section; each field carries its bound (`bounded`) and, in the docstring
under it, its one documentation (`docs/params.md` is generated from them)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal


def bounded(rule: str, *, runtime: bool = False) -> Any:
    """A numeric field's range, declared at the field: `> 0`, `>= 1`, `in [0, 1)`, `in (0, 1]`."""
    return dataclasses.field(metadata={"bound": rule, "runtime": runtime})


def runtime() -> Any:
    """A runtime knob: it changes how a stage runs, never what it writes, so no stage lists it in `dvc.yaml` (its
    cache key) and changing it reruns nothing. A test keeps `dvc.yaml` from listing it."""
    return dataclasses.field(metadata={"runtime": True})


def is_runtime(item: dataclasses.Field) -> bool:
    return bool(item.metadata.get("runtime"))


@dataclass(frozen=True)
class ModelConfig:
    base: str
    """`scratch` (a fresh GPT-2 sized below, with the tokenizer `prepare` trains), a hub id or a local directory."""
    trust_remote_code: bool
    """Passed to `from_pretrained`; keep false unless you trust the repository's code."""
    n_layer: int = bounded(">= 1")
    """Scratch model only: transformer blocks."""
    n_head: int = bounded(">= 1")
    """Scratch model only: attention heads (must divide `n_embd`)."""
    n_embd: int = bounded(">= 1")
    """Scratch model only: hidden width."""
    n_positions: int = bounded(">= 1")
    """Scratch model only: context length in tokens."""
    dropout: float = bounded("in [0, 1)")
    """Scratch model only: residual, embedding and attention dropout."""
    chat_template: str
    """`auto` (the tokenizer's chat template when it has one), `none` (plain text), or a path to a Jinja file.
    With a template, prompts are rendered with `apply_chat_template(..., add_generation_prompt=True)` and every
    completion ends with the template's end-of-turn token, which becomes the tokenizer's EOS."""
    lora_r: int = bounded(">= 0")
    """LoRA rank for every trained stage (0: full fine-tuning). Stages train adapters (and the reward/value score
    head) and write merged, self-contained weights; the reference is the policy with its adapters disabled."""
    lora_alpha: int = bounded(">= 1")
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)."""
    lora_dropout: float = bounded("in [0, 1)")
    """Dropout on the LoRA branch."""
    lora_target_modules: str
    """`all-linear` (every linear layer of the blocks, not the output head) or comma-separated module names
    (`q_proj,v_proj`, `c_attn`)."""


@dataclass(frozen=True)
class TrainerConfig:
    accelerator: str
    """Lightning accelerator: `auto`, `cpu`, `gpu`, `cuda`, `mps`."""
    devices: int | str = bounded(">= 1")
    """Devices per node (`auto` or a count)."""
    strategy: str
    """Lightning strategy: `auto`, `ddp`, `ddp_spawn`, `fsdp` (FSDP2 for sft, reward and dpo; ppo needs `ddp`),
    `deepspeed_stage_2`, ... With `fsdp`, `devices` is a number."""
    precision: str
    """Lightning precision: `32-true`, `bf16-mixed`, `16-mixed`, `bf16-true`."""
    num_nodes: int = bounded(">= 1")
    """Nodes for multi-node DDP/FSDP."""
    log_every_n_steps: int = bounded(">= 1")
    """How often training metrics are logged."""
    accumulate_grad_batches: int = bounded(">= 1")
    """Micro-batches per optimizer step: the effective batch is batch_size x this x devices (PPO: minibatch_size
    is split into this many micro-batches)."""
    gradient_checkpointing: bool
    """Recompute activations in the backward pass instead of storing them (less memory, ~30 % more compute)."""
    compile: bool
    """`torch.compile` the model's transformer body (dynamic shapes) in every trained stage; generation still runs
    eagerly. Measured on CPU it loses (see docs/benchmarks.md): leave it off there; try it on GPUs."""
    checkpoint_every_n_steps: int = bounded(">= 0", runtime=True)
    """sft, reward, dpo: optimizer steps (ppo: rollouts) between mid-stage checkpoints a killed stage resumes from,
    plus one when training ends, so a failure in a later step resumes there (0: none). They live in
    `.checkpoints/<stage>/<key>/`, outside the DVC outputs. Runtime knob: a resumed or checkpointed stage ends with
    the weights and metrics of an uninterrupted one (tested), so changing it reruns nothing."""
    keep_checkpoints: bool = runtime()
    """Keep a stage's checkpoints after its outputs are written (default: remove them). Runtime knob: reruns
    nothing."""


@dataclass(frozen=True)
class PrepareConfig:
    source: Literal["synthetic", "dataset", "arithmetic", "calculator", "guess"]
    """`synthetic`: the embedded movie-review task. `dataset`: `datasets.load_dataset` on the keys below.
    `arithmetic`: the embedded verifiable task (sums with reference answers, `pipeline.tasks.arithmetic`).
    `calculator`, `guess`: the embedded multi-turn tasks for `env.kind` of the same name, with demonstrations one
    row per policy turn (`pipeline.tasks.tools`)."""
    n_train: int = bounded(">= 1")
    """Synthetic: training reviews (the split is by prompt, so prompts never cross splits)."""
    n_val: int = bounded(">= 1")
    """Validation reviews."""
    n_test: int = bounded(">= 1")
    """Held-out test prompts used by evaluation."""
    frac_positive: float = bounded("in [0, 1]")
    """Synthetic: fraction of positive continuations (negative alike; the rest are neutral)."""
    frac_negative: float = bounded("in [0, 1]")
    """Synthetic: fraction of negative continuations."""
    tokenizer_vocab_size: int = bounded(">= 260")
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
    prompt_words: int = bounded(">= 1")
    """Words kept as the prompt when `completion_column` is null."""
    completion_words: int | None = bounded(">= 1")
    """When `completion_column` is null: keep at most this many words after the prompt (whole IMDb reviews run to
    hundreds of tokens; null keeps the rest of the text)."""
    answer_column: str | None
    """Dataset: the column holding each row's reference answer (kept as `answer`; a verifier judge checks responses
    against its final answer, e.g. GSM8K's `answer`, which ends in `#### 72`). null: no answers."""
    frac_wrong: float = bounded("in [0, 1]")
    """Arithmetic, calculator, guess: share of SFT demonstrations that are wrong (a wrong sum, no tool or a wrong
    call, a random guess: the imperfect data RL then fixes)."""
    messages_column: str | None
    """Conversational data: a column of `{role, content}` turn lists. The prompt is every turn before the last
    assistant turn, the completion that turn's content; `prompt_column`/`completion_column` are then not read."""


@dataclass(frozen=True)
class TrainingConfig:
    """Keys every Lightning-trained stage (sft, reward, dpo) shares."""

    lr: float = bounded("> 0")
    """Peak AdamW learning rate."""
    weight_decay: float = bounded(">= 0")
    """AdamW weight decay (not applied to biases and norms)."""
    warmup_steps: int = bounded(">= 0")
    """Linear warm-up steps before cosine decay."""
    batch_size: int = bounded(">= 1")
    """Examples (sft) or pairs (reward, dpo) per optimizer step, per device."""
    max_steps: int = bounded(">= 1")
    """Optimizer steps."""
    val_every_n_steps: int = bounded(">= 1")
    """Validation interval in steps."""
    max_length: int = bounded(">= 2")
    """Prompt + completion + EOS tokens; longer rows are an error, not truncated."""
    grad_clip: float = bounded(">= 0")
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
    n_samples: int = bounded(">= 0")
    """Completions sampled on validation prompts at the end, logged as an artifact."""
    max_new_tokens: int = bounded(">= 1")
    """Sampling budget (new tokens) of those completions; the model's context caps it per prompt."""
    on_invalid: Literal["drop", "fail"]
    """Rows longer than `max_length` or with an empty completion: stop with an error naming them, or drop them
    (counted in reports/sft.json as data/dropped_rows)."""


@dataclass(frozen=True)
class PreferencesConfig:
    mode: Literal["generate", "dataset"]
    """`generate`: sample K completions per prompt from `models/sft`, label pairs with the simulated annotator.
    `dataset`: read human pairs through the column mapping below."""
    k: int = bounded(">= 2")
    """Generate: completions sampled per prompt; every pair among them is a candidate."""
    train_prompts: int = bounded(">= 1")
    """Generate: train prompts used (the first distinct ones of the prepared train split)."""
    val_prompts: int = bounded(">= 1")
    """Generate: validation prompts used."""
    max_new_tokens: int = bounded(">= 1")
    """Generate: sampling budget per completion."""
    temperature: float = bounded(">= 0")
    """Generate: sampling temperature."""
    top_k: int = bounded(">= 0")
    """Generate: top-k filter (0 disables)."""
    top_p: float = bounded("in (0, 1]")
    """Generate: nucleus filter (1.0 disables)."""
    batch_size: int = bounded(">= 1")
    """Generate: sequences per `generate` call."""
    tau: float = bounded(">= 0")
    """Bradley-Terry annotator temperature: P(a > b) = sigmoid((gold_a - gold_b) / tau); 0 is deterministic."""
    min_gold_gap: float = bounded(">= 0")
    """Generate: pairs whose gold scores differ by at most this are dropped (0 drops exact ties)."""
    bias_pattern: str | None
    """Generate: a biased annotator (null: none). Each match of this regex in a response adds `bias_weight` to the
    score the annotator compares, something the gold judge ignores: a proxy to study reward hacking with
    (docs/monitor.md)."""
    bias_weight: float = bounded("in [-1, 1]")
    """Generate: what each match of `bias_pattern` adds to the annotator's score (gold-judge units)."""
    max_length: int = bounded(">= 2")
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
    val_fraction: float = bounded("in [0, 1)")
    """Dataset: share of prompts held out for validation."""


@dataclass(frozen=True)
class RewardConfig(TrainingConfig):
    margin: float = bounded(">= 0")
    """Bradley-Terry margin: loss = -log sigmoid(r_chosen - r_rejected - margin) (0 disables)."""
    center_coef: float = bounded(">= 0")
    """Reward centering: + coef * (r_chosen + r_rejected)^2 keeps rewards near 0 (Eisenstein et al. 2023)."""
    ensemble: int = bounded(">= 1")
    """Score heads on the reward model's shared body, each started from its own random draw and trained on its own
    bootstrap of the pairs (Poisson(1) weights per pair and head, drawn per step): an ensemble whose spread says
    where the reward model is unsure; `ppo.ensemble_combine` reads it. 1: one head, as before."""


@dataclass(frozen=True)
class ReferenceConfig:
    batch_size: int = bounded(">= 1")
    """Pairs per forward pass when caching the reference (SFT) log-probs."""
    max_length: int = bounded(">= 2")
    """Prompt + response + EOS tokens (as in DPO, which reads these log-probs)."""
    packing: bool
    """Padding-free batches, as `dpo.packing` (the cached values then differ from padded ones by float rounding
    only)."""


@dataclass(frozen=True)
class DPOConfig(TrainingConfig):
    loss: Literal["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo", "kto"]
    """Loss variant: sigmoid (DPO), ipo (Azar et al., on log-probs averaged per token as the authors' and TRL's code,
    so a paper's beta carries over), hinge (SLiC), robust (Chowdhury et al.), the reference-free simpo (Meng et al.
    2024; beta is its reward scale, ~2) and orpo (Hong et al. 2024), which read no cached reference log-probs, or kto
    (Ethayarajh et al. 2024), which learns from the pairs made unpaired: each chosen response a desirable row, each
    rejected one an undesirable row (docs/kto.md)."""
    beta: float = bounded("> 0")
    """KL-constraint strength: higher keeps the policy closer to the reference."""
    label_smoothing: float = bounded("in [0, 1)")
    """Assumed label-flip rate for sigmoid (cDPO) and robust; 0 is plain DPO."""
    simpo_gamma: float = bounded(">= 0")
    """SimPO's target reward margin gamma."""
    orpo_lambda: float = bounded("> 0")
    """ORPO's weight of the odds-ratio term (beside the chosen response's NLL)."""
    kto_lambda_d: float = bounded("> 0")
    """KTO's weight of a desirable row's loss (lambda_D). The paper advises lambda_D n_D / (lambda_U n_U) in
    [1, 4/3]: with a 1:10 imbalance, lambda_D 10 to 13.3 at lambda_U 1."""
    kto_lambda_u: float = bounded("> 0")
    """KTO's weight of an undesirable row's loss (lambda_U)."""
    kto_desirable_fraction: float = bounded("in (0, 1]")
    """KTO: the share of pairs whose chosen response is kept as a desirable row (every rejected response is an
    undesirable row): 1.0 is one of each per pair, 0.1 a 1:10 desirable-to-undesirable imbalance."""
    kto_dataset: str | None
    """KTO: unpaired feedback to learn from instead of the preference pairs, in TRL's unpaired format (prompt,
    completion, boolean label, as `trl-lib/kto-mix-14k`): a hub id or a builder (`json`, `parquet`); null: the pairs
    made unpaired. Its rows' reference log-probs are scored by the stage (from the SFT weights) before training."""
    kto_data_files: str | None
    """KTO dataset: local files for the json/parquet builders."""
    kto_dataset_split: str
    """KTO dataset: split read; train/val are carved from it by prompt."""
    kto_val_fraction: float = bounded("in (0, 1)")
    """KTO dataset: share of prompts held out for validation."""
    kl_prompts: int = bounded(">= 1")
    """Validation prompts sampled at the end to measure objective/kl against the reference."""
    max_new_tokens: int = bounded(">= 1")
    """Sampling budget for the objective/kl samples, and for online rounds' samples."""
    online_rounds: int = bounded(">= 0")
    """Online (iterative) DPO: rounds in which the policy samples `online_k` responses to each of `online_prompts`
    fresh train prompts (past the `preferences.train_prompts` the pairs came from), the reward model and judge label
    them (`online_reward_model_weight`, `online_judge_weight`: PPO's score composition), the best and worst make a
    pair, and `max_steps` / `online_rounds` steps train on them, from the previous round's weights (one schedule over
    all rounds; docs/online-dpo.md). 0: offline, on the preference pairs."""
    online_prompts: int = bounded(">= 1")
    """Online: fresh train prompts per round."""
    online_k: int = bounded(">= 2")
    """Online: responses sampled per prompt; its highest and lowest scored make its pair."""
    online_reward_model_weight: float = bounded(">= 0")
    """Online: weight of the reward model's normalised score in a response's score (0: no reward model is run)."""
    online_judge_weight: float = bounded(">= 0")
    """Online: weight of the gold judge's score (the gold judge labelling: an oracle, as `ppo.judge_weight`)."""
    online_missing_eos_penalty: float = bounded(">= 0")
    """Online: subtracted from the score of a response that did not end with EOS."""
    online_min_gap: float = bounded(">= 0")
    """Online: a prompt whose best and worst scores differ by this or less (0: a tie) gives no pair."""


@dataclass(frozen=True)
class PPOConfig:
    lr: float = bounded("> 0")
    """Policy learning rate (AdamW, warm-up then cosine over the rollouts)."""
    value_lr: float = bounded("> 0")
    """Value-model learning rate."""
    warmup_rollouts: int = bounded(">= 0")
    """Rollouts of linear learning-rate warm-up."""
    rollouts: int = bounded(">= 1")
    """Rollout batches (each: sample, score, then `ppo_epochs` passes of minibatch updates)."""
    prompts_per_rollout: int = bounded(">= 1")
    """Prompts sampled per rollout batch (`num_generations` responses each)."""
    num_generations: int = bounded(">= 1")
    """Responses sampled per prompt; the group estimators (grpo, dr_grpo, rloo) need >= 2."""
    advantage_estimator: Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp"]
    """gae: PPO with a value model; grpo / dr_grpo / rloo: group baselines, no value model; reinforce_pp: REINFORCE++
    (batch-whitened returns), no value model."""
    minibatch_size: int = bounded(">= 1")
    """Sequences per PPO update."""
    ppo_epochs: int = bounded(">= 1")
    """Passes over each rollout batch."""
    max_new_tokens: int = bounded(">= 1")
    """Response budget; a response that hits it without EOS gets `missing_eos_penalty`."""
    temperature: float = bounded("> 0")
    """Sampling temperature (log-probs are computed at the same temperature)."""
    top_k: int = bounded(">= 0")
    """Top-k filter while sampling (0 disables; keep 0 for an unbiased KL)."""
    top_p: float = bounded("in (0, 1]")
    """Nucleus filter while sampling (1.0 disables)."""
    gamma: float = bounded("in [0, 1]")
    """GAE discount."""
    lam: float = bounded("in [0, 1]")
    """GAE lambda."""
    cliprange: float = bounded("> 0")
    """Policy-ratio clip."""
    cliprange_value: float = bounded("> 0")
    """Value clip around the rollout's values."""
    vf_coef: float = bounded(">= 0")
    """Weight of the value loss."""
    kl_coef: float = bounded(">= 0")
    """Per-token KL penalty (the initial value when `kl_control` is adaptive)."""
    kl_estimator: Literal["k1", "k2", "k3"]
    """Per-token KL estimator in the reward penalty."""
    kl_in: Literal["reward", "loss"]
    """Where the KL to the reference goes: a per-token penalty in the reward (`kl_coef`), or a k3 term in the loss
    (`kl_loss_coef`, as GRPO does)."""
    kl_loss_coef: float = bounded(">= 0")
    """Weight of the k3 KL loss term when `kl_in` is loss."""
    kl_control: Literal["fixed", "adaptive"]
    """Keep `kl_coef` fixed, or adapt it towards `kl_target` (Ziegler et al. 2019)."""
    kl_target: float = bounded("> 0")
    """Adaptive control: target sequence KL (nats)."""
    kl_horizon: int = bounded(">= 1")
    """Adaptive control: horizon in samples."""
    whiten_rewards: bool
    """Whiten per-token rewards (keeping their mean) before GAE."""
    reward_model_weight: float = bounded(">= 0")
    """The RL reward is this times the reward model's normalised score plus `judge_weight` times the gold judge's
    score (TRL's `reward_weights`). 0: no reward model is loaded (RLVR: reward from a verifier judge alone)."""
    judge_weight: float = bounded(">= 0")
    """Weight of the gold judge's score in the RL reward (1 with `judge.kind: verifier`: RLVR). 0: the judge only
    measures (`objective/gold_scores`), as in RLHF against a learned reward model."""
    reward_clip: float = bounded(">= 0")
    """Clip normalised reward-model scores to +-this (0 disables)."""
    ensemble_combine: Literal["mean", "mean_minus_std", "min"]
    """With `reward.ensemble` > 1 heads, each normalised by its own saved mean and std (and clipped): their `mean`,
    the conservative `mean_minus_std` (minus `ensemble_std_coef` x their spread) or their `min` (Coste et al. 2023).
    With one head every choice is that head."""
    ensemble_std_coef: float = bounded(">= 0")
    """`mean_minus_std`: how many spreads (standard deviations across the heads) below their mean."""
    missing_eos_penalty: float = bounded(">= 0")
    """Subtracted from the normalised score of responses that never produced EOS."""
    grad_clip: float = bounded(">= 0")
    """Gradient-norm clip for policy and value models (0 disables)."""
    disable_dropout: bool
    """Set every dropout of policy and value model to 0 (keeps rollout, training and reference log-probs consistent)."""
    max_ratio: float = bounded("> 1")
    """Health gate: stop when a minibatch's mean importance ratio exceeds this."""
    min_eos_rate: float = bounded("in [0, 1]")
    """Health gate: stop when fewer rollout responses than this end with EOS."""
    n_logged_samples: int = bounded(">= 0")
    """Rollout samples logged as a table artifact."""


@dataclass(frozen=True)
class EnvConfig:
    kind: str
    """`none` (single-turn: one prompt, one response, the default), an embedded environment (`calculator`: sums
    with a `<calc>` tool; `guess`: a number in 1..32 told higher or lower), or your own `python:<module>:<Class>`
    (`reset(row) -> str`, `step(action) -> pipeline.envs.base.Step`; imported from the project root only when
    named). With an environment, `ppo` rollouts are episodes of several turns and only the policy's tokens train."""
    max_turns: int = bounded(">= 1")
    """Policy turns per episode; an episode still running after them is cut, counted as `env/truncated_turns`."""
    turn_tokens: int = bounded(">= 1")
    """New tokens per policy turn; a turn that has not stopped by then ends its episode (`env/truncated_tokens`)."""
    total_tokens: int = bounded(">= 1")
    """Policy and observation tokens per episode after its first observation, within the model's context; an
    episode with no room left ends (`env/truncated_total`)."""
    timeout_s: float = bounded("> 0")
    """Seconds one environment step may take; a step still running then ends its episode with reward 0, counted
    (`env/timeouts`)."""
    reward_weight: float = bounded(">= 0")
    """Weight of the environment's episode reward in the RL reward, beside `ppo.reward_model_weight` and
    `ppo.judge_weight`."""
    tools: bool
    """false: the environment without its tools, in `ppo` and `evaluate` (`calculator`: a call is read as the answer),
    to measure what the tool is worth against a policy trained with it."""


@dataclass(frozen=True)
class MonitorConfig:
    every_n_rollouts: int = bounded(">= 0")
    """Online RL (`ppo`): every this many rollouts, and after the last, the policy samples a fixed batch of validation
    prompts, scored by the proxy (the RL reward without its KL term) and by the gold judge: `monitor/*` metrics,
    `reports/plots/ppo_monitor.csv`, and what `gates` watch. 0: off. Single-turn only (not under an `env.kind`)."""
    prompts: int = bounded(">= 2")
    """Validation prompts the monitor samples (the first ones of `data/prepared/val.parquet`, never the test
    prompts `evaluate` uses); with the cadence, what bounds its cost."""


@dataclass(frozen=True)
class GatesConfig:
    on_trip: Literal["warn", "stop", "fail"]
    """What a tripped gate does: `warn` logs it (metric, MLflow tag, `reports/ppo.json`) and training goes on;
    `stop` ends training and saves the policy of the best monitored gold score as the stage's model (its step
    recorded); `fail` fails the stage naming the gate, its threshold, the value and the step, writing nothing."""
    max_kl: float | None = bounded(">= 0")
    """Trip when the monitored policy's mean sequence KL to the reference (SFT) exceeds this many nats. null: off."""
    max_length_ratio: float | None = bounded("> 0")
    """Trip when the monitored responses' mean length exceeds this times the SFT policy's (the monitor's first
    measurement, before any update). null: off."""
    min_correlation: float | None = bounded("in [-1, 1]")
    """Trip when the Spearman correlation of proxy and gold scores across the monitored samples falls below this.
    null: off."""
    gold_drop: float | None = bounded("> 0")
    """Trip when the monitored gold score falls this far below its best while the proxy is above its value at that
    best (over-optimisation: Gao et al. 2022). null: off."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every gate, by name (each field but `on_trip`)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "on_trip")

    @property
    def armed(self) -> tuple[str, ...]:
        """The gates set (not null), by name."""
        return tuple(name for name in self.names() if getattr(self, name) is not None)


@dataclass(frozen=True)
class EvaluateConfig:
    max_new_tokens: int = bounded(">= 1")
    """Response budget for every policy."""
    temperature: float = bounded(">= 0")
    """Sampling temperature, the same for every policy (1.0 keeps the KL estimate unbiased)."""
    top_k: int = bounded(">= 0")
    """Top-k filter (0 disables)."""
    top_p: float = bounded("in (0, 1]")
    """Nucleus filter (1.0 disables)."""
    best_of_n: int = bounded(">= 2")
    """N of the Best-of-N baseline (SFT samples ranked by the reward model); smaller powers of 2 are reported too."""
    batch_size: int = bounded(">= 1")
    """Sequences per generate / scoring call."""
    n_shown_samples: int = bounded(">= 0")
    """Test prompts whose completions by every policy appear in reports/eval.md."""
    pass_k: int = bounded(">= 0")
    """Verifier judge: responses sampled per test prompt and policy for `pass_at_1`, `pass_at_<k>` (the unbiased
    estimator), `mean_at_<k>` and `maj_at_<k>` (majority vote over final answers). 0: not measured."""


@dataclass(frozen=True)
class SamplerConfig:
    compile: bool
    """Sample (preferences, PPO rollouts, DPO's frontier, evaluation) with a static KV cache and a compiled decode
    step: the same tokens for the same seed, one compile per batch size (CUDA graphs on GPU). After ~10-15 s of
    compiling per batch size, the benchmark samples 1.07-1.39x faster on a 2-core CPU and 1.4-1.8x on an H200 (see
    docs/benchmarks.md)."""


@dataclass(frozen=True)
class JudgeConfig:
    kind: Literal["vader", "classifier", "reward_model", "verifier"]
    """The gold judge: `vader` (the embedded task's sentiment lexicon), `classifier` (a Hugging Face
    sequence-classification model, scored on `label`), `reward_model` (a one-logit `save_pretrained` model),
    `verifier` (the response's final answer checked against the row's reference answer: `prepare.answer_column`)."""
    path: str | None
    """classifier / reward_model: a hub id (`lvwerra/distilbert-imdb`) or a local `save_pretrained` directory."""
    label: str | None
    """classifier: the label whose score is the gold score (one of the model's `id2label`, e.g. `POSITIVE`)."""
    score: Literal["log_odds", "probability"]
    """classifier: `log_odds` (logit of `label` minus the log-sum-exp of the others) or its `probability`."""
    include_prompt: bool
    """classifier: score prompt + response as one text (false: the response alone, as VADER does)."""
    penalize_repetition: bool
    """vader: multiply the score by the response's share of distinct word bigrams: repeating a positive word, the
    cheapest way to please a lexicon, earns nothing, as with a reader. A stricter gold for studying reward hacking
    (docs/monitor.md); false: VADER alone."""
    batch_size: int = bounded(">= 1")
    """Texts per judge forward pass."""
    max_length: int = bounded(">= 8")
    """Judge tokens per text; longer inputs are truncated (hub classifiers stop at 512)."""
    trust_remote_code: bool
    """Passed to the judge's `from_pretrained`; keep false unless you trust the repository's code."""
    verifier: str
    """verifier: `exact` (normalized final answers equal: the last `\\boxed{}`, else the text after `####`, else the
    last number), `math` (symbolic equivalence by math-verify), or `python:<module>:<function>` (your
    `function(prompt, response, answer) -> float`, imported from the project root only when named)."""
    timeout_s: float = bounded("> 0")
    """verifier: seconds one check may take; a check still running then scores 0 and is counted
    (`*/verifier_timeouts`)."""
    format_pattern: str | None
    """verifier: a regex the response should contain (searched anywhere, e.g. `#### -?\\d+`); null: no format
    reward."""
    format_weight: float = bounded(">= 0")
    """verifier: added to the score of a response that matches `format_pattern`."""


@dataclass(frozen=True)
class Config:
    seed: int = bounded(">= 0")
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
    env: EnvConfig
    monitor: MonitorConfig
    gates: GatesConfig
