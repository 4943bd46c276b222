"""The library behind the DVC stages: `stages/<name>.py` parses argv and params and calls into it; nothing here
reads `params.yaml`, argv or the environment.

Packages, lowest first (each imports only those before it; `tests/unit/test_layout.py` enforces it):
`config` and `files` (params and atomic file helpers), `data` (schemas, tokenizers, chat templates, dataset loading,
collators), `models` (building, LoRA, sampling, log-probs, judges), `tasks` (the synthetic task, prepare, preference
pairs), `losses` (DPO family, RL math; pure), `train` (Trainer, optimizer, checkpoints, one module per method),
`eval` (evaluation, frontier, reports), `track` (MLflow, provenance); `bench` at the top measures the stages' work.
"""
