"""`dpo`: Direct Preference Optimization (and its family, `dpo.loss`) of the SFT policy against the reference
log-probs the `reference` stage cached, then the sampled KL and gold score on held-out prompts; or, with
`dpo.online_rounds`, online DPO: rounds of pairs the policy samples on fresh prompts, labelled by the reward model
and the judge (`pipeline.train.online`)."""

from __future__ import annotations

import pandas as pd

from pipeline.config import Config
from pipeline.data.schemas import PROMPT_COMPLETION, read_table
from pipeline.data.tokenization import encode, load_tokenizer
from pipeline.eval.policies import sampled_objective
from pipeline.methods.judging import gold_judge
from pipeline.methods.outcome import Outcome
from pipeline.models.build import build_causal_lm, build_reward_model, frozen, inference_device, prepare_for_training
from pipeline.models.generation import SamplingParams, check_room
from pipeline.models.lora import merged, parameter_counts
from pipeline.train.dpo import dpo_rows, fit_dpo, is_unpaired, kl_reference, needs_reference
from pipeline.train.hooks import NO_HOOKS, Hooks
from pipeline.train.online import (
    Labeller,
    Measure,
    fit_online_dpo,
    labelling_weights,
    round_measures,
    steps_per_round,
)
from pipeline.train.reward import RewardStats


def run_dpo(
    cfg: Config,
    *,
    pairs_dir: str,
    reference_dir: str,
    data_dir: str,
    sft_dir: str,
    reward_dir: str,
    hooks: Hooks = NO_HOOKS,
) -> Outcome | None:
    """Train on the train pairs, validate on val, then measure on `dpo.kl_prompts` val prompts. None on ranks > 0.
    With `dpo.online_rounds`: online rounds (`run_online_dpo`), validated on the same val pairs."""
    dpo = cfg.dpo
    if dpo.online_rounds:
        return run_online_dpo(
            cfg,
            pairs_dir=pairs_dir,
            reference_dir=reference_dir,
            data_dir=data_dir,
            sft_dir=sft_dir,
            reward_dir=reward_dir,
            hooks=hooks,
        )
    tokenizer = load_tokenizer(sft_dir, trust_remote_code=cfg.model.trust_remote_code)
    rows = dpo_rows(pairs_dir, reference_dir, tokenizer, dpo, seed=cfg.seed)
    if is_unpaired(dpo.loss):  # KTO: the mismatched responses' reference log-probs, from the SFT weights
        reference = frozen(build_causal_lm(cfg.model, tokenizer, path=sft_dir), inference_device())
        rows = {split: kl_reference(reference, split_rows, tokenizer, dpo) for split, split_rows in rows.items()}
        del reference
    policy = prepare_for_training(
        build_causal_lm(cfg.model, tokenizer, path=sft_dir),
        cfg.model,
        cfg.trainer,
        disable_dropout=dpo.disable_dropout,
        task="CAUSAL_LM",
    )
    val = read_table(f"{data_dir}/val.parquet", PROMPT_COMPLETION).head(dpo.kl_prompts)
    prompts = val["prompt"].tolist()
    check_room(policy, tokenizer, prompts, SamplingParams(dpo.max_new_tokens, 1.0, 0, 1.0, key="dpo.max_new_tokens"))
    counts = parameter_counts(policy)
    module, result = fit_dpo(
        policy,
        tokenizer,
        rows["train"],
        rows["val"],
        dpo,
        cfg.trainer,
        seed=cfg.seed,
        hooks=hooks,
    )
    if not result.is_global_zero:
        return None
    metrics = {**result.metrics, **counts, "reference/cached_logps_used": float(needs_reference(dpo.loss))}
    if is_unpaired(dpo.loss):  # the paper advises lambda_D n_D / (lambda_U n_U) in [1, 4/3]
        desirable = sum(row.desirable for row in rows["train"])
        undesirable = len(rows["train"]) - desirable
        metrics.update({"kto/desirable_rows": float(desirable), "kto/undesirable_rows": float(undesirable)})
        metrics["kto/weighted_ratio"] = dpo.kto_lambda_d * desirable / (dpo.kto_lambda_u * undesirable)
    # The x-axis of the DPO paper's frontier: sampled sequence KL to the reference, on held-out prompts. Under LoRA
    # the reference is the policy with its adapters off (no second copy), so this runs before the merge.
    device = inference_device()
    reference = None if cfg.model.lora_r else frozen(build_causal_lm(cfg.model, tokenizer, path=sft_dir), device)
    objective, samples = sampled_objective(
        module.policy.to(device),
        reference,
        tokenizer,
        prompts,
        gold_judge(cfg, [(f"{data_dir}/val.parquet", val)]),
        max_new_tokens=dpo.max_new_tokens,
        seed=cfg.seed,
        compiled=cfg.generation.compile,
    )
    metrics.update(objective)
    table = pd.DataFrame({"prompt": prompts, "completion": samples.texts, "ended": samples.ended})
    return Outcome(
        metrics, result.step, merged(module.policy), tokenizer, result.history, {"samples/dpo_val_samples.json": table}
    )


def run_online_dpo(
    cfg: Config, *, pairs_dir: str, reference_dir: str, data_dir: str, sft_dir: str, reward_dir: str, hooks: Hooks
) -> Outcome | None:
    """`dpo.online_rounds` rounds on the train prompts past the `preferences.train_prompts` the pairs came from,
    `dpo.online_prompts` each; every round's labelling and measurement in the metrics (`round<r>/*`). None on ranks
    > 0."""
    dpo = cfg.dpo
    tokenizer = load_tokenizer(sft_dir, trust_remote_code=cfg.model.trust_remote_code)
    train = read_table(f"{data_dir}/train.parquet", PROMPT_COMPLETION)
    fresh = list(train["prompt"].unique()[cfg.preferences.train_prompts :])
    wanted = dpo.online_rounds * dpo.online_prompts
    if len(fresh) < wanted:
        raise ValueError(
            f"dpo.online_rounds x dpo.online_prompts = {dpo.online_rounds} x {dpo.online_prompts} = {wanted} fresh "
            f"train prompts, but {data_dir}/train.parquet has {len(fresh)} past the preferences.train_prompts = "
            f"{cfg.preferences.train_prompts} the pairs came from; lower either, or prepare more (prepare.n_train)"
        )
    val = read_table(f"{data_dir}/val.parquet", PROMPT_COMPLETION).head(dpo.kl_prompts)
    prompts = val["prompt"].tolist()
    # a verifier also keys answers by the prompts' decoded tokens, as a round's samples see them (as ppo's rollouts)
    judge = gold_judge(cfg, [(f"{data_dir}/train.parquet", train), (f"{data_dir}/val.parquet", val)], tokenizer)
    device = inference_device()
    policy = prepare_for_training(
        build_causal_lm(cfg.model, tokenizer, path=sft_dir),
        cfg.model,
        cfg.trainer,
        disable_dropout=dpo.disable_dropout,
        task="CAUSAL_LM",
    )
    fresh_ids = encode(tokenizer, fresh[:wanted])
    params = SamplingParams(dpo.max_new_tokens, 1.0, 0, 1.0, key="dpo.max_new_tokens")
    check_room(policy, tokenizer, fresh[:wanted] + prompts, params)
    counts = parameter_counts(policy)
    reference = None if cfg.model.lora_r else frozen(build_causal_lm(cfg.model, tokenizer, path=sft_dir), device)
    reward_model, stats = None, RewardStats(mean=0.0, std=1.0)
    if dpo.online_reward_model_weight:
        reward_model = frozen(build_reward_model(cfg.model, tokenizer, reward_dir), device)
        stats = RewardStats.read(reward_dir)
    weights = labelling_weights(dpo, stats)
    labeller = Labeller(tokenizer, fresh_ids, reference, reward_model, judge, weights, dpo, cfg.seed)
    measure = Measure(tokenizer, prompts, reference, judge, dpo.max_new_tokens, cfg.seed)
    val_pairs = dpo_rows(pairs_dir, reference_dir, tokenizer, dpo, seed=cfg.seed)["val"]
    module, data, result = fit_online_dpo(
        policy, tokenizer, labeller, measure, val_pairs, dpo, cfg.trainer, seed=cfg.seed, hooks=hooks
    )
    if not result.is_global_zero:
        return None
    objective, samples = measure(module.policy.to(device))  # the last round's measurement
    if hooks.logger:  # the end of the MLflow `round/*` series the earlier rounds logged
        hooks.logger.log_metrics({f"round/{k}": v for k, v in round_measures(objective).items()}, step=result.step)
    measured = {int(r["round"]): r for r in module.rounds}
    measured[dpo.online_rounds] = {"step": float(result.step), **round_measures(objective)}
    metrics = {**result.metrics, **counts, **objective, "reference/cached_logps_used": float(needs_reference(dpo.loss))}
    metrics["online/steps_per_round"] = float(steps_per_round(dpo))
    for labelled in data.rounds:
        index = int(labelled["round"])
        row = {**labelled, **measured.get(index, {})}
        metrics.update({f"round{index}/{key}": value for key, value in row.items() if key != "round"})
    table = pd.DataFrame({"prompt": prompts, "completion": samples.texts, "ended": samples.ended})
    return Outcome(
        metrics, result.step, merged(module.policy), tokenizer, result.history, {"samples/dpo_val_samples.json": table}
    )
