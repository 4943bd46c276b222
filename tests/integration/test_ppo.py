import dataclasses

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch.utils.data import DataLoader

from pipeline.data.tokenization import encode
from pipeline.envs.guess import Guess
from pipeline.eval.gates import GateTripped
from pipeline.losses.rewards import shape_rewards
from pipeline.models.build import build_causal_lm, build_reward_model, prepare_for_training, save_model
from pipeline.models.judges import VaderJudge
from pipeline.track.tracking import StageRun
from pipeline.train.monitor import MonitorSpec
from pipeline.train.ppo import PPOHealthError, PPOModule, PromptBatches
from pipeline.train.trainer import build_trainer
from tests.defaults import default_section
from tests.integration.helpers import changed, params_snapshot, saved_tiny_model

METRICS = [
    "objective/kl", "objective/entropy", "objective/scores", "objective/non_score_reward", "objective/rlhf_reward",
    "objective/kl_coef", "policy/approxkl_avg", "policy/clipfrac_avg", "policy/entropy_avg", "loss/policy_avg",
    "loss/value_avg", "val/clipfrac_avg", "val/ratio", "val/num_eos_tokens", "objective/gold_scores",
    "perf/tokens_per_s",
]  # fmt: skip


def _ppo_cfg(**overrides):
    base = default_section("ppo")
    small = dict(
        rollouts=3,
        prompts_per_rollout=8,
        minibatch_size=4,
        ppo_epochs=2,
        max_new_tokens=6,
        min_eos_rate=0.0,
        warmup_rollouts=1,
        lr=1e-3,
        value_lr=1e-3,
        kl_control="adaptive",
    )
    return dataclasses.replace(base, **{**small, **overrides})


def _module(model_cfg, tokenizer, tmp_path, cfg, **extra):
    sft = saved_tiny_model(model_cfg, tokenizer, tmp_path / "sft")
    reward = build_reward_model(model_cfg, tokenizer, sft)
    save_model(reward, tokenizer, tmp_path / "reward")
    critic = cfg.advantage_estimator == "gae"
    return PPOModule(
        policy=build_causal_lm(model_cfg, tokenizer, path=sft),
        value_model=build_reward_model(model_cfg, tokenizer, str(tmp_path / "reward")) if critic else None,
        reference=build_causal_lm(model_cfg, tokenizer, path=sft),
        reward_model=build_reward_model(model_cfg, tokenizer, str(tmp_path / "reward")),
        judge=VaderJudge(),
        tokenizer=tokenizer,
        cfg=cfg,
        reward_mean=0.0,
        reward_std=1.0,
        seed=0,
        **extra,
    )


def _fit(module, cpu_trainer_cfg, tokenizer, reviews, logger=False):
    prompt_ids = encode(tokenizer, [r.prompt for r in reviews[:40]])
    cfg = module.cfg
    loader = DataLoader(
        prompt_ids, batch_sampler=PromptBatches(40, cfg.prompts_per_rollout, cfg.rollouts, 0), collate_fn=list
    )
    trainer = build_trainer(
        cpu_trainer_cfg, max_steps=-1, max_epochs=1, val_every_n_steps=None, grad_clip=0.0, logger=logger
    )
    trainer.fit(module, train_dataloaders=loader)


def test_ppo_updates_policy_and_value_only_and_logs_every_metric(
    model_cfg, cpu_trainer_cfg, tokenizer, reviews, tmp_path, tracking
):
    module = _module(model_cfg, tokenizer, tmp_path, _ppo_cfg())
    policy, value = params_snapshot(module.policy), params_snapshot(module.value_model)
    reference, reward = params_snapshot(module.reference), params_snapshot(module.reward_model)
    with StageRun(tracking, "ppo", {}, {}) as run:
        _fit(module, cpu_trainer_cfg, tokenizer, reviews, run.lightning_logger())
    assert len(changed(policy, module.policy)) > len(policy) // 2
    assert len(changed(value, module.value_model)) > len(value) // 2
    assert changed(reference, module.reference) == set() and changed(reward, module.reward_model) == set()
    client = MlflowClient(tracking.tracking_uri)
    assert set(METRICS) <= set(client.get_run(run.run_id).data.metrics)
    assert [m.step for m in client.get_metric_history(run.run_id, "objective/kl")] == [0, 1, 2]
    assert len(module.history) == 3 and len(module.last_samples) == 8


@pytest.mark.parametrize(
    ("estimator", "kl_in"), [("grpo", "loss"), ("dr_grpo", "loss"), ("rloo", "reward"), ("reinforce_pp", "reward")]
)
def test_critic_free_estimators_train_the_policy_alone(
    estimator, kl_in, model_cfg, cpu_trainer_cfg, tokenizer, reviews, tmp_path, tracking
):
    cfg = _ppo_cfg(
        advantage_estimator=estimator,
        num_generations=3,
        prompts_per_rollout=4,
        minibatch_size=6,
        kl_in=kl_in,
        kl_control="fixed",
    )
    module = _module(model_cfg, tokenizer, tmp_path, cfg)
    policy, reference = params_snapshot(module.policy), params_snapshot(module.reference)
    with StageRun(tracking, "ppo", {}, {}) as run:
        _fit(module, cpu_trainer_cfg, tokenizer, reviews, run.lightning_logger())
    assert module.value_model is None and len(module.trainer.optimizers) == 1  # no critic, no critic optimizer
    assert len(changed(policy, module.policy)) > len(policy) // 2
    assert changed(reference, module.reference) == set()
    # 4 prompts x 3 samples, each prompt's samples consecutive
    prompts = [sample["prompt"] for sample in module.last_samples]
    assert len(prompts) == 12 and all(len(set(prompts[i : i + 3])) == 1 for i in range(0, 12, 3))
    logged = set(MlflowClient(tracking.tracking_uri).get_run(run.run_id).data.metrics)
    assert "loss/value_avg" not in logged and {"loss/policy_avg", "objective/kl", "objective/gold_scores"} <= logged
    assert ("loss/kl_avg" in logged) == (kl_in == "loss")
    if estimator != "reinforce_pp":
        assert {"objective/reward_std", "objective/frac_reward_zero_std"} <= logged
    if kl_in == "loss":  # the reward carries no KL penalty then
        assert all(row["objective/non_score_reward"] == 0 for row in module.history)


def test_health_gate_on_eos_rate_names_the_params(model_cfg, cpu_trainer_cfg, tokenizer, reviews, tmp_path):
    module = _module(model_cfg, tokenizer, tmp_path, _ppo_cfg(min_eos_rate=1.0))  # an untrained model rarely ends
    with pytest.raises(
        PPOHealthError,
        match=r"responses ended with EOS, under ppo\.min_eos_rate = 1\.0; raise "
        r"ppo\.missing_eos_penalty",
    ):
        _fit(module, cpu_trainer_cfg, tokenizer, reviews)


def test_health_gate_on_importance_ratio(model_cfg, cpu_trainer_cfg, tokenizer, reviews, tmp_path):
    module = _module(model_cfg, tokenizer, tmp_path, _ppo_cfg(max_ratio=1.0, lr=0.05, ppo_epochs=4))
    with pytest.raises(PPOHealthError, match=r"mean importance ratio .* exceeds ppo\.max_ratio = 1\.0 at rollout 0"):
        _fit(module, cpu_trainer_cfg, tokenizer, reviews)


def test_accumulated_micro_batches_give_the_minibatch_update(model_cfg, cpu_trainer_cfg, tokenizer, reviews, tmp_path):
    modules = []
    for accumulate in (1, 2):
        module = _module(model_cfg, tokenizer, tmp_path / f"acc{accumulate}", _ppo_cfg(rollouts=2, kl_control="fixed"))
        module.accumulate = accumulate
        _fit(module, cpu_trainer_cfg, tokenizer, reviews)
        modules.append(module)
    for model in ("policy", "value_model"):
        for (name, a), b in zip(
            getattr(modules[0], model).named_parameters(), getattr(modules[1], model).parameters(), strict=True
        ):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{model}.{name}")


def test_lora_ppo_holds_one_policy_copy(model_cfg, cpu_trainer_cfg, tokenizer, reviews, tmp_path):
    lora_cfg = dataclasses.replace(model_cfg, lora_r=4)
    sft = saved_tiny_model(model_cfg, tokenizer, tmp_path / "sft")
    save_model(build_reward_model(model_cfg, tokenizer, sft), tokenizer, tmp_path / "reward")
    policy = prepare_for_training(
        build_causal_lm(lora_cfg, tokenizer, path=sft),
        lora_cfg,
        cpu_trainer_cfg,
        disable_dropout=True,
        task="CAUSAL_LM",
    )
    value = prepare_for_training(
        build_reward_model(lora_cfg, tokenizer, str(tmp_path / "reward")),
        lora_cfg,
        cpu_trainer_cfg,
        disable_dropout=True,
        task="SEQ_CLS",
    )
    reward = build_reward_model(lora_cfg, tokenizer, str(tmp_path / "reward"))
    module = PPOModule(
        policy=policy,
        value_model=value,
        reference=None,
        reward_model=reward,
        judge=VaderJudge(),
        tokenizer=tokenizer,
        cfg=_ppo_cfg(rollouts=1),
        reward_mean=0.0,
        reward_std=1.0,
        seed=0,
    )
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(module) == count(policy) + count(value) + count(reward)  # no reference copy anywhere
    frozen = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    _fit(module, cpu_trainer_cfg, tokenizer, reviews)
    assert all(torch.equal(dict(policy.named_parameters())[n], p) for n, p in frozen.items())
    assert module.history[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # first rollout: policy == reference


class Wordy(Guess):
    """The guessing game, with a reward for every character of a turn too: rewards that differ within a group."""

    def step(self, action):
        step = super().step(action)
        return dataclasses.replace(step, reward=step.reward + 0.1 * len(action))


def _guess_module(model_cfg, tokenizer, tmp_path, cfg):
    from pipeline.envs.episodes import Budgets, EpisodeSpec

    sft = saved_tiny_model(model_cfg, tokenizer, tmp_path / "sft")
    # a random model rarely writes EOS: most tokens end a turn here, so episodes last several turns
    spec = EpisodeSpec(
        Wordy, "wordy", Budgets(4, 6, 80), timeout_s=5.0, tool_stops=tuple(range(2, 400)), reward_weight=1.0
    )
    return PPOModule(
        policy=build_causal_lm(model_cfg, tokenizer, path=sft),
        value_model=build_reward_model(model_cfg, tokenizer, sft) if cfg.advantage_estimator == "gae" else None,
        reference=build_causal_lm(model_cfg, tokenizer, path=sft),
        reward_model=None,
        judge=VaderJudge(),
        tokenizer=tokenizer,
        cfg=cfg,
        reward_mean=0.0,
        reward_std=1.0,
        seed=0,
        episodes=spec,
    )


ENV_CFG = {"reward_model_weight": 0.0, "judge_weight": 0.0, "missing_eos_penalty": 0.0, "kl_control": "fixed"}
GUESS_ROWS = [{"prompt": "Guess my number from 1 to 32.", "answer": secret} for secret in range(1, 33)]


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_an_environment_rollout_trains_and_scores_the_policy_tokens_only(
    estimator, model_cfg, cpu_trainer_cfg, tokenizer, tmp_path
):
    groups = {"num_generations": 2, "minibatch_size": 8} if estimator == "grpo" else {}
    cfg = _ppo_cfg(advantage_estimator=estimator, prompts_per_rollout=4, **ENV_CFG, **groups)
    module = _guess_module(model_cfg, tokenizer, tmp_path, cfg)
    rollout, stats, samples = module.make_rollout(GUESS_ROWS[:4], step=0)
    observed = (rollout.attention_mask[:, 1:] > 0) & (rollout.mask == 0)  # trajectory tokens the policy did not write
    observed[:, : min(len(p) for p in samples.prompt_ids) - 1] = False  # (the first observation, the prompt)
    assert observed.any() and stats["env/turns"] > 1  # observations between turns
    assert not rollout.advantages[rollout.mask == 0].any()  # no advantage on an observation or the prompt
    if rollout.returns is not None:
        assert not rollout.returns[rollout.mask == 0].any()
    assert {"env/reward", "env/success", "env/call_errors", "env/truncated_turns", "env/truncated_tokens"} <= set(stats)

    policy = params_snapshot(module.policy)
    loader = DataLoader(GUESS_ROWS, batch_sampler=PromptBatches(32, cfg.prompts_per_rollout, 2, 0), collate_fn=list)
    trainer = build_trainer(
        cpu_trainer_cfg, max_steps=-1, max_epochs=1, val_every_n_steps=None, grad_clip=0.0, logger=False
    )
    trainer.fit(module, train_dataloaders=loader)
    assert len(module.history) == 2 and all("env/turns" in row for row in module.history)
    assert len(changed(policy, module.policy)) > len(policy) // 2


def _monitor(tokenizer, reviews, every=1, **gates):
    prompt_ids = encode(tokenizer, [r.prompt for r in reviews[40:48]])  # not among the 40 prompts trained on
    return MonitorSpec(prompt_ids, every, default_section("gates", **gates), seed=7)


def test_the_monitor_measures_logs_and_leaves_training_as_it_was(
    model_cfg, cpu_trainer_cfg, tokenizer, reviews, tmp_path, tracking
):
    plain = _module(model_cfg, tokenizer, tmp_path / "plain", _ppo_cfg())
    _fit(plain, cpu_trainer_cfg, tokenizer, reviews)
    watched = _module(model_cfg, tokenizer, tmp_path / "watched", _ppo_cfg(), monitor=_monitor(tokenizer, reviews))
    with StageRun(tracking, "ppo", {}, {}) as run:
        _fit(watched, cpu_trainer_cfg, tokenizer, reviews, run.lightning_logger())
    for (name, a), b in zip(plain.policy.named_parameters(), watched.policy.parameters(), strict=True):
        assert torch.equal(a, b), name  # the monitor's draws are its own
    history = watched.watch.history
    assert [p["step"] for p in history] == [0.0, 1.0, 2.0, 3.0]  # every rollout, and after the last
    assert history[0]["monitor/kl"] == 0.0 and history[0]["monitor/length_ratio"] == 1.0  # the SFT policy itself
    assert history[-1]["monitor/kl"] > 0.0
    client = MlflowClient(tracking.tracking_uri)
    for key in ("monitor/proxy", "monitor/gold", "monitor/kl", "monitor/length_ratio", "monitor/gap"):
        assert [m.step for m in client.get_metric_history(run.run_id, key)] == [0, 1, 2, 3], key
    assert watched.watch.trips == [] and watched.watch.report()["gates/tripped"] == 0.0


def test_a_warn_gate_logs_its_trip_and_training_finishes(model_cfg, cpu_trainer_cfg, tokenizer, reviews, tmp_path):
    module = _module(model_cfg, tokenizer, tmp_path, _ppo_cfg(), monitor=_monitor(tokenizer, reviews, max_kl=0.0))
    _fit(module, cpu_trainer_cfg, tokenizer, reviews)
    assert len(module.history) == 3  # every rollout ran
    (trip,) = module.watch.trips  # any update moves the policy off its reference: past a KL of 0 at rollout 1
    assert (trip.gate, trip.step) == ("max_kl", 1) and trip.value > 0.0


def test_a_stop_gate_ends_training_and_the_policy_is_the_best_measured(
    model_cfg, cpu_trainer_cfg, tokenizer, reviews, tmp_path
):
    monitor = _monitor(tokenizer, reviews, every=2, on_trip="stop", max_kl=0.0)
    module = _module(model_cfg, tokenizer, tmp_path, _ppo_cfg(rollouts=6), monitor=monitor)
    sft = params_snapshot(module.policy)
    _fit(module, cpu_trainer_cfg, tokenizer, reviews)
    module.restore_best()  # what fit_ppo does after fitting
    watch = module.watch
    assert watch.stopped_at == 2 and len(module.history) == 2  # measured at 0 and 2; no rollout after the trip
    best = max(watch.history, key=lambda p: p["monitor/gold"])
    assert watch.best_step == best["step"]
    moved = changed(sft, module.policy)
    assert (moved == set()) == (watch.best_step == 0)  # the SFT weights themselves when SFT scored best
    assert watch.report()["gates/model_step"] == watch.best_step


def test_a_fail_gate_names_the_gate_threshold_value_and_step(model_cfg, cpu_trainer_cfg, tokenizer, reviews, tmp_path):
    monitor = _monitor(tokenizer, reviews, on_trip="fail", max_length_ratio=0.5)  # SFT's own length is 1.0x
    module = _module(model_cfg, tokenizer, tmp_path, _ppo_cfg(), monitor=monitor)
    with pytest.raises(GateTripped, match=r"gates.max_length_ratio: .* exceeds 0.5 at rollout 0 \(value 1\)"):
        _fit(module, cpu_trainer_cfg, tokenizer, reviews)
    assert module.history == []  # nothing trained


def test_an_ensemble_reward_is_combined_conservatively_and_its_spread_logged(
    model_cfg, cpu_trainer_cfg, tokenizer, reviews, tmp_path
):
    sft = saved_tiny_model(model_cfg, tokenizer, tmp_path / "sft")
    save_model(build_reward_model(model_cfg, tokenizer, sft, heads=3), tokenizer, tmp_path / "reward")
    cfg = _ppo_cfg(advantage_estimator="grpo", num_generations=2, prompts_per_rollout=4, ensemble_combine="min")
    module = PPOModule(
        policy=build_causal_lm(model_cfg, tokenizer, path=sft),
        value_model=None,
        reference=build_causal_lm(model_cfg, tokenizer, path=sft),
        reward_model=build_reward_model(model_cfg, tokenizer, str(tmp_path / "reward")),  # its three heads
        judge=VaderJudge(),
        tokenizer=tokenizer,
        cfg=cfg,
        reward_mean=0.0,
        reward_std=1.0,
        reward_heads=((0.0, 1.0), (0.1, 2.0), (-0.1, 0.5)),
        seed=0,
        monitor=_monitor(tokenizer, reviews, every=2),
    )
    _fit(module, cpu_trainer_cfg, tokenizer, reviews)
    assert all(row["objective/ensemble_std"] > 0.0 for row in module.history)  # three heads never agree exactly
    assert all(point["monitor/ensemble_std"] > 0.0 for point in module.watch.history)
    ids = encode(tokenizer, [r.prompt + r.completion for r in reviews[:4]])
    batch = torch.tensor([row[:8] for row in ids])
    raw = module._reward_scores(batch, torch.ones_like(batch))
    assert raw.shape == (4, 3)
    heads = (raw - torch.tensor([0.0, 0.1, -0.1])) / torch.tensor([1.0, 2.0, 0.5])  # each head's own stats
    shaped = shape_rewards(
        torch.zeros(4, 7),
        torch.ones(4, 7),
        torch.ones(4, dtype=torch.bool),
        reward_model_scores=raw,
        judge_scores=torch.zeros(4),
        weights=module.reward_weights,
        kl_coef=None,
    )
    torch.testing.assert_close(shaped.scores, heads.clamp(-10.0, 10.0).amin(1))  # ppo.ensemble_combine: min
