"""SB3 callbacks: TensorBoard text-generation metrics with the KL charge, and atomic checkpoints
(see ``agents.sb3``)."""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from stable_baselines3.common.callbacks import BaseCallback

import envs  # noqa: F401  (registers the suite)
from agents.sb3.policies import acting_net
from pretrain.checkpoint import load_training_state, save_training_state
from pretrain.run_dir import RunDir, StopOnInterrupt


# -- TensorBoard ------------------------------------------------------------------------------------
class TextGenCallback(BaseCallback):
    """Logs reward/rm, reward/gold, kl/ref (means over the last ``window`` episodes) and sample texts.

    kl/ref is the sequence KL estimate sum_t log pi(a_t|s_t) - log pi_ref(a_t|s_t) (k1), available
    when the env loads a reference (``kl_coef > 0``) and the policy chose every action itself.

    ``kl_coef`` = beta > 0 (PPO, A2C): each step's rewards get -beta log pi_old(a_t|s_t) before SB3
    stores them (the ``rewards`` array SB3 hands its callbacks is the one it then adds to the rollout
    buffer), which with the env's beta log pi_ref shaping is the per-token KL penalty.
    """

    def __init__(self, sample_every: int = 5, window: int = 100, kl_coef: float = 0.0):
        super().__init__()
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.sample_every, self.window, self.kl_coef = sample_every, window, kl_coef
        self.rollouts = 0

    def _on_training_start(self) -> None:
        n = self.training_env.num_envs
        self.kl = np.zeros(n)
        self.kl_ok = np.ones(n, dtype=bool)
        self.episodes = {key: deque(maxlen=self.window) for key in ("rm_score", "gold_score", "kl")}
        self.texts: deque = deque(maxlen=4)

    def _on_step(self) -> bool:
        infos, dones = self.locals["infos"], self.locals["dones"]
        if self.kl_coef > 0:
            if "log_probs" not in self.locals:
                raise ValueError(f"TextGenCallback(kl_coef>0) needs an on-policy algorithm (PPO, A2C), not {type(self.model).__name__}")
            self.locals["rewards"] -= self.kl_coef * self.locals["log_probs"].cpu().numpy()
        net = acting_net(self.model)
        log_policy, net.last_log_policy = net.last_log_policy, None
        actions = np.asarray(self.locals["actions"]).reshape(-1)
        if log_policy is not None and "ref_logprob" in infos[0]:
            chosen = log_policy.gather(1, torch.as_tensor(actions, device=log_policy.device).view(-1, 1)).squeeze(1)
            self.kl += chosen.cpu().numpy() - np.array([info["ref_logprob"] for info in infos])
        else:
            self.kl_ok[:] = False
        for i in np.flatnonzero(dones):
            info = infos[i]
            if "rm_score" in info:
                self.episodes["rm_score"].append(info["rm_score"])
                self.episodes["gold_score"].append(info["gold_score"])
                for name, value in info.get("reward_terms", {}).items():
                    self.episodes.setdefault(f"reward/terms/{name}", deque(maxlen=self.window)).append(value)
                self.texts.append(info["prompt"] + " ->" + info["text"])
            if self.kl_ok[i]:
                self.episodes["kl"].append(self.kl[i])
            self.kl[i], self.kl_ok[i] = 0.0, True
        return True

    def _on_rollout_end(self) -> None:
        self.rollouts += 1
        tags = {"rm_score": "reward/rm", "gold_score": "reward/gold", "kl": "kl/ref"}
        for key, values in self.episodes.items():
            if values and np.isfinite(values).any():  # no gold score: no reward/gold
                self.logger.record(tags.get(key, key), float(np.nanmean(values)))
        if self.texts and self.rollouts % self.sample_every == 0:
            self.logger.record("samples", "\n\n".join(f"    {t}" for t in self.texts), exclude=("stdout", "log", "json", "csv"))

    def summary(self) -> dict:
        return {f"final_{k}": float(np.mean(v)) for k, v in self.episodes.items() if v}


class ProgressCallback(BaseCallback):
    """The project's progress display (``pretrain.progress``: on stderr, plain lines where that is
    not a terminal) for an SB3 ``learn``, in place of SB3's ``progress_bar=True`` (rich on stdout):
    env steps done of the bar's total, with ``TextGenCallback``'s episode means as the status."""

    def __init__(self, bar, task, episodes: TextGenCallback):
        super().__init__()
        self.bar, self.task, self.episodes = bar, task, episodes
        self.status = ""

    def _on_step(self) -> bool:
        if np.any(self.locals["dones"]):  # the means move only when episodes end (it runs after TextGenCallback)
            means = self.episodes.summary()
            self.status = "  ".join(f"{name} {means[f'final_{key}']:.3f}" for name, key in (("rm", "rm_score"), ("gold", "gold_score"),
                                                                                            ("kl", "kl")) if f"final_{key}" in means)
        self.bar.update(self.task, completed=self.num_timesteps, status=self.status)
        return True


# -- checkpoints and resume -------------------------------------------------------------------------
SB3_POLICY_FILE = "policy.safetensors"


def save_sb3_state(agent, directory: Path, config: dict) -> None:
    """An SB3 agent's training state, pickle-free: the policy's tensors (safetensors; tied weights
    once), its optimizer and the RNGs (``pretrain.checkpoint``), SB3's counters, and for DQN its
    replay buffer (one ``.npy`` per array, written from the buffer's memory)."""
    save_model(agent.policy, str(directory / SB3_POLICY_FILE))
    counters = {"num_timesteps": int(agent.num_timesteps), "n_updates": int(agent._n_updates),
                "episode_num": int(agent._episode_num), "exploration_rate": float(getattr(agent, "exploration_rate", 0.0))}
    save_training_state(directory, optimizer=agent.policy.optimizer, np_rng=np.random.default_rng(0),
                        state={"config": config, "step": counters["num_timesteps"], **counters})
    buffer = getattr(agent, "replay_buffer", None)
    if buffer is not None:
        replay = directory / "replay"
        replay.mkdir()
        for name, array in replay_arrays(buffer):
            np.save(replay / f"{name}.npy", array, allow_pickle=False)
        (replay / "replay.json").write_text(json.dumps({"pos": int(buffer.pos), "full": bool(buffer.full)}))


def load_sb3_state(agent, directory: Path) -> None:
    """Restore what :func:`save_sb3_state` wrote into a freshly made agent of the same settings."""
    load_model(agent.policy, str(directory / SB3_POLICY_FILE))
    state, _ = load_training_state(directory, optimizer=agent.policy.optimizer, np_rng=np.random.default_rng(0))
    agent.num_timesteps, agent._n_updates, agent._episode_num = state["num_timesteps"], state["n_updates"], state["episode_num"]
    if hasattr(agent, "exploration_rate"):
        agent.exploration_rate = state["exploration_rate"]
    buffer = getattr(agent, "replay_buffer", None)
    if buffer is not None:
        for name, array in replay_arrays(buffer):
            array[:] = np.load(directory / "replay" / f"{name}.npy", mmap_mode="r", allow_pickle=False)
        meta = json.loads((directory / "replay" / "replay.json").read_text())
        buffer.pos, buffer.full = meta["pos"], meta["full"]


def replay_arrays(buffer) -> list[tuple[str, np.ndarray]]:
    arrays = [(f"obs.{k}", v) for k, v in buffer.observations.items()] + [(f"next_obs.{k}", v) for k, v in buffer.next_observations.items()]
    return arrays + [(k, getattr(buffer, k)) for k in ("actions", "rewards", "dones", "timeouts")]


class CheckpointCallback(BaseCallback):
    """Writes an atomic checkpoint (``pretrain.run_dir``) between rollouts, every ``every`` env steps,
    and stops ``learn`` at the first Ctrl-C (the caller then checkpoints and says how to resume)."""

    def __init__(self, run_dir: RunDir, every: int, config: dict, interrupt: StopOnInterrupt):
        super().__init__()
        self.run_dir, self.every, self.config, self.interrupt = run_dir, every, config, interrupt
        self.last = None

    def _on_training_start(self) -> None:
        self.last = self.num_timesteps

    def _on_rollout_start(self) -> None:  # after the previous rollout's update
        if self.num_timesteps - self.last >= self.every:
            self.save()

    def _on_step(self) -> bool:
        return not self.interrupt.requested

    def save(self) -> Path:
        self.last = self.num_timesteps
        return self.run_dir.save_checkpoint(self.num_timesteps, lambda d: save_sb3_state(self.model, d, self.config))
