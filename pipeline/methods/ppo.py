"""`ppo`: online RL of the SFT policy against the reward model with a KL penalty to the SFT reference, by PPO (GAE
with a value model) or a critic-free estimator (`ppo.advantage_estimator`)."""

from __future__ import annotations

import pandas as pd

from pipeline.config import Config, ConfigError
from pipeline.data.schemas import PROMPT_COMPLETION, read_table
from pipeline.data.tokenization import encode, load_tokenizer
from pipeline.envs.episodes import check_resets
from pipeline.methods.environments import episode_spec, episode_starts
from pipeline.methods.judging import gold_judge
from pipeline.methods.outcome import Outcome
from pipeline.models.build import build_causal_lm, build_reward_model, prepare_for_training
from pipeline.models.lora import merged, parameter_counts
from pipeline.train.hooks import NO_HOOKS, Hooks
from pipeline.train.monitor import MonitorSpec
from pipeline.train.ppo import fit_ppo, summarize_history
from pipeline.train.reward import RewardStats
from pipeline.train.sharding import FSDP


def run_ppo(cfg: Config, *, data_dir: str, sft_dir: str, reward_dir: str, hooks: Hooks = NO_HOOKS) -> Outcome | None:
    """`ppo.rollouts` rollout batches on the train prompts; `Outcome.history` holds every rollout's metrics. None on
    DDP ranks > 0."""
    if cfg.trainer.strategy == FSDP:
        raise ConfigError(
            "trainer.strategy: fsdp is not supported by the ppo stage: each rank samples its own rollouts, and under "
            "FSDP every decoding step is a collective that all ranks must join in lockstep, which rollouts ending at "
            "different lengths break. Run ppo under DDP (trainer.strategy: ddp); sft, reward and dpo run under fsdp"
        )
    ppo = cfg.ppo
    tokenizer = load_tokenizer(sft_dir, trust_remote_code=cfg.model.trust_remote_code)
    train_table = read_table(f"{data_dir}/train.parquet", PROMPT_COMPLETION)
    prompts = train_table["prompt"].unique().tolist()
    train = {"disable_dropout": ppo.disable_dropout}
    policy = prepare_for_training(
        build_causal_lm(cfg.model, tokenizer, path=sft_dir), cfg.model, cfg.trainer, task="CAUSAL_LM", **train
    )
    value_model = None  # critic-free estimators never load one
    if ppo.advantage_estimator == "gae":
        value_model = prepare_for_training(
            build_reward_model(cfg.model, tokenizer, reward_dir), cfg.model, cfg.trainer, task="SEQ_CLS", **train
        )
    counts = parameter_counts(policy)
    counts["model/value_parameters"] = parameter_counts(value_model)["model/parameters"] if value_model else 0.0
    # Under LoRA the reference is the policy with its adapters disabled: no second copy.
    reference = None if cfg.model.lora_r else build_causal_lm(cfg.model, tokenizer, path=sft_dir)
    # With ppo.reward_model_weight 0 (RLVR: the verifier alone) no reward model is loaded or run.
    reward_model, stats = None, RewardStats(mean=0.0, std=1.0)
    if ppo.reward_model_weight:
        reward_model, stats = build_reward_model(cfg.model, tokenizer, reward_dir), RewardStats.read(reward_dir)
    monitor, val_table = monitor_spec(cfg, data_dir, tokenizer)
    judged = [(f"{data_dir}/train.parquet", train_table)]
    judged += [(f"{data_dir}/val.parquet", val_table)] if monitor is not None else []  # the monitor's prompts' answers
    judge = gold_judge(cfg, judged, tokenizer).to("cpu")
    episodes = episode_spec(cfg.env, tokenizer)
    rows = episode_starts(train_table) if episodes is not None else []
    if episodes is not None:
        check_resets(episodes.make_env, rows, episodes.kind)  # a broken environment fails before any training
    module, is_global_zero = fit_ppo(
        policy,
        value_model,
        reference,
        reward_model,
        judge,
        tokenizer,
        encode(tokenizer, prompts),
        ppo,
        cfg.trainer,
        reward_mean=stats.mean,
        reward_std=stats.std,
        reward_heads=stats.heads,
        seed=cfg.seed,
        compiled_sampling=cfg.generation.compile,
        hooks=hooks,
        episodes=episodes,
        rows=rows,
        monitor=monitor,
    )
    if not is_global_zero:
        return None
    rollouts = pd.DataFrame(module.last_samples[: ppo.n_logged_samples])
    watch = module.watch
    return Outcome(
        {**summarize_history(module.history), **counts, **(watch.report() if watch else {})},
        len(module.history),
        merged(module.policy),
        tokenizer,
        module.history,
        {"samples/ppo_rollouts.json": rollouts},
        curves={"monitor": watch.history} if watch else {},
        tags={"gates.tripped": ", ".join(f"{t.gate}@{t.step}" for t in watch.trips)} if watch and watch.trips else {},
    )


def monitor_spec(cfg: Config, data_dir: str, tokenizer) -> tuple[MonitorSpec | None, pd.DataFrame | None]:
    """The monitor's fixed batch (the first `monitor.prompts` distinct validation prompts) and the validation table
    (a verifier judge needs its answers); (None, None) when the monitor is off."""
    if not cfg.monitor.every_n_rollouts:
        return None, None
    val = read_table(f"{data_dir}/val.parquet", PROMPT_COMPLETION)
    prompts = val["prompt"].unique().tolist()
    if len(prompts) < cfg.monitor.prompts:
        raise ConfigError(
            f"monitor.prompts: {cfg.monitor.prompts} exceeds the {len(prompts)} distinct prompts of "
            f"{data_dir}/val.parquet; lower it or raise prepare.n_val"
        )
    ids = encode(tokenizer, prompts[: cfg.monitor.prompts])
    return MonitorSpec(ids, cfg.monitor.every_n_rollouts, cfg.gates, seed=cfg.seed + 1_000_003), val
