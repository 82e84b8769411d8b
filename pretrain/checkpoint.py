"""Pickle-free training checkpoints: optimizer and RNG states in safetensors + JSON.

``torch.save`` pickles, and unpickling an untrusted file can run arbitrary code, so training state
is stored as flat tensors in ``training_state.safetensors`` plus a ``training_state.json`` holding
everything that is not a tensor (step counters, optimizer hyper-parameters, numpy RNG state, the
run's config). The model itself is saved next to it as an ordinary HF dir.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

TENSORS = "training_state.safetensors"
STATE = "training_state.json"


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into flat tensors and a JSON-able remainder."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{param_id}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, param_id, key = name.split(".", 2)
            state.setdefault(int(param_id), {})[key] = value
    for param_id, values in meta["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_training_state(
    path: str | Path,
    *,
    optimizer: torch.optim.Optimizer,
    np_rng: np.random.Generator,
    state: dict[str, Any],
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write optimizer, torch/numpy RNG states and ``state`` (JSON-able) into ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, optim_meta = optimizer_to_flat(optimizer)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    tensors.update(extra_tensors or {})
    save_file(tensors, str(path / TENSORS))
    meta = {"state": state, "optimizer": optim_meta, "np_rng": np_rng.bit_generator.state}
    (path / STATE).write_text(json.dumps(meta, indent=1))


def load_training_state(
    path: str | Path, *, optimizer: torch.optim.Optimizer, np_rng: np.random.Generator
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore what :func:`save_training_state` wrote; returns ``(state, extra_tensors)``."""
    path = Path(path)
    if not (path / TENSORS).is_file() or not (path / STATE).is_file():
        raise FileNotFoundError(f"{path} is not a training checkpoint: it needs {TENSORS} and {STATE}")
    tensors = load_file(str(path / TENSORS))
    meta = json.loads((path / STATE).read_text())
    try:
        optimizer_from_flat(optimizer, tensors, meta["optimizer"])
    except (ValueError, KeyError, RuntimeError) as err:
        raise ValueError(f"the optimizer state in {path} does not fit this model/optimizer: {err}") from err
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    np_rng.bit_generator.state = meta["np_rng"]
    extra = {k: v for k, v in tensors.items() if not k.startswith(("optimizer.", "rng."))}
    return meta["state"], extra
