"""What the stages that play episodes share: the environment `env.*` names, and the rows episodes start from."""

from __future__ import annotations

import pandas as pd

from pipeline.config import EnvConfig
from pipeline.envs.dialogue import dialogue_for
from pipeline.envs.episodes import Budgets, EpisodeSpec, turn_stops
from pipeline.envs.registry import environment_factory


def episode_spec(env: EnvConfig, tokenizer) -> EpisodeSpec | None:
    """The environment `env.kind` names, speaking the tokenizer's dialogue (its chat template's tool calls, or the
    tag protocol), with its budgets and the tokens its turns stop on; None for `none`. With `env.tools: false`, the
    environment without its tools."""
    if env.kind == "none":
        return None
    make_env = environment_factory(env.kind, dialogue_for(tokenizer))
    budgets = Budgets(env.max_turns, env.turn_tokens, env.total_tokens)
    probe = make_env()
    stops = turn_stops(probe, tokenizer, env.kind)
    bare = None
    if callable(getattr(probe, "without_tools", None)):
        bare = lambda: make_env().without_tools()  # noqa: E731 - a factory like make_env
    if not env.tools:
        if bare is None:
            raise ValueError(
                f"env.tools: false, but env.kind {env.kind} has no variant without tools (a without_tools() method "
                "returning the environment with its tools taken away); set env.tools: true"
            )
        return EpisodeSpec(bare, env.kind, budgets, env.timeout_s, (), env.reward_weight)
    return EpisodeSpec(make_env, env.kind, budgets, env.timeout_s, stops, env.reward_weight, bare)


def episode_starts(table: pd.DataFrame) -> list[dict]:
    """The rows episodes start from: each prompt once, first turns only when the rows show several turns."""
    if "turn" in table:
        table = table[table["turn"] == 0]
    return table.drop_duplicates("prompt").to_dict("records")
