"""The reward a TextGen task pays when an episode ends: a function of the finished episodes' text.

Inside the env a reward function takes the episodes that finished in one step, all at once::

    reward_fn(prompts, completions, completion_ids, completion_mask) -> (R,) float32 tensor

with ``prompts`` and ``completions`` the R texts (the completion decoded from the generated tokens,
EOS excluded) and ``completion_ids`` / ``completion_mask`` (R, T) the generated token ids, right
padded. :func:`make_reward` builds one from what a user brings (``reward=`` of the env, ``--reward``
of the CLI):

* ``"default"``: the shipped reward model (Bradley-Terry on VADER-labelled preferences); any dir
  made by ``textgym reward`` (a one-label classifier whose config holds ``reward_mean``): its
  normalised score of (prompt, completion) (:class:`RewardModelReward`);
* ``"default-classifier"``: the shipped sentiment classifier trained on the human review labels;
  any other ``*ForSequenceClassification`` dir, whatever its tokenizer and number of labels: the
  chosen label of prompt + completion as one text, re-tokenised by the classifier's own tokenizer
  (:class:`ClassifierReward`, ``rlhf.classifier``; default: the ``positive`` label's logit);
* a Python callable ``(prompts: list[str], completions: list[str]) -> sequence of float``, or
  ``"module:function"`` naming one: called once per step for every episode that finished in it,
  its return checked (length, numbers, finite; :class:`CallableReward`);
* a list of these with ``reward_weights``: the weighted sum (:class:`WeightedReward`), each term's
  value reported in ``info["reward_terms"]`` and by the agents as ``reward/terms/<name>``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch

from pretrain.config import check_float, import_object
from rlhf.classifier import SequenceClassifier, default_classifier_dir, is_classifier_dir
from rlhf.gold import callable_name, check_scores, review_texts
from rlhf.reward_model import RewardModel


class RewardFunction(Protocol):
    def __call__(self, prompts: Sequence[str], completions: Sequence[str], completion_ids: torch.Tensor,
                 completion_mask: torch.Tensor) -> torch.Tensor: ...


class RewardModelReward:
    """A reward model's normalised score of (prompt, completion) texts (``RewardModel.rewards``):
    a function of the text, canonically re-tokenised, never of how the policy segmented it."""

    def __init__(self, reward_model: RewardModel, device: torch.device, name: str = "rm"):
        self.reward_model, self.device, self.name = reward_model, device, name

    def __call__(self, prompts, completions, completion_ids=None, completion_mask=None) -> torch.Tensor:
        return self.reward_model.rewards(prompts, completions).to(self.device)


class ClassifierReward:
    """One label of a ``*ForSequenceClassification`` model (``rlhf.classifier.SequenceClassifier``)
    of the review, prompt + completion as one text, tokenised by the classifier's own tokenizer."""

    def __init__(self, classifier: SequenceClassifier, device: torch.device):
        self.classifier, self.device, self.name = classifier, device, classifier.name

    def __call__(self, prompts, completions, completion_ids=None, completion_mask=None) -> torch.Tensor:
        return self.classifier.scores(review_texts(prompts, completions)).to(self.device)


class CallableReward:
    """A user's ``(prompts, completions) -> sequence of float``, called once per step for all the
    episodes that finished in it; a return of the wrong length, a non-number or a non-finite value
    raises ``ValueError`` naming the function."""

    def __init__(self, fn: Callable[[list[str], list[str]], Sequence[float]], device: torch.device):
        self.fn, self.device = fn, device
        self.name = getattr(fn, "__name__", type(fn).__name__)  # its key in info["reward_terms"]
        self.qualname = callable_name(fn)

    def __call__(self, prompts, completions, completion_ids=None, completion_mask=None) -> torch.Tensor:
        values = self.fn(list(prompts), list(completions))
        values = check_scores(values, len(prompts), f"reward function {self.qualname}")
        return torch.tensor(values, dtype=torch.float32, device=self.device)


class WeightedReward:
    """sum_i w_i r_i(prompt, completion) over named reward functions; :meth:`terms` also gives each r_i."""

    def __init__(self, terms: Sequence[RewardFunction], weights: Sequence[float], names: Sequence[str]):
        if not terms:
            raise ValueError("a weighted reward needs at least one term")
        if len(weights) != len(terms):
            raise ValueError(f"got {len(terms)} rewards but {len(weights)} reward_weights; give one weight per reward")
        self.reward_fns = list(terms)
        self.weights = [check_float(f"reward_weights[{i}]", w) for i, w in enumerate(weights)]
        self.names = unique_names(names)

    def terms(self, prompts, completions, completion_ids=None, completion_mask=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted sum (R,) and each term's unweighted value (R,), by name."""
        values = {name: fn(prompts, completions, completion_ids, completion_mask)
                  for name, fn in zip(self.names, self.reward_fns)}
        total = sum(w * v for w, v in zip(self.weights, values.values()))
        return total, values

    def __call__(self, prompts, completions, completion_ids=None, completion_mask=None) -> torch.Tensor:
        return self.terms(prompts, completions, completion_ids, completion_mask)[0]


def unique_names(names: Sequence[str]) -> list[str]:
    """``names`` with ``-2``, ``-3``, ... appended to repeats, so every term has its own key."""
    out, seen = [], {}
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return out


def make_reward_term(spec, device: torch.device, label: str | int | None = None, output: str = "logit") -> RewardFunction:
    """One reward function from a spec (module docstring); raises ``ValueError`` /
    ``FileNotFoundError`` / ``TypeError`` naming the spec, at construction (models are probed)."""
    if isinstance(spec, RewardModel):
        return RewardModelReward(spec, device)
    if isinstance(spec, SequenceClassifier):
        return ClassifierReward(spec, device)
    if callable(spec):
        return CallableReward(spec, device)
    if not isinstance(spec, (str, Path)):
        raise TypeError(f"a reward must be 'default', 'default-classifier', a model dir, a callable or 'module:function', "
                        f"got {type(spec).__name__} {spec!r:.80}")
    if str(spec) == "default":
        return RewardModelReward(RewardModel.load("default", device=device), device)
    if str(spec) == "default-classifier":
        return ClassifierReward(SequenceClassifier(default_classifier_dir(), label, output, device), device)
    path = Path(spec).expanduser()
    if path.exists():
        if not is_classifier_dir(path):
            raise ValueError(f"reward {str(spec)!r} is not a reward model or classifier dir: expected a config.json with "
                             "a *ForSequenceClassification architecture")
        from pretrain.model import load_config

        if hasattr(load_config(path), "reward_mean"):  # made by `textgym reward`: reads (prompt, completion) as it was trained
            rm = RewardModel.load(path, device=device)
            rm.rewards(["A probe"], [" text."])  # an unusable head fails here, not at an episode's end
            return RewardModelReward(rm, device, name=path.name)
        return ClassifierReward(SequenceClassifier(path, label, output, device), device)
    if ":" in str(spec):
        fn = import_object(str(spec), "reward")
        if not callable(fn):
            raise ValueError(f"reward {spec!r} is a {type(fn).__name__}, not a callable")
        return CallableReward(fn, device)
    raise FileNotFoundError(f"reward {str(spec)!r} is neither 'default', 'default-classifier', an existing model dir nor "
                            "module:function")


def make_reward(spec, device: torch.device, weights: Sequence[float] | None = None, label: str | int | None = None,
                output: str = "logit") -> RewardFunction:
    """The env's reward from one spec or a list of specs (module docstring). A list, or any
    ``weights``, makes a :class:`WeightedReward` (default weights: 1 each)."""
    specs = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if not specs:
        raise ValueError("the reward list is empty; give at least one reward")
    if weights is None and len(specs) == 1:
        return make_reward_term(specs[0], device, label, output)
    weights = [1.0] * len(specs) if weights is None else list(weights)
    terms = [make_reward_term(s, device, label, output) for s in specs]
    return WeightedReward(terms, weights, [getattr(t, "name", f"reward{i}") for i, t in enumerate(terms)])


def score_with_terms(reward_fn: RewardFunction, prompts, completions, completion_ids, completion_mask):
    """The reward (R,) of finished episodes, and each term's value when it is a :class:`WeightedReward`."""
    if isinstance(reward_fn, WeightedReward):
        return reward_fn.terms(prompts, completions, completion_ids, completion_mask)
    return reward_fn(prompts, completions, completion_ids, completion_mask), {}
