"""CachedLM gives every row the logits of a full, unpadded forward, across staggered resets."""

import torch

from pretrain import load_lm
from pretrain.kv_cache import CachedLM


def full_forward_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


def test_incremental_logits_match_full_forward_with_staggered_resets(tiny_model_dir):
    model, tokenizer = load_lm(tiny_model_dir)
    lm = CachedLM(model, batch_size=3, pad_token_id=tokenizer.pad_token_id)
    contexts = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]
    lm.reset_rows([0, 1, 2], contexts)
    g = torch.Generator().manual_seed(0)
    for step in range(48):  # past the buffers' APPEND_ROOM (32): the in-place appends move to new buffers
        tokens = torch.randint(3, 500, (3,), generator=g)
        logits = lm.step(tokens)
        for row in range(3):
            contexts[row] = contexts[row] + [int(tokens[row])]
        if step == 2:  # row 1 starts a new, longer episode mid-batch
            contexts[1] = [20, 21, 22, 23, 24, 25, 26]
            lm.reset_rows([1], [contexts[1]])
            logits = lm.next_logits
        if step == 5:  # rows 0 and 2 restart together with different lengths
            contexts[0], contexts[2] = [30], [31, 32]
            lm.reset_rows([0, 2], [contexts[0], contexts[2]])
            logits = lm.next_logits
        if step == 30:  # row 1 restarts late, shorter than the live cache: written into the buffers' columns
            contexts[1] = [40, 41, 42]
            lm.reset_rows([1], [contexts[1]])
            logits = lm.next_logits
        for row in range(3):
            torch.testing.assert_close(logits[row], full_forward_logits(model, contexts[row]), atol=1e-4, rtol=1e-4)
    assert lm.mask.shape[1] <= max(len(c) for c in contexts), "fully padded columns are trimmed"


def test_prefill_in_length_buckets_matches_full_forward(tiny_model_dir):
    """More distinct prompt lengths than prefill buckets: groups hold mixed lengths, padded within."""
    model, tokenizer = load_lm(tiny_model_dir)
    contexts = [[7] * n for n in (1, 9, 2, 4, 3, 8, 5, 6, 2)]
    contexts = [[3 + (i * 7 + j) % 400 for j in range(len(c))] for i, c in enumerate(contexts)]
    lm = CachedLM(model, batch_size=len(contexts), pad_token_id=tokenizer.pad_token_id)
    logits = lm.reset_rows(list(range(len(contexts))), contexts)
    for _ in range(2):
        for row, context in enumerate(contexts):
            torch.testing.assert_close(logits[row], full_forward_logits(model, context), atol=1e-4, rtol=1e-4)
        tokens = torch.arange(len(contexts)) + 40
        logits = lm.step(tokens)
        contexts = [c + [int(t)] for c, t in zip(contexts, tokens)]


def test_repeated_contexts_are_prefilled_once_and_continue_independently(tiny_model_dir):
    """G copies of a prompt (GRPO, RLOO) share one prefill row; each copy then takes its own tokens."""
    model, tokenizer = load_lm(tiny_model_dir)
    contexts = [[5, 6, 7]] * 3 + [[8, 9]] * 2 + [[10, 11, 12, 13]]
    lm = CachedLM(model, batch_size=len(contexts), pad_token_id=tokenizer.pad_token_id)
    calls = []
    forward = lm._forward
    lm._forward = lambda ids, *a, **k: calls.append(ids.shape[0]) or forward(ids, *a, **k)
    logits = lm.reset_rows(list(range(len(contexts))), contexts)
    assert sum(calls) == 3  # three distinct contexts
    for _ in range(3):
        for row, context in enumerate(contexts):
            torch.testing.assert_close(logits[row], full_forward_logits(model, context), atol=1e-4, rtol=1e-4)
        tokens = torch.arange(len(contexts)) + 40  # a different token in every row
        logits = lm.step(tokens)
        contexts = [c + [int(t)] for c, t in zip(contexts, tokens)]
