"""Token-in, token-out rollouts over several turns.

Each episode starts from its environment's first observation, tokenised once. Every turn the active episodes sample
together (`sample_ids`, stopping at the model's stop tokens and at the tools' closing tags), the sampled ids are
appended as they were drawn, the action's text goes to the environment, and its observation is tokenised once and
appended: the history is never decoded and tokenised again, so what the trainer scores is exactly what the sampler
saw. `Episode.policy` marks the policy's own tokens; `episode_batch` turns it into the token-aligned mask that keeps
observation tokens out of the policy loss, the KL term, the value loss and the advantages.

Budgets (`Budgets`): `max_turns` policy turns, `turn_tokens` new tokens per turn, `total_tokens` policy and
observation tokens after the first observation (checked against the model's context before any turn). An episode
ended by a budget is flagged (`Episode.truncated`: `turns`, `turn_tokens` or `total_tokens`), and the flags are
metrics (`episode_stats`), never silent. A step past `timeout_s` ends its episode with reward 0 (`timed_out`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.data.tokenization import encode
from pipeline.envs.base import Environment, EnvironmentBug, Step
from pipeline.models.generation import CACHE_ARGUMENT, SamplingParams, context_length, drawn_log_probs, stop_ids

TRUNCATIONS = ("turns", "turn_tokens", "total_tokens")


@dataclass(frozen=True)
class Budgets:
    max_turns: int
    turn_tokens: int
    total_tokens: int


@dataclass(frozen=True)
class EpisodeSpec:
    """What a stage needs to run episodes (`env.*`): the environment's factory and name, the budgets, the step
    timeout, the token ids that end a turn besides EOS (its tools' closing tags), the reward's weight, and the
    environment without its tools."""

    make_env: Callable[[], Environment]
    kind: str
    budgets: Budgets
    timeout_s: float
    tool_stops: tuple[int, ...]
    reward_weight: float
    make_bare: Callable[[], Environment] | None = None
    """The same environment with its tools taken away (`without_tools`), when it has that variant."""


def turn_stops(env: Environment, tokenizer, kind: str) -> tuple[int, ...]:
    """The ids of the texts `env` ends a turn on besides EOS (`stop_texts`: its tools' closing tags), each one token
    of `tokenizer`. Raises ValueError naming the text when the tokenizer splits it."""
    ids = []
    for text in getattr(env, "stop_texts", ()):
        pieces = encode(tokenizer, [text])[0]
        if len(pieces) != 1:
            raise ValueError(
                f"env.kind {kind}: the tokenizer splits {text!r} into {len(pieces)} tokens, so a turn cannot stop on "
                "it; train the scratch tokenizer with the tool tags (prepare.source: calculator does) or use a chat "
                "model, whose tool calls end on its end-of-turn token"
            )
        ids.append(pieces[0])
    return tuple(ids)


@dataclass
class Episode:
    """One trajectory: the first observation's ids, then the policy's and the environment's tokens in order."""

    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    policy: list[bool] = field(default_factory=list)
    """Per id of `ids`: the policy sampled it (True) or the environment wrote it."""
    sampler_logps: list[float] = field(default_factory=list)
    """With `with_logps`: the sampler's log-prob of each policy token, in order."""
    reward: float = 0.0
    turns: int = 0
    tool_calls: int = 0
    call_errors: int = 0
    timed_out: bool = False
    truncated: str | None = None
    done: bool = False
    transcript: list[tuple[str, str]] = field(default_factory=list)
    """(`observation` or `policy`, text) per turn, the first observation first."""
    pending: list[int] = field(default_factory=list)
    """The observation's ids appended since the policy's last turn (the next turn feeds them to the sampler)."""

    @property
    def active(self) -> bool:
        return not (self.done or self.timed_out or self.truncated)


def run_episodes(
    policy: torch.nn.Module,
    tokenizer,
    make_env: Callable[[], Environment],
    rows: Sequence[Mapping[str, Any]],
    budgets: Budgets,
    params: SamplingParams,
    *,
    seed: int,
    batch_size: int,
    tool_stops: Sequence[int] = (),
    timeout_s: float,
    kind: str,
    with_logps: bool = False,
) -> list[Episode]:
    """One episode per row of `rows` in a new environment from `make_env` (`kind` names it in errors), played
    `batch_size` episodes at a time, every turn of a batch sampled together (`CachedTurns`)."""
    envs = [make_env() for _ in rows]
    first = [_reset(env, row, index, kind) for index, (env, row) in enumerate(zip(envs, rows, strict=True))]
    episodes = [Episode(ids) for ids in encode(tokenizer, first)]
    for episode, text in zip(episodes, first, strict=True):
        episode.transcript.append(("observation", text))
    _check_context(policy, episodes, budgets)
    model_stops = stop_ids(policy, tokenizer)
    stops = model_stops + [t for t in tool_stops if t not in model_stops]
    for start in range(0, len(episodes), batch_size):
        chunk = range(start, min(start + batch_size, len(episodes)))
        turns = CachedTurns(policy, tokenizer, [episodes[i].prompt_ids for i in chunk], params, stops, with_logps)
        for turn in range(budgets.max_turns):
            active = [i for i in chunk if episodes[i].active]
            if not active:
                break
            rooms = [min(budgets.turn_tokens, budgets.total_tokens - len(episodes[i].ids)) for i in active]
            observed = {i - start: episodes[i].pending for i in active}
            drawn = turns.sample(observed, max(rooms), seed + 100_003 * turn + start)
            for i, room in zip(active, rooms, strict=True):
                action, logps, stop = drawn[i - start]
                episode = episodes[i]
                if stop is None or len(action) > room:  # the budget, not the policy, ended the turn
                    action, logps = action[:room], logps[:room]
                    episode.truncated = "turn_tokens" if room == budgets.turn_tokens else "total_tokens"
                text = _append_turn(episode, action, logps, tokenizer, set(model_stops))
                if episode.truncated:
                    continue
                answer = _bounded_step(envs[i], text, timeout_s, i, turn, kind)
                if answer is None:
                    episode.timed_out = True
                    continue
                _take(episode, answer, tokenizer, budgets)
        for i in chunk:
            if episodes[i].active:
                episodes[i].truncated = "turns"
    return episodes


def _append_turn(episode: Episode, action: list[int], logps: list[float], tokenizer, model_stops: set[int]) -> str:
    """One policy turn's ids appended to `episode` as drawn; the turn's text, as the environment reads it."""
    episode.pending = []
    episode.ids += action
    episode.policy += [True] * len(action)
    episode.sampler_logps += logps
    episode.turns += 1
    shown = [t for t in action if t not in model_stops]  # a tool's closing tag stays in the text
    text = tokenizer.decode(shown, skip_special_tokens=False)
    episode.transcript.append(("policy", text))
    return text


class CachedTurns:
    """The turns of a batch of episodes sampled together, the KV cache kept from turn to turn.

    The batch starts as the left-padded first observations. After each turn every continuing row is extended by its
    observation, left-padded to the widest one, and rows whose episode ended leave the batch (and the cache). The
    cache never sees a token twice: each turn feeds only what is new (the last sampled token and the observation).
    Padding inside a row (after an early stop, before a shorter observation) is masked, and positions come from
    the mask, so each row's tokens are scored as the trainer scores its unpadded trajectory (a test checks the
    sampler's log-probs against the trainer's).
    """

    def __init__(self, policy, tokenizer, prompts: Sequence[list[int]], params: SamplingParams, stops, with_logps):
        self.policy, self.params, self.stops, self.with_logps = policy, params, list(stops), with_logps
        self.pad = tokenizer.pad_token_id
        width = max(map(len, prompts))
        self.sequences = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        self.mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            self.sequences[row, width - len(ids) :] = torch.as_tensor(ids)
            self.mask[row, width - len(ids) :] = 1
        self.rows = list(range(len(prompts)))  # batch row -> episode of the chunk
        self.cache = None

    def _continue(self, observed: Mapping[int, list[int]]) -> None:
        """Keep the rows in `observed` (in its order), each extended by its observation."""
        keep = [self.rows.index(row) for row in observed]
        if keep != list(range(len(self.rows))):
            index = torch.as_tensor(keep)
            self.sequences, self.mask = self.sequences[index], self.mask[index]
            if self.cache is not None:
                self.cache.batch_select_indices(index.to(self.cache.layers[0].keys.device))
        self.rows = list(observed)
        width = max(map(len, observed.values()))
        if width:
            block = torch.full((len(self.rows), width), self.pad, dtype=torch.long)
            block_mask = torch.zeros_like(block)
            for row, ids in enumerate(observed.values()):
                if ids:
                    block[row, width - len(ids) :] = torch.as_tensor(ids)
                    block_mask[row, width - len(ids) :] = 1
            self.sequences = torch.cat([self.sequences, block], 1)
            self.mask = torch.cat([self.mask, block_mask], 1)

    @torch.no_grad()
    def sample(
        self, observed: Mapping[int, list[int]], max_new_tokens: int, seed: int
    ) -> dict[int, tuple[list[int], list[float], int | None]]:
        """One turn for the episodes in `observed` (chunk row -> its observation since its last turn): per row, the
        drawn ids (up to and including the stop token), their log-probs (with `with_logps`), the stop token."""
        self._continue(observed)
        params, policy = self.params, self.policy
        device = next(policy.parameters()).device
        was_training = policy.training
        policy.eval()
        torch.manual_seed(seed)
        width = self.sequences.shape[1]
        sampling = params.temperature > 0
        with torch.compiler.set_stance("force_eager"):
            output = policy.generate(
                input_ids=self.sequences.to(device),
                attention_mask=self.mask.to(device),
                **{CACHE_ARGUMENT: self.cache},
                do_sample=sampling,
                temperature=params.temperature if sampling else None,
                top_k=params.top_k if sampling else None,
                top_p=params.top_p if sampling else None,
                max_new_tokens=max_new_tokens,
                eos_token_id=self.stops if len(self.stops) > 1 else self.stops[0],
                pad_token_id=self.pad,
                use_cache=True,
                return_dict_in_generate=True,
                output_logits=self.with_logps,
            )
        policy.train(was_training)
        self.cache = output.past_key_values
        drawn_logps = drawn_log_probs(output, width, params.temperature) if self.with_logps else None
        sequences = output.sequences.cpu()
        new = sequences[:, width:]
        new_mask = torch.zeros_like(new)
        drawn = {}
        for row, episode in enumerate(self.rows):
            tokens = new[row].tolist()
            end = next((t for t, token in enumerate(tokens) if token in self.stops), None)
            action = tokens if end is None else tokens[: end + 1]
            new_mask[row, : len(action)] = 1
            logps = drawn_logps[row, : len(action)].tolist() if drawn_logps is not None else []
            drawn[episode] = (action, logps, None if end is None else tokens[end])
        self.sequences, self.mask = sequences, torch.cat([self.mask, new_mask], 1)
        return drawn


def _take(episode: Episode, answer: Step, tokenizer, budgets: Budgets) -> None:
    """The environment's answer: its reward and counts, then its observation unless the episode ends."""
    episode.reward += answer.reward
    episode.tool_calls += int(answer.tool_call)
    episode.call_errors += int(answer.error is not None)
    if answer.done or answer.observation is None:
        episode.done = True
        return
    observation = encode(tokenizer, [answer.observation])[0]
    if len(episode.ids) + len(observation) >= budgets.total_tokens:  # no room left for a policy token after it
        episode.truncated = "total_tokens"
        return
    episode.ids += observation
    episode.policy += [False] * len(observation)
    episode.pending = observation
    episode.transcript.append(("observation", answer.observation))


def check_resets(make_env: Callable[[], Environment], rows: Sequence[Mapping[str, Any]], kind: str) -> None:
    """Start an episode on every row once, before any training: an environment that cannot is named with its row
    (`EnvironmentBug`) while nothing has been trained yet."""
    for index, row in enumerate(rows):
        _reset(make_env(), row, index, kind)


def _reset(env: Environment, row: Mapping[str, Any], index: int, kind: str) -> str:
    try:
        return env.reset(row)
    except Exception as error:
        raise EnvironmentBug(
            f"env.kind {kind}: reset raised on row {index} ({type(error).__name__}: {error}); an environment that "
            "cannot start an episode is a bug in the environment or a bad row, not the policy's"
        ) from error


def _bounded_step(env: Environment, action: str, timeout_s: float, index: int, turn: int, kind: str) -> Step | None:
    """`env.step(action)` in a daemon thread: its Step, or None past `timeout_s` (the thread is left behind)."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["step"] = env.step(action)
        except Exception as error:  # noqa: BLE001 - carried to the caller, raised there with the row and turn
            result["error"] = error

    worker = threading.Thread(target=run, daemon=True, name=f"env-{kind}-row{index}")
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        return None
    if "error" in result:
        error = result["error"]
        raise EnvironmentBug(
            f"env.kind {kind}: step raised on row {index}, turn {turn + 1} ({type(error).__name__}: {error}); a "
            "malformed action must come back as an error observation (Step(error=...)), not an exception"
        ) from error
    step = result["step"]
    if not isinstance(step, Step):
        raise EnvironmentBug(f"env.kind {kind}: step returned {type(step).__name__} on row {index}, not a Step")
    return step


def _check_context(policy: torch.nn.Module, episodes: Sequence[Episode], budgets: Budgets) -> None:
    context = context_length(policy)
    longest = max((len(e.prompt_ids) for e in episodes), default=0)
    if context is not None and longest + budgets.total_tokens > context:
        raise ValueError(
            f"env.total_tokens: {budgets.total_tokens} tokens after a first observation of up to {longest} do not "
            f"fit the model's context of {context} positions; set it to at most {context - longest}"
        )


def episode_batch(episodes: Sequence[Episode], pad_id: int) -> dict[str, torch.Tensor]:
    """The trajectories right-padded: `input_ids`, `attention_mask` (B, L), and `mask` (B, L - 1), token-aligned as
    `pipeline.losses.rl` reads it: 1 where position t's next token is the policy's."""
    width = max(len(e.prompt_ids) + len(e.ids) for e in episodes)
    input_ids = torch.full((len(episodes), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(episodes), width), dtype=torch.long)
    policy = torch.zeros((len(episodes), width), dtype=torch.float32)
    for row, episode in enumerate(episodes):
        ids = episode.prompt_ids + episode.ids
        input_ids[row, : len(ids)] = torch.as_tensor(ids)
        attention_mask[row, : len(ids)] = 1
        start = len(episode.prompt_ids)
        policy[row, start : len(ids)] = torch.as_tensor(episode.policy, dtype=torch.float32)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "mask": policy[:, 1:]}


def episode_stats(episodes: Sequence[Episode]) -> dict[str, float]:
    """The environment's metrics over `episodes`: mean reward and success, turns, tool calls and call errors per
    episode, and the share of episodes each budget or the timeout ended."""
    n = max(len(episodes), 1)
    stats = {
        "env/reward": sum(e.reward for e in episodes) / n,
        "env/success": sum(e.reward > 0 for e in episodes) / n,
        "env/turns": sum(e.turns for e in episodes) / n,
        "env/tool_calls": sum(e.tool_calls for e in episodes) / n,
        "env/call_errors": sum(e.call_errors for e in episodes) / n,
        "env/timeouts": sum(e.timed_out for e in episodes) / n,
    }
    names = {
        "turns": "env/truncated_turns",
        "turn_tokens": "env/truncated_tokens",
        "total_tokens": "env/truncated_total",
    }
    stats.update({names[t]: sum(e.truncated == t for e in episodes) / n for t in TRUNCATIONS})
    return stats
