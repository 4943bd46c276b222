"""Tokenizers: train the scratch model's byte-level BPE, load any tokenizer, and encode prompt/completion rows.

Prompts and completions are encoded separately and concatenated (`prompt_ids + completion_ids + [eos]`), the same
way in SFT, the reward model, DPO, PPO and evaluation, so a completion's tokens never depend on where a merge
would have crossed the prompt boundary. Pad and EOS are always distinct tokens: the reward model reads its score
at the EOS, and a pad equal to EOS would hide where a response ended.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|pad|>"


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int, special: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 style) on `texts`, with EOS and pad special tokens, and `special` ones
    more (a tool protocol's tags: each one token, never split or merged)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN, *special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    extra = {"additional_special_tokens": list(special)} if special else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=PAD_TOKEN, **extra
    )


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer; give it a pad token distinct from EOS when it has none (GPT-2, Pythia)."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {name_or_path!r} has no EOS token; completions could never end")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.padding_side = "right"
    return tokenizer


def encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (one batched call)."""
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]
