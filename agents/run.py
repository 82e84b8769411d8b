"""What every agent's training run shares: env + policy set-up, logging, checkpoints, resume.

The algorithms (``ppo.py``, ``reinforce.py``, ``dqn.py``) stay readable top to bottom; this file
holds the machinery around them:

* ``make_env`` builds the vector env (``gym.make_vec(..., vectorization_mode="vector_entry_point")``;
  any env with the tensor API of ``envs.api`` will do) and ``make_policy_model`` resolves ``--model
  auto`` (the LM the env speaks, or a tiny random GPT-2 for an env no pretrained LM speaks, like the
  toy's 8 words).
* ``Run`` owns the TensorBoard writer (``runs/`` by default), the metric stream (``metrics.jsonl``,
  one line per update, what resume must reproduce), the rich progress bar, and checkpoints:
  an HF dir for the policy plus optimizer / RNG / env-RNG / counters in safetensors + JSON
  (never pickle), written atomically (``pretrain.run_dir``). ``resume`` restores all of it so the
  continued metric stream equals an uninterrupted run's. Ctrl-C finishes the current update,
  checkpoints, and prints the command that resumes.
* A non-finite value (logits, loss, gradient, reward) stops the run with a ``NonFiniteError`` that
  names it, the update, and the last checkpoint that exists (or that there is none); a checkpoint
  is written only after the policy's weights and outputs are checked finite.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

import envs  # noqa: F401  (registers the suite)
from agents.task_config import env_parameters, resolve_env_id
from envs.api import TextVectorEnv
from pretrain.checkpoint import STATE, load_training_state, save_training_state
from pretrain.config import hparam
from pretrain.distributed import Distributed, SingleProcess
from pretrain.model import build_gpt2, resolve_device, save_lm
from pretrain.optim import NonFiniteError, check_finite, make_adam, optimizer_step
from pretrain.progress import progress_bar
from pretrain.run_dir import RunDir, StopOnInterrupt, atomic_write_dir, check_same_config, resolve_out, verify_dir


def make_env(env_id: str, num_envs: int, device, seed: int, model: str | None = None, prompt_split: str | None = None,
             **env_kwargs) -> TextVectorEnv:
    """The registered env's native vector version, reset with ``seed``; it must provide the tensor
    API the agents use (``envs.api.TextVectorEnv``).

    ``env_id`` may be ``module:Id`` (the module registers it). ``model`` (a causal-LM dir or
    'default'; None/'auto' = the env's own) is passed on when the env takes a ``model`` argument, so
    the env speaks the policy's tokenizer; ``prompt_split`` likewise (an env without splits, like
    the toy, has only its own prompts). Any other kwarg the env does not take is a ``ValueError``
    naming it."""
    name = resolve_env_id(env_id)
    params, open_kwargs = env_parameters(name)
    for key, value in (("model", None if model == "auto" else model), ("prompt_split", prompt_split)):
        if value is not None and (key in params or open_kwargs):
            env_kwargs[key] = value
    unknown = sorted(k for k in env_kwargs if k not in params)
    if unknown and not open_kwargs:
        raise ValueError(f"env {name!r} does not take {', '.join(unknown)} (it takes: {', '.join(sorted(params - {'self'}))})")
    env = gym.make_vec(name, num_envs=num_envs, vectorization_mode="vector_entry_point", device=str(device), **env_kwargs)
    env = env.unwrapped if hasattr(env, "unwrapped") else env
    if not isinstance(env, TextVectorEnv):
        raise ValueError(f"{env_id!r} makes a {type(env).__name__}, which lacks the tensor API the agents use "
                         "(envs.api.TextVectorEnv: reset_tensor, step_tensor, valid_actions, ...)")
    env.reset(seed=seed)
    return env


def make_policy_model(model: str, env: TextVectorEnv, out: Path, seed: int, dist: Distributed | None = None) -> str:
    """The policy's initial model dir. ``auto``: the LM the env speaks (``env.lm_path``), or, for an
    env no pretrained LM speaks (the toy's 8 words), a tiny random GPT-2 over its vocabulary, saved in
    ``out/init-model`` (by the main process of a data-parallel run; the others wait for it)."""
    if model != "auto":
        return model
    if env.lm_path is not None:
        return str(env.lm_path)
    target = out / "init-model"
    if (dist is None or dist.is_main) and verify_dir(target) is not None:  # a resumed run has it already
        torch.manual_seed(seed)
        tokenizer = env.tokenizer
        tiny = build_gpt2(env.valid_actions.shape[0], n_layer=2, n_embd=32, n_head=2, n_positions=64,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        atomic_write_dir(target, lambda directory: save_lm(tiny, tokenizer, directory))
    if dist is not None:
        dist.wait()
    return str(target)


def start_policy_run(cfg, algorithm: str, value_head: bool):
    """The set-up the policy-gradient agents (``ppo``, ``reinforce``, ``grpo``, ``trpo``) share; returns
    ``(dist, run, env, policy, reference)``:

    * ``dist``: the process group (``pretrain.distributed``); torch seeded with ``cfg.seed + rank``;
    * ``run``: the run dir (:class:`Run`), ``total_steps // (num_envs x max_new_tokens x processes)`` updates;
    * ``env``: this process's vector env, seeded ``seed + rank x num_envs``, on its share of the prompts;
    * ``policy``: ``LMPolicy`` on the initial model (or the checkpoint being resumed), with the
      ``--peft``/``--dtype``/``--gradient-checkpointing`` options, checked to speak the env's tokens;
    * ``reference``: pi_ref, or None when the env's per-step ``ref_logprobs`` are pi_ref's.
    """
    from agents.policy import LMPolicy, check_policy_fits_env, load_reference
    from agents.task_config import task_kwargs
    from pretrain.adapters import model_options
    from pretrain.distributed import process_group

    dist = process_group(cfg.device)
    torch.manual_seed(cfg.seed + dist.rank)
    per_update = cfg.num_envs * cfg.max_new_tokens * dist.world_size
    run = Run(cfg, algorithm, total_updates=max(1, cfg.total_steps // per_update), dist=dist)
    env = make_env(cfg.env, cfg.num_envs, dist.device, cfg.seed + dist.rank * cfg.num_envs, model=cfg.model,
                   max_new_tokens=cfg.max_new_tokens, ref_logprob_coef=cfg.env_ref_logprob_coef, **task_kwargs(cfg))
    if dist.world_size > 1:
        env.shard_prompts(dist.rank, dist.world_size)
    initial_dir = make_policy_model(cfg.model, env, run.out, cfg.seed, dist)
    policy = LMPolicy.load(initial_dir, dist.device, valid_actions=env.valid_actions, value_head=value_head,
                           options=model_options(cfg), resume_from=run.resume_model_dir())
    check_policy_fits_env(policy, env)
    reference = load_reference(initial_dir, env, dist.device, policy)
    return dist, run, env, policy, reference


def reward_metrics(rm_scores, gold_scores, reward_terms: dict | None = None) -> dict[str, float]:
    """The episode-end metrics of a batch of finished episodes: ``reward/rm`` (the task's reward:
    reward model, classifier, function or weighted sum), ``reward/gold`` (omitted when the env
    computes no gold score) and ``reward/terms/<name>`` for each term of a weighted reward."""
    gold = np.asarray(gold_scores, dtype=np.float64)
    metrics = {"reward/rm": float(np.mean(np.asarray(rm_scores.cpu() if torch.is_tensor(rm_scores) else rm_scores)))}
    if np.isfinite(gold).any():
        metrics["reward/gold"] = float(np.nanmean(gold))
    for name, values in (reward_terms or {}).items():
        metrics[f"reward/terms/{name}"] = float(np.mean(values))
    return metrics


__all__ = ["NonFiniteError", "Run", "RunOptions", "check_finite", "device_of", "make_adam", "make_env", "make_policy_model", "optimizer_step",
           "reward_metrics", "start_policy_run"]


@dataclass
class RunOptions:
    """The run's own settings, the same for every agent's config (a mixin, like ``TaskConfig``):
    seed, device, and the run dir that :class:`Run` writes, resumes and checkpoints."""

    seed: int = hparam(0, "seed")
    device: str = hparam("auto", "'auto', 'cpu' or 'cuda'")
    out: str = hparam("", "run dir: TensorBoard events, metrics.jsonl, checkpoint-<update>/, final/ (default: runs/<algorithm>; "
                          "with --resume: the resumed run's dir)")
    resume: str = hparam("", "continue the run in this dir from its newest complete checkpoint, with its settings")
    overwrite: bool = hparam(False, "start a new run in --out even if it holds another run or other files (removes a previous run's files)")
    checkpoint_every: int = hparam(10, "updates between checkpoints")
    keep_checkpoints: int = hparam(2, "complete checkpoints kept (older ones are deleted once a newer one is complete)")
    sample_every: int = hparam(5, "updates between sample texts in TensorBoard")


class Run:
    """Logging + atomic checkpoints + exact resume for one training run (``pretrain.run_dir.RunDir``).

    The run dir is ``cfg.out``, or ``cfg.resume`` when resuming (default ``runs/<algorithm>``); a
    different ``--out`` with ``--resume`` is an error, so a resumed run never writes into another.
    Resuming checks the config against the newest checkpoint's (only ``pretrain.run_dir.MAY_CHANGE_ON_RESUME``
    may differ), truncates ``metrics.jsonl`` to the checkpoint and purges the later TensorBoard steps, so
    the continued metric stream equals an uninterrupted run's. Ctrl-C finishes the update,
    checkpoints, and prints the command that resumes.
    """

    def __init__(self, cfg, algorithm: str, total_updates: int, dist: Distributed | None = None):
        self.cfg = cfg
        self.algorithm = algorithm
        self.command = f"train {algorithm}"
        self.out = resolve_out(cfg, algorithm)
        # Data-parallel runs (pretrain.distributed): the main process claims the dir and alone writes
        # to it; every process reads the checkpoint it resumes from.
        self.dist = dist or SingleProcess()
        self.dir = self.dist.on_main(lambda: RunDir(self.out, self.command, resume=bool(cfg.resume), overwrite=cfg.overwrite,
                                                    keep_checkpoints=cfg.keep_checkpoints, config=asdict(cfg)), str(self.out))
        if not self.dist.is_main:
            self.dir = RunDir(self.out, self.command, resume=bool(cfg.resume), keep_checkpoints=cfg.keep_checkpoints, claim=False)
        self.total_updates = total_updates
        self.update = 0
        self.env_steps = 0
        self.np_rng = np.random.default_rng(cfg.seed + self.dist.rank)
        self._stop = False
        self.resume_from = self.dir.latest_checkpoint() if cfg.resume else None
        if self.resume_from is not None:
            saved = {**getattr(cfg, "OLDER_RUNS", {}), **self.dir.saved_config(self.resume_from)}  # fields newer than the run
            check_same_config(asdict(cfg), saved, self.resume_from)

    # -- resume -----------------------------------------------------------------------------------
    def resume_model_dir(self) -> Path | None:
        """The checkpoint to load the policy from when resuming (None for a fresh run)."""
        return self.resume_from

    def restore(self, optimizer, env) -> dict:
        """Load optimizer, RNGs, env RNGs and counters from the newest complete checkpoint; returns
        the saved state (the algorithm's extra state, and its extra tensors under "tensors")."""
        state, tensors = load_training_state(self.resume_from, optimizer=optimizer, np_rng=self.np_rng)
        saved_world = len(state.get("ranks", [None]))
        if saved_world != self.dist.world_size:
            raise ValueError(f"--resume {self.out}: the run was checkpointed by {saved_world} process(es); resume it with "
                             f"{saved_world}, not {self.dist.world_size} (each process continues its own data stream)")
        env_rngs = state["env_rngs"]
        if "ranks" in state:  # this process's own RNG streams
            mine = state["ranks"][self.dist.rank]
            env_rngs = mine["env_rngs"]
            self.np_rng.bit_generator.state = mine["np_rng"]
            torch.set_rng_state(tensors[f"rank{self.dist.rank}.rng.torch"])
            if f"rank{self.dist.rank}.rng.cuda" in tensors and self.dist.device.type == "cuda":
                torch.cuda.set_rng_state(tensors[f"rank{self.dist.rank}.rng.cuda"], self.dist.device)
        env.set_rng_state(env_rngs)
        self.update, self.env_steps = state["update"], state["env_steps"]
        lines = (self.out / "metrics.jsonl").read_text().splitlines() if (self.out / "metrics.jsonl").exists() else []
        kept = [line for line in lines if line.strip() and json.loads(line)["update"] <= self.update]
        if kept != lines and self.dist.is_main:  # drop the updates logged after the checkpoint (they will be redone)
            (self.out / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
        state["tensors"] = tensors
        return state

    @property
    def finished(self) -> bool:
        """Resumed at the last update with ``final/`` complete: nothing is left to do."""
        return self.update >= self.total_updates and self.dir.final() is not None

    # -- running ----------------------------------------------------------------------------------
    def __enter__(self):
        self.interrupt = StopOnInterrupt().__enter__()
        self.t0 = time.perf_counter()
        if self.finished or not self.dist.is_main:  # nothing to write: a finished run, or not the main process
            self.writer = None
            return self
        # On resume, TensorBoard drops the steps after the checkpoint (written before the kill), so
        # each step appears once, as in metrics.jsonl.
        self.writer = SummaryWriter(str(self.out), purge_step=self.update + 1 if self.update else None)
        if self.update == 0:
            self.writer.add_text("hparams", "\n".join(f"    {k} = {v!r}" for k, v in asdict(self.cfg).items()))
        self.metrics_file = (self.out / "metrics.jsonl").open("a")
        self.progress = progress_bar(self.algorithm)
        self.progress.__enter__()
        self.progress_task = self.progress.add_task(self.algorithm, total=self.total_updates, completed=self.update, status="")
        return self

    def __exit__(self, exc_type, exc, tb):
        self.interrupt.__exit__(exc_type, exc, tb)
        if self.writer is not None:
            self.progress.__exit__(exc_type, exc, tb)
            self.metrics_file.close()
            self.writer.close()
        if isinstance(exc, NonFiniteError):  # say when, and what is left to resume from
            when = "" if getattr(exc, "located", False) else f" in update {self.update + 1}"
            raise NonFiniteError(f"{exc}{when}; stopping. {self._last_checkpoint_hint()}") from exc
        if exc is None and self.should_stop():
            last = self.dir.latest_checkpoint()
            launch = "textgym" if self.dist.world_size == 1 else f"torchrun --nproc_per_node {self.dist.world_size} -m agents.cli"
            if self.dist.is_main:
                print(f"\ninterrupted after update {self.update} of {self.total_updates}; checkpoint: {last}\n"
                      f"resume with: {launch} {self.command} --resume {self.out}", file=sys.stderr)
        return False

    def _last_checkpoint_hint(self) -> str:
        last = self.dir.latest_checkpoint()
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
        """One update's metrics (already reduced over processes): TensorBoard, metrics.jsonl, the
        progress bar, written by the main process."""
        self.update += 1
        self._stop = self.dist.any(self.interrupt.requested)  # every process stops after the same update
        if not self.dist.is_main:
            return
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, self.update)
        if torch.cuda.is_available() and str(getattr(self.cfg, "device", "cpu")) != "cpu":
            self.writer.add_scalar("perf/gpu_memory_gb", torch.cuda.max_memory_allocated() / 2**30, self.update)
        if texts and self.update % self.cfg.sample_every == 0:
            self.writer.add_text("samples", "\n\n".join(f"    {t}" for t in texts[:4]), self.update)
        # 7 significant digits: a small quantity (a KL of 5e-7) is not rounded to 0
        record = {"update": self.update, "env_steps": self.env_steps, **{k: float(f"{float(v):.7g}") for k, v in metrics.items()}}
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        status = "  ".join(f"{label} {metrics[k]:.3f}" for k, label in (("reward/rm", "rm"), ("reward/gold", "gold"), ("kl/ref", "kl"))
                           if k in metrics)
        self.progress.update(self.progress_task, completed=self.update, status=status)

    def due(self) -> bool:
        """Whether the update just logged ends with a checkpoint: every ``checkpoint_every``, the last, or Ctrl-C."""
        return self.update % self.cfg.checkpoint_every == 0 or self.update == self.total_updates or self.should_stop()

    def checkpoint(self, policy, optimizer, env, probe: tuple[torch.Tensor, torch.Tensor], extra_state: dict | None = None,
                   extra_tensors: dict | None = None, write_extra=None) -> Path:
        """Write ``checkpoint-<update>`` atomically: policy, optimizer, RNGs, counters, ``extra_state``
        (JSON), ``extra_tensors`` and whatever ``write_extra(dir)`` writes; after checking the policy
        is finite on ``probe`` (a few left-padded contexts): never a checkpoint of a blown-up model."""
        self._probe = probe
        cuda = self.dist.device.type == "cuda"
        ranks = self.dist.gather_objects({"np_rng": self.np_rng.bit_generator.state, "env_rngs": env.get_rng_state(),
                                          "torch": torch.get_rng_state().tolist(),
                                          "cuda": torch.cuda.get_rng_state(self.dist.device).tolist() if cuda else None})
        rank_state = {}
        if self.dist.world_size > 1:  # every process's RNG streams (a GPU samples from its CUDA one), for an exact resume of each
            rank_state = {"ranks": [{"np_rng": r["np_rng"], "env_rngs": r["env_rngs"]} for r in ranks]}
            extra_tensors = {**(extra_tensors or {}),
                             **{f"rank{i}.rng.{kind}": torch.tensor(r[kind], dtype=torch.uint8)
                                for i, r in enumerate(ranks) for kind in ("torch", "cuda") if r[kind] is not None}}

        def write(directory: Path) -> None:
            policy.save(directory, merged=False)
            save_training_state(
                directory,
                optimizer=optimizer,
                np_rng=self.np_rng,
                state={
                    "algorithm": self.algorithm,
                    "update": self.update,
                    "env_steps": self.env_steps,
                    "env_rngs": env.get_rng_state(),
                    "config": asdict(self.cfg),
                    **rank_state,
                    **(extra_state or {}),
                },
                extra_tensors=extra_tensors,
            )
            if write_extra is not None:
                write_extra(directory)

        def save() -> Path:
            self._check_finite_model(policy, probe)
            return self.dir.save_checkpoint(self.update, write)

        # The main process writes; an error there (a non-finite model) is raised on every process.
        return self.dist.on_main(save, str(self.out)) or self.dir.path / f"checkpoint-{self.update}"

    def _check_finite_model(self, policy, probe) -> None:
        try:
            policy.check_finite(*probe)
        except NonFiniteError as err:
            located = NonFiniteError(f"{err} after update {self.update}, so it was not saved")
            located.located = True
            raise located from err

    def should_stop(self) -> bool:
        """A Ctrl-C was seen (by any process, as of the last update logged)."""
        return self._stop if self.dist.world_size > 1 else self.interrupt.requested

    def finish(self, policy) -> dict:
        """Write ``final/`` (atomically; unless interrupted) and return the run's summary: the path
        of ``final/`` and the last update's metrics. A finished run resumed says so and writes nothing."""
        if self.should_stop():
            return self.summary()

        def save() -> None:  # by the main process (an error there is raised on every process)
            if self.writer is None:  # resumed a finished run
                print(f"{self.out} already finished (update {self.update} of {self.total_updates}); final model: "
                      f"{self.dir.final()}", file=sys.stderr)
                return
            if getattr(self, "_probe", None) is not None:
                self._check_finite_model(policy, self._probe)
            self.dir.save_final(policy.save, self.update)
            summary = self.summary()
            self.writer.add_hparams(
                {k: v for k, v in asdict(self.cfg).items() if isinstance(v, (int, float, str, bool))},
                {f"hparam/{k}": v for k, v in summary.items() if k in ("reward/rm", "reward/gold", "kl/ref")
                 and isinstance(v, (int, float)) and math.isfinite(v)},
                run_name="hparams",
            )

        self.dist.on_main(save, str(self.out))
        return self.summary()

    def summary(self) -> dict:
        """``{"final": <final/ or None>, **the last logged update's metrics}``."""
        metrics = {}
        if (self.out / "metrics.jsonl").exists():
            lines = [line for line in (self.out / "metrics.jsonl").read_text().splitlines() if line.strip()]
            metrics = json.loads(lines[-1]) if lines else {}
        final = self.dir.final()
        return {"final": str(final) if final else None, **metrics}


def device_of(cfg) -> torch.device:
    return resolve_device(cfg.device)
