"""Log-probabilities of completions under a causal LM: the one home of this computation.

PPO, REINFORCE, DQN's evaluation, ``textgym eval``, DPO and SFT all score completions here::

    log pi(y_t | x, y_<t) = logits_t[y_t] - logsumexp(logits_t)        (over the valid tokens, if given)

for the completion tokens y of each row and 0 elsewhere. Position ids are derived from the
attention mask, so a left-padded row gets exactly the log-probs it gets unpadded, and the LM head
runs only on the positions that predict a completion token (``logits_to_keep``), not on the prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from pretrain.padding import position_ids_from_mask


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] per position, without materialising the full log-softmax twice.

    logits (B, T, V), labels (B, T) -> (B, T).
    """
    logits = logits.float()
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def masked_log_softmax(logits: torch.Tensor, valid_actions: torch.Tensor | None = None) -> torch.Tensor:
    """float32 log-softmax over the last dim, with the tokens outside ``valid_actions`` (V,) at -inf."""
    logits = logits.float()
    if valid_actions is not None:
        logits = logits.masked_fill(~valid_actions, float("-inf"))
    return F.log_softmax(logits, dim=-1)


def gather_logprobs(log_probs: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log_probs (B, T, V) at ``tokens`` (B, T) where ``mask`` (B, T) is True, exactly 0 elsewhere
    (never the -inf of a padding token that the valid-action mask excludes)."""
    # Off the mask the picked value may be -inf (a padding token outside the valid actions); the
    # where() drops it, and its gradient there is 0, so neither the values nor the gradients see it.
    picked = log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, picked, torch.zeros_like(picked))


def keep_from(completion_mask: torch.Tensor) -> int:
    """How many last positions need the LM head: from the one before the first completion column on."""
    columns = completion_mask.any(0).nonzero()
    return min(completion_mask.shape[1] - int(columns[0]) + 1, completion_mask.shape[1]) if len(columns) else 1


def completion_logprobs(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    valid_actions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token log pi(x_t | x_<t) for the completion tokens, zero elsewhere: (B, S) float32.

    ``input_ids``, ``attention_mask`` (B, S) left-padded rows; ``completion_mask`` (B, S) 1 on
    completion tokens (never on padding or the prompt; the first column is never a completion
    token, as nothing predicts it); ``valid_actions`` (V,) bool restricts the softmax to the tokens
    a policy may emit (the agents' action mask), None = the full vocabulary.
    """
    n_keep = keep_from(completion_mask)
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=n_keep,
    ).logits[:, -n_keep:]
    # The logits at position t predict token t + 1.
    log_probs = masked_log_softmax(logits[:, :-1], valid_actions)
    targets, mask = input_ids[:, -n_keep + 1:], completion_mask[:, -n_keep + 1:].bool()
    logps = gather_logprobs(log_probs, targets, mask)
    return F.pad(logps, (input_ids.shape[1] - logps.shape[1], 0))


def sequence_logprobs(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
) -> torch.Tensor:
    """log pi(completion | prompt) = sum of completion-token log-probs, padding masked: (B,)."""
    return completion_logprobs(model, input_ids, attention_mask, completion_mask).sum(-1)


def text_token_limit(model) -> int | None:
    """How many tokens of text ``model`` reads at once: its ``n_positions`` (GPT-2) less the virtual
    tokens of a soft prompt (``pretrain.adapters``), looking through a data-parallel wrapper; None
    (not checked here) for a config without ``n_positions``."""
    model = getattr(model, "module", model)
    n_positions = getattr(model.config, "n_positions", None)
    return None if n_positions is None else n_positions - getattr(model, "num_virtual_tokens", 0)


def tokenize_pairs(
    tokenizer, prompts: list[str], completions: list[str], max_length: int | None = None
) -> tuple[list[list[int]], list[list[int]]]:
    """The library's one token representation of (prompt, completion) *texts*: each text's canonical
    tokenisation (``tokenizer(text)``, no special tokens), prompt then completion.

    Everything that scores or fine-tunes on text goes through it: the reward model (training, the
    env's reward, evaluation), DPO and SFT. A policy's sampled token ids are decoded to text first,
    so a reward is a function of the text, never of how the policy happened to segment it (byte-level
    BPE is not a bijection: the same text has many segmentations). Returns (prompt_ids,
    completion_ids). A pair longer than ``max_length`` tokens is a ``ValueError``, never truncated.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
    if not prompts:
        raise ValueError("cannot encode an empty batch")
    bad = [x for x in (*prompts, *completions) if not isinstance(x, str)]
    if bad:
        raise ValueError(f"prompts and completions must be str, got {type(bad[0]).__name__} {bad[0]!r}")
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    if max_length is not None:
        lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)]
        i = max(range(len(lengths)), key=lengths.__getitem__)
        if lengths[i] > max_length:
            raise ValueError(
                f"example {i} is {lengths[i]} tokens long (prompt {len(prompt_ids[i])} + completion "
                f"{len(completion_ids[i])}), more than max_length={max_length}"
            )
    return prompt_ids, completion_ids


def encode(
    tokenizer,
    prompts: list[str],
    completions: list[str],
    max_length: int | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Tokenize (prompt, completion) pairs (``tokenize_pairs``), join them and left-pad the batch.

    Returns ``input_ids``, ``attention_mask`` and ``completion_mask`` (1 on completion tokens), all
    (B, T). A pair longer than ``max_length`` is an error, never silently truncated.
    """
    prompt_ids, completion_ids = tokenize_pairs(tokenizer, prompts, completions, max_length)
    rows = [p + c for p, c in zip(prompt_ids, completion_ids)]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        start = width - len(p) - len(c)
        input_ids[i, start:] = torch.tensor(p + c, dtype=torch.long)
        attention_mask[i, start:] = 1
        completion_mask[i, width - len(c) :] = 1 if c else 0
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "completion_mask": completion_mask.to(device),
    }
