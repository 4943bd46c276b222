"""DVC stage `dpo`: Direct Preference Optimization of the SFT policy against cached reference log-probs."""

from __future__ import annotations

import pandas as pd

from pipeline.data.schemas import PROMPT_COMPLETION, read_table
from pipeline.data.tokenization import load_tokenizer
from pipeline.eval.policies import sampled_objective
from pipeline.eval.reports import write_curve
from pipeline.models.build import build_causal_lm, frozen, prepare_for_training, save_model
from pipeline.models.generation import SamplingParams, check_room
from pipeline.models.judges import build_judge
from pipeline.models.lora import parameter_counts
from pipeline.train.dpo import dpo_rows, fit_dpo, reads_reference
from stages.common import finish, inference_device, stage

PATHS = {
    "pairs_dir": "data/preferences",
    "reference_dir": "data/reference",
    "data_dir": "data/prepared",
    "sft_dir": "models/sft",
    "model_dir": "models/dpo",
    "report": "reports/dpo.json",
    "curve": "reports/plots/dpo.csv",
}


def main() -> None:
    with stage("dpo", PATHS, inputs=("pairs_dir", "reference_dir", "data_dir", "sft_dir")) as ctx:
        cfg, dpo, args = ctx.config, ctx.config.dpo, ctx.args
        tokenizer = load_tokenizer(args.sft_dir, trust_remote_code=cfg.model.trust_remote_code)
        rows = {s: dpo_rows(args.pairs_dir, args.reference_dir, s, tokenizer, dpo) for s in ("train", "val")}
        policy = prepare_for_training(build_causal_lm(cfg.model, tokenizer, path=args.sft_dir), cfg.model, cfg.trainer,
                                      disable_dropout=dpo.disable_dropout, task="CAUSAL_LM")  # fmt: skip
        prompts = read_table(f"{args.data_dir}/val.parquet", PROMPT_COMPLETION)["prompt"].head(dpo.kl_prompts).tolist()
        kl_sampling = SamplingParams(dpo.max_new_tokens, 1.0, 0, 1.0, key="dpo.max_new_tokens")
        check_room(policy, tokenizer, prompts, kl_sampling)  # before training, not after it
        counts = parameter_counts(policy)
        module, result = fit_dpo(policy, tokenizer, rows["train"], rows["val"], dpo, cfg.trainer, seed=cfg.seed,
                                 logger=ctx.run.lightning_logger(), resume=ctx.resume_callback,
                                 ckpt_path=ctx.resume_from)  # fmt: skip
        if not result.is_global_zero:
            return
        metrics = {**result.metrics, **counts, "reference/cached_logps_used": float(reads_reference(dpo))}

        # The x-axis of the DPO paper's frontier: sampled sequence KL to the reference, on held-out prompts. Under
        # LoRA the reference is the policy with its adapters off (no second copy), so this runs before the merge.
        device = inference_device()
        reference = None
        if not cfg.model.lora_r:
            reference = frozen(build_causal_lm(cfg.model, tokenizer, path=args.sft_dir), device)
        objective, samples = sampled_objective(
            module.policy.to(device), reference, tokenizer, prompts, build_judge(cfg.judge).to(device),
            max_new_tokens=dpo.max_new_tokens, seed=cfg.seed, compiled=cfg.generation.compile,
        )  # fmt: skip
        metrics.update(objective)
        save_model(module.policy, tokenizer, args.model_dir)
        ctx.run.log_table(pd.DataFrame({"prompt": prompts, "completion": samples.texts, "ended": samples.ended}),
                          "samples/dpo_val_samples.json")  # fmt: skip
        write_curve(result.history, args.curve)
        finish(ctx, metrics, args.report, [args.model_dir], step=result.step)
        print(f"dpo: {metrics}")


if __name__ == "__main__":
    main()
