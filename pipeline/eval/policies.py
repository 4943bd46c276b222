"""Evaluation of policies on held-out prompts: gold score, reward, KL to SFT, win-rates, length, diversity.

Every policy is sampled on the same test prompts with the same seed and sampling settings. Best-of-N draws N
samples per prompt from the SFT policy and keeps the reward model's favourite; its KL to SFT is the analytic
log N - (N - 1) / N (Stiennon et al. 2020, Appendix G). Win-rates pair each policy's sample with SFT's sample on
the same prompt; ties count half.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from pipeline.config import EvaluateConfig
from pipeline.data.batches import length_sorted_batches, response_batch
from pipeline.models.generation import Samples, SamplingParams, sample
from pipeline.models.judges import Judge, VerifierJudge
from pipeline.models.logprobs import sequence_kl
from pipeline.models.lora import as_reference
from pipeline.models.verifiers import final_answer, lookup_answers, normalize


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation 95 % confidence interval (1.96 standard errors)."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, math.nan
    return mean, 1.96 * statistics.stdev(values) / math.sqrt(n)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant (it ranks nothing)."""
    a, b = pd.Series(np.asarray(x, dtype=float)), pd.Series(np.asarray(y, dtype=float))
    if a.nunique() < 2 or b.nunique() < 2:
        return math.nan
    return float(a.corr(b, method="spearman"))


def win_rate(scores: Sequence[float], baseline: Sequence[float]) -> float:
    """Share of prompts where `scores` beats `baseline` (paired by position); ties count half."""
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline, strict=True))
    return wins / len(scores)


def length_controlled_win_rate(
    scores: Sequence[float],
    baseline: Sequence[float],
    lengths: Sequence[int],
    baseline_lengths: Sequence[int],
    *,
    ridge: float = 1e-3,
) -> float:
    """The win-rate at equal length, as AlpacaEval-LC reads it (Dubois et al. 2024).

    A logistic regression of the (soft: ties 0.5) win on the standardised length difference,
    P(win) = sigmoid(a + b * z), fitted by Newton's method with a small ridge so a perfectly separable set stays
    finite; the answer is sigmoid(a), the win probability when both responses have the same length. A policy that
    wins by being longer scores closer to 0.5 here than in the raw win-rate.
    """
    wins = np.array([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline, strict=True)])
    gap = np.asarray(lengths, dtype=float) - np.asarray(baseline_lengths, dtype=float)
    z = gap / gap.std() if gap.std() > 0 else np.zeros_like(gap)
    features = np.stack([np.ones_like(z), z], axis=1)  # (N, 2)
    coef = np.zeros(2)
    for _ in range(100):
        p = 1 / (1 + np.exp(-features @ coef))
        gradient = features.T @ (p - wins) + ridge * coef
        hessian = features.T @ (features * (p * (1 - p))[:, None]) + ridge * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        coef -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(1 / (1 + np.exp(-coef[0])))


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate from n samples of which c are correct (Chen et al. 2021):
    1 - C(n - c, k) / C(n, k), the chance that k of the n drawn without replacement include a correct one."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_vote(responses: Sequence[str]) -> str | None:
    """The most frequent normalized final answer among `responses` (the first seen wins a tie); None if none has one."""
    answers = [normalize(a) for a in map(final_answer, responses) if a is not None]
    return max(answers, key=answers.count) if answers else None


def accuracy_metrics(
    correct: Sequence[Sequence[float]],
    scores: Sequence[Sequence[float]],
    responses: Sequence[Sequence[str]],
    answers: Sequence[str],
    k: int,
) -> dict[str, float]:
    """Per prompt, `k` responses: their correctness (> 0 counts as correct), judge scores and texts, and the
    reference answers. Returns `pass_at_1`, `pass_at_<k>`, `mean_at_<k>` (the mean judge score) and `maj_at_<k>`
    (the majority-vote answer equals the reference's final answer), each a mean over prompts."""
    counts = [sum(value > 0 for value in row) for row in correct]
    votes = [majority_vote(row) for row in responses]
    wanted = [normalize(final_answer(answer) or answer) for answer in answers]
    return {
        "pass_at_1": statistics.fmean(pass_at_k(k, c, 1) for c in counts),
        f"pass_at_{k}": statistics.fmean(pass_at_k(k, c, k) for c in counts),
        f"mean_at_{k}": statistics.fmean(statistics.fmean(row) for row in scores),
        f"maj_at_{k}": statistics.fmean(float(v is not None and v == w) for v, w in zip(votes, wanted, strict=True)),
    }


def best_of_n_kl(n: int) -> float:
    """Analytic KL(best-of-N || base policy) = log N - (N - 1) / N."""
    return math.log(n) - (n - 1) / n


def best_of_n_index(rewards: torch.Tensor) -> torch.Tensor:
    """Which of the N samples each prompt keeps: the reward model's argmax.

    Args:
        rewards: Shape: (P, N), prompt-major.

    Returns:
        Shape: (P,).
    """
    return rewards.argmax(dim=1)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n: unique word n-grams over all n-grams across the texts (0 when there are none)."""
    grams = [tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@dataclass(frozen=True)
class PolicyResult:
    """What evaluation measured for one policy, and its samples (for reports)."""

    name: str
    texts: list[str]
    gold: list[float]
    rewards: list[float]
    kl: float
    lengths: list[int]
    ended: list[bool]
    stopped_by_context: list[bool]


def samples_table(results: Mapping[str, PolicyResult], prompts: Sequence[str]) -> pd.DataFrame:
    """Every policy's completion of every prompt, long format (policy, prompt, completion, gold, reward, length,
    ended): the table MLflow shows and compares across runs."""
    rows = [
        {
            "policy": name,
            "prompt": prompt,
            "completion": text,
            "gold": gold,
            "reward": reward,
            "length": length,
            "ended": ended,
        }
        for name, result in results.items()
        for prompt, text, gold, reward, length, ended in zip(
            prompts, result.texts, result.gold, result.rewards, result.lengths, result.ended, strict=True
        )
    ]
    return pd.DataFrame(rows)


def summarize(result: PolicyResult, baseline: PolicyResult) -> dict[str, float]:
    """The per-policy metrics, keyed without the policy prefix."""
    gold, gold_ci = mean_ci95(result.gold)
    return {
        "gold_score": gold,
        "gold_score_ci95": gold_ci,
        "reward": statistics.fmean(result.rewards),
        "kl": result.kl,
        "win_rate": win_rate(result.gold, baseline.gold),
        "lc_win_rate": length_controlled_win_rate(result.gold, baseline.gold, result.lengths, baseline.lengths),
        "rm_win_rate": win_rate(result.rewards, baseline.rewards),
        "length": statistics.fmean(result.lengths),
        "eos_rate": sum(result.ended) / len(result.ended),
        "stopped_by_context": float(sum(result.stopped_by_context)),
        "distinct_1": distinct_n(result.texts, 1),
        "distinct_2": distinct_n(result.texts, 2),
    }


def select(samples: Samples, index: Sequence[int]) -> Samples:
    """The samples at `index`, in that order."""
    return Samples(
        [samples.prompt_ids[i] for i in index],
        [samples.completion_ids[i] for i in index],
        [samples.texts[i] for i in index],
        [samples.ended[i] for i in index],
        [samples.stopped_by_context[i] for i in index],
    )


@torch.no_grad()
def reward_scores(
    reward_model, samples: Samples, *, eos_id: int, pad_id: int, batch_size: int, heads: bool = False
) -> torch.Tensor:
    """Reward-model scores of sampled completions (read at their last token). Shape: (N,), on the CPU; with `heads`,
    a reward ensemble's every head: (N, heads) (a single head stays (N,))."""
    device = next(reward_model.parameters()).device
    reward_model.eval()
    lengths = [
        len(p) + len(c) + e for p, c, e in zip(samples.prompt_ids, samples.completion_ids, samples.ended, strict=True)
    ]
    width = reward_model.config.num_labels if heads and reward_model.config.num_labels > 1 else 0
    out = torch.empty(len(lengths), width) if width else torch.empty(len(lengths))
    for index in length_sorted_batches(lengths, batch_size):
        batch = select(samples, index)
        tensors = response_batch(batch.prompt_ids, batch.completion_ids, batch.ended, eos_id=eos_id, pad_id=pad_id)
        logits = reward_model(
            input_ids=tensors["input_ids"].to(device), attention_mask=tensors["attention_mask"].to(device)
        ).logits
        out[torch.tensor(index)] = (logits if width else logits[:, 0]).float().cpu()
    return out


def evaluate_policies(
    policies: dict,
    sft,
    reward_model,
    judge: Judge,
    tokenizer,
    prompts: list[str],
    cfg: EvaluateConfig,
    *,
    seed: int,
    compiled: bool = False,
):
    """Sample every policy (and Best-of-N from SFT) on `prompts` and measure it against SFT.

    Args:
        policies: name -> causal LM, besides SFT (e.g. `ppo`, `dpo`).
        sft: the SFT policy, the KL reference and the win-rate baseline.
        judge: the gold judge.
        cfg: the `evaluate` config.
        compiled: sample with a compiled decode step (`SamplingParams.compiled`).

    Returns:
        (results by policy name, flat metrics `<policy>/<metric>`).
    """
    params = SamplingParams(
        cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, compiled, key="evaluate.max_new_tokens"
    )
    ids = {"eos_id": tokenizer.eos_token_id, "pad_id": tokenizer.pad_token_id, "batch_size": cfg.batch_size}

    def result(name: str, samples: Samples, kl: float) -> PolicyResult:
        rewards = reward_scores(reward_model, samples, **ids).tolist()
        lengths = [len(c) + int(e) for c, e in zip(samples.completion_ids, samples.ended, strict=True)]
        gold = judge.score(tokenizer.batch_decode(samples.prompt_ids), samples.texts)
        return PolicyResult(name, samples.texts, gold, rewards, kl, lengths, samples.ended, samples.stopped_by_context)

    results = {"sft": result("sft", sample(sft, tokenizer, prompts, params, batch_size=cfg.batch_size, seed=seed), 0.0)}
    for name, model in policies.items():
        samples = sample(model, tokenizer, prompts, params, batch_size=cfg.batch_size, seed=seed)
        kl = float(sequence_kl(model, sft, samples, tokenizer, cfg.batch_size).mean())
        results[name] = result(name, samples, kl)

    n_max = cfg.best_of_n
    repeated = [p for p in prompts for _ in range(n_max)]
    pool = sample(sft, tokenizer, repeated, params, batch_size=cfg.batch_size, seed=seed + 1)
    pool_rewards = reward_scores(reward_model, pool, **ids).view(len(prompts), n_max)  # (P, N)
    n = 2
    while n <= n_max:
        pick = best_of_n_index(pool_rewards[:, :n])
        name = "bon" if n == n_max else f"bon_{n}"
        results[name] = result(name, select(pool, [p * n_max + int(k) for p, k in enumerate(pick)]), best_of_n_kl(n))
        n *= 2
    if "bon" not in results:  # n_max is not a power of 2
        pick = best_of_n_index(pool_rewards)
        results["bon"] = result(
            "bon", select(pool, [p * n_max + int(k) for p, k in enumerate(pick)]), best_of_n_kl(n_max)
        )
    metrics = {
        f"{name}/{key}": value for name, res in results.items() for key, value in summarize(res, results["sft"]).items()
    }
    if cfg.pass_k and isinstance(judge, VerifierJudge):  # a verifier: accuracy over k samples per prompt
        answers = lookup_answers(judge.answers, prompts)
        repeated = [p for p in prompts for _ in range(cfg.pass_k)]
        for name, model in {"sft": sft, **policies}.items():
            samples = sample(model, tokenizer, repeated, params, batch_size=cfg.batch_size, seed=seed + 2)
            scores = judge.score(repeated, samples.texts)
            rows = lambda values: [values[i : i + cfg.pass_k] for i in range(0, len(values), cfg.pass_k)]  # noqa: E731
            accuracy = accuracy_metrics(
                rows(judge.last_correct), rows(scores), rows(samples.texts), answers, cfg.pass_k
            )
            metrics.update({f"{name}/{key}": value for key, value in accuracy.items()})
        metrics["judge/verifier_timeouts"] = float(judge.timeouts)
    return results, metrics


@torch.no_grad()
def sampled_objective(
    policy: torch.nn.Module,
    reference: torch.nn.Module | None,
    tokenizer,
    prompts: Sequence[str],
    judge: Judge,
    *,
    max_new_tokens: int,
    seed: int,
    batch_size: int = 256,
    compiled: bool = False,
) -> tuple[dict[str, float], Samples]:
    """The DPO paper's frontier coordinates on held-out prompts: the sampled sequence KL of the trained policy to
    the reference, and both models' mean gold score (pure sampling at temperature 1, so the KL is unbiased).
    `reference` None: the LoRA policy with its adapters disabled.

    Returns:
        (`objective/kl`, `objective/gold_scores`, `reference/gold_scores`, `objective/eos_rate`,
        `objective/stopped_by_context`; the policy's samples).
    """
    params = SamplingParams(
        max_new_tokens=max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, compiled=compiled, key="dpo.max_new_tokens"
    )
    samples = sample(policy, tokenizer, prompts, params, batch_size=batch_size, seed=seed)
    with as_reference(policy, reference) as frozen:
        reference_samples = sample(frozen, tokenizer, prompts, params, batch_size=batch_size, seed=seed)
    policy_gold = judge.score(prompts, samples.texts)
    reference_gold = judge.score(prompts, reference_samples.texts)
    metrics = {
        "objective/kl": float(sequence_kl(policy, reference, samples, tokenizer, batch_size).mean()),
        "objective/gold_scores": sum(policy_gold) / len(policy_gold),
        "reference/gold_scores": sum(reference_gold) / len(reference_gold),
        "objective/eos_rate": sum(samples.ended) / len(samples.ended),
        "objective/stopped_by_context": float(sum(samples.stopped_by_context)),
    }
    return metrics, samples
