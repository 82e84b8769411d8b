"""Pickle-free training checkpoints: optimizer and RNG states in safetensors + JSON.

``torch.save`` pickles, and unpickling an untrusted file can run arbitrary code, so training state
is stored as flat tensors in ``training_state.safetensors`` plus a ``training_state.json`` holding
everything that is not a tensor (step counters, optimizer hyper-parameters, numpy RNG state, the
run's config). The model itself is saved next to it as an ordinary HF dir, or, for an adapter run
(``--peft``), as the adapter alone in ``adapter/`` (:func:`save_trained_lm`).

:class:`StepRun` is the run machinery of the step-counted trainers (SFT, DPO, reward model,
classifier), single-process or data-parallel (``pretrain.distributed``).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.tensorboard import SummaryWriter

from pretrain.adapters import ADAPTER_DIR, AdaptedLM, save_merged
from pretrain.distributed import Distributed, SingleProcess
from pretrain.run_dir import STATE, RunDir, StopOnInterrupt, check_same_config, resolve_out

TENSORS = "training_state.safetensors"


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


def save_step_checkpoint(run_dir, step: int, save_model, *, optimizer: torch.optim.Optimizer, np_rng: np.random.Generator,
                         scheduler=None, state: dict[str, Any] | None = None,
                         extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """``checkpoint-<step>`` of a step-counted trainer (pretraining, SFT, DPO, reward model), atomically
    (``pretrain.run_dir.RunDir.save_checkpoint``): ``save_model(dir)`` writes the model, then the
    optimizer, RNG and learning-rate-schedule state, ``state`` (with ``step``) and ``extra_tensors`` follow."""

    def write(directory: Path) -> None:
        save_model(directory)
        extra = {"step": step, **(state or {})}
        if scheduler is not None:
            extra["scheduler"] = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        save_training_state(directory, optimizer=optimizer, np_rng=np_rng, state=extra, extra_tensors=extra_tensors)

    return run_dir.save_checkpoint(step, write)


def save_trained_lm(model, tokenizer, path: str | Path, final: bool = False) -> Path:
    """The LM a trainer fine-tuned, as a dir: an HF dir (model + tokenizer) for all-weights training.

    An adapter (``pretrain.adapters.AdaptedLM``) writes itself alone in ``adapter/`` (peft's format)
    with the tokenizer beside it: a checkpoint, which ``load_trainable_lm(base, opts,
    resume_from=dir)`` resumes. With ``final``, a LoRA adapter is also merged into a plain HF dir
    at ``path`` (``AutoModelForCausalLM.from_pretrained(path)`` and ``textgym eval`` load it); a
    prompt-tuning adapter cannot be merged, so its ``final/`` loads through ``pretrain.load_lm``."""
    path = Path(path)
    if not isinstance(model, AdaptedLM):
        from pretrain.model import save_lm

        return save_lm(model, tokenizer, path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_adapter(path / ADAPTER_DIR)
    if final and model.kind == "lora":
        return save_merged(model, tokenizer, path)
    tokenizer.save_pretrained(str(path))
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a text file all-or-nothing (a temp file, fsync, rename): a kill never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


class _NoWriter:
    """The TensorBoard writer of a process that writes nothing (not the main one of a data-parallel run)."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def add_text(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


class StepRun:
    """Run dir, resume and checkpoints of a step-counted trainer (pretraining, SFT, DPO, reward model).

    ``StepRun(cfg, "dpo", dist)`` claims ``cfg.out`` (default ``runs/<command>``) or, with ``cfg.resume``,
    reopens that run at its newest complete checkpoint (``self.checkpoint``; settings and the number
    of processes checked against it). The loop then calls :meth:`restore` once, :meth:`after_step`
    after every optimizer step (a checkpoint every ``cfg.checkpoint_every`` steps and on Ctrl-C, which
    then stops with the command that resumes) and :meth:`save_final` at the end. ``finished`` is the
    saved summary of a run that already completed (resuming it is a no-op), else None.

    Data-parallel runs (``dist``, a ``pretrain.distributed.Distributed`` of N processes): the main
    process claims the dir and alone writes to it (TensorBoard, checkpoints, ``final/``, data files:
    :meth:`on_main`); every process reads the checkpoint it resumes from. A checkpoint holds every
    process's RNG state, so each continues its own random stream; it is resumed with as many processes
    as wrote it. :meth:`shard` is a process's part of a global batch.
    """

    def __init__(self, cfg, command: str, dist: Distributed | None = None):
        self.cfg, self.command = cfg, command
        self.dist = dist if dist is not None else SingleProcess()
        self.out = resolve_out(cfg, command)
        self.run = self.on_main(lambda: RunDir(self.out, command, resume=bool(cfg.resume), overwrite=cfg.overwrite,
                                               keep_checkpoints=cfg.keep_checkpoints, config=asdict(cfg)))
        if not self.dist.is_main:  # the dir is claimed (or checked resumable) by now
            self.run = RunDir(self.out, command, resume=bool(cfg.resume), keep_checkpoints=cfg.keep_checkpoints, claim=False)
        self.checkpoint = self.run.latest_checkpoint() if cfg.resume else None
        if self.checkpoint is not None:
            check_same_config(asdict(cfg), self.run.saved_config(self.checkpoint), self.checkpoint)
        self.step = 0
        self.resumed_step = json.loads((self.checkpoint / STATE).read_text())["state"]["step"] if self.checkpoint else 0
        self.interrupt = StopOnInterrupt()

    @property
    def finished(self) -> dict | None:
        final = self.run.final() if self.cfg.resume else None
        if final is None:
            return None
        final_step = json.loads((final / "manifest.json").read_text()).get("step") or 0
        if self.checkpoint is not None and self.resumed_step > final_step:
            return None
        if self.dist.is_main:
            print(f"{self.out} already finished (step {final_step}); final model: {final}", file=sys.stderr)
        return json.loads((final / "metrics.json").read_text()) if (final / "metrics.json").is_file() else {}

    # -- data-parallel ----------------------------------------------------------------------------
    def on_main(self, action):
        """``action()`` by the main process alone, errors raised on every process (``SingleProcess.on_main``)."""
        return self.dist.on_main(action, str(self.out))

    def shard(self, batch):
        """This process's contiguous part of a global batch (a list or array; the parts' sizes differ
        by at most one, like ``np.array_split``; the whole batch in a single process)."""
        size, extra = divmod(len(batch), self.dist.world_size)
        start = self.dist.rank * size + min(self.dist.rank, extra)
        return batch[start : start + size + (self.dist.rank < extra)]

    # -- resume and checkpoints -----------------------------------------------------------------
    def restore(self, *, optimizer: torch.optim.Optimizer, np_rng: np.random.Generator, scheduler=None) -> dict:
        """Optimizer, RNGs (this process's own) and schedule from the checkpoint being resumed; returns
        its saved state (``step`` and what :meth:`after_step` was given), or ``{"step": 0}`` for a new run."""
        if self.checkpoint is None:
            return {"step": 0}
        state, tensors = load_training_state(self.checkpoint, optimizer=optimizer, np_rng=np_rng)
        saved_world = state.get("world_size", 1)
        if saved_world != self.dist.world_size:
            raise ValueError(f"--resume {self.out}: the run was checkpointed by {saved_world} process(es); resume it with "
                             f"{saved_world}, not {self.dist.world_size} (the global batch and each process's data follow from it)")
        if scheduler is not None:
            scheduler.load_state_dict({**scheduler.state_dict(), **state["scheduler"]})
        if "ranks" in state:  # a data-parallel run: this process's RNG streams
            mine = state["ranks"][self.dist.rank]
            np_rng.bit_generator.state = mine["np_rng"]
            torch.set_rng_state(tensors[f"rank{self.dist.rank}.rng.torch"])
            if f"rank{self.dist.rank}.rng.cuda" in tensors and self.dist.device.type == "cuda":
                torch.cuda.set_rng_state(tensors[f"rank{self.dist.rank}.rng.cuda"], self.dist.device)
        self.step = state["step"]
        return state

    def __enter__(self):
        self.interrupt.__enter__()
        return self

    def __exit__(self, *exc):
        return self.interrupt.__exit__(*exc)

    def writer(self):
        """TensorBoard in the run dir (the main process's; the others' writes nothing); a resumed run
        drops the events after its checkpoint (they are redone)."""
        if not self.dist.is_main:
            return _NoWriter()
        return SummaryWriter(str(self.out), purge_step=self.resumed_step + 1 if self.resumed_step else None)

    def after_step(self, step: int, save_model, *, optimizer: torch.optim.Optimizer, np_rng: np.random.Generator,
                   scheduler=None, state: dict | None = None, check=None) -> None:
        """Checkpoint every ``checkpoint_every`` steps, and on Ctrl-C (then stop: ``KeyboardInterrupt``;
        a Ctrl-C seen by any process stops all of them after the same step). ``check(step)`` runs first,
        on every process, and raises if the model is not fit to save (``pretrain.optim.check_model_finite``)."""
        self.step = step
        every = self.cfg.checkpoint_every
        stop = self.dist.any(self.interrupt.requested)
        if (every and step % every == 0) or stop:
            if check is not None:
                check(step)
            state = {"config": self._config(), "world_size": self.dist.world_size, **(state or {})}
            extra_tensors = None
            if self.dist.world_size > 1:  # every process's RNG streams, for an exact resume of each
                ranks = self.dist.gather_objects(self._rng_state(np_rng))
                state["ranks"] = [{"np_rng": r["np_rng"]} for r in ranks]
                extra_tensors = {f"rank{i}.rng.{kind}": torch.tensor(r[kind], dtype=torch.uint8)
                                 for i, r in enumerate(ranks) for kind in ("torch", "cuda") if r.get(kind) is not None}
            path = self.on_main(lambda: save_step_checkpoint(self.run, step, save_model, optimizer=optimizer, np_rng=np_rng,
                                                             scheduler=scheduler, state=state, extra_tensors=extra_tensors))
            if stop:
                if self.dist.is_main:
                    print(f"\ninterrupted at step {step}; checkpoint: {path}\nresume with: textgym {self.command} --resume {self.out}",
                          file=sys.stderr)
                raise KeyboardInterrupt

    def _rng_state(self, np_rng: np.random.Generator) -> dict:
        cuda = torch.cuda.get_rng_state(self.dist.device).tolist() if self.dist.device.type == "cuda" else None
        return {"np_rng": np_rng.bit_generator.state, "torch": torch.get_rng_state().tolist(), "cuda": cuda}

    def save_final(self, write) -> Path | None:
        """``final/``, written atomically by ``write(dir)`` on the main process (None on the others)."""
        return self.on_main(lambda: self.run.save_final(write, self.step))

    def _config(self) -> dict:
        return asdict(self.cfg)
