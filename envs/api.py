"""The public surface of a batched text-generation env: what the library's agents use, and all they use.

Gymnasium's API (``reset``/``step`` with numpy observations) is for everyone; batched agents that
keep their tensors on the model's device use the *tensor API* below instead. Any vector env that
provides it can be trained by ``agents.ppo``, ``agents.reinforce``, ``agents.dqn``, ``textgym
eval`` and the SB3 adapter; ``envs.vector.TextGenVectorEnv`` is one, and ``tests/test_agents_train``
trains an agent on another, written in the test against this protocol alone.

Conventions shared by every implementation:

* An observation is a **left-padded** token context: ``input_ids`` and ``attention_mask``, both
  (N, L) int64, the newest token at index -1 and ``input_ids[i][attention_mask[i] == 1]`` the
  context of sub-env i.
* An action is one token id per sub-env, (N,) integer; ``valid_actions`` (V,) bool says which ids
  may be emitted (an invalid one is a ``ValueError``).
* Episodes end (``terminated``) at EOS or after ``max_new_tokens`` tokens; the reward of a finished
  episode arrives in the step that finishes it, with its record in ``finished``.
* Auto-reset is Gymnasium's ``NEXT_STEP``: the step after a sub-env terminates starts it over (that
  step's action is ignored, its reward is 0 and ``reset[i]`` is True).
* The tensors returned may be the env's own state, valid until the next call: clone what you keep.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass
class VectorReset:
    """What ``reset_tensor`` returns; tensors on the env's device."""

    input_ids: torch.Tensor  # (N, L) int64, left-padded contexts
    attention_mask: torch.Tensor  # (N, L) int64
    prompts: list[str]  # the prompt of each sub-env's episode


@dataclass
class VectorStep:
    """What ``step_tensor`` returns; tensors on the env's device."""

    input_ids: torch.Tensor  # (N, L) int64 left-padded observation after the step
    attention_mask: torch.Tensor  # (N, L) int64
    rewards: torch.Tensor  # (N,) float32
    terminated: torch.Tensor  # (N,) bool: the episode ended with this step
    reset: torch.Tensor  # (N,) bool: sub-envs auto-reset by this step (their actions were ignored)
    ref_logprobs: torch.Tensor | None  # (N,) log pi_ref(a_t | s_t) of each action, when the env runs a reference LM
    finished: dict[int, dict[str, Any]]  # sub-env -> {"rm_score", "gold_score", "text", "prompt"[, "reward_terms"]} of the episode it ended
    final_input_ids: torch.Tensor | None = None  # SAME_STEP autoreset: the terminal observations of the rows in ``reset``
    final_attention_mask: torch.Tensor | None = None


@runtime_checkable
class TextVectorEnv(Protocol):
    """The tensor API of a batched text-generation env (see the module docstring).

    ``ref_logprobs`` of a step are the env's reference LM's log-probs of the actions (None when it
    runs none); ``reference_model`` names that LM (a dir, or None), so an agent whose own reference
    is the same model reuses them instead of loading a second copy. ``lm_path`` is the causal LM
    whose tokenizer the env speaks (None: no pretrained LM fits, as for the toy env's 8 words).

    Two optional methods (``TextGenVectorEnv`` has them; the agents use them when present):
    ``shard_prompts(index, count)`` keeps a disjoint share of the prompts (data-parallel processes),
    and ``share_reference(model)`` runs the agent's frozen LM (an adapter-disabled policy) as the
    env's reference instead of its own copy.
    """

    num_envs: int

    @property
    def tokenizer(self): ...

    @property
    def pad_token_id(self) -> int: ...

    @property
    def eos_token_id(self) -> int: ...

    @property
    def valid_actions(self) -> torch.Tensor: ...  # (V,) bool on the env's device

    @property
    def prompts(self) -> list[str]: ...  # the prompts episodes are drawn from

    @property
    def max_new_tokens(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def lm_path(self) -> Path | None: ...

    @property
    def reference_model(self) -> Path | None: ...

    def reset_tensor(self, *, seed=None, options: dict | None = None) -> VectorReset: ...

    def step_tensor(self, actions: torch.Tensor) -> VectorStep: ...

    def get_rng_state(self) -> list[dict]: ...

    def set_rng_state(self, state: list[dict]) -> None: ...
