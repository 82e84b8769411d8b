"""Sampling continuations from a causal LM (``textgym sample``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pretrain.adapters import load_lm
from pretrain.config import hparam, require_positive, validate_fields


@dataclass
class SampleConfig:
    """Sample continuations of a prompt from a model."""

    model: str = hparam("default", "'default' (the shipped LM) or an HF causal-LM dir")
    prompt: str = hparam("This movie was", "text to continue")
    num_samples: int = hparam(3, "how many continuations")
    max_new_tokens: int = hparam(48, "tokens to generate per continuation")
    temperature: float = hparam(1.0, "softmax temperature (> 0)")
    top_k: int = hparam(50, "sample from the k most likely tokens only (0 = the full distribution)")
    seed: int = hparam(0, "sampling seed")
    device: str = hparam("cpu", "'cpu', 'cuda' or 'auto'")

    def __post_init__(self):
        validate_fields(self)
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not self.prompt.strip():
            raise ValueError(f"prompt must hold text to continue, got {self.prompt!r}")
        require_positive(self, "num_samples", "max_new_tokens")


@torch.no_grad()
def generate_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Sample continuations of a batch of prompts (left-padded), seeded.

    Returns ``input_ids`` (B, P + N), ``attention_mask`` (1 on prompt tokens and on generated
    tokens up to and including the first EOS) and ``completion_mask`` (1 on those generated tokens).
    """
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    for i, ids in enumerate(tokenizer(list(prompts), add_special_tokens=False)["input_ids"]):
        if not ids:
            raise ValueError(f"prompt {i} ({prompts[i]!r}) encodes to no tokens: give at least one token of context to continue")
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    prompt_len = enc["input_ids"].shape[1]
    n_positions = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if n_positions and prompt_len + max_new_tokens > n_positions:
        raise ValueError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model's context of {n_positions} tokens"
        )
    sequences = model.generate(
        **enc,
        do_sample=True,
        temperature=temperature,
        top_k=top_k or None,
        top_p=None,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    generated = sequences[:, prompt_len:]
    # A generated token counts while no EOS came *before* it (the EOS itself counts).
    is_eos = (generated == tokenizer.eos_token_id).long()
    completion_mask = (is_eos.cumsum(1) - is_eos == 0).long()
    return {
        "input_ids": sequences,
        "attention_mask": torch.cat([enc["attention_mask"], completion_mask], dim=1),
        "completion_mask": torch.cat([torch.zeros_like(enc["attention_mask"]), completion_mask], dim=1),
    }


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
) -> list[str]:
    """Sampled continuations (the generated text only, up to the first EOS) of a batch of prompts."""
    out = generate_ids(model, tokenizer, prompts, max_new_tokens, temperature, top_k, seed)
    return completion_texts(tokenizer, out)


def completion_texts(tokenizer: PreTrainedTokenizerBase, out: dict[str, torch.Tensor]) -> list[str]:
    """Decode the completion tokens of a :func:`generate_ids` result (special tokens dropped)."""
    return [
        tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
        for ids, mask in zip(out["input_ids"], out["completion_mask"])
    ]


def sample(cfg: SampleConfig) -> list[str]:
    model, tokenizer = load_lm(cfg.model, device=cfg.device)
    texts = generate(
        model, tokenizer, [cfg.prompt] * cfg.num_samples, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.seed
    )
    for i, text in enumerate(texts):
        print(f"[{i}] {cfg.prompt}{text}")
    return texts
