"""Token-in, token-out rollouts over several turns.

Each episode starts from its environment's first observation, tokenised once. The episodes of a batch run as
streams over one KV cache (`Decoder`, `_Play`): every forward takes one token per row, the policy's next draw or
the next token of the row's observation, so a row whose turn ends (at the model's stop tokens or the tools' closing
tags) is answered by its environment at once and goes on while the others are still in their turns. The sampled ids
are appended as they were drawn and each observation is tokenised once and appended: the history is never decoded
and tokenised again, so what the trainer scores is exactly what the sampler saw. `Episode.policy` marks the
policy's own tokens; `episode_batch` turns it into the token-aligned mask that keeps observation tokens out of the
policy loss, the KL term, the value loss and the advantages.

Budgets (`Budgets`): `max_turns` policy turns, `turn_tokens` new tokens per turn, `total_tokens` policy and
observation tokens after the first observation (checked against the model's context before any turn). An episode
ended by a budget is flagged (`Episode.truncated`: `turns`, `turn_tokens` or `total_tokens`), and the flags are
metrics (`episode_stats`), never silent. A step past `timeout_s` ends its episode with reward 0 (`timed_out`).
"""

from __future__ import annotations

import inspect
import signal
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.data.tokenization import encode
from pipeline.envs.base import Environment, EnvironmentBug, Step
from pipeline.models.generation import CACHE_ARGUMENT, SamplingParams, context_length, preallocated_cache, stop_ids
from pipeline.models.lora import unwrapped

TRUNCATIONS = ("turns", "turn_tokens", "total_tokens")
COMPACT_AT = 4
"""Rows whose episodes ended leave the batch once they are a 1/`COMPACT_AT` share of it; until then they are fed
nothing (a masked pad)."""


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
    `batch_size` episodes at a time (`_Play`)."""
    envs = [make_env() for _ in rows]
    first = [_reset(env, row, index, kind) for index, (env, row) in enumerate(zip(envs, rows, strict=True))]
    episodes = [Episode(ids) for ids in encode(tokenizer, first)]
    for episode, text in zip(episodes, first, strict=True):
        episode.transcript.append(("observation", text))
    _check_context(policy, episodes, budgets)
    model_stops = stop_ids(policy, tokenizer)
    stops = model_stops + [t for t in tool_stops if t not in model_stops]
    play = _Play(tokenizer, budgets, set(stops), set(model_stops), timeout_s, kind)
    was_training = policy.training
    policy.eval()
    try:
        with torch.inference_mode(), torch.compiler.set_stance("force_eager"):  # a compiled body decodes eagerly
            for start in range(0, len(episodes), batch_size):
                chunk = list(range(start, min(start + batch_size, len(episodes))))
                prompts = [episodes[i].prompt_ids for i in chunk]
                decoder = Decoder(
                    policy,
                    prompts,
                    params,
                    pad_id=tokenizer.pad_token_id,
                    room=budgets.total_tokens,
                    seed=seed + start,
                    with_logps=with_logps,
                )
                play(decoder, chunk, episodes, envs)
    finally:
        policy.train(was_training)
    return episodes


@dataclass
class _Play:
    """The episodes of a chunk played as streams: every row of the batch moves one token per forward, whatever the
    others do. A row draws its next token, or is fed the next token of its environment's observation; when its turn
    ends (a stop token, or the turn's budget) the environment answers at once and the row goes on with the answer,
    so no row waits for the slowest turn of the batch, and a row whose episode ended leaves the batch."""

    tokenizer: Any
    budgets: Budgets
    stops: set[int]
    model_stops: set[int]
    timeout_s: float
    kind: str

    def __call__(self, decoder: Decoder, chunk: list[int], episodes: list[Episode], envs: list[Environment]) -> None:
        rows = list(chunk)  # batch row -> episode
        feed: dict[int, deque[int]] = {i: deque() for i in chunk}  # ids to feed before the row's next draw
        turn: dict[int, tuple[list[int], list[float]]] = {i: ([], []) for i in chunk}  # this turn's ids, log-probs
        room = {i: self._room(episodes[i]) for i in chunk}
        while rows:
            drawing = [row for row, i in enumerate(rows) if episodes[i].active and not feed[i]]
            for row, (token, logp) in zip(drawing, decoder.draw(drawing), strict=True):
                i = rows[row]
                action, logps = turn[i]
                action.append(token)
                logps.append(logp)
                feed[i].append(token)
                if token in self.stops or len(action) == room[i]:
                    feed[i] += self._end_turn(episodes[i], envs[i], i, action, logps, room[i])
                    turn[i], room[i] = ([], []), self._room(episodes[i])
            staying = [row for row, i in enumerate(rows) if episodes[i].active]
            if not staying:
                break
            if (len(rows) - len(staying)) * COMPACT_AT >= len(rows):  # ended rows leave in groups: each leave copies
                rows = [rows[row] for row in staying]  # the cache, and a row fed nothing costs less than a copy
                decoder.keep(staying)
            decoder.feed([feed[i].popleft() if episodes[i].active else None for i in rows])

    def _room(self, episode: Episode) -> int:
        return min(self.budgets.turn_tokens, self.budgets.total_tokens - len(episode.ids))

    def _end_turn(
        self, episode: Episode, env: Environment, index: int, action: list[int], logps: list[float], room: int
    ) -> list[int]:
        """The turn appended, the environment's answer taken; the answer's ids to feed when the episode goes on."""
        if action[-1] not in self.stops:  # the budget, not the policy, ended the turn
            episode.truncated = "turn_tokens" if room == self.budgets.turn_tokens else "total_tokens"
        text = _append_turn(episode, action, logps, self.tokenizer, self.model_stops)
        if episode.truncated:
            return []
        answer = _bounded_step(env, text, self.timeout_s, index, episode.turns - 1, self.kind)
        if answer is None:
            episode.timed_out = True
            return []
        observation = _take(episode, answer, self.tokenizer, self.budgets)
        if episode.active and episode.turns == self.budgets.max_turns:
            episode.truncated = "turns"
        return observation


def _append_turn(episode: Episode, action: list[int], logps: list[float], tokenizer, model_stops: set[int]) -> str:
    """One policy turn's ids appended to `episode` as drawn; the turn's text, as the environment reads it."""
    episode.ids += action
    episode.policy += [True] * len(action)
    episode.sampler_logps += logps
    episode.turns += 1
    shown = [t for t in action if t not in model_stops]  # a tool's closing tag stays in the text
    text = tokenizer.decode(shown, skip_special_tokens=False)
    episode.transcript.append(("policy", text))
    return text


class Decoder:
    """A batch of token streams over one KV cache: `draw` the next token of some rows, `feed` one token to every row,
    `keep` some rows (the others leave the batch and the cache).

    The batch starts as the left-padded first observations, run once; then every forward takes exactly one token
    per row, so a row never holds padding after its prompt and its positions are its own count of tokens. Each row's
    tokens are scored as the trainer scores its unpadded trajectory (a test checks the sampler's log-probs against
    the trainer's). Sampling follows `generate`'s order (temperature, then top-k, then top-p); a drawn token's
    log-prob is under the raw logits at the temperature, as the trainer computes it. One generator, seeded once,
    draws for the whole batch: the same rows give the same tokens.
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        prompts: Sequence[list[int]],
        params: SamplingParams,
        *,
        pad_id: int,
        room: int,
        seed: int,
        with_logps: bool,
    ) -> None:
        self.policy, self.params, self.with_logps, self.pad = policy, params, with_logps, pad_id
        self.device = next(policy.parameters()).device
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        self.mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.as_tensor(prompt)
            self.mask[row, width - len(prompt) :] = 1
        self.mask = self.mask.to(self.device)
        self.positions = self.mask.sum(1, keepdim=True)  # each row's next position
        self.cache = preallocated_cache(unwrapped(policy), width + room)
        self.generator = torch.Generator(self.device).manual_seed(seed)
        keep_last = "logits_to_keep" in inspect.signature(unwrapped(policy).forward).parameters
        self.logits = self._forward(
            ids.to(self.device), (self.mask.cumsum(1) - 1).clamp(min=0), {"logits_to_keep": 1} if keep_last else {}
        )

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, extra: Mapping[str, Any]) -> torch.Tensor:
        output = self.policy(
            input_ids=ids,
            attention_mask=self.mask,
            position_ids=positions,
            use_cache=True,
            **{CACHE_ARGUMENT: self.cache},
            **extra,
        )
        return output.logits[:, -1].float()

    def feed(self, tokens: Sequence[int | None]) -> None:
        """One token per row, in the batch's order; None feeds a row nothing (a pad its later tokens do not see)."""
        seen = torch.as_tensor([token is not None for token in tokens], device=self.device)
        self.mask = torch.cat([self.mask, seen[:, None].long()], 1)
        ids = torch.as_tensor([self.pad if token is None else token for token in tokens], device=self.device)[:, None]
        self.logits = self._forward(ids, self.positions, {})
        self.positions = self.positions + 1

    def draw(self, rows: Sequence[int]) -> list[tuple[int, float]]:
        """The next token of each of `rows` (batch rows), with its log-prob (0.0 without `with_logps`)."""
        if not rows:
            return []
        logits = self.logits[torch.as_tensor(rows, device=self.device)]
        params = self.params
        if params.temperature <= 0:
            tokens = logits.argmax(-1)
            scaled = logits
        else:
            scaled = logits / params.temperature
            probs = torch.softmax(filtered(scaled, params.top_k, params.top_p), -1)
            tokens = torch.multinomial(probs, 1, generator=self.generator)[:, 0]
        logps = torch.log_softmax(scaled, -1).gather(-1, tokens[:, None])[:, 0] if self.with_logps else None
        tokens = tokens.tolist()
        return list(zip(tokens, logps.tolist() if logps is not None else [0.0] * len(tokens), strict=True))

    def keep(self, rows: Sequence[int]) -> None:
        """Only `rows` (batch rows, in this order) stay in the batch."""
        index = torch.as_tensor(rows, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions, self.logits = self.mask[index], self.positions[index], self.logits[index]


def filtered(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """`scores` (B, V) with the tokens top-k and then top-p sampling exclude set to -inf, as `generate`'s warpers do:
    top-k keeps the tokens scoring at least the k-th best; top-p the smallest set of the best tokens whose
    probability reaches `top_p` (at least one)."""
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False)
        drop = torch.softmax(ordered, -1).cumsum(-1) <= 1 - top_p
        drop[..., -1:] = False
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scores


def _take(episode: Episode, answer: Step, tokenizer, budgets: Budgets) -> list[int]:
    """The environment's answer: its reward and counts, then its observation unless the episode ends (its ids,
    returned to be fed to the policy)."""
    episode.reward += answer.reward
    episode.tool_calls += int(answer.tool_call)
    episode.call_errors += int(answer.error is not None)
    if answer.done or answer.observation is None:
        episode.done = True
        return []
    observation = encode(tokenizer, [answer.observation])[0]
    if len(episode.ids) + len(observation) >= budgets.total_tokens:  # no room left for a policy token after it
        episode.truncated = "total_tokens"
        return []
    episode.ids += observation
    episode.policy += [False] * len(observation)
    episode.transcript.append(("observation", answer.observation))
    return observation


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
    """`env.step(action)`: its Step, or None past `timeout_s`.

    On the main thread the step runs there, bounded by a SIGALRM timer (`_alarmed`): a thread per step cost a
    quarter of multi-turn sampling's throughput (`make bench`'s `episodes`), the hand-over to it waiting on the
    cores torch's threads hold. Elsewhere (or without SIGALRM) it runs in a daemon thread, left behind past the
    bound. A step stuck in C code that never returns to Python is bounded only by the thread."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["step"] = env.step(action)
        except Exception as error:  # noqa: BLE001 - carried to the caller, raised there with the row and turn
            result["error"] = error

    if hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread():
        if not _alarmed(run, timeout_s):
            return None
    else:
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


class _StepTimeout(BaseException):
    """Raised into a step past its bound; a BaseException, so an environment's `except Exception` lets it through."""


def _raise_timeout(signum, frame) -> None:
    raise _StepTimeout


def _alarmed(run: Callable[[], None], timeout_s: float) -> bool:
    """`run()` on this (the main) thread, interrupted after `timeout_s`: whether it finished in time."""
    previous = signal.signal(signal.SIGALRM, _raise_timeout)
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            run()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _StepTimeout:
        return False
    finally:
        signal.signal(signal.SIGALRM, previous)
    return True


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
