"""What every agent's training run shares: env + policy set-up, logging, checkpoints, resume.

The algorithms (``ppo.py``, ``reinforce.py``, ``dqn.py``) stay readable top to bottom; this file
holds the machinery around them:

* ``make_env`` builds the vector env (``gym.make_vec(..., vectorization_mode="vector_entry_point")``)
  and ``make_policy_model`` resolves ``--model auto`` (the shipped LM, or a tiny random GPT-2 for
  the toy env, whose 8-word vocabulary no pretrained LM shares).
* ``Run`` owns the TensorBoard writer (``runs/`` by default), the metric stream (``metrics.jsonl``,
  one line per update, what resume must reproduce), the rich progress bar, and checkpoints:
  an HF dir for the policy plus optimizer / RNG / env-RNG / counters in safetensors + JSON
  (never pickle). ``resume`` restores all of it so the continued metric stream equals an
  uninterrupted run's. Ctrl-C finishes the current update, checkpoints and exits.
* A non-finite value (logits, loss, gradient, reward) stops the run with a ``NonFiniteError`` that
  names it, the update, and the last checkpoint that exists (or that there is none); a checkpoint
  is written only after the policy's weights and outputs are checked finite.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

import envs  # noqa: F401  (registers the suite)
from pretrain.checkpoint import STATE, load_training_state, save_training_state
from pretrain.model import build_gpt2, resolve_device, save_lm
from pretrain.optim import NonFiniteError, check_finite, optimizer_step
from pretrain.progress import progress_bar
from pretrain.train import StopOnInterrupt


def make_env(env_id: str, num_envs: int, device, seed: int, **env_kwargs):
    if env_id not in envs.ENV_IDS and env_id not in gym.registry:
        raise ValueError(f"unknown env id {env_id!r}; valid ids: {', '.join(envs.ENV_IDS)}")
    env = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="vector_entry_point", device=str(device), **env_kwargs)
    env.reset(seed=seed)
    return env.unwrapped if hasattr(env, "unwrapped") else env


def make_policy_model(model: str, env, out: Path, seed: int) -> str:
    """The policy's initial model dir: ``auto`` = the shipped LM, or a tiny GPT-2 for the toy env."""
    if model != "auto":
        return model
    if env.task.reference is None and env.task.toy_ref_logits is not None:  # the toy env
        torch.manual_seed(seed)
        tiny = build_gpt2(env.task.n_actions, n_layer=2, n_embd=32, n_head=2, n_positions=64,
                          eos_token_id=env.task.tokenizer.eos_token_id, pad_token_id=env.task.tokenizer.pad_token_id)
        return str(save_lm(tiny, env.task.tokenizer, out / "init-model"))
    return "default"


__all__ = ["NonFiniteError", "Run", "check_finite", "device_of", "make_env", "make_policy_model", "optimizer_step"]


class Run:
    """Logging + checkpoint/resume for one training run in ``cfg.out``."""

    def __init__(self, cfg, algorithm: str, total_updates: int):
        self.cfg = cfg
        self.algorithm = algorithm
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoint"
        self.total_updates = total_updates
        self.update = 0
        self.env_steps = 0
        self.np_rng = np.random.default_rng(cfg.seed)
        self.resume_dir = Path(cfg.resume) if cfg.resume else None
        if self.resume_dir is not None:
            self._check_resumable()
        elif (self.out / "metrics.jsonl").exists():
            raise FileExistsError(f"{self.out} already holds a run; pick another --out or continue it with --resume {self.out}")

    # -- resume -----------------------------------------------------------------------------------
    def _checkpoint_path(self) -> Path:
        d = self.resume_dir
        return d / "checkpoint" if (d / "checkpoint" / STATE).is_file() else d

    def _check_resumable(self) -> None:
        ckpt = self._checkpoint_path()
        if not (ckpt / STATE).is_file():
            raise FileNotFoundError(f"--resume {self.resume_dir}: no checkpoint there (expected {ckpt / STATE})")
        saved = json.loads((ckpt / STATE).read_text())["state"]
        if saved.get("algorithm") != self.algorithm:
            raise ValueError(f"--resume {self.resume_dir}: it is a {saved.get('algorithm')!r} checkpoint, not {self.algorithm!r}")
        mine = asdict(self.cfg)
        for key in ("env", "num_envs", "seed", "max_new_tokens"):
            if key in mine and saved["config"].get(key) != mine[key]:
                raise ValueError(
                    f"--resume {self.resume_dir}: the checkpoint has {key}={saved['config'].get(key)!r}, "
                    f"this run {key}={mine[key]!r}; resume with the same settings"
                )

    def resume_model_dir(self) -> Path | None:
        return self._checkpoint_path() if self.resume_dir is not None else None

    def restore(self, optimizer, env, extra_state: dict | None = None) -> dict:
        """Load optimizer, RNGs, env RNGs and counters; returns the algorithm's extra state."""
        state, tensors = load_training_state(self._checkpoint_path(), optimizer=optimizer, np_rng=self.np_rng)
        for rng, saved in zip(env._rngs, state["env_rngs"]):
            rng.bit_generator.state = saved
        self.update, self.env_steps = state["update"], state["env_steps"]
        lines = (self.out / "metrics.jsonl").read_text().splitlines() if (self.out / "metrics.jsonl").exists() else []
        kept = [line for line in lines if json.loads(line)["update"] <= self.update]
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
        state["tensors"] = tensors
        return state

    # -- running ----------------------------------------------------------------------------------
    def __enter__(self):
        self.out.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(self.out))
        if self.update == 0:
            self.writer.add_text("hparams", "\n".join(f"    {k} = {v!r}" for k, v in asdict(self.cfg).items()))
        self.metrics_file = (self.out / "metrics.jsonl").open("a")
        self.progress = progress_bar(self.algorithm)
        self.progress.__enter__()
        self.task = self.progress.add_task(self.algorithm, total=self.total_updates, completed=self.update, status="")
        self.interrupt = StopOnInterrupt().__enter__()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb):
        self.interrupt.__exit__(exc_type, exc, tb)
        self.progress.__exit__(exc_type, exc, tb)
        self.metrics_file.close()
        self.writer.close()
        if isinstance(exc, NonFiniteError):  # say when, and what is left to resume from
            when = "" if getattr(exc, "located", False) else f" in update {self.update + 1}"
            raise NonFiniteError(f"{exc}{when}; stopping. {self._last_checkpoint_hint()}") from exc
        return False

    def last_checkpoint(self) -> Path | None:
        """The checkpoint dir a resume would use, if one has been written completely."""
        done = (self.ckpt_dir / STATE).is_file() and (self.ckpt_dir / "model.safetensors").is_file()
        return self.ckpt_dir if done else None

    def _last_checkpoint_hint(self) -> str:
        last = self.last_checkpoint()
        advice = "Lower the learning rate or check the reward."
        if last is None:
            return f"No checkpoint has been written yet. {advice}"
        update = json.loads((last / STATE).read_text())["state"]["update"]
        return f"The last good checkpoint is {last} (update {update}; continue with --resume {self.out}). {advice}"

    def seconds_since_last_log(self) -> float:
        now = time.perf_counter()
        last, self._last_log = getattr(self, "_last_log", self.t0), now
        return max(now - last, 1e-9)

    def log(self, metrics: dict[str, float], texts: list[str] | None = None) -> None:
        """One update's metrics: TensorBoard, metrics.jsonl, the progress bar."""
        self.update += 1
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, self.update)
        if torch.cuda.is_available() and str(getattr(self.cfg, "device", "cpu")) != "cpu":
            self.writer.add_scalar("perf/gpu_memory_gb", torch.cuda.max_memory_allocated() / 2**30, self.update)
        if texts and self.update % self.cfg.sample_every == 0:
            self.writer.add_text("samples", "\n\n".join(f"    {t}" for t in texts[:4]), self.update)
        record = {"update": self.update, "env_steps": self.env_steps, **{k: round(float(v), 6) for k, v in metrics.items()}}
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        status = "  ".join(f"{k.split('/')[-1]} {metrics[k]:.3f}" for k in ("reward/rm", "reward/gold", "kl/ref") if k in metrics)
        self.progress.update(self.task, completed=self.update, status=status)

    def checkpoint(self, policy, optimizer, env, probe: tuple[torch.Tensor, torch.Tensor], extra_state: dict | None = None,
                   extra_tensors: dict | None = None) -> None:
        """Save policy, optimizer, RNGs and counters, after checking the policy is finite on ``probe``
        (a few left-padded contexts ``(input_ids, attention_mask)``): never a checkpoint of a blown-up model."""
        self._check_finite_model(policy, probe)
        self._probe = probe
        policy.save(self.ckpt_dir)
        save_training_state(
            self.ckpt_dir,
            optimizer=optimizer,
            np_rng=self.np_rng,
            state={
                "algorithm": self.algorithm,
                "update": self.update,
                "env_steps": self.env_steps,
                "env_rngs": [rng.bit_generator.state for rng in env._rngs],
                "config": asdict(self.cfg),
                **(extra_state or {}),
            },
            extra_tensors=extra_tensors,
        )

    def _check_finite_model(self, policy, probe) -> None:
        try:
            policy.check_finite(*probe)
        except NonFiniteError as err:
            located = NonFiniteError(f"{err} after update {self.update}, so it was not saved")
            located.located = True
            raise located from err

    def should_stop(self) -> bool:
        return self.interrupt.requested

    def finish(self, policy, hparams: dict, final_metrics: dict) -> Path:
        if getattr(self, "_probe", None) is not None:
            self._check_finite_model(policy, self._probe)
        final = policy.save(self.out / "final")
        self.writer.add_hparams(
            {k: v for k, v in hparams.items() if isinstance(v, (int, float, str, bool))},
            {f"hparam/{k}": v for k, v in final_metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)},
            run_name="hparams",
        )
        return final


def device_of(cfg) -> torch.device:
    return resolve_device(cfg.device)
