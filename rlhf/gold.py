"""The gold scorer: the stand-in for the human labeller.

A gold scorer is any callable ``texts -> list[float]``. It labels preference pairs (through a
Bradley-Terry label model, see ``rlhf.preferences``) and measures the true quality of a policy in
evaluation. It is **never** an agent's training reward: agents optimise the *learned* reward model,
and the gap between the two is exactly what RLHF experiments measure (reward over-optimisation).

The default is VADER's compound sentiment score (Hutto & Gilbert, 2014), a lexicon-and-rules model
in [-1, 1] that is fully independent of our networks. It scores the whole review, prompt plus
continuation, because the task is to make *the review* turn positive.

A user brings their own judge with :func:`load_gold`: a Python callable ``texts -> floats``
(each return validated), any ``*ForSequenceClassification`` dir (``rlhf.classifier``; its positive
label's probability), ``"vader"``, or none.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
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


def check_scores(values, n: int, source: str) -> list[float]:
    """A scorer's return as ``n`` finite floats; ``ValueError`` naming ``source`` otherwise.

    Accepts a list/tuple of real numbers, a 1-D numpy array or tensor of length ``n``."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    if isinstance(values, np.ndarray):
        if values.ndim != 1 or not (np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)):
            raise ValueError(f"{source} returned an array of shape {values.shape} and dtype {values.dtype}; "
                             f"expected {n} numbers (one per text)")
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{source} returned {type(values).__name__} {values!r:.80}; expected a sequence of {n} numbers (one per text)")
    if len(values) != n:
        raise ValueError(f"{source} returned {len(values)} values for {n} texts; expected one number per text")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise ValueError(f"{source} returned {type(v).__name__} {v!r:.80} at index {i}; expected a number")
        if not math.isfinite(v):
            raise ValueError(f"{source} returned the non-finite value {v} at index {i}")
    return [float(v) for v in values]


def callable_name(fn) -> str:
    """``module.qualname`` of a function (or its class's, for a callable object), for messages."""
    target = fn if hasattr(fn, "__qualname__") else type(fn)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(fn))}"


class CallableGold:
    """A user's ``texts -> sequence of float`` as a gold scorer, its return checked on every call."""

    def __init__(self, fn: Callable[[list[str]], Sequence[float]]):
        self.fn, self.name = fn, callable_name(fn)

    def __call__(self, texts: Sequence[str]) -> list[float]:
        return check_scores(self.fn(list(texts)), len(texts), f"gold scorer {self.name}")


def load_gold(spec, device="cpu") -> GoldScorer | None:
    """The gold scorer ``spec`` names.

    ``True`` / ``"vader"``: VADER; ``False`` / ``None`` / ``"none"``: no gold score; a callable
    ``texts -> floats``; ``"module:function"``; ``"default-classifier"`` or a
    ``*ForSequenceClassification`` dir: P(positive label) of that classifier (``rlhf.classifier``).
    Raises ``ValueError`` / ``FileNotFoundError`` naming the spec.
    """
    from pretrain.config import import_object
    from rlhf.classifier import SequenceClassifier, default_classifier_dir

    if spec is True or spec == "vader":
        return VaderGold()
    if spec is False or spec is None or spec == "none":
        return None
    if callable(spec):
        return spec if isinstance(spec, (VaderGold, CallableGold, SequenceClassifier)) else CallableGold(spec)
    if not isinstance(spec, (str, Path)):
        raise TypeError(f"gold must be 'vader', 'none', a callable, 'module:function' or a classifier dir, got {type(spec).__name__} {spec!r}")
    if str(spec) == "default-classifier":
        return SequenceClassifier(default_classifier_dir(), output="prob", device=device)
    path = Path(spec).expanduser()
    if path.exists():
        return SequenceClassifier(path, output="prob", device=device)
    if ":" in str(spec):
        fn = import_object(str(spec), "gold scorer")
        if not callable(fn):
            raise ValueError(f"gold scorer {spec!r} is a {type(fn).__name__}, not a callable")
        return CallableGold(fn)
    raise ValueError(f"gold {str(spec)!r} is neither 'vader', 'none', 'default-classifier', an existing classifier dir "
                     "nor module:function")
