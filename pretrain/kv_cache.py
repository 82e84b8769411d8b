"""A causal LM advanced one token at a time for a batch of independent sequences.

``CachedLM`` keeps one KV cache for B rows whose episodes start and end at different times (the
vector env auto-resets each sub-env on its own). Each row is left-padded inside the shared cache:

    cache columns:  [ pad pad | prompt tokens ... generated tokens ]   mask 0 on pads, 1 elsewhere

* ``reset_rows(rows, prompts)`` encodes only the new prompts and writes their keys/values
  right-aligned into those rows; other rows are untouched. Prompts are prefilled in up to four
  batches of similar length, so short prompts are not padded to the longest one.
* ``step(tokens)`` feeds one token per row: one forward of shape (B, 1) against the cache, so a
  step costs O(context) attention, never a re-encoding of the context.
* Columns that are padding in every row are trimmed from the left, so the cache never grows past
  the longest live context.
* Each layer's keys and values live in a buffer with room for ``APPEND_ROOM`` more tokens: a step
  writes its token's keys and values in place (``_AppendLayer``) where ``DynamicCache`` would copy
  the whole cache into a new tensor per layer and token (measured: 17% of a batch-256 rollout).

Positions come from the mask (a row's first real token has position 0), so every row sees exactly
the logits it would see alone and unpadded. Works for any HF causal LM with a ``DynamicCache``
(GPT-2, Llama, Qwen2, ...).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from pretrain.padding import CALL_COST_TOKENS, left_pad, length_buckets, position_ids_from_mask


def _forward_parameters(model) -> set[str]:
    """The argument names of the ``transformers`` model's forward (through an adapter wrapper; not
    ``model.base_model``, which for a plain HF model is its headless trunk)."""
    from pretrain.adapters import AdaptedLM, ReferenceLM

    if isinstance(model, ReferenceLM):
        model = model._adapted
    if isinstance(model, AdaptedLM):
        model = model.base_model
    return set(inspect.signature(model.forward).parameters)


def _cache_kwarg(model: PreTrainedModel) -> str:
    """transformers >= 5.2x names the argument ``cache``; earlier versions ``past_key_values``."""
    return "cache" if "cache" in _forward_parameters(model) else "past_key_values"


def _returned_cache(output) -> DynamicCache:
    cache = output.get("cache") if "cache" in output else None
    return cache if cache is not None else output.past_key_values


APPEND_ROOM = 32  # tokens a layer's buffer holds beyond the live cache before it is reallocated


class _AppendLayer(DynamicLayer):
    """A ``DynamicLayer`` over columns [start, end) of preallocated (B, H, capacity, D) buffers: ``update``
    writes the new keys/values at ``end`` in place and returns views, instead of concatenating."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, start: int, end: int):
        super().__init__()
        self.k_buffer, self.v_buffer, self.start, self.end = keys, values, start, end
        self.keys, self.values = keys[:, :, start:end], values[:, :, start:end]
        self.device, self.dtype, self.is_initialized = keys.device, keys.dtype, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = key_states.shape[-2]
        self.k_buffer[:, :, self.end : self.end + n] = key_states  # CachedLM.step made the room
        self.v_buffer[:, :, self.end : self.end + n] = value_states
        self.end += n
        self.keys, self.values = self.k_buffer[:, :, self.start : self.end], self.v_buffer[:, :, self.start : self.end]
        return self.keys, self.values


class CachedLM:
    """Batched incremental decoding with per-row resets. All tensors live on the model's device."""

    max_prefill_buckets = 4  # prompt-length groups per reset_rows prefill (see pretrain.model.length_buckets)

    def __init__(self, model: PreTrainedModel, batch_size: int, pad_token_id: int, keep_hidden: bool = False):
        """``keep_hidden``: also keep ``next_hidden`` (B, hidden), the last layer's state at the newest token."""
        self.model = model.eval()
        self.batch_size = batch_size
        self.keep_hidden = keep_hidden
        self.pad_token_id = pad_token_id
        self.device = model.device if isinstance(getattr(model, "device", None), torch.device) else next(model.parameters()).device
        self._cache_arg = _cache_kwarg(model)
        # Only the last position's logits are used: skip the LM head elsewhere where the model allows it.
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in _forward_parameters(model) else {}
        # A prompt-tuned model (pretrain.adapters.AdaptedLM) puts n soft-prompt columns before every
        # prefilled context: they stay in the cache, with mask 1, ahead of the prompt's tokens.
        self.n_virtual = int(getattr(model, "num_virtual_tokens", 0))
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer (B, H, S, D): views of the buffers
        self._buffers: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer (B, H, capacity, D)
        self._end = 0  # the live cache is columns [_end - S, _end) of the buffers
        self.mask = torch.zeros(batch_size, 0, dtype=torch.long, device=self.device)  # (B, S)
        self.next_logits = torch.zeros(batch_size, 0, device=self.device)  # (B, V): logits of the next token
        self.next_hidden: torch.Tensor | None = None  # (B, hidden), with keep_hidden

    @torch.no_grad()
    def _forward(self, input_ids, attention_mask, position_ids, cache: DynamicCache | None = None):
        """(next-token logits, last hidden state or None, per-layer keys/values) of the newest position."""
        kwargs = {self._cache_arg: cache} if cache is not None else {}
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
            output_hidden_states=self.keep_hidden, **self._last_only, **kwargs
        )
        cache = _returned_cache(out)
        hidden = out.hidden_states[-1][:, -1].float() if self.keep_hidden else None
        return out.logits[:, -1].float(), hidden, [(layer.keys, layer.values) for layer in cache.layers]

    @torch.no_grad()
    def reset_rows(self, rows: Sequence[int], prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Start new sequences in ``rows`` from the token-id ``prompts``; returns their next-token logits."""
        if len(rows) != len(prompts):
            raise ValueError(f"got {len(rows)} rows but {len(prompts)} prompts")
        if not rows:
            return self.next_logits[:0]
        if any(len(p) == 0 for p in prompts):
            raise ValueError("a prompt must hold at least one token")
        # Identical contexts (the G completions of one prompt: GRPO, RLOO) are prefilled once, and
        # the distinct ones in a few batches of similar length (``length_buckets``), not one batch
        # padded to the longest prompt: a batch of review openings is mostly padding otherwise.
        distinct: dict[tuple[int, ...], int] = {}
        source = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]  # row j's distinct context
        contexts = list(distinct)
        width = max(len(p) for p in contexts) + self.n_virtual
        logits = hidden = None
        parts = []
        for bucket in length_buckets([len(p) for p in contexts], self.max_prefill_buckets, CALL_COST_TOKENS):
            ids, mask = left_pad([contexts[u] for u in bucket], self.pad_token_id, self.device)
            b_logits, b_hidden, b_kv = self._forward(ids, mask, position_ids_from_mask(mask))
            if self.n_virtual:  # the cache's layout: [virtual | pads | prompt]
                mask = torch.cat([mask.new_ones(mask.shape[0], self.n_virtual), mask], 1)
            w = mask.shape[1]
            if logits is None:
                logits = b_logits.new_empty((len(rows), b_logits.shape[-1]))
                if b_hidden is not None:
                    hidden = b_hidden.new_empty((len(rows), b_hidden.shape[-1]))
            position = {u: i for i, u in enumerate(bucket)}
            members = [j for j, u in enumerate(source) if u in position]  # the rows this bucket's contexts fill
            src = torch.as_tensor([position[source[j]] for j in members], device=self.device)
            parts.append((members, w, mask[src], [(k[src], v[src]) for k, v in b_kv]))
            logits[members] = b_logits[src]
            if hidden is not None:
                hidden[members] = b_hidden[src]

        if self.kv is None:  # first reset: allocate the whole batch at this width
            self.kv = [
                (k.new_zeros((self.batch_size, k.shape[1], width, k.shape[3])),
                 v.new_zeros((self.batch_size, v.shape[1], width, v.shape[3])))
                for k, v in parts[0][3]
            ]
            self.mask = torch.zeros(self.batch_size, width, dtype=torch.long, device=self.device)
            self.next_logits = logits.new_zeros((self.batch_size, logits.shape[-1]))
            if hidden is not None:
                self.next_hidden = hidden.new_zeros((self.batch_size, hidden.shape[-1]))
        self._left_pad_to(width)
        new_dtype = parts[0][3][0][0].dtype
        if self.kv[0][0].dtype != new_dtype:  # filled outside an autocast region, now inside one (or back)
            self._adopt(self.kv, dtype=new_dtype)
        seq = self.mask.shape[1]
        index = torch.as_tensor(list(rows), device=self.device)
        for k, v in self.kv:
            k[index] = 0
            v[index] = 0
        self.mask[index] = 0
        for bucket, w, mask, b_kv in parts:  # each bucket right-aligned in its rows
            b_index = index[bucket]
            for (k, v), (nk, nv) in zip(self.kv, b_kv):
                k[b_index, :, seq - w :] = nk
                v[b_index, :, seq - w :] = nv
            self.mask[b_index, seq - w :] = mask
        self.next_logits[index] = logits
        if hidden is not None:
            self.next_hidden[index] = hidden
        self._trim()
        return logits

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token to every row; returns the next-token logits (B, V)."""
        if self.kv is None:
            raise RuntimeError("CachedLM.step called before reset_rows")
        tokens = tokens.to(self.device).long().view(self.batch_size, 1)
        positions = self.mask.sum(1, keepdim=True)  # the new token's position in each row
        self.mask = torch.cat([self.mask, torch.ones_like(tokens)], dim=1)
        if not self._buffers or self._end == self._buffers[0][0].shape[2]:  # no room for this token's keys
            self._adopt(self.kv)
        seq = self.kv[0][0].shape[2]
        cache = DynamicCache()
        cache.layers = [_AppendLayer(k, v, self._end - seq, self._end) for k, v in self._buffers]
        self.next_logits, self.next_hidden, self.kv = self._forward(tokens, self.mask, positions, cache)
        self._end += 1
        return self.next_logits

    def _adopt(self, kv: list[tuple[torch.Tensor, torch.Tensor]], pad: int = 0, dtype: torch.dtype | None = None) -> None:
        """Copy the live cache ``kv`` into new buffers (in ``dtype``, default its own), after ``pad`` zero
        columns and with ``APPEND_ROOM`` free columns after it: one copy per reallocation."""
        seq = pad + kv[0][0].shape[2]
        self._buffers = []
        for k, v in kv:
            shape = (*k.shape[:2], seq + APPEND_ROOM, k.shape[3])
            k_buffer, v_buffer = k.new_empty(shape, dtype=dtype or k.dtype), v.new_empty(shape, dtype=dtype or v.dtype)
            k_buffer[:, :, :pad], v_buffer[:, :, :pad] = 0, 0
            k_buffer[:, :, pad:seq], v_buffer[:, :, pad:seq] = k, v
            self._buffers.append((k_buffer, v_buffer))
        self._end = seq
        self.kv = [(k[:, :, :seq], v[:, :, :seq]) for k, v in self._buffers]

    def _left_pad_to(self, width: int) -> None:
        extra = width - self.mask.shape[1]
        if extra > 0:
            self._adopt(self.kv, pad=extra)
            self.mask = torch.cat([self.mask.new_zeros((self.batch_size, extra)), self.mask], 1)

    def _trim(self) -> None:
        live = self.mask.any(0).nonzero()
        first = int(live[0]) if len(live) else self.mask.shape[1]
        if first > 0:  # views: the buffers keep their columns, the live cache starts later
            self.kv = [(k[:, :, first:], v[:, :, first:]) for k, v in self.kv]
            self.mask = self.mask[:, first:]
