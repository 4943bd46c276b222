"""`dpo`: Direct Preference Optimization (and its family, `dpo.loss`) of the SFT policy against the reference
log-probs the `reference` stage cached, then the sampled KL and gold score on held-out prompts."""

from __future__ import annotations

import pandas as pd

from pipeline.config import Config
from pipeline.data.schemas import PROMPT_COMPLETION, read_table
from pipeline.data.tokenization import load_tokenizer
from pipeline.eval.policies import sampled_objective
from pipeline.methods.judging import gold_judge
from pipeline.methods.outcome import Outcome
from pipeline.models.build import build_causal_lm, frozen, inference_device, prepare_for_training
from pipeline.models.generation import SamplingParams, check_room
from pipeline.models.lora import merged, parameter_counts
from pipeline.train.dpo import dpo_rows, fit_dpo, is_unpaired, kl_reference, needs_reference
from pipeline.train.hooks import NO_HOOKS, Hooks


def run_dpo(
    cfg: Config, *, pairs_dir: str, reference_dir: str, data_dir: str, sft_dir: str, hooks: Hooks = NO_HOOKS
) -> Outcome | None:
    """Train on the train pairs, validate on val, then measure on `dpo.kl_prompts` val prompts. None on ranks > 0."""
    dpo = cfg.dpo
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
