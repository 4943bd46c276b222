"""The gold judge a method scores with, given the reference answers of the prompts it will judge (a verifier's)."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from pipeline.config import Config
from pipeline.data.tokenization import encode
from pipeline.models.build import inference_device
from pipeline.models.judges import Judge, VerifierJudge, build_judge


def gold_judge(cfg: Config, frames: Sequence[tuple[str, pd.DataFrame]], tokenizer=None) -> Judge:
    """`build_judge(cfg.judge)` on the inference device; a verifier also gets every frame's prompt -> answer.

    Args:
        frames: (source file, table with `prompt` and, for a verifier, `answer`).
        tokenizer: also key each answer by its prompt as decoded from its tokens (how PPO's rollouts see prompts).
    """
    judge = build_judge(cfg.judge).to(inference_device())
    if not isinstance(judge, VerifierJudge):
        return judge
    for source, frame in frames:
        if "answer" not in frame:
            raise ValueError(
                f"{source}: no answer column for judge.kind 'verifier'; set prepare.answer_column and "
                "rerun prepare (dvc repro)"
            )
        prompts, answers = frame["prompt"].tolist(), frame["answer"].tolist()
        judge.with_answers(dict(zip(prompts, answers, strict=True)))
        if tokenizer is not None:
            decoded = tokenizer.batch_decode(encode(tokenizer, prompts))
            judge.with_answers(dict(zip(decoded, answers, strict=True)))
    return judge
