"""Log-probabilities of completions under a causal LM: the one home of this computation.

PPO, REINFORCE, DQN's evaluation, ``textgym eval``, DPO and SFT all score completions here::

    log pi(y_t | x, y_<t) = logits_t[y_t] - logsumexp(logits_t)        (over the valid tokens, if given)

for the completion tokens y of each row and 0 elsewhere, in one pass (``causal_pass``): the rows'
tokens are moved to the front and read under the causal mask alone, so a padded row gets exactly
the log-probs it gets unpadded, and the LM head runs only on the positions that predict a
completion token, not on the prompt or the padding. Rows that share a prompt (RLOO's and GRPO's k
samples of one prompt) are packed so that the prompt is read once for all of them
(``shared_prefix_layout``).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.weak import WeakIdKeyDictionary
from transformers import PreTrainedModel

from pretrain.padding import right_pad, to_right_padded

# A (V,) action mask -> (its version, the indices of its invalid tokens): found once per mask (a
# nonzero() waits for the device), again only if the mask is changed in place.
_INVALID_COLUMNS = WeakIdKeyDictionary()


def _invalid_columns(valid_actions: torch.Tensor) -> torch.Tensor:
    if valid_actions.is_inference():  # made under torch.inference_mode: it has no version to check
        return (~valid_actions).nonzero().squeeze(1)
    known = _INVALID_COLUMNS.get(valid_actions)
    if known is None or known[0] != valid_actions._version:
        known = valid_actions._version, (~valid_actions).nonzero().squeeze(1)
        _INVALID_COLUMNS[valid_actions] = known
    return known[1]


def mask_invalid_actions(logits: torch.Tensor, valid_actions: torch.Tensor | None, value: float = float("-inf"),
                         inplace: bool = False) -> torch.Tensor:
    """``logits`` (..., V) with ``value`` (default -inf) where ``valid_actions`` is False: a (V,) bool
    mask of the tokens a policy may emit, or one mask per position, (..., V); None = all valid.

    A (V,) mask is applied to its invalid columns only (``index_fill``): the agents' mask excludes a
    few tokens (the shipped LM's: the padding token), and ``masked_fill`` would read the mask and
    write every one of the (..., V) logits (128 x 8,192: 0.5 ms against 13 us); its invalid indices
    are found once per mask tensor, again after an in-place change of it (not one made behind
    torch's back, through ``.data`` or a NumPy view). ``inplace`` overwrites ``logits``; otherwise a
    new tensor is returned (differentiable in ``logits``). Raises ``TypeError`` for a mask that is
    not bool and ``ValueError`` for one whose last dim is not the logits' V."""
    if valid_actions is None:
        return logits
    if valid_actions.dtype != torch.bool:
        raise TypeError(f"valid_actions must be a bool mask, got dtype {valid_actions.dtype}")
    if valid_actions.shape[-1] != logits.shape[-1]:
        raise ValueError(f"valid_actions covers {valid_actions.shape[-1]} tokens, the logits {logits.shape[-1]}")
    if valid_actions.dim() == 1:
        invalid = _invalid_columns(valid_actions)
        return logits.index_fill_(-1, invalid, value) if inplace else logits.index_fill(-1, invalid, value)
    return logits.masked_fill_(~valid_actions, value) if inplace else logits.masked_fill(~valid_actions, value)


class _TokenLogprobs(torch.autograd.Function):
    """log p(y) = log_softmax(x)[y] over the last dim, and with ``with_entropy`` H(p), detached.

    Autograd would run this as masked_fill, log_softmax and gather, whose backward passes allocate
    and fill a zero (..., V) tensor for the gather, another for the log-softmax and a third for the
    mask. The gradient in closed form is

        d log p(y) / dx = onehot(y) - softmax(x)          (0 on the masked logits)

    so the backward turns the saved log-softmax into -g * softmax(x) in place (exp_, mul_), adds g
    at y and zeroes the masked logits: no new (..., V) tensor (the unused outputs' gradients are not
    materialised either). With ``overwrite`` the log-softmax is written over the logits themselves
    (``mark_dirty``), which saves allocating (and page-faulting in) one more (..., V) tensor. On
    the shipped LM's head (768 x 8,192, DPO's 16-pair micro-batch) the head's forward + backward
    takes 45 ms instead of 56, and overwriting saves 5 ms more. The saved log-softmax is consumed,
    so the backward runs once."""

    @staticmethod
    def forward(ctx, logits, labels, valid_actions, with_entropy, overwrite):
        ctx.set_materialize_grads(False)  # the entropy's and the dirty logits' gradients are never used
        overwrite = overwrite and logits._base is None  # a view is never overwritten (autograd forbids it)
        if overwrite:
            x = mask_invalid_actions(logits, valid_actions, inplace=True)
            log_probs = torch.log_softmax(x, dim=-1, out=x)  # row-wise: every row is read before it is written
            ctx.mark_dirty(logits)
        else:
            x = mask_invalid_actions(logits, valid_actions)
            log_probs = F.log_softmax(x, dim=-1)
            del x
        logprobs = log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        entropy = categorical_entropy(log_probs) if with_entropy else logprobs.new_empty(0)
        ctx.mark_non_differentiable(entropy)
        ctx.save_for_backward(log_probs, labels, valid_actions)
        ctx.consumed = False
        return logprobs, entropy, (log_probs if overwrite else log_probs.new_empty(0))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, _grad_entropy, _grad_log_probs):
        if grad is None:  # only an unused output reached the backward
            return None, None, None, None, None
        if ctx.consumed:
            raise RuntimeError("token_logprobs' backward runs once (it reuses its saved log-softmax in place)")
        ctx.consumed = True
        log_probs, labels, valid_actions = ctx.saved_tensors
        grad_logits = log_probs.exp_().mul_(-grad.unsqueeze(-1))  # -g softmax(x)
        grad_logits.scatter_add_(-1, labels.unsqueeze(-1), grad.unsqueeze(-1))  # + g onehot(y)
        # a label outside the valid tokens: its g lands on a masked logit, whose gradient is 0
        mask_invalid_actions(grad_logits, valid_actions, value=0.0, inplace=True)
        return grad_logits, None, None, None, None


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, valid_actions: torch.Tensor | None = None,
                   overwrite_logits: bool = False) -> torch.Tensor:
    """log softmax(logits)[label] per position, float32, over the tokens in ``valid_actions`` (V,)
    bool when given (the others at -inf; a label outside them gets -inf and no gradient).

    logits (..., V), labels (...) int64 -> (...): (B, T, V) -> (B, T), or the packed (N, V) -> (N,).
    ``valid_actions`` may also be (..., V), a mask per position. One log-softmax pass forward; the
    backward is the closed form (see ``_TokenLogprobs``), with no (..., V) tensor allocated beyond
    the log-softmax itself. ``overwrite_logits``: write the log-softmax over float32 ``logits``
    (which hold it until the backward turns it into their gradient) instead of a new tensor; for
    logits the caller made for this and no other use (autograd raises if their producer needs them
    back). A view (``x[:, -1]``) is never overwritten: it gets a tensor of its own.
    """
    return _TokenLogprobs.apply(logits.float(), labels, valid_actions, False, overwrite_logits)[0]


def token_logprobs_and_entropy(logits: torch.Tensor, labels: torch.Tensor, valid_actions: torch.Tensor | None = None,
                               overwrite_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_logprobs`` and the entropy H(softmax(logits)) in nats per position, (...) each; the
    entropy is detached (for logging; ``categorical_entropy`` of ``masked_log_softmax`` keeps a graph)."""
    logprobs, entropy, _ = _TokenLogprobs.apply(logits.float(), labels, valid_actions, True, overwrite_logits)
    return logprobs, entropy


def masked_log_softmax(logits: torch.Tensor, valid_actions: torch.Tensor | None = None) -> torch.Tensor:
    """float32 log-softmax over the last dim, with the tokens outside ``valid_actions`` (V,) at -inf."""
    return F.log_softmax(mask_invalid_actions(logits.float(), valid_actions), dim=-1)


def categorical_entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """H(p) = -sum_v p_v log p_v in nats over the last dim of log-probs (..., V) -> (...), where
    masked tokens are -inf (``masked_log_softmax``): their p log p is 0, not the NaN of 0 * -inf.

    The -inf entries are clamped to the most negative finite float, whose product with their p = 0
    is 0, as ``torch.distributions.Categorical.entropy`` does (one pass over the (..., V) values,
    where masking the zeros of p took three: 3.9 vs 12.2 ms for 512 x 8,192); no NaN reaches the
    gradient either."""
    return -(log_probs.exp() * log_probs.clamp(min=torch.finfo(log_probs.dtype).min)).sum(-1)


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
    no padding mask, no work on padding, no head on the prompt; rows with the same prompt read it
    once (``shared_prefix_layout``). Every pass that scores completions (the policy's, the
    reference's, SFT's) is this one, so at equal weights and on the same batch they agree exactly.
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
    return unpack(targets, token_logprobs(logits, input_ids[targets], valid_actions, overwrite_logits=True))


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


def _unwrapped(model):
    """``model`` without its data-parallel wrapper (adapter wrappers pass attributes on themselves)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module  # DistributedDataParallel
    return model


def _text_config(model):
    config = getattr(_unwrapped(model), "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def output_head(model) -> torch.nn.Linear | None:
    """The LM head of ``model`` (looking through a data-parallel wrapper and the adapter wrappers)
    when it is a plain ``nn.Linear`` that maps the last hidden state to the logits, else None (also
    for a config that transforms the head's output: ``LOGIT_TRANSFORMS``)."""
    config = _text_config(model)
    if any(getattr(config, name, None) not in neutral for name, neutral in LOGIT_TRANSFORMS.items()):
        return None
    get = getattr(_unwrapped(model), "get_output_embeddings", None)
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
    # No shared-prefix layout: it places a pair's rows by the batch's other rows, which moves their
    # float rounding (~1e-6), and DPO's reference log-probs, precomputed in other batches, must equal
    # the policy's exactly at step 0. (On pairs of 6-token prompts it saved no time either.)
    logits, _ = causal_logits_at(model, input_ids, predicts, share_prefixes=False)
    logps = token_logprobs(logits, targets, overwrite_logits=True)  # (N,)
    return torch.zeros(len(rows), dtype=logps.dtype, device=logps.device).index_add(0, row_of, logps)


# Models whose own logits were checked to be their head's output (``causal_logits_at``), with that
# head and the model's forward hooks then: checked once per model, head and hooks; later passes ask
# the model for no logits of its own (two (B, H) x (H, V) matmuls a pass fewer).
_PLAIN_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def causal_logits_at(
    model: PreTrainedModel, input_ids: torch.Tensor, predicts: torch.Tensor, hidden_states: bool = False,
    share_prefixes: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The logits (N, V) float32 at the N positions where ``predicts`` (B, W) bool is True, of the
    *right*-padded rows ``input_ids`` (B, W) read under the causal mask alone; with ``hidden_states``
    also the last hidden states there, (N, H) (else None). Rows are in row-major order of ``predicts``.

    A token never sees the padding after it, so with positions 0, 1, ... every real token gets
    exactly the outputs it gets alone, and no padding mask is built or applied (an all-ones mask,
    rather than none, which transformers warns about when a row holds pad ids, is read as "causal
    only"). With ``share_prefixes``, rows that start with the same context (the k completions of one
    prompt: RLOO, GRPO) read it once (``shared_prefix_layout``), exact to float rounding. The (N, H)
    hidden states meet the (H, V) head only where asked, so the head's matmul and the (B, W, V)
    logits are skipped elsewhere (prompt, padding). A model whose logits are not the plain
    ``nn.Linear`` head of its last hidden state (a soft-capped or scaled head by its config,
    ``output_head``; LoRA on the head) is read through its full logits in the same one pass; any
    other transform is caught at the one position the model computes itself, at the cost of a
    second pass (checked on a model's first pass, and again when its head or forward hooks change).
    """
    max_width = prefix_sharing_width(model) if share_prefixes else 0
    layout = shared_prefix_layout(input_ids, predicts, max_width, attention_window(model)) if max_width else None
    if layout is None:  # every position read once: plain indexing (its backward is ~1% cheaper a PPO step)
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        at = predicts.nonzero(as_tuple=True)
        def read(x):
            return x[at]
    else:
        inputs = {"input_ids": layout.input_ids, "position_ids": layout.position_ids,
                  "attention_mask": _model_mask(model, layout.attends)}
        at = layout.rows, layout.columns
        def read(x):
            return _positions(x, at)
    head = output_head(model)
    checked = (head, tuple(model._forward_hooks))  # a hook added later may transform the logits: check again
    known_plain = head is not None and _PLAIN_HEADS.get(model) == checked
    # The model's own logits: none once its head is known plain (an empty index list), else at the
    # last position (to check it), else all.
    keep = input_ids.new_empty(0) if known_plain else 1 if head is not None else 0
    out = model(**inputs, output_hidden_states=head is not None or hidden_states, logits_to_keep=keep)
    hidden = out.hidden_states[-1] if head is not None or hidden_states else None
    if head is not None:
        plain = known_plain
        if not plain:
            with torch.no_grad():  # the model's own logits at the last position must be what the head gives there
                plain = torch.allclose(head(hidden[:, -1]).float(), out.logits[:, -1].float(), rtol=1e-3, atol=1e-3)
            if plain:
                _PLAIN_HEADS[model] = checked
        logits = head(read(hidden)) if plain else read(model(**inputs).logits)
    else:
        logits = read(out.logits)
    return logits.float(), read(hidden) if hidden_states else None


def _positions(x: torch.Tensor, at: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``x[at]`` for (R, W, ...) ``x`` and (rows, columns) index tensors that may repeat a position,
    as an ``index_select`` of the flattened (R * W, ...) rows. A packed layout reads one position for
    several targets (a shared prompt's last token predicts every completion's first), and the
    backward of ``x[rows, columns]`` adds their gradients into that position with parallel atomic
    adds on a multi-threaded CPU, in an order that varies from run to run (GRPO's metrics drifted
    apart after ~18 steps, same seed); ``index_select``'s backward (``index_add``) adds them in order."""
    return x.flatten(0, 1).index_select(0, at[0] * x.shape[1] + at[1])


# Model types whose attention applies a given 4-D mask as it is and whose positions come from
# ``position_ids`` alone (no ALiBi or positions derived from a 2-D mask), so a packed row of several
# sequences reads each one exactly as alone. Each is tested (tests/test_logprobs.py); any other
# model, a soft prompt, or an attention kernel other than SDPA / eager takes the plain padded pass.
PREFIX_SHARING_MODELS = ("gpt2", "llama", "qwen2", "qwen3", "mistral")


def prefix_sharing_width(model) -> int:
    """How wide ``shared_prefix_layout`` should pack rows for ``model``: its hidden size H (the
    attention over a packed row of W tokens then costs at most W / 6H of its matmuls), or 0 where
    ``model`` cannot read packed rows (not in ``PREFIX_SHARING_MODELS``, a soft prompt, an attention
    kernel other than SDPA or eager)."""
    if getattr(_unwrapped(model), "num_virtual_tokens", 0):
        return 0
    config = _text_config(model)
    if getattr(config, "model_type", None) not in PREFIX_SHARING_MODELS:
        return 0
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return 0
    return int(config.hidden_size)


def attention_window(model) -> int | None:
    """The sliding attention window of ``model``'s config (Mistral; Qwen2/3 with
    ``use_sliding_window``), None without one. A packed row's 4-D mask replaces the model's own, so
    a layout is only used where no row is wider than the window (there it never bites)."""
    config = _text_config(model)
    if getattr(config, "use_sliding_window", True) is False:
        return None
    window = getattr(config, "sliding_window", None)
    return int(window) if window else None


def _model_mask(model, attends: torch.Tensor) -> torch.Tensor:
    """``attends`` (R, 1, W, W) bool as the model's attention reads a 4-D mask: as it is for SDPA,
    as 0 / the dtype's minimum added to the scores for eager attention."""
    if _text_config(model)._attn_implementation == "sdpa":
        return attends
    dtype = _unwrapped(model).dtype  # a transformers model's (an adapter wrapper passes it on)
    return torch.zeros(attends.shape, dtype=dtype, device=attends.device).masked_fill(~attends, torch.finfo(dtype).min)


# The packed layout is used when its rows x width is at most this fraction of the padded batch's: SDPA
# reads an explicit mask ~10% slower per token than with its causal kernel (the shipped LM, 2 CPU
# cores), and attends over wider rows. RLOO's 4 samples of a review opening pack to 0.63 (0.77x the
# time); pairs of a 6-token prompt and two 24-token completions would pack to 0.87 (no faster).
MAX_LAYOUT_COST = 0.75


@dataclass
class SharedPrefixLayout:
    """Right-padded rows packed so that each distinct context is read once.

    ``input_ids``, ``position_ids`` (R, W) long; ``attends`` (R, 1, W, W) bool, True where a query
    (dim 2) reads a key (dim 3); ``rows``, ``columns`` (N,) long: where the N predicting positions of
    the input (row-major) sit in the packed rows.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attends: torch.Tensor
    rows: torch.Tensor
    columns: torch.Tensor


def shared_prefix_layout(input_ids: torch.Tensor, predicts: torch.Tensor, max_width: int,
                         window: int | None = None) -> SharedPrefixLayout | None:
    """The packed layout of right-padded rows ``input_ids`` (B, W) whose predicting positions
    ``predicts`` (B, W) bool start after a context some rows share; None if no two rows share one.

    A row's *context* is its tokens up to its first predicting position (a prompt), its *branch* the
    tokens after that up to its last predicting position (its completion but the last token, which
    predicts nothing). Rows with the same context form a group, laid out as one context then its
    branches, ``[x | y1 | y2 | ...]``: each branch reads the context and itself (causal), at the
    positions it has in its own row, so it gets exactly the outputs of its row read alone, while the
    context's tokens are computed once for the group instead of once per row (a prompt of RLOO's k = 4
    samples: 4x fewer prompt tokens). A group longer than ``max_width`` is split (each part repeats
    the context), and the parts are packed into rows as wide as the longest part, first-fit
    decreasing (a part longer than ``max_width`` is a single context + branch: a row that long); every
    padding token reads itself only, so no row of the mask is empty. None also when the packed rows
    would not save enough of the padded batch's work (``MAX_LAYOUT_COST``, checked before anything is
    built) or would be wider than an attention ``window`` (the mask given replaces the model's: parts
    are split to fit it, and a row longer than it is read padded).
    """
    batch, full_width = input_ids.shape
    flags = predicts.to(torch.uint8)
    firsts = flags.argmax(1).tolist()  # each row's first and last predicting position
    lasts = (full_width - 1 - flags.flip(1).argmax(1)).tolist()
    rows = predicts.any(1).nonzero()[:, 0].tolist()
    ids = input_ids.tolist()
    groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}  # context -> [(row, branch)]
    for r in rows:
        groups.setdefault(tuple(ids[r][: firsts[r] + 1]), []).append((r, ids[r][firsts[r] + 1 : lasts[r] + 1]))
    needed = sum(len(context) + sum(len(branch) for _, branch in members) for context, members in groups.items())
    if len(groups) == len(rows) or needed > MAX_LAYOUT_COST * batch * full_width:
        return None
    max_width = min(max_width, window) if window is not None else max_width
    parts = []  # (context, [(row, branch)]) no longer than max_width, unless one branch is
    for context, members in groups.items():
        part, width = [], len(context)
        for row, branch in members:
            if part and width + len(branch) > max_width:
                parts.append((context, part))
                part, width = [], len(context)
            part.append((row, branch))
            width += len(branch)
        parts.append((context, part))
    lengths = [len(c) + sum(len(b) for _, b in m) for c, m in parts]
    width = max(lengths)
    if window is not None and width > window:
        return None
    bins: list[list[int]] = []  # first-fit decreasing: part indices per packed row
    room: list[int] = []
    for i in sorted(range(len(parts)), key=lambda i: -lengths[i]):
        j = next((j for j, free in enumerate(room) if free >= lengths[i]), len(bins))
        if j == len(bins):
            bins.append([])
            room.append(width)
        bins[j].append(i)
        room[j] -= lengths[i]
    R = len(bins)
    if R * width > MAX_LAYOUT_COST * batch * full_width:
        return None
    packed = [[0] * width for _ in range(R)]
    positions = [[0] * width for _ in range(R)]
    segment = [[-1 - c for c in range(width)] for _ in range(R)]  # a padding token: its own segment
    branch_of = [[0] * width for _ in range(R)]  # 0 on a context, b >= 1 on its b-th branch
    spans: dict[int, list[int]] = {}  # row -> its predicting positions, ascending
    for r, t in predicts.nonzero().tolist():
        spans.setdefault(r, []).append(t)
    at = {}  # row -> (packed row, packed columns of its predicting positions)
    for j, members in enumerate(bins):
        c = 0
        for i in members:
            context, part = parts[i]
            n = len(context)
            packed[j][c : c + n], positions[j][c : c + n] = context, range(n)
            segment[j][c : c + n] = [i] * n
            last_context_column = c + n - 1
            c += n
            for b, (row, branch) in enumerate(part, start=1):
                m = len(branch)
                packed[j][c : c + m], positions[j][c : c + m] = branch, range(n, n + m)
                segment[j][c : c + m], branch_of[j][c : c + m] = [i] * m, [b] * m
                first = spans[row][0]
                at[row] = j, [last_context_column] + [c + t - first - 1 for t in spans[row][1:]]
                c += m
    device = input_ids.device
    segment_t = torch.tensor(segment, device=device)
    branch_t = torch.tensor(branch_of, device=device)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    same_segment = segment_t[:, :, None] == segment_t[:, None, :]
    reads_branch = (branch_t[:, None, :] == 0) | (branch_t[:, :, None] == branch_t[:, None, :])  # its context, or its own branch
    rows = [at[r][0] for r in sorted(at) for _ in at[r][1]]
    columns = [column for r in sorted(at) for column in at[r][1]]
    return SharedPrefixLayout(
        input_ids=torch.tensor(packed, device=device),
        position_ids=torch.tensor(positions, device=device),
        attends=(causal & same_segment & reads_branch)[:, None],
        rows=torch.tensor(rows, dtype=torch.long, device=device),
        columns=torch.tensor(columns, dtype=torch.long, device=device),
    )


def text_token_limit(model) -> int | None:
    """How many tokens of text ``model`` reads at once: its ``n_positions`` (GPT-2) less the virtual
    tokens of a soft prompt (``pretrain.adapters``), looking through a data-parallel wrapper; None
    (not checked here) for a config without ``n_positions``."""
    model = _unwrapped(model)
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
