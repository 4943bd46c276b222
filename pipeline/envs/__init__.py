"""Environments for multi-turn online RL: the policy acts, the environment answers, only the policy's tokens train.

- `base`: the protocol (`Environment.reset(row) -> observation`, `step(action) -> Step`), `env.kind`'s loader
  (`none`, the built-ins, `python:<module>:<Class>`), errors that name the environment and the row;
- `tools`: tool calls through text (the `<calc>...</calc>` tag protocol), a malformed call an error observation;
- `calculator`, `guess`: the two embedded environments;
- `episodes`: token-in, token-out rollouts over several turns, with budgets, flags and the policy-token mask.
"""
