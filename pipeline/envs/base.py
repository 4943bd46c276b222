"""The environment protocol: `reset`, `step` and the `Step` it returns.

An environment is a Python object, one instance per episode: `reset(row)` takes the data row (its `prompt`, its
`answer`, any other column) and returns the first observation, the text the policy starts from; `step(action)`
takes the text of one policy turn and returns a `Step`: the observation appended before the next turn (None: the
episode ends), the reward of the step, whether the episode is done, and whether the action was a tool call, or a
malformed one (`error`, counted as `env/call_errors`: the policy sees it as its observation, the rollout goes on).

An environment that raises in `reset` or `step` is a bug, not the policy's: the stage fails naming the environment,
the row and the turn. A step that runs past `env.timeout_s` ends its episode with reward 0, counted
(`env/timeouts`); it runs in a worker thread, which Python cannot stop: a step that never returns keeps its thread.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class Step:
    """What the environment answers to one policy turn."""

    observation: str | None
    """Text appended to the trajectory before the next policy turn; None ends the episode."""
    reward: float = 0.0
    done: bool = False
    tool_call: bool = False
    """The action was a tool call (well-formed or not)."""
    error: str | None = None
    """Why the action was malformed (a bad tag, an unknown tool, a tool that raised); counted, never raised."""


@runtime_checkable
class Environment(Protocol):
    def reset(self, row: Mapping[str, Any]) -> str: ...

    def step(self, action: str) -> Step: ...


class EnvironmentBug(RuntimeError):
    """An environment raised (in `reset` or `step`): the message names it, the row and the turn."""
