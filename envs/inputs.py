"""What a user hands a TextGen env, checked at the door: actions, seeds, reset options, prompts.

Every check raises ``ValueError`` (a bad value) or ``TypeError`` (a value of the wrong type) whose
message names the argument and contains the offending value; nothing is clipped, cast with
overflow, or silently replaced. The env stays usable after any rejection.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
import torch

RESET_OPTIONS = ("prompt",)
INT64_MAX = np.iinfo(np.int64).max


def as_action(action) -> int:
    """A token id from an int-like action (Python or numpy int of any width, 0-d or 1-element array,
    tensor); anything else is a ``ValueError`` naming what it got. The range is checked by the env."""
    if isinstance(action, (bool, np.bool_)):
        raise ValueError(f"action must be an integer token id, got bool {action!r}")
    if isinstance(action, torch.Tensor):
        action = action.detach().cpu().numpy()
    if isinstance(action, np.ndarray):
        if action.shape not in ((), (1,)):
            raise ValueError(f"expected a single action, got an array of shape {action.shape}")
        if action.dtype.kind not in "iu":
            raise ValueError(f"action must be an integer token id, got dtype {action.dtype}")
        action = action.reshape(())[()]
    if isinstance(action, numbers.Integral):
        return int(action)
    raise ValueError(f"action must be an integer token id, got {type(action).__name__} {action!r}")


def as_actions(actions, num_envs: int) -> torch.Tensor:
    """(num_envs,) int64 token ids from an array or tensor of any integer dtype (int8 ... uint64),
    converted without overflow; floats, bools, other shapes and values beyond int64 are a ``ValueError``."""
    if isinstance(actions, torch.Tensor):
        if actions.dtype.is_floating_point or actions.dtype.is_complex or actions.dtype == torch.bool:
            raise ValueError(f"actions must be integer token ids, got dtype {actions.dtype}")
        if actions.dtype in (torch.uint16, torch.uint32, torch.uint64):  # no kernels for these: go through numpy
            actions = actions.cpu().numpy()
    if not isinstance(actions, torch.Tensor):
        array = np.asarray(actions)
        if array.dtype.kind not in "iu":
            raise ValueError(f"actions must be integer token ids, got dtype {array.dtype}: {array.tolist()!r}"[:300])
        if array.dtype == np.uint64 and (array > INT64_MAX).any():
            raise ValueError(f"action {int(array[array > INT64_MAX][0])} is out of range: not a token id")
        actions = torch.from_numpy(array.astype(np.int64, copy=False))
    if actions.shape != (num_envs,):
        raise ValueError(f"expected {num_envs} actions of shape ({num_envs},), got shape {tuple(actions.shape)}")
    return actions.long()


def check_seed(seed, what: str = "seed") -> int | None:
    """None or a non-negative int (numpy ints included; not bool)."""
    if seed is None:
        return None
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"{what} must be None or a non-negative int, got {type(seed).__name__} {seed!r}")
    if seed < 0:
        raise ValueError(f"{what} must be None or a non-negative int, got {seed}")
    return int(seed)


def vector_seeds(seed, num_envs: int) -> list[int | None]:
    """Per-sub-env seeds: None, an int (sub-env i gets seed + i) or a list of num_envs ints/None."""
    if seed is None or isinstance(seed, (numbers.Integral, np.integer)) and not isinstance(seed, (bool, np.bool_)):
        seed = check_seed(seed)
        return [None] * num_envs if seed is None else [seed + i for i in range(num_envs)]
    if isinstance(seed, (str, bytes)) or not isinstance(seed, Sequence | np.ndarray):
        raise ValueError(f"seed must be None, a non-negative int or a list of {num_envs} of them, got {type(seed).__name__} {seed!r}")
    seeds = list(seed)
    if len(seeds) != num_envs:
        raise ValueError(f"got {len(seeds)} seeds for {num_envs} envs: {seeds!r}")
    return [check_seed(s, f"seed[{i}]") for i, s in enumerate(seeds)]


def reset_options(options) -> dict:
    """``options`` as a dict with known keys only (``RESET_OPTIONS``)."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ValueError(f"options must be a dict such as {{'prompt': 'This movie was'}} or None, got {type(options).__name__} {options!r}")
    unknown = sorted(set(options) - set(RESET_OPTIONS), key=str)
    if unknown:
        raise ValueError(f"unknown reset option(s) {unknown}; valid options: {list(RESET_OPTIONS)}")
    return dict(options)


def check_prompt(tokenizer, prompt, where: str = "prompt") -> str:
    """A prompt is a non-empty str whose text holds no special token (``<|pad|>`` in a prompt would
    become the pad id inside the attended context) and no word outside the vocabulary (a tokenizer
    with an unknown token, like the toy env's, would encode it as that token)."""
    if not isinstance(prompt, str):
        raise ValueError(f"{where} must be a str, got {type(prompt).__name__} {prompt!r}")
    if not prompt.strip():
        raise ValueError(f"{where} must hold text, got {prompt!r}")
    specials = [t for t in tokenizer.all_special_tokens if t and t in prompt]
    if specials:
        raise ValueError(f"{where} {prompt!r} contains the special token {specials[0]!r}; special tokens cannot be part of a prompt")
    unk = tokenizer.unk_token_id
    if unk is not None and unk in tokenizer(prompt, add_special_tokens=False)["input_ids"]:
        raise ValueError(f"{where} {prompt!r} has words outside the tokenizer's vocabulary (they would become {tokenizer.unk_token!r})")
    return prompt
