"""Shared fixtures: tiny tokenizers and random-init causal LMs of several architectures, offline."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

from pretrain import corpus
from pretrain.tokenizer import train_tokenizer
from rlhf.reward_model import RewardModel

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A 512-token byte-level BPE trained on 500 real train reviews."""
    return train_tokenizer(corpus.texts("train")[:500], vocab_size=512)


def tiny_config(arch: str, vocab_size: int, eos: int = 0, pad: int = 1, dropout: float = 0.0):
    common = dict(vocab_size=vocab_size, bos_token_id=eos, eos_token_id=eos, pad_token_id=pad)
    if arch == "gpt2":
        return GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=128, resid_pdrop=dropout, embd_pdrop=dropout,
                          attn_pdrop=dropout, **common)
    kw = dict(
        attention_dropout=dropout,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        **common,
    )
    return {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch](**kw)


ARCHS = ("gpt2", "llama", "qwen2")


def save_tiny_lm(arch: str, path, tokenizer, seed: int = 0, dropout: float = 0.0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer), dropout=dropout))
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session", params=ARCHS)
def tiny_model_dir(request, tmp_path_factory, tiny_tokenizer):
    """A random-init causal LM of each architecture + tokenizer, saved as an HF dir."""
    return save_tiny_lm(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"), tiny_tokenizer)


@pytest.fixture(scope="session", params=ARCHS)
def tiny_dropout_dir(request, tmp_path_factory, tiny_tokenizer):
    """Like ``tiny_model_dir``, but its config has dropout 0.1 (as published GPT-2 checkpoints do)."""
    return save_tiny_lm(request.param, tmp_path_factory.mktemp(f"tiny-dropout-{request.param}"), tiny_tokenizer, dropout=0.1)


@pytest.fixture(scope="session")
def toy_dropout_dir(tmp_path_factory):
    """A tiny GPT-2 over the toy env's 8 words with dropout 0.1 everywhere in its config."""
    from envs.toy import toy_tokenizer
    from pretrain.model import build_gpt2, save_lm

    torch.manual_seed(0)
    tokenizer = toy_tokenizer()
    model = build_gpt2(len(tokenizer), n_layer=2, n_embd=32, n_head=2, n_positions=64, dropout=0.1,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return str(save_lm(model, tokenizer, tmp_path_factory.mktemp("toy-dropout")))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tiny_tokenizer):
    return save_tiny_lm("gpt2", tmp_path_factory.mktemp("tiny-gpt2"), tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_rm_dir(tmp_path_factory, tiny_gpt2_dir):
    """A tiny reward model (random score head) on the tiny GPT-2, sharing its tokenizer."""
    torch.manual_seed(0)
    rm = RewardModel.from_lm(tiny_gpt2_dir)
    torch.nn.init.normal_(rm.model.score.weight, std=0.5)
    return rm.save(tmp_path_factory.mktemp("tiny-rm"))


@pytest.fixture(scope="session")
def tiny_env_kwargs(tiny_gpt2_dir, tiny_rm_dir):
    """TextGen env kwargs on the tiny LM and RM: fast enough for many steps in a test."""
    return dict(model=str(tiny_gpt2_dir), reward_model=str(tiny_rm_dir), max_new_tokens=6,
                prompts=["This movie was", "I watched it and", "Terrible"])
