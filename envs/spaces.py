"""The action and observation spaces of a TextGen task (shared by its single and vector envs)."""

from __future__ import annotations

import numpy as np
import torch
from gymnasium import spaces


class TokenActions(spaces.Discrete):
    """``Discrete(V)`` whose ``sample()`` (without an explicit mask) draws only valid tokens, so
    random exploration (SB3's epsilon-greedy and warm-up, the env checkers) never produces an
    action the env must reject."""

    def __init__(self, valid: np.ndarray, seed: int | None = None):
        super().__init__(len(valid), seed=seed)
        self.valid = np.asarray(valid, dtype=np.int8)

    def sample(self, mask=None, probability=None):
        if mask is None and probability is None:
            mask = self.valid
        return super().sample(mask=mask, probability=probability)


def action_space(valid_actions: torch.Tensor) -> TokenActions:
    """One token id: ``Discrete(V)`` over the ``(V,)`` bool mask of valid actions."""
    return TokenActions(valid_actions.cpu().numpy())


def observation_space(n_actions: int, length: int) -> spaces.Dict:
    """``Dict(input_ids=Box(0, V-1, (L,), int64), attention_mask=Box(0, 1, (L,), int64))``, left-padded."""
    return spaces.Dict(
        {
            "input_ids": spaces.Box(0, n_actions - 1, shape=(length,), dtype=np.int64),
            "attention_mask": spaces.Box(0, 1, shape=(length,), dtype=np.int64),
        }
    )
