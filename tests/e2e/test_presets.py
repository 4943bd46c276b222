"""Each real-task preset runs the whole DAG through real DVC on local stand-ins in the hub's formats (no download).

The preset is applied with its documented command; the test then points the hub ids at stand-ins generated here
(`tests/standins.py`) and shrinks every stage to a few steps, on 32-bit CPU.
"""

import json
import random
import sys

import pandas as pd
import pytest
from safetensors import safe_open
from transformers import AutoTokenizer

from pipeline.config import load_config, read_params
from pipeline.data.tokenization import load_tokenizer
from pipeline.envs.tools import CALC
from pipeline.models.judges import build_judge
from pipeline.tasks.preferences import split_dialogues
from pipeline.tasks.tools import calculator_problem
from tests.e2e.project import Project
from tests.e2e.test_pipeline import STAGES
from tests.standins import (
    QWEN_TOOLS,
    chat_llama,
    encoder_reward_model,
    gpt2_hub,
    hh_rows,
    imdb_rows,
    neox_hub,
    sentiment_classifier,
    ultrafeedback_rows,
    write_jsonl,
)

pytestmark = pytest.mark.slow
CPU = {"precision": "32-true"}


def _judged_like_the_judge(project: Project) -> None:
    """prepare's gold column is the configured judge's score of each completion, not VADER's."""
    config = load_config(read_params(project.path / "params.yaml"))
    rows = pd.read_parquet(project.path / "data/prepared/test.parquet").head(5)
    expected = build_judge(config.judge).score(rows["prompt"].tolist(), rows["completion"].tolist())
    assert rows["gold"].tolist() == pytest.approx(expected, abs=1e-5)


def _ran_everything(project: Project) -> dict:
    assert project.ran(project.dvc("repro")) == STAGES
    metrics = project.report("metrics")
    for policy in ("sft", "ppo", "dpo", "bon"):
        assert {f"{policy}/gold_score", f"{policy}/kl", f"{policy}/win_rate", f"{policy}/eos_rate"} <= set(metrics)
    _judged_like_the_judge(project)
    return metrics


PACKED = {"packing": True}


def test_chat_preset_llama_chat_model_conversational_data_classifier_judge_lora(tmp_path):
    """Also the memory path: LoRA rank 8 and two accumulated micro-batches per step in every trained stage, and
    padding-free batches in every stage that has them (the reward model's score head under LoRA included)."""
    hub = tmp_path / "hub"
    hub.mkdir()
    data = write_jsonl(hub / "ultrafeedback.jsonl", ultrafeedback_rows(160))
    project = Project(
        tmp_path / "repo",
        preset="chat",
        overrides={
            "model": {"base": chat_llama(hub / "chat-llama"), "lora_r": 8},
            "trainer": {**CPU, "accumulate_grad_batches": 2},
            "prepare": {"dataset_path": "json", "data_files": data},
            "preferences": {"dataset_path": "json", "data_files": data, "val_fraction": 0.2},
            "judge": {"kind": "classifier", "path": sentiment_classifier(hub / "distilbert-imdb"), "label": "POSITIVE"},
            "sft": PACKED,
            "reward": PACKED,
            "reference": PACKED,
            "dpo": PACKED,
        },
    )
    _ran_everything(project)
    prepared = pd.read_parquet(project.path / "data/prepared/train.parquet")
    assert prepared["prompt"].str.startswith("<|im_start|>user\nWrite about this:").all()
    assert prepared["prompt"].str.endswith("<|im_start|>assistant\n").all()
    pairs = pd.read_parquet(project.path / "data/preferences/train.parquet")
    assert pairs["prompt"].str.endswith("<|im_start|>assistant\n").all() and len(pairs) > 100
    tokenizer = AutoTokenizer.from_pretrained(project.path / "models/sft")
    assert tokenizer.eos_token == "<|im_end|>"  # every later stage appends and stops at the end-of-turn
    generation = json.loads((project.path / "models/sft/generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    for stage in ("sft", "reward", "dpo", "ppo"):
        report = project.report(stage)
        assert 0 < report["model/trainable_parameters"] < 0.2 * report["model/parameters"], stage
    for model in ("sft", "reward", "dpo", "ppo"):  # merged, self-contained checkpoints: no adapter tensors
        with safe_open(project.path / f"models/{model}/model.safetensors", "pt") as weights:
            assert not any("lora" in key for key in weights.keys()), model  # noqa: SIM118


def test_imdb_preset_gpt2_review_prefixes_classifier_judge(tmp_path):
    """Also padding-free batches in every stage that has them, on learned absolute positions."""
    hub = tmp_path / "hub"
    hub.mkdir()
    project = Project(
        tmp_path / "repo",
        preset="imdb",
        overrides={
            "model": {"base": gpt2_hub(hub / "gpt2")},
            "trainer": CPU,
            "prepare": {"dataset_path": "json", "data_files": write_jsonl(hub / "imdb.jsonl", imdb_rows(400))},
            "judge": {"path": sentiment_classifier(hub / "distilbert-imdb")},
            "sft": PACKED,
            "reward": PACKED,
            "reference": PACKED,
            "dpo": PACKED,
        },
    )
    _ran_everything(project)
    prepared = pd.read_parquet(project.path / "data/prepared/train.parquet")
    assert (prepared["prompt"].str.split().str.len() == 8).all()  # review prefixes, as in the DPO paper
    assert (prepared["completion"].str.split().str.len() <= 48).all()


def _hh_stand_in(hub, data: str, **sections) -> dict:
    """The hh preset's overrides onto local stand-ins: a tiny Pythia, HH-shaped dialogues in `data`, a reward-model
    judge; `sections` add or replace whole sections."""
    return {
        "model": {"base": neox_hub(hub / "pythia")},
        "trainer": CPU,
        "prepare": {"dataset_path": "json", "data_files": data},
        "preferences": {"dataset_path": "json", "data_files": data, "val_fraction": 0.2},
        "judge": {"path": encoder_reward_model(hub / "deberta-rm")},
        **sections,
    }


def test_hh_preset_pythia_dialogues_reward_model_judge(tmp_path):
    hub = tmp_path / "hub"
    hub.mkdir()
    data = write_jsonl(hub / "hh.jsonl", hh_rows(160))
    project = Project(tmp_path / "repo", preset="hh", overrides=_hh_stand_in(hub, data))
    _ran_everything(project)
    pairs = pd.read_parquet(project.path / "data/preferences/train.parquet")
    assert pairs["prompt"].str.endswith("\n\nHuman: And then?\n\nAssistant:").all()
    assert pairs["chosen"].str.startswith(" ").all()


def gsm8k_rows(n: int, seed: int = 0) -> list[dict]:
    """`openai/gsm8k` rows: a word problem in `question`, a worked solution ending in `#### <answer>` in `answer`."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        rows.append(
            {
                "question": f"Tom has {a} apples and buys {b} more. How many apples does he have now?",
                "answer": f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}",
            }
        )
    return rows


def test_gsm8k_preset_chat_model_math_verifier_grpo(tmp_path):
    """GSM8K's exact format (JSON lines of question / `#### answer`) on a tiny chat-template model: the `math`
    verifier labels prepare's demonstrations and the preference pairs, rewards GRPO (no reward model loaded) and
    scores pass@k in evaluate."""
    hub = tmp_path / "hub"
    hub.mkdir()
    rows = gsm8k_rows(300)
    project = Project(
        tmp_path / "repo",
        preset="gsm8k",
        overrides={
            "model": {"base": chat_llama(hub / "chat-llama")},
            "trainer": CPU,
            "prepare": {
                "dataset_path": "json",
                "dataset_name": None,
                "data_files": write_jsonl(hub / "gsm8k.jsonl", rows),
            },
            # the stand-in's small vocabulary spells the numbers out in several tokens each; its context is 256
            "sft": {"max_length": 200, "max_new_tokens": 16},
            "preferences": {"max_length": 200},
            "reward": {"max_length": 200},
            "reference": {"max_length": 200},
            "dpo": {"max_length": 200},
            "ppo": {"num_generations": 2, "prompts_per_rollout": 4, "minibatch_size": 4},
            "evaluate": {"pass_k": 4},
            # an untrained stand-in is never right, so every sample would tie at 0 and leave no pairs: a format reward
            # (a pattern random text matches now and then) separates them, and is exercised on the way
            "judge": {"format_pattern": "[aeiou]{2}", "format_weight": 0.5},
        },
    )
    assert project.ran(project.dvc("repro")) == STAGES
    prepared = pd.read_parquet(project.path / "data/prepared/train.parquet")
    assert prepared["answer"].str.contains("#### ").all()  # the reference answer travels with each row
    assert prepared["gold"].eq(1.0).all()  # every demonstration's final answer checks against its own answer
    assert prepared["prompt"].str.startswith("<|im_start|>user\nTom has").all()
    pairs = pd.read_parquet(project.path / "data/preferences/train.parquet")
    assert len(pairs) and pairs["answer"].str.contains("#### ").all()  # and with every verifier-labelled pair
    metrics = project.report("metrics")
    for policy in ("sft", "ppo", "dpo"):
        assert {f"{policy}/pass_at_1", f"{policy}/pass_at_4", f"{policy}/mean_at_4", f"{policy}/maj_at_4"} <= set(
            metrics
        ), policy
        assert 0.0 <= metrics[f"{policy}/pass_at_1"] <= metrics[f"{policy}/pass_at_4"] <= 1.0
    assert metrics["judge/verifier_timeouts"] == 0.0
    ppo = project.report("ppo")
    assert "final/objective/accuracy" in ppo and ppo["model/value_parameters"] == 0.0  # GRPO: no value model


@pytest.mark.parametrize("preset", ["calculator", "guess"])
def test_a_multi_turn_preset_runs_the_dag_with_episodes_in_its_environment(tmp_path, preset):
    """The environment presets' whole DAG at tiny sizes: demonstrations one row per policy turn, a tokenizer that
    keeps the tool's tags whole, and `ppo` rollouts that are episodes of several turns, their metrics reported."""
    project = Project(
        tmp_path / "repo",
        preset=preset,
        overrides={
            "ppo": {"num_generations": 2, "prompts_per_rollout": 4, "minibatch_size": 4},
            # an SFT of 8 steps never wins an episode, so every first turn would tie at 0 and leave no preference
            # pairs: a format reward on the final turn that random text meets now and then separates them
            "judge": {"format_pattern": "[a-z]{2}", "format_weight": 0.5},
        },
    )
    assert project.ran(project.dvc("repro")) == STAGES
    prepared = pd.read_parquet(project.path / "data/prepared/train.parquet")
    assert prepared["turn"].max() >= 1 and prepared["answer"].notna().all()  # later turns carry their history
    preferences = project.report("preferences")  # first turns, each judged by the episode it starts
    assert preferences["train/samples/env/turns"] >= 1.0 and preferences["train/pairs_written"] > 0
    tokenizer = load_tokenizer(str(project.path / "models/sft"))
    if preset == "calculator":
        assert tokenizer.tokenize("<calc> 12 + 7</calc>") == ["<calc>", "Ġ12", "Ġ+", "Ġ7", "</calc>"]  # tags whole
    ppo = project.report("ppo")
    episode = {"env/reward", "env/success", "env/turns", "env/call_errors", "env/timeouts", "env/truncated_turns"}
    assert {f"final/{key}" for key in episode} <= set(ppo)
    assert ppo["final/env/turns"] >= 1.0 and ppo["model/value_parameters"] == 0.0
    metrics = project.report("metrics")  # evaluate plays every policy in the environment too
    for policy in ("sft", "ppo", "dpo"):
        played = {f"{policy}/env/{key}" for key in ("pass_at_1", "turns", "tool_calls", "call_errors", "timeouts")}
        assert played <= set(metrics), policy
        assert (f"{policy}/env/no_tool/pass_at_1" in metrics) == (preset == "calculator")  # the tool's value
    report = (project.path / "reports/eval.md").read_text()
    assert "## In the environment" in report and "[observation] " in report and "[policy] " in report
    if preset == "calculator":  # the tool-less baseline retrains ppo only: preferences play with the tool either way
        project.set_param("env", "tools", False)
        assert project.ran(project.dvc("repro")) == {"ppo", "evaluate"}


def test_calculator_chat_preset_runs_the_dag_through_the_chat_templates_tool_calling(tmp_path):
    """The hub tool preset on a stand-in with a Qwen2.5-shaped tool-calling template: demonstrations written in it
    (the tool offered as a JSON schema, calls as `<tool_call>` JSON, results as `tool` turns), episodes played
    through it in ppo and evaluate, the tool taken away for `no_tool`."""
    hub = tmp_path / "hub"
    hub.mkdir()
    rng = random.Random(0)
    call = '<tool_call>\n{"name": "calc", "arguments": {"expression": "12+31+7"}}\n</tool_call>'
    texts = [json.dumps(CALC.schema())] * 20 + [
        f"{calculator_problem(rng)[0]} {call} <tool_response>\n50\n</tool_response> You may call these tools:"
        for _ in range(300)
    ]
    base = chat_llama(hub / "tool-llama", template=QWEN_TOOLS, texts=texts, vocab_size=800, context=512)
    lengths = {"max_length": 300}
    project = Project(
        tmp_path / "repo",
        preset="calculator-chat",
        overrides={
            "model": {"base": base},
            "trainer": CPU,
            "prepare": {"n_train": 200, "n_val": 10, "n_test": 10},
            "sft": {**lengths, "max_new_tokens": 16},
            "preferences": lengths,
            "reward": lengths,
            "reference": lengths,
            "dpo": {**lengths, "max_new_tokens": 16},
            "ppo": {"num_generations": 2, "prompts_per_rollout": 4, "minibatch_size": 4, "max_new_tokens": 16},
            "evaluate": {"pass_k": 2, "max_new_tokens": 16},
            "env": {"turn_tokens": 24, "total_tokens": 120},
            "judge": {"format_pattern": "tool", "format_weight": 0.5},  # as above: pairs from an untrained SFT
        },
    )
    assert project.ran(project.dvc("repro")) == STAGES
    train = pd.read_parquet(project.path / "data/prepared/train.parquet")
    firsts, seconds = train[train["turn"] == 0], train[train["turn"] == 1]
    assert firsts["prompt"].str.startswith("<|im_start|>system\nYou may call these tools:\n<tools>\n").all()
    assert firsts["completion"].str.startswith('<tool_call>\n{"name": "calc", "arguments": {"expression": ').any()
    assert (
        len(seconds)
        and seconds["prompt"].str.contains("</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n").all()
    )
    ppo = project.report("ppo")
    assert {"final/env/success", "final/env/turns", "final/env/call_errors"} <= set(ppo)
    metrics = project.report("metrics")
    for policy in ("sft", "ppo", "dpo"):
        assert {f"{policy}/env/pass_at_1", f"{policy}/env/no_tool/pass_at_1"} <= set(metrics), policy
    report = (project.path / "reports/eval.md").read_text()
    assert "[observation] <|im_start|>system\nYou may call these tools:" in report


def test_hh_preset_learns_kto_from_feedback_in_trls_unpaired_format(tmp_path):
    """KTO through the hh preset's DAG on an unpaired stand-in (prompt, completion, boolean label, as
    `trl-lib/kto-mix-14k`): a bad label stops `dpo` before training, naming the file, row and column, writing nothing;
    the fixed file trains."""
    hub = tmp_path / "hub"
    hub.mkdir()
    pairs = hh_rows(160)
    split = split_dialogues([row["chosen"] for row in pairs], [row["rejected"] for row in pairs], "hh stand-in")
    feedback = []
    for prompt, chosen, rejected in split.itertuples(index=False):
        feedback.append({"prompt": prompt, "completion": chosen, "label": True})
        feedback.append({"prompt": prompt, "completion": rejected, "label": False})
    bad = [dict(row) for row in feedback]
    bad[7]["label"] = "yes"
    data, unpaired = write_jsonl(hub / "hh.jsonl", pairs), write_jsonl(hub / "kto.jsonl", bad)
    kto = {"loss": "kto", "kto_dataset": "json", "kto_data_files": unpaired, "kto_val_fraction": 0.2}
    project = Project(tmp_path / "repo", preset="hh", overrides=_hh_stand_in(hub, data, dpo=kto))
    failed = project.run(sys.executable, "-m", "dvc", "repro", "dpo", check=False)
    assert "kto.jsonl line 8 column 'label': \"yes\" is not a boolean" in failed
    assert not (project.path / "models/dpo").exists() and not (project.path / "reports/dpo.json").exists()
    write_jsonl(hub / "kto.jsonl", feedback)
    assert "dpo" in project.ran(project.dvc("repro", "dpo"))
    report = project.report("dpo")
    assert report["kto/desirable_rows"] + report["kto/undesirable_rows"] == pytest.approx(0.8 * 320, abs=8)
    assert report["kto/weighted_ratio"] == pytest.approx(1.0, abs=0.1)
    assert {"val/kl", "val/rewards/desirable", "val/rewards/undesirable"} <= set(report)
