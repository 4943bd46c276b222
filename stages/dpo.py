"""DVC stage `dpo`: Direct Preference Optimization of the SFT policy against cached reference log-probs."""

from __future__ import annotations

from pipeline.batches import PairCollator, RowsDataModule, tokenize_pairs
from pipeline.dpo import DPOModule, attach_reference
from pipeline.generation import SamplingParams, sample
from pipeline.judges import gold_scores
from pipeline.logprobs import sequence_kl
from pipeline.models import build_causal_lm, save_model
from pipeline.reports import write_curve
from pipeline.schemas import PREFERENCE_PAIRS, PROMPT_COMPLETION, REFERENCE_LOGPS, read_table
from pipeline.tokenization import load_tokenizer
from pipeline.training import fit_and_validate, optim_args
from stages.common import finish, stage

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
    with stage("dpo", ["seed", "model", "trainer", "dpo"], PATHS) as ctx:
        cfg, dpo, args = ctx.config, ctx.config.dpo, ctx.args
        tokenizer = load_tokenizer(args.sft_dir, trust_remote_code=cfg.model.trust_remote_code)
        rows = {}
        for split in ("train", "val"):
            source = f"{args.pairs_dir}/{split}.parquet"
            pairs = tokenize_pairs(tokenizer, read_table(source, PREFERENCE_PAIRS), dpo.max_length, source)
            cached = read_table(f"{args.reference_dir}/{split}.parquet", REFERENCE_LOGPS)
            rows[split] = attach_reference(pairs, cached, f"{args.reference_dir}/{split}.parquet")
        policy = build_causal_lm(cfg.model, tokenizer, path=args.sft_dir)
        module = DPOModule(policy, beta=dpo.beta, loss_type=dpo.loss, label_smoothing=dpo.label_smoothing,
                           **optim_args(dpo))  # fmt: skip
        collate = PairCollator(tokenizer.pad_token_id, tokenizer.eos_token_id)
        data = RowsDataModule(rows["train"], rows["val"], collate, dpo.batch_size, cfg.seed)
        result = fit_and_validate(module, data, cfg.trainer, dpo, ctx.run.lightning_logger())
        if not result.is_global_zero:
            return
        metrics = result.metrics
        save_model(module.policy, tokenizer, args.model_dir)

        # The x-axis of the DPO paper's frontier: sampled sequence KL to the reference, on held-out prompts.
        prompts = read_table(f"{args.data_dir}/val.parquet", PROMPT_COMPLETION)["prompt"].head(dpo.kl_prompts)
        reference = build_causal_lm(cfg.model, tokenizer, path=args.sft_dir).requires_grad_(False)
        params = SamplingParams(dpo.max_new_tokens, 1.0, 0, 1.0)
        samples = sample(module.policy, tokenizer, prompts.tolist(), params, batch_size=256, seed=cfg.seed)
        reference_samples = sample(reference, tokenizer, prompts.tolist(), params, batch_size=256, seed=cfg.seed)
        metrics["objective/kl"] = float(sequence_kl(module.policy, reference, samples, tokenizer, 256).mean())
        metrics["objective/gold_scores"] = sum(gold_scores(samples.texts)) / len(samples.texts)
        metrics["reference/gold_scores"] = sum(gold_scores(reference_samples.texts)) / len(reference_samples.texts)
        metrics["objective/eos_rate"] = sum(samples.ended) / len(samples.ended)
        ctx.run.log_text("\n".join(f"{p!r} -> {t!r}" for p, t in zip(prompts, samples.texts, strict=True)),
                         "samples/dpo_val_samples.txt")  # fmt: skip
        write_curve(result.history, args.curve)
        finish(ctx, metrics, args.report, [args.model_dir], step=result.step)
        print(f"dpo: {metrics}")


if __name__ == "__main__":
    main()
