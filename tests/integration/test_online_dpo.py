"""Online DPO rounds on a tiny model: each round samples fresh prompts with the current policy, the judge labels
best against worst, the reference scores the pairs, and the round trains on them; each round is logged."""

import dataclasses

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.data.batches import PairCollator
from pipeline.data.tokenization import encode
from pipeline.losses.rewards import RewardWeights
from pipeline.models.build import build_causal_lm
from pipeline.models.judges import VaderJudge
from pipeline.models.reference import attach_reference, pair_logps, reference_logps
from pipeline.track.tracking import StageRun
from pipeline.train.hooks import Hooks
from pipeline.train.online import Labeller, Measure, fit_online_dpo
from tests.defaults import default_section
from tests.integration.helpers import changed, params_snapshot, saved_tiny_model, tiny_pairs


def _sft_and_val_pairs(model_cfg, tokenizer, reviews, tmp_path, n_val: int):
    """A tiny saved SFT model as the policy and as the frozen reference, the pair collator, and `n_val` validation
    pairs carrying the reference's log-probs."""
    path = saved_tiny_model(model_cfg, tokenizer, tmp_path / "sft")
    reference = build_causal_lm(model_cfg, tokenizer, path=path).requires_grad_(False)
    policy = build_causal_lm(model_cfg, tokenizer, path=path)
    collate = PairCollator(tokenizer.pad_token_id, tokenizer.eos_token_id)
    val = tiny_pairs(tokenizer, reviews, n_val, offset=200)
    val = attach_reference(val, reference_logps(reference, val, collate, batch_size=n_val), "val")
    return policy, reference, collate, val


def test_online_rounds_label_with_the_judge_and_train_round_after_round(
    model_cfg, cpu_trainer_cfg, tokenizer, reviews, tmp_path, tracking
):
    policy, reference, collate, val = _sft_and_val_pairs(model_cfg, tokenizer, reviews, tmp_path, 8)
    cfg = dataclasses.replace(
        default_section("dpo"),
        lr=1e-2,
        warmup_steps=1,
        max_steps=6,  # 3 a round
        val_every_n_steps=3,
        batch_size=4,
        max_new_tokens=10,
        online_rounds=2,
        online_prompts=6,
        online_k=3,
    )
    judge = VaderJudge()
    labeller = Labeller(
        tokenizer,
        encode(tokenizer, [r.prompt for r in reviews[:12]]),
        reference,
        None,  # the judge alone labels (online_reward_model_weight 0)
        judge,
        RewardWeights(reward_model_weight=0.0, judge_weight=1.0, missing_eos_penalty=0.0),
        cfg,
        seed=3,
    )
    prompts = [r.prompt for r in reviews[300:306]]
    measure = Measure(tokenizer, prompts, reference, judge, 10, seed=5)
    before_policy, before_reference = params_snapshot(policy), params_snapshot(reference)

    # The first round's pairs, labelled from the SFT weights: the judge's best over its worst, reference attached.
    first, stats = labeller(policy, 0)
    assert stats["pairs"] == len(first) > 0 and stats["pairs"] + stats["ties"] == 6
    assert all(p.chosen_gold > p.rejected_gold for p in first)
    assert {tuple(p.prompt_ids) for p in first} <= {tuple(ids) for ids in labeller.prompts(0)}
    live_chosen, _ = pair_logps(reference, collate(first))
    torch.testing.assert_close(torch.tensor([p.reference_chosen_logps for p in first]).float(), live_chosen)
    assert not set(map(tuple, labeller.prompts(0))) & set(map(tuple, labeller.prompts(1)))  # fresh prompts a round
    tied = dataclasses.replace(labeller, cfg=dataclasses.replace(cfg, online_min_gap=100.0))
    with pytest.raises(ValueError, match=r"round 1's 6 prompts gave no pair: 6 tied \(their 3 samples scored within "):
        tied(policy, 0)

    with StageRun(tracking, "dpo", {}, {}) as run:
        module, data, result = fit_online_dpo(
            policy, tokenizer, labeller, measure, val, cfg, cpu_trainer_cfg, seed=0, hooks=Hooks(run.lightning_logger())
        )
    assert result.step == 6
    assert changed(before_policy, module.policy) == set(before_policy)
    assert changed(before_reference, reference) == set()
    assert [r["round"] for r in data.rounds] == [1.0, 2.0]
    assert data.rounds[0]["pairs"] == stats["pairs"]  # round 1 sampled from the SFT weights, as above
    assert data.rounds[1]["gold_mean"] != data.rounds[0]["gold_mean"]  # round 2 sampled from the trained policy
    assert [r["round"] for r in module.rounds] == [1.0]  # the stage measures the last round after training
    assert module.rounds[0]["step"] == 3.0 and 0.0 <= module.rounds[0]["win_rate"] <= 1.0
    client = MlflowClient(tracking.tracking_uri)
    assert [m.step for m in client.get_metric_history(run.run_id, "round/pairs")] == [0, 3]
    assert [m.step for m in client.get_metric_history(run.run_id, "round/win_rate")] == [3]
    assert {"train/loss", "val/loss", "val/rewards/accuracies"} <= set(client.get_run(run.run_id).data.metrics)


def test_too_few_fresh_prompts_fail_before_training_naming_the_keys(model_cfg, tokenizer, reviews, tmp_path):
    import pandas as pd

    from pipeline.config import load_config, read_params
    from pipeline.files import write_parquet
    from pipeline.methods.dpo import run_dpo
    from tests.defaults import ROOT

    sft = saved_tiny_model(model_cfg, tokenizer, tmp_path / "sft")
    data = tmp_path / "prepared"
    some = reviews[:40]
    rows = pd.DataFrame({"prompt": [r.prompt for r in some], "completion": [r.completion for r in some]})
    write_parquet(rows.assign(gold=0.0), data / "train.parquet")
    cfg = load_config(read_params(ROOT / "params.yaml"))
    cfg = dataclasses.replace(
        cfg,
        model=model_cfg,
        preferences=dataclasses.replace(cfg.preferences, train_prompts=30),
        dpo=dataclasses.replace(cfg.dpo, online_rounds=3, online_prompts=4),
    )
    fresh = len(rows["prompt"].unique()) - 30
    with pytest.raises(ValueError) as info:
        run_dpo(cfg, pairs_dir="none", reference_dir="none", data_dir=str(data), sft_dir=sft, reward_dir="none")
    assert str(info.value) == (
        f"dpo.online_rounds x dpo.online_prompts = 3 x 4 = 12 fresh train prompts, but {data}/train.parquet has "
        f"{fresh} past the preferences.train_prompts = 30 the pairs came from; lower either, or prepare more "
        "(prepare.n_train)"
    )


def test_every_rounds_end_is_checkpointed_whatever_the_stages_cadence(
    model_cfg, cpu_trainer_cfg, tokenizer, reviews, tmp_path
):
    from stages.checkpoints import Checkpoints

    published = []

    class Recorded(Checkpoints):
        def publish(self, staged, done, run_id, *, final=False):
            published.append((done, final))
            return super().publish(staged, done, run_id, final=final)

    policy, reference, _, val = _sft_and_val_pairs(model_cfg, tokenizer, reviews, tmp_path, 4)
    cfg = dataclasses.replace(
        default_section("dpo"), warmup_steps=1, max_steps=6, val_every_n_steps=3, batch_size=4, max_new_tokens=8
    )
    cfg = dataclasses.replace(cfg, online_rounds=2, online_prompts=4, online_k=2)
    weights = RewardWeights(reward_model_weight=0.0, judge_weight=1.0, missing_eos_penalty=0.0)
    prompts = encode(tokenizer, [r.prompt for r in reviews[:8]])
    labeller = Labeller(tokenizer, prompts, reference, None, VaderJudge(), weights, cfg, seed=3)
    folder = Recorded(tmp_path / "checkpoints", every_n=100, keep=True)  # the stage's cadence: longer than a round
    hooks = Hooks(checkpoints=folder)
    fit_online_dpo(policy, tokenizer, labeller, None, val, cfg, cpu_trainer_cfg, seed=0, hooks=hooks)
    assert published == [(3, False), (6, False), (6, True)]  # round 1's end, round 2's end, the end of training
