"""Byte-level BPE tokenizer trained with Hugging Face ``tokenizers`` on the train split.

The result is a standard :class:`transformers.PreTrainedTokenizerFast` (GPT-2 conventions: one
``<|endoftext|>`` token serves as BOS, EOS and UNK) plus a separate ``<|pad|>`` token, so that
padding is never confused with the end of a text. Saved and loaded as an ordinary tokenizer dir:
``AutoTokenizer.from_pretrained(dir)`` works.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN]  # ids 0 and 1


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` (deterministic for the same texts in the same order)."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs at least "
            f"{256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens)"
        )
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return wrap(bpe)


def wrap(bpe: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a raw ``tokenizers.Tokenizer`` with our special tokens as a transformers tokenizer."""
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="left",  # left padding: batched generation appends on the right
        model_max_length=1_000_000,  # the model's n_positions is the real limit
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer dir; a clear error if ``path`` is not one."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer dir {path} does not exist")
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{path} is not a tokenizer dir: no tokenizer.json / tokenizer_config.json")
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    if tok.pad_token is None:
        # Many causal-LM tokenizers ship without a pad token; reuse EOS, masked by attention_mask.
        tok.pad_token = tok.eos_token
    return tok


def tokens_per_word(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> float:
    """Compression measure used to choose the vocabulary size: BPE tokens per whitespace word."""
    n_tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    n_words = sum(len(t.split()) for t in texts)
    return n_tokens / max(n_words, 1)
