"""Log-probabilities of completions under a causal LM: the one home of this computation.

PPO, REINFORCE, DQN's evaluation, ``textgym eval``, DPO and SFT all score completions here::

    log pi(y_t | x, y_<t) = logits_t[y_t] - logsumexp(logits_t)        (over the valid tokens, if given)

for the completion tokens y of each row and 0 elsewhere, in one pass (``causal_pass``): the rows'
tokens are moved to the front and read under the causal mask alone, so a padded row gets exactly
the log-probs it gets unpadded, and the LM head runs only on the positions that predict a
completion token, not on the prompt or the padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from pretrain.padding import right_pad, to_right_padded


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] per position, without materialising the full log-softmax twice.

    logits (..., V), labels (...) -> (...): (B, T, V) -> (B, T), or the packed (N, V) -> (N,).
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


def unpack(where: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``packed`` (N, ...) rows laid out at the True entries of ``where`` (B, T) bool, in row-major
    order, 0 elsewhere: (B, T, ...), differentiable in ``packed``."""
    return packed.new_zeros((*where.shape, *packed.shape[1:])).index_put((where,), packed)


def causal_pass(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    targets: torch.Tensor,
    hidden_states: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The logits (N, V) float32 that predict the N tokens where ``targets`` (B, S) bool is True, in
    row-major order, and with ``hidden_states`` the last hidden states they come from, (N, H).

    ``input_ids``, ``attention_mask`` (B, S) are padded rows (left-padded contexts and right-padded
    completions, or any layout); ``targets`` must lie on attended tokens. Each row's tokens are moved
    to its front (``pretrain.padding.to_right_padded``), trimmed to the batch's longest row, and read
    under the causal mask alone with the LM head on the N predicting positions (``causal_logits_at``):
    no padding mask, no work on padding, no head on the prompt. Every pass that scores completions
    (the policy's, the reference's, SFT's) is this one, so at equal weights they agree exactly.
    Raises ``ValueError`` for a target that is a row's first token (nothing predicts it) or padding.
    """
    mask = attention_mask.bool()
    if bool((targets & ~mask).any()):
        raise ValueError("a target token lies on padding (attention_mask 0)")
    # The k-th token of a row (k = its attended tokens up to it, less 1) sits at position k of the
    # right-padded row and is predicted at position k - 1.
    predicted_at = (attention_mask.long().cumsum(1) - 2)[targets]
    if bool((predicted_at < 0).any()):
        raise ValueError("a target token is its row's first token: nothing before it predicts it")
    ids = to_right_padded(input_ids, attention_mask)
    predicts = torch.zeros_like(ids, dtype=torch.bool)
    predicts[targets.nonzero()[:, 0], predicted_at] = True
    return causal_logits_at(model, ids, predicts, hidden_states)


def completion_logprobs(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    valid_actions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token log pi(x_t | x_<t) for the completion tokens, zero elsewhere: (B, S) float32.

    ``input_ids``, ``attention_mask`` (B, S) padded rows; ``completion_mask`` (B, S) 1 on
    completion tokens (never on padding or a row's first token, as nothing predicts it);
    ``valid_actions`` (V,) bool restricts the softmax to the tokens a policy may emit (the agents'
    action mask), None = the full vocabulary. One ``causal_pass``.
    """
    targets = completion_mask.bool()
    logits, _ = causal_pass(model, input_ids, attention_mask, targets)
    log_probs = masked_log_softmax(logits, valid_actions)
    return unpack(targets, log_probs.gather(-1, input_ids[targets][:, None]).squeeze(-1))


def sequence_logprobs(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
) -> torch.Tensor:
    """log pi(completion | prompt) = sum of completion-token log-probs, padding masked: (B,)."""
    return completion_logprobs(model, input_ids, attention_mask, completion_mask).sum(-1)


# Config fields of transformers models whose logits are not the head's output (soft cap, scaling),
# with their neutral values: Gemma-2/3's final_logit_softcapping, Cohere's logit_scale, Granite's
# logits_scaling.
LOGIT_TRANSFORMS = {"final_logit_softcapping": (None, 0, 0.0), "logit_scale": (None, 1, 1.0), "logits_scaling": (None, 1, 1.0)}


def output_head(model) -> torch.nn.Linear | None:
    """The LM head of ``model`` (looking through a data-parallel wrapper and the adapter wrappers)
    when it is a plain ``nn.Linear`` that maps the last hidden state to the logits, else None (also
    for a config that transforms the head's output: ``LOGIT_TRANSFORMS``)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module  # DistributedDataParallel
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if any(getattr(config, name, None) not in neutral for name, neutral in LOGIT_TRANSFORMS.items()):
        return None
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
    input_ids, _ = right_pad(rows, pad_id, device)  # its padding mask is not needed: see causal_logits_at
    width = input_ids.shape[1]
    # predicts[i, t]: position t of row i predicts completion token t + 1.
    predicts = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        predicts[i, max(len(p), 1) - 1 : len(p) + len(c) - 1] = True
    predicts = predicts.to(device)
    targets = input_ids.roll(-1, dims=1)[predicts]  # (N,)
    row_of = predicts.nonzero()[:, 0]  # (N,)
    logits, _ = causal_logits_at(model, input_ids, predicts)
    logps = token_logprobs(logits, targets)  # (N,)
    return torch.zeros(len(rows), dtype=logps.dtype, device=logps.device).index_add(0, row_of, logps)


def causal_logits_at(
    model: PreTrainedModel, input_ids: torch.Tensor, predicts: torch.Tensor, hidden_states: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The logits (N, V) float32 at the N positions where ``predicts`` (B, W) bool is True, of the
    *right*-padded rows ``input_ids`` (B, W) read under the causal mask alone; with ``hidden_states``
    also the last hidden states there, (N, H) (else None). Rows are in row-major order of ``predicts``.

    A token never sees the padding after it, so with positions 0, 1, ... every real token gets
    exactly the outputs it gets alone, and no padding mask is built or applied (an all-ones mask,
    rather than none, which transformers warns about when a row holds pad ids, is read as "causal
    only"). The (N, H) hidden states meet the (H, V) head only where asked, so the head's matmul
    and the (B, W, V) logits are skipped elsewhere (prompt, padding). A model whose logits are not
    the plain ``nn.Linear`` head of its last hidden state (a soft-capped or scaled head by its config,
    ``output_head``; LoRA on the head) is read through its full logits in the same one pass; any
    other transform is caught at the one position the model computes itself, at the cost of a
    second pass.
    """
    attention_mask = torch.ones_like(input_ids)
    head = output_head(model)
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=head is not None or hidden_states,
                logits_to_keep=1 if head is not None else 0)
    hidden = out.hidden_states[-1] if head is not None or hidden_states else None
    if head is not None:
        with torch.no_grad():  # the model's own logits at the last position must be what the head gives there
            plain = torch.allclose(head(hidden[:, -1]).float(), out.logits[:, -1].float(), rtol=1e-3, atol=1e-3)
        if plain:
            logits = head(hidden[predicts])
        else:
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[predicts]
    else:
        logits = out.logits[predicts]
    return logits.float(), hidden[predicts] if hidden_states else None


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
