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

from pretrain.padding import position_ids_from_mask, right_pad


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


def output_head(model) -> torch.nn.Linear | None:
    """The LM head of ``model`` (looking through a data-parallel wrapper and the adapter wrappers)
    when it is a plain ``nn.Linear`` that maps the last hidden state to the logits, else None."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module  # DistributedDataParallel
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if type(head) is torch.nn.Linear else None


def packed_sequence_logprobs(
    model: PreTrainedModel,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    pad_id: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """log pi(completion | prompt) of token-id pairs, (B,) float32, in one forward pass that runs the
    LM head on the completion tokens only.

    The rows are *right*-padded and read with the causal mask alone: a token never sees the padding
    after it, so every real token gets exactly the log-probs it gets alone,
    with positions 0, 1, ... and no padding mask to build or apply. The last hidden states at the N
    positions that predict a completion token are gathered into one (N, H) matrix and only those
    meet the (H, V) head: log pi(y_t) = z_t[y_t] - logsumexp(z_t), z = head(h). That skips the
    head's matmul on the prompt and the padding, and the (B, T, V) logits tensor. A model whose
    logits are not the plain ``nn.Linear`` head of its last hidden state (a soft-capped or scaled
    head, LoRA on the head) is detected from the one position the model computes itself and scored
    through its full logits instead. An empty prompt has nothing to predict the completion's first
    token, which is then left out of the sum.
    """
    rows = [p + c for p, c in zip(prompt_ids, completion_ids)]
    input_ids, _ = right_pad(rows, pad_id, device)  # its padding mask is not needed: see the all-ones mask below
    width = input_ids.shape[1]
    # predicts[i, t]: position t of row i predicts completion token t + 1.
    predicts = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        predicts[i, max(len(p), 1) - 1 : len(p) + len(c) - 1] = True
    predicts = predicts.to(device)
    targets = input_ids.roll(-1, dims=1)[predicts]  # (N,)
    row_of = predicts.nonzero()[:, 0]  # (N,)
    # An all-ones mask (rather than none, which transformers warns about when a row holds pad ids) is
    # recognised as "causal only": no padding mask is built.
    attention_mask = torch.ones_like(input_ids)
    head = output_head(model)
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=head is not None,
                logits_to_keep=1 if head is not None else 0)
    if head is not None:
        hidden = out.hidden_states[-1]
        # The model's own logits at the last position must be what the head gives there.
        if torch.allclose(head(hidden[:, -1]).float(), out.logits[:, -1].float(), rtol=1e-3, atol=1e-3):
            logits = head(hidden[predicts]).float()  # (N, V)
        else:
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[predicts].float()
    else:
        logits = out.logits[predicts].float()
    logps = logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (N,)
    return torch.zeros(len(rows), dtype=logps.dtype, device=logps.device).index_add(0, row_of, logps)


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
