"""Evaluate a policy on held-out prompts: gold score, reward-model score, KL to the reference, diversity.

    kl_ref = E_{y ~ pi}[ sum_t log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t) ]

is the sequence-level KL(pi || pi_ref), estimated with the (unbiased) k1 estimator summed over the
sampled tokens; ``ref_ppl`` is the reference model's perplexity of the policy's samples (fluency as
the pretrained LM judges it); ``distinct_n`` is the fraction of distinct n-grams over all samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from pretrain.sample import completion_texts, generate_ids
from rlhf.gold import GoldScorer, VaderGold, review_texts
from rlhf.kl import warn_if_negative_kl
from rlhf.logprobs import completion_logprobs


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams / all n-grams over whitespace tokens of all texts (Li et al. 2016)."""
    ngrams = [tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0


@torch.no_grad()
def evaluate_policy(
    model,
    tokenizer,
    reference,
    prompts: Sequence[str],
    samples_per_prompt: int = 2,
    max_new_tokens: int = 32,
    seed: int = 0,
    gold: GoldScorer | None = None,
    reward_model=None,
    batch_size: int = 256,
) -> dict[str, float]:
    """Mean gold score, RM score (if a reward model is given), KL to the reference and diversity.

    Both models run in eval mode (dropout off; their modes are restored afterwards), so sampling and
    the KL's log-probs are one deterministic function of each model's weights.
    """
    modes = [(m, m.training) for m in (model, reference)]
    for m, _ in modes:
        m.eval()
    try:
        return _evaluate_policy(model, tokenizer, reference, prompts, samples_per_prompt, max_new_tokens, seed, gold,
                                reward_model, batch_size)
    finally:
        for m, training in modes:
            m.train(training)


def _evaluate_policy(model, tokenizer, reference, prompts, samples_per_prompt, max_new_tokens, seed, gold, reward_model,
                     batch_size) -> dict[str, float]:
    gold = gold or VaderGold()
    flat = [p for p in prompts for _ in range(samples_per_prompt)]
    texts, kls, ref_nll, ref_tokens = [], [], 0.0, 0
    for i, start in enumerate(range(0, len(flat), batch_size)):
        chunk = flat[start : start + batch_size]
        out = generate_ids(model, tokenizer, chunk, max_new_tokens, seed=seed + i)
        logps = completion_logprobs(model, out["input_ids"], out["attention_mask"], out["completion_mask"])
        ref_logps = completion_logprobs(reference, out["input_ids"], out["attention_mask"], out["completion_mask"])
        kls += (logps - ref_logps).sum(-1).tolist()
        ref_nll -= ref_logps.sum().item()
        ref_tokens += int(out["completion_mask"].sum())
        texts += completion_texts(tokenizer, out)
    warn_if_negative_kl(torch.tensor(kls))
    metrics = {
        "gold": sum(gold(review_texts(flat, texts))) / len(flat),
        "kl_ref": sum(kls) / len(kls),
        "ref_ppl": math.exp(ref_nll / max(ref_tokens, 1)),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "samples": len(flat),
    }
    if reward_model is not None:
        metrics["rm"] = sum(reward_model.score(flat, texts)) / len(flat)
    return metrics
