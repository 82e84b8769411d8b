"""The reward a TextGen task pays when an episode ends: a function of finished episodes.

A reward function takes the episodes that finished in one step, all at once::

    reward_fn(prompts, completions, completion_ids, completion_mask) -> (R,) float32 tensor

with ``prompts`` and ``completions`` the R texts (the completion decoded from the generated tokens,
EOS excluded) and ``completion_ids`` / ``completion_mask`` (R, T) the generated token ids, right
padded. The library's tasks pay a learned reward model's score of the text
(:class:`RewardModelReward`), or, for the toy env, a count over the token ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from rlhf.reward_model import RewardModel


class RewardFunction(Protocol):
    def __call__(self, prompts: Sequence[str], completions: Sequence[str], completion_ids: torch.Tensor,
                 completion_mask: torch.Tensor) -> torch.Tensor: ...


class RewardModelReward:
    """A reward model's normalised score of (prompt, completion) texts (``RewardModel.rewards``):
    a function of the text, canonically re-tokenised, never of how the policy segmented it."""

    def __init__(self, reward_model: RewardModel, device: torch.device):
        self.reward_model, self.device = reward_model, device

    def __call__(self, prompts, completions, completion_ids=None, completion_mask=None) -> torch.Tensor:
        return self.reward_model.rewards(prompts, completions).to(self.device)
