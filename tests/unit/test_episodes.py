"""Multi-turn rollouts (`pipeline.envs.episodes`) with scripted policies: sampling patched to fixed token ids, as
TRL's tests do; then a real model, whose sampler log-probs the trainer's must reproduce on the policy tokens."""

import dataclasses
import random
import re
import threading
import time

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from pipeline.config import load_config, read_params
from pipeline.data.chat import use_chat_template
from pipeline.data.tokenization import encode, train_bpe_tokenizer
from pipeline.envs import episodes as episodes_module
from pipeline.envs.base import EnvironmentBug, Step
from pipeline.envs.calculator import Calculator
from pipeline.envs.dialogue import ChatTemplate, closing, tag_tokens
from pipeline.envs.episodes import (
    Budgets,
    Episode,
    EpisodeSpec,
    check_resets,
    episode_batch,
    episode_stats,
    run_episodes,
)
from pipeline.envs.guess import CEILING, HIGH, LOW, Guess, intro
from pipeline.envs.tools import CALC
from pipeline.models.generation import SamplingParams
from pipeline.models.judges import VerifierJudge
from pipeline.models.logprobs import model_token_logps
from pipeline.models.verifiers import Verifier
from pipeline.tasks.preferences import episode_pairs
from pipeline.tasks.tools import calculator_problem
from tests.defaults import ROOT
from tests.standins import QWEN_TOOLS, chat_tokenizer

PARAMS = SamplingParams(16, temperature=1.0, top_k=0, top_p=1.0)
BUDGETS = Budgets(max_turns=6, turn_tokens=16, total_tokens=200)


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    texts = [
        calculator_problem(rng)[0] + " <calc>12+31</calc><result>43</result> 43 higher. lower." for _ in range(200)
    ]
    return train_bpe_tokenizer(texts + [intro()], vocab_size=400, special=tag_tokens(["calc"]))


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=256,
        n_embd=32,
        n_layer=2,
        n_head=2,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config)


def scripted(monkeypatch, tokenizer, script):
    """Patch the sampler: a row starting a turn draws the ids of `script(its context as text)`, one per draw, ended
    by EOS unless the text ends on a stop (a tool's closing tag); the rollout loop cuts it at the turn's budget.
    Records every context a turn started from."""
    seen = []
    calc = tokenizer.convert_tokens_to_ids(closing("calc"))
    stops = {tokenizer.eos_token_id} | ({calc} if calc != tokenizer.unk_token_id else set())

    class ScriptedDecoder:
        def __init__(self, policy, prompts, params, **kwargs):
            self.contexts, self.actions = [list(ids) for ids in prompts], [[] for _ in prompts]

        def draw(self, rows):
            drawn = []
            for row in rows:
                if not self.actions[row]:
                    seen.append(list(self.contexts[row]))
                    action = encode(
                        tokenizer, [script(tokenizer.decode(self.contexts[row], skip_special_tokens=False))]
                    )[0]
                    self.actions[row] = action if action and action[-1] in stops else action + [tokenizer.eos_token_id]
                token = self.actions[row].pop(0)
                if token in stops:
                    self.actions[row] = []
                drawn.append((token, 0.0))
            return drawn

        def feed(self, tokens):
            for context, token in zip(self.contexts, tokens, strict=True):
                context += [] if token is None else [token]

        def keep(self, rows):
            self.contexts = [self.contexts[row] for row in rows]
            self.actions = [self.actions[row] for row in rows]

    monkeypatch.setattr(episodes_module, "Decoder", ScriptedDecoder)
    return seen


def _run(model, tokenizer, env, rows, budgets=BUDGETS, **kwargs):
    arguments = {"seed": 0, "batch_size": 8, "timeout_s": 5.0, "kind": "test"}
    tool_stops = [tokenizer.convert_tokens_to_ids(closing("calc"))]
    return run_episodes(model, tokenizer, env, rows, budgets, PARAMS, tool_stops=tool_stops, **{**arguments, **kwargs})


def test_the_trajectory_is_the_ids_as_sampled_and_observed_and_the_mask_marks_the_policys(
    monkeypatch, model, tokenizer
):
    def script(context: str) -> str:
        return "<calc>12+31</calc>" if "<result>" not in context else " so 43"

    seen = scripted(monkeypatch, tokenizer, script)
    (episode,) = _run(model, tokenizer, Calculator, [{"prompt": "Ann has 12, Bo has 31 coins.", "answer": "43"}])
    call, result, answer = (
        encode(tokenizer, [text])[0] for text in ("<calc>12+31</calc>", "<result> 43</result>", " so 43")
    )
    eos = tokenizer.eos_token_id
    assert episode.ids == call + result + answer + [eos]  # each part tokenised once, appended in order
    assert episode.policy == [True] * len(call) + [False] * len(result) + [True] * (len(answer) + 1)
    assert seen[1] == episode.prompt_ids + call + result  # the second turn saw exactly the trajectory's ids
    assert (episode.reward, episode.turns, episode.tool_calls, episode.done) == (1.0, 2, 1, True)
    assert [role for role, _ in episode.transcript] == ["observation", "policy", "observation", "policy"]
    batch = episode_batch([episode], tokenizer.pad_token_id)
    start = len(episode.prompt_ids)  # token-aligned: position t is 1 where token t + 1 is the policy's
    expected = [0.0] * (start - 1) + [float(p) for p in episode.policy]
    assert batch["mask"][0].tolist() == expected and batch["input_ids"].shape[1] == start + len(episode.ids)


def test_under_a_chat_template_the_trajectory_is_what_the_template_renders_of_the_whole_conversation(monkeypatch):
    """A chat model's episode (the tool offered in the first observation, a `<tool_call>` ended by the end-of-turn
    token, the result a `tool` turn appended through the template): its ids, as text, are the template's rendering
    of the conversation; the tool's turn is the environment's, the rest the policy's."""
    tokenizer = chat_tokenizer(template=QWEN_TOOLS)
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    tokenizer = use_chat_template(tokenizer, "auto")
    dialogue = ChatTemplate(tokenizer)
    call = dialogue.call(CALC, "12+31")
    scripted(monkeypatch, tokenizer, lambda context: call if "tool_response" not in context else "43")
    first = dialogue.first("Ann has 12, Bo has 31 coins. How many?", [CALC])
    torch.manual_seed(0)
    shape = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=1024, **shape))
    (episode,) = run_episodes(
        model,
        tokenizer,
        lambda: Calculator(dialogue),
        [{"prompt": first, "answer": "43"}],
        Budgets(max_turns=3, turn_tokens=200, total_tokens=400),
        PARAMS,
        seed=0,
        batch_size=1,
        timeout_s=5.0,
        kind="calculator",
    )
    function = {"name": "calc", "arguments": {"expression": "12+31"}}
    conversation = [
        {"role": "user", "content": "Ann has 12, Bo has 31 coins. How many?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": function}]},
        {"role": "tool", "content": "43"},
        {"role": "assistant", "content": "43"},
    ]
    rendered = tokenizer.apply_chat_template(conversation, tools=[CALC.schema()], tokenize=False)
    text = tokenizer.decode(episode.prompt_ids + episode.ids, skip_special_tokens=False)
    assert text + "\n" == rendered and (episode.reward, episode.tool_calls, episode.turns) == (1.0, 1, 2)
    observed = tokenizer.decode([t for t, mine in zip(episode.ids, episode.policy, strict=True) if not mine])
    assert observed == "\n<|im_start|>user\n<tool_response>\n43\n</tool_response><|im_end|>\n<|im_start|>assistant\n"


def test_each_malformed_call_is_answered_counted_and_the_episode_goes_on(monkeypatch, model, tokenizer):
    calls = iter(["12+7</calc>", "<calc> </calc>", "<calc>12 plus</calc>", " 19"])
    scripted(monkeypatch, tokenizer, lambda context: next(calls))
    (episode,) = _run(model, tokenizer, Calculator, [{"prompt": "Sum 12 and 7.", "answer": "19"}])
    observations = [text for role, text in episode.transcript[1:] if role == "observation"]
    assert observations == [
        "<result> error: </calc> without <calc></result>",
        "<result> error: empty <calc> call</result>",
        "<result> error: calc: cannot parse '12 plus'</result>",
    ]
    assert (episode.call_errors, episode.tool_calls, episode.reward, episode.done) == (3, 3, 1.0, True)
    assert episode_stats([episode])["env/call_errors"] == 3.0


def test_each_budget_ends_the_episode_flagged(monkeypatch, model, tokenizer):
    scripted(monkeypatch, tokenizer, lambda context: " 5")  # always wrong: the secret is 20
    rows = [{"answer": 20}]
    (turns,) = _run(model, tokenizer, Guess, rows, Budgets(max_turns=3, turn_tokens=16, total_tokens=80))
    assert (turns.truncated, turns.turns, turns.done) == ("turns", 3, False)

    scripted(monkeypatch, tokenizer, lambda context: " maybe it is 5 or 6 or 7 or 8 or 9 or 10 or 11")
    (long_turn,) = _run(model, tokenizer, Guess, rows, Budgets(max_turns=6, turn_tokens=8, total_tokens=80))
    assert long_turn.truncated == "turn_tokens" and len(long_turn.ids) == 8 and all(long_turn.policy)

    scripted(monkeypatch, tokenizer, lambda context: " 5")
    (total,) = _run(model, tokenizer, Guess, rows, Budgets(max_turns=6, turn_tokens=8, total_tokens=9))
    assert total.truncated == "total_tokens" and len(total.ids) <= 9 and total.policy[-1]  # never ends on an answer
    stats = episode_stats([turns, long_turn, total])
    assert stats["env/truncated_turns"] == stats["env/truncated_tokens"] == stats["env/truncated_total"] == 1 / 3


def test_a_budget_beyond_the_models_context_is_refused_naming_the_key(model, tokenizer):
    with pytest.raises(ValueError, match=r"env.total_tokens: 500 tokens .* context of 256 positions"):
        _run(model, tokenizer, Guess, [{"answer": 3}], Budgets(max_turns=2, turn_tokens=8, total_tokens=500))


class Hanging(Guess):
    def step(self, action: str) -> Step:
        time.sleep(30)
        return super().step(action)


class BrokenReset(Guess):
    def reset(self, row):
        raise KeyError("answer")


def test_a_hanging_step_ends_its_episode_in_time_and_a_reset_that_raises_is_named(monkeypatch, model, tokenizer):
    scripted(monkeypatch, tokenizer, lambda context: " 16")
    start = time.monotonic()
    (episode,) = _run(model, tokenizer, Hanging, [{"answer": 20}], timeout_s=0.2)
    assert time.monotonic() - start < 5 and episode.timed_out and episode.reward == 0.0 and episode.turns == 1
    assert episode_stats([episode])["env/timeouts"] == 1.0
    off_main = []  # off the main thread (no SIGALRM there) the step runs in a thread of its own, bounded the same
    worker = threading.Thread(
        target=lambda: off_main.extend(_run(model, tokenizer, Hanging, [{"answer": 20}], timeout_s=0.2))
    )
    worker.start()
    worker.join(5)
    assert not worker.is_alive() and off_main[0].timed_out and off_main[0].reward == 0.0
    with pytest.raises(EnvironmentBug, match=r"env.kind broken: reset raised on row 0 \(KeyError: 'answer'\)"):
        check_resets(BrokenReset, [{"answer": 3}], "broken")  # what ppo does before it trains
    made = iter([Guess(), BrokenReset()])
    with pytest.raises(EnvironmentBug, match=r"env.kind test: reset raised on row 1 \(KeyError: 'answer'\)"):
        _run(model, tokenizer, lambda: next(made), [{"answer": 3}, {"answer": 4}])


def binary_search(context: str) -> str:
    """The optimal guesser: the middle of what the answers so far leave."""
    low, high = LOW, HIGH
    guesses = [int(number) for number in re.findall(r"\d+", context)][3:]  # after the intro's three numbers
    answers = re.findall(r"higher|lower", context)
    for guess, answer in zip(guesses, answers, strict=False):
        low, high = (guess + 1, high) if answer == "higher" else (low, guess - 1)
    return f" {(low + high) // 2}"


def test_binary_search_scores_the_known_ceiling_through_the_real_rollout_code(monkeypatch, model, tokenizer):
    scripted(monkeypatch, tokenizer, binary_search)
    rows = [{"answer": secret} for secret in range(LOW, HIGH + 1)]
    episodes = _run(model, tokenizer, Guess, rows, Budgets(max_turns=6, turn_tokens=8, total_tokens=80))
    stats = episode_stats(episodes)
    assert stats["env/success"] == CEILING["success_rate"] and stats["env/turns"] == CEILING["mean_turns"]
    assert stats["env/truncated_turns"] == 0 and stats["env/call_errors"] == 0


def test_the_trainers_log_probs_equal_the_samplers_on_the_policy_tokens(model, tokenizer):
    rows = [{"answer": secret} for secret in (3, 17, 30, 9)]
    params = SamplingParams(6, temperature=0.7, top_k=0, top_p=1.0)
    episodes = run_episodes(
        model,
        tokenizer,
        Guess,
        rows,
        Budgets(max_turns=3, turn_tokens=6, total_tokens=60),
        params,
        seed=3,
        batch_size=4,
        timeout_s=5.0,
        kind="guess",
        tool_stops=list(range(3, 200)),  # a random model: most tokens end a turn, so episodes last several turns
        with_logps=True,
    )
    assert sum(e.turns for e in episodes) > len(episodes)  # several turns, observations between them
    batch = episode_batch(episodes, tokenizer.pad_token_id)
    logps, _ = model_token_logps(model.eval(), batch["input_ids"], batch["attention_mask"], temperature=0.7)
    for row, episode in enumerate(episodes):
        trained = logps[row][batch["mask"][row].bool()]
        torch.testing.assert_close(trained, torch.tensor(episode.sampler_logps), atol=1e-4, rtol=1e-4)


class Chatter:
    """Answers every turn with `row["words"]` words and ends the episode after `row["turns"]` turns."""

    def reset(self, row):
        self.row, self.turns = row, 0
        return row["prompt"]

    def step(self, action: str) -> Step:
        self.turns += 1
        return Step(" higher" * self.row["words"], done=self.turns == self.row["turns"])


def test_each_row_is_its_own_stream_the_same_alone_as_beside_rows_that_end_sooner_or_later(model, tokenizer):
    """Greedy episodes of different lengths and answers played in one batch (rows fed their answers while others
    draw, rows leaving the batch) and each played alone: the same ids, the same log-probs (so the same positions
    and attention)."""
    prompts = ["Ann has 12 coins.", "Sum 12 and 7, then 31.", "lower", "Bo has 31, Ann 12 and Cy 43 coins."]
    rows = [{"prompt": p, "words": 1 + i, "turns": 4 - i} for i, p in enumerate(prompts)]
    stops = list(range(3, len(tokenizer)))  # every turn one token: the rows' phases are set by their answers
    arguments = {"seed": 5, "timeout_s": 5.0, "kind": "chatter", "tool_stops": stops, "with_logps": True}
    greedy = SamplingParams(6, temperature=0.0, top_k=0, top_p=1.0)
    budgets = Budgets(max_turns=4, turn_tokens=6, total_tokens=60)
    together = run_episodes(model, tokenizer, Chatter, rows, budgets, greedy, batch_size=4, **arguments)
    assert [e.turns for e in together] == [4, 3, 2, 1] and len({len(e.ids) for e in together}) > 2
    for row, episode in zip(rows, together, strict=True):
        (alone,) = run_episodes(model, tokenizer, Chatter, [row], budgets, greedy, batch_size=1, **arguments)
        assert alone.ids == episode.ids and alone.policy == episode.policy
        torch.testing.assert_close(torch.tensor(alone.sampler_logps), torch.tensor(episode.sampler_logps))


@pytest.mark.parametrize(("top_k", "top_p"), [(0, 1.0), (5, 1.0), (0, 0.8), (7, 0.6)])
def test_the_samplers_filter_keeps_what_generates_warpers_keep(top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    scores = torch.randn(6, 50, generator=torch.Generator().manual_seed(top_k))
    expected = scores.clone()
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(None, expected)
    torch.testing.assert_close(episodes_module.filtered(scores, top_k, top_p), expected, rtol=0, atol=0)


def test_environment_pass_at_k_and_rates_by_hand():
    from pipeline.eval.environments import Played, played_metrics, transcripts_markdown

    def episode(reward, turns, truncated=None):
        return Episode([1], reward=reward, turns=turns, truncated=truncated, transcript=[("observation", "q")])

    # two rows, 4 episodes each: row 0 wins once, row 1 never (one cut by the turn budget)
    played = Played([episode(1.0, 2)] + [episode(0.0, 3)] * 3 + [episode(0.0, 6, "turns")] + [episode(0.0, 4)] * 3, 4)
    metrics = played_metrics(played)
    assert metrics["pass_at_1"] == (0.25 + 0.0) / 2 and metrics["pass_at_4"] == (1.0 + 0.0) / 2
    assert metrics["turns"] == (2 + 3 * 3 + 6 + 3 * 4) / 8 and metrics["truncated_turns"] == 1 / 8
    text = transcripts_markdown(
        {"sft": played}, {f"sft/env/{k}": v for k, v in metrics.items()}, n_shown=1, ceiling=Guess.ceiling
    )
    assert "| sft | 0.125 | 0.500 | - | 3.62 |" in text and "[observation] q" in text
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table[-1] == "| optimal (binary search) | 1.000 | - | - | 4.22 | - | - | - | - |"
    assert {line.count("|") for line in table} == {10}  # the ceiling's row has the table's columns


def test_preference_pairs_in_an_environment_are_first_turns_judged_by_the_episodes_they_start(
    monkeypatch, model, tokenizer
):
    """The `preferences` stage under `env.kind`: k episodes per row, each first turn scored by its whole episode
    (env.reward_weight x the environment's reward + the judge on the final turn), pairs of first turns only."""
    question, numbers = (
        "Q: Ann has 12 apples, Bo has 31 apples, Cy has 7 apples. How many apples in all?\nA:",
        [12, 31, 7],
    )
    calls = iter([" <calc> 12 + 31 + 7</calc>", " <calc> 12 + 31</calc>"] * 4)

    def script(context: str) -> str:  # first turns alternate a right call and one leaving 7 out; then copy the result
        return next(calls) if context == question else " " + re.findall(r"-?\d+", context)[-1]

    scripted(monkeypatch, tokenizer, script)
    spec = EpisodeSpec(Calculator, "calculator", BUDGETS, 5.0, (tokenizer.convert_tokens_to_ids(closing("calc")),), 2.0)
    judge = VerifierJudge(Verifier("exact", timeout_s=10)).with_answers({question: str(sum(numbers))})
    cfg = load_config(read_params(ROOT / "params.yaml")).preferences
    cfg = dataclasses.replace(cfg, k=4, tau=0.0, min_gold_gap=0.0)
    table, stats = episode_pairs(model, tokenizer, [{"prompt": question, "answer": "50"}], cfg, judge, spec, seed=0)
    # 4 episodes: two right calls (each scored 2 x 1 + 1), two wrong (0); the 2 tied pairs of identical texts dropped
    assert len(table) == 4 and stats["dropped_ties"] == 2 and stats["samples/env/turns"] == 2.0
    assert (table["prompt"] == question).all() and (table["chosen"] == " <calc> 12 + 31 + 7</calc>").all()
    assert (table["rejected"] == " <calc> 12 + 31</calc>").all()  # the tool's result is in no response
    assert (table["chosen_gold"] == 3.0).all() and (table["rejected_gold"] == 0.0).all()
    assert stats["samples/gold_mean"] == 1.5 and stats["samples/env/success"] == 0.5
