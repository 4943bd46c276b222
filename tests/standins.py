"""Local stand-ins for hub models and datasets, in the hub's own formats, generated inside the tests.

Nothing here is committed as weights: each builder writes a tiny random-init `save_pretrained` directory (or JSON
lines shaped like the hub dataset) into a test's temporary folder, so the hub-loading code runs offline on the
same files it would download:

- `chat_llama`: a Llama-architecture causal LM (GQA, RoPE, untied head) whose tokenizer has a ChatML template;
  like Llama 3 Instruct its EOS (`<|endoftext|>`) differs from the end-of-turn (`<|im_end|>`).
- `gpt2_hub` / `neox_hub`: `gpt2` and `EleutherAI/pythia-*` shapes (no pad token, GELU, hub dropout).
- `sentiment_classifier` / `encoder_reward_model`: DistilBERT-style judges with their own WordPiece tokenizer
  (`[CLS] text [SEP]`), as `lvwerra/distilbert-imdb` and the DeBERTa reward models are.
- `imdb_rows`, `hh_rows`, `ultrafeedback_rows`: rows shaped like `stanfordnlp/imdb`, `Anthropic/hh-rlhf` and
  `trl-lib/ultrafeedback_binarized`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from pipeline.tasks.synthetic import generate_reviews

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' "
    "+ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# The shape of Qwen2.5-Instruct's template with tools (written for these tests, not copied): the tools' JSON schemas
# listed in a system turn, an assistant's calls as `<tool_call>` JSON, each `tool` turn a `<tool_response>` inside a
# user turn (consecutive ones share it).
QWEN_TOOLS = (
    "{%- if tools %}{{ '<|im_start|>system\\nYou may call these tools:\\n<tools>' }}{%- for tool in tools %}"
    "{{ '\\n' + (tool | tojson) }}{%- endfor %}{{ '\\n</tools>\\nCall one as <tool_call>\\n{\"name\": <name>, "
    '"arguments": <object>}\\n</tool_call><|im_end|>\\n\' }}{%- endif %}'
    "{%- for message in messages %}"
    "{%- if message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{ '<|im_start|>user' }}{%- endif %}"
    "{{ '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{ '<|im_end|>\\n' }}{%- endif %}"
    "{%- elif message.role == 'assistant' and message.tool_calls %}{{ '<|im_start|>assistant' }}"
    "{%- if message.content %}{{ '\\n' + message.content }}{%- endif %}"
    "{%- for call in message.tool_calls %}{%- set call = call.function if call.function is defined else call %}"
    '{{ \'\\n<tool_call>\\n{"name": "\' + call.name + \'", "arguments": \' + (call.arguments | tojson) + '
    "'}\\n</tool_call>' }}{%- endfor %}{{ '<|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
EOS, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"


def corpus(n: int = 300, seed: int = 0) -> list[str]:
    """Sentences from the embedded grammar: the stand-ins' tokenizers are trained on them."""
    return [
        r.prompt + r.completion for r in generate_reviews(n, random.Random(seed), frac_positive=0.4, frac_negative=0.4)
    ]


def bpe_tokenizer(texts: Sequence[str], specials: Sequence[str], vocab_size: int = 400, **tokens: str):
    """A byte-level BPE tokenizer with the given special tokens (`eos_token=...` etc. name their roles)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokens)


def chat_tokenizer(
    texts: Sequence[str] | None = None, template: str = CHATML, vocab_size: int = 400
) -> PreTrainedTokenizerFast:
    tokenizer = bpe_tokenizer(texts or corpus(), [EOS, IM_START, IM_END], vocab_size, eos_token=EOS, bos_token=EOS)
    tokenizer.chat_template = template
    return tokenizer


def _save(model, tokenizer, path: Path) -> str:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)


def chat_llama(
    path: Path,
    seed: int = 0,
    template: str = CHATML,
    texts: Sequence[str] | None = None,
    vocab_size: int = 400,
    context: int = 256,
) -> str:
    """A tiny Llama-architecture chat model with a ChatML template (or `template`, e.g. `QWEN_TOOLS`), its
    tokenizer trained on `texts` (the review grammar by default); no pad token, EOS != end-of-turn."""
    tokenizer = chat_tokenizer(texts, template, vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return _save(LlamaForCausalLM(config), tokenizer, path)


def gpt2_hub(path: Path, seed: int = 0) -> str:
    """A tiny `gpt2`-shaped checkpoint: `gelu_new`, dropout 0.1, EOS but no pad token."""
    tokenizer = bpe_tokenizer(corpus(), [EOS], eos_token=EOS, bos_token=EOS)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=256,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return _save(GPT2LMHeadModel(config), tokenizer, path)


def neox_hub(path: Path, seed: int = 0) -> str:
    """A tiny `EleutherAI/pythia`-shaped GPT-NeoX checkpoint (rotary, parallel residual, no pad token)."""
    tokenizer = bpe_tokenizer(corpus(), [EOS], eos_token=EOS, bos_token=EOS)
    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return _save(GPTNeoXForCausalLM(config), tokenizer, path)


def wordpiece_tokenizer(texts: Sequence[str]) -> PreTrainedTokenizerFast:
    """A BERT-style tokenizer: lower-cased WordPiece, `[CLS] a [SEP]` and `[CLS] a [SEP] b [SEP]`."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.train_from_iterator(
        texts, trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
    )
    cls, sep = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    backend.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )


def _distilbert(path: Path, labels: dict[int, str], seed: int) -> str:
    tokenizer = wordpiece_tokenizer(corpus())
    torch.manual_seed(seed)
    config = DistilBertConfig(
        vocab_size=len(tokenizer),
        dim=32,
        n_layers=2,
        n_heads=2,
        hidden_dim=64,
        max_position_embeddings=512,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
        pad_token_id=tokenizer.pad_token_id,
    )
    return _save(DistilBertForSequenceClassification(config), tokenizer, path)


def sentiment_classifier(path: Path, seed: int = 0) -> str:
    """A tiny two-label classifier shaped like `lvwerra/distilbert-imdb` (`id2label` NEGATIVE / POSITIVE)."""
    return _distilbert(path, {0: "NEGATIVE", 1: "POSITIVE"}, seed)


def encoder_reward_model(path: Path, seed: int = 0) -> str:
    """A tiny one-logit encoder reward model, scored on the (prompt, response) pair as DeBERTa RMs are."""
    return _distilbert(path, {0: "LABEL_0"}, seed)


def write_jsonl(path: Path, rows: Sequence[dict]) -> str:
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return str(path)


def imdb_rows(n: int, seed: int = 0) -> list[dict]:
    """`stanfordnlp/imdb` rows: a whole review in `text`, a 0/1 `label`."""
    reviews = generate_reviews(n, random.Random(seed), frac_positive=0.4, frac_negative=0.4, unique_prompts=True)
    return [{"text": r.prompt + r.completion, "label": int(r.gold > 0)} for r in reviews]


def hh_rows(n: int, seed: int = 0) -> list[dict]:
    """`Anthropic/hh-rlhf` rows: `chosen` and `rejected` whole dialogues sharing all but the last reply."""
    reviews = generate_reviews(2 * n, random.Random(seed), frac_positive=0.4, frac_negative=0.4, unique_prompts=True)
    rows = []
    for i, (a, b) in enumerate(zip(reviews[:n], reviews[n:], strict=True)):
        context = f"\n\nHuman: Tell me about film {i}.\n\nAssistant: {a.prompt}\n\nHuman: And then?\n\nAssistant:"
        rows.append({"chosen": context + a.completion, "rejected": context + b.completion})
    return rows


def ultrafeedback_rows(n: int, seed: int = 0) -> list[dict]:
    """`trl-lib/ultrafeedback_binarized` rows: `chosen`/`rejected` conversations with an implicit prompt."""
    reviews = generate_reviews(2 * n, random.Random(seed), frac_positive=0.4, frac_negative=0.4, unique_prompts=True)
    rows = []
    for a, b in zip(reviews[:n], reviews[n:], strict=True):
        user = {"role": "user", "content": f"Write about this: {a.prompt}"}
        rows.append(
            {
                "chosen": [user, {"role": "assistant", "content": a.completion.strip()}],
                "rejected": [user, {"role": "assistant", "content": b.completion.strip()}],
                "score_chosen": 8.0,
                "score_rejected": 4.0,
            }
        )
    return rows
