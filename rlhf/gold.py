"""The gold scorer: the stand-in for the human labeller.

A gold scorer is any callable ``texts -> list[float]``. It labels preference pairs (through a
Bradley-Terry label model, see ``rlhf.preferences``) and measures the true quality of a policy in
evaluation. It is **never** an agent's training reward: agents optimise the *learned* reward model,
and the gap between the two is exactly what RLHF experiments measure (reward over-optimisation).

The default is VADER's compound sentiment score (Hutto & Gilbert, 2014), a lexicon-and-rules model
in [-1, 1] that is fully independent of our networks. It scores the whole review, prompt plus
continuation, because the task is to make *the review* turn positive.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer


class GoldScorer(Protocol):
    def __call__(self, texts: Sequence[str]) -> list[float]: ...


class VaderGold:
    """VADER compound sentiment in [-1, 1]: > 0.05 positive, < -0.05 negative."""

    name = "vader_compound"

    def __init__(self):
        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, texts: Sequence[str]) -> list[float]:
        if isinstance(texts, str):
            raise TypeError("VaderGold scores a list of texts, got a single str; wrap it in a list")
        scores = [float(self._analyzer.polarity_scores(t)["compound"]) for t in texts]
        bad = [s for s in scores if not math.isfinite(s)]
        if bad:
            raise ValueError(f"gold scorer returned non-finite scores {bad[:3]}")
        return scores


def review_texts(prompts: Sequence[str], completions: Sequence[str]) -> list[str]:
    """The whole review the gold scorer judges: the prompt followed by its continuation."""
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
    return [p + c for p, c in zip(prompts, completions)]
