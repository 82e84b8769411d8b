"""``textgym train sb3-ppo | sb3-a2c | sb3-dqn``: the configs, the training run, its logger (see ``agents.sb3``)."""

from __future__ import annotations

import csv
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from stable_baselines3.common.logger import CSVOutputFormat, KVWriter, TensorBoardOutputFormat, configure
from torch.utils.tensorboard import SummaryWriter

import envs  # noqa: F401  (registers the suite)
from agents.run import make_policy_model
from agents.sb3.callbacks import CheckpointCallback, ProgressCallback, TextGenCallback, load_sb3_state
from agents.sb3.policies import export_hf, make_sb3_agent
from agents.sb3.vec_env import make_sb3_vec_env
from agents.task_config import TaskConfig, task_kwargs
from pretrain.checkpoint import write_text_atomic
from pretrain.config import hparam, require_non_negative, require_positive, require_unit_interval, validate_fields
from pretrain.model import resolve_device
from pretrain.progress import progress_bar
from pretrain.run_dir import RunDir, StopOnInterrupt, check_same_config, resolve_out


# -- textgym train sb3-* ----------------------------------------------------------------------------
@dataclass
class SB3Config(TaskConfig):
    """Shared settings of the SB3 agents (defaults: the embedded default task)."""

    num_envs: int = hparam(16, "parallel envs, advanced in one batched step")
    total_steps: int = hparam(8_192, "env steps (generated tokens) to train for")
    max_new_tokens: int = hparam(16, "tokens per episode")
    kl_coef: float = hparam(0.05, "beta of the KL penalty: the env pays beta*log pi_ref per token (see kl_route)")
    lr: float = hparam(5e-5, "Adam learning rate")
    gamma: float = hparam(1.0, "discount")
    seed: int = hparam(0, "seed")
    device: str = hparam("auto", "'auto', 'cpu' or 'cuda'")
    out: str = hparam("", "run dir: TensorBoard events, progress.csv, checkpoint-<steps>/, sb3_model.zip, final/ (HF dir) "
                          "(default: runs/sb3-<algorithm>; with --resume: the resumed run's dir)")
    sample_every: int = hparam(5, "rollouts between sample texts in TensorBoard")
    resume: str = hparam("", "continue the run in this dir from its newest complete checkpoint, with its settings "
                             "(episodes in flight restart, so the numbers are not an uninterrupted run's)")
    overwrite: bool = hparam(False, "start a new run in --out even if it holds another run or other files")
    checkpoint_every: int = hparam(2_048, "env steps between checkpoints (taken between rollouts)")
    keep_checkpoints: int = hparam(2, "complete checkpoints kept (older ones are deleted once a newer one is complete)")

    def __post_init__(self):
        validate_fields(self)
        self.validate_task()
        require_positive(self, "num_envs", "total_steps", "max_new_tokens", "lr", "sample_every", "checkpoint_every",
                         "keep_checkpoints")
        require_non_negative(self, "kl_coef")
        require_unit_interval(self, "gamma")

    def callback_kl_coef(self) -> float:
        return 0.0  # DQN: the env's shaping only (a hard-max Q-learner has no log pi to charge)


@dataclass
class SB3ActorCriticConfig(SB3Config):
    kl_route: str = hparam("reward", "where -beta*log pi comes from: 'reward' (the callback charges it per token) "
                                     "or 'entropy' (ent_coef = beta; see agents/sb3.py for why 'reward' is the default)")

    def __post_init__(self):
        super().__post_init__()
        if self.kl_route not in ("reward", "entropy"):
            raise ValueError(f"unknown kl_route {self.kl_route!r}; expected 'reward' or 'entropy'")

    def callback_kl_coef(self) -> float:
        return self.kl_coef if self.kl_route == "reward" else 0.0

    def ent_coef(self) -> float:
        return self.kl_coef if self.kl_route == "entropy" else 0.0


@dataclass
class SB3PPOConfig(SB3ActorCriticConfig):
    """SB3 PPO with LMActorCriticPolicy."""

    out: str = hparam("", "run dir: TensorBoard events, progress.csv, checkpoint-<steps>/, sb3_model.zip, final/ (HF dir) "
                          "(default: runs/sb3-ppo; with --resume: the resumed run's dir)")
    n_steps: int = hparam(32, "steps per env per rollout (rollout = n_steps * num_envs transitions)")
    batch_size: int = hparam(128, "minibatch size (transitions)")
    n_epochs: int = hparam(4, "passes over each rollout")
    gae_lambda: float = hparam(0.95, "GAE lambda")
    clip_range: float = hparam(0.2, "surrogate clipping epsilon")
    vf_coef: float = hparam(0.1, "value loss coefficient")
    max_grad_norm: float = hparam(1.0, "clip the global gradient norm")
    target_kl: float = hparam(0.05, "stop the epochs early past this approx KL (0 = never)")

    def algorithm_kwargs(self) -> dict:
        # Advantage normalisation rescales the reward but not an entropy bonus: off for the entropy route.
        return dict(n_steps=self.n_steps, batch_size=self.batch_size, n_epochs=self.n_epochs, gae_lambda=self.gae_lambda,
                    clip_range=self.clip_range, vf_coef=self.vf_coef, max_grad_norm=self.max_grad_norm,
                    target_kl=self.target_kl or None, ent_coef=self.ent_coef(), normalize_advantage=self.kl_route == "reward")


@dataclass
class SB3A2CConfig(SB3ActorCriticConfig):
    """SB3 A2C with LMActorCriticPolicy."""

    out: str = hparam("", "run dir: TensorBoard events, progress.csv, checkpoint-<steps>/, sb3_model.zip, final/ (HF dir) "
                          "(default: runs/sb3-a2c; with --resume: the resumed run's dir)")
    lr: float = hparam(1e-5, "learning rate (RMSprop, SB3's A2C default optimizer)")
    n_steps: int = hparam(16, "steps per env per update")
    gae_lambda: float = hparam(1.0, "GAE lambda (1 = plain n-step advantages, SB3's default)")
    vf_coef: float = hparam(0.1, "value loss coefficient")
    max_grad_norm: float = hparam(1.0, "clip the global gradient norm")

    def algorithm_kwargs(self) -> dict:
        return dict(n_steps=self.n_steps, gae_lambda=self.gae_lambda, vf_coef=self.vf_coef,
                    max_grad_norm=self.max_grad_norm, ent_coef=self.ent_coef())


@dataclass
class SB3DQNConfig(SB3Config):
    """SB3 DQN with LMQNetworkPolicy (SB3's replay buffer and target network, Boltzmann exploration)."""

    env: str = hparam("TextGenToy-v0", "registered env id (module:MyTask-v0 imports module first)")
    out: str = hparam("", "run dir: TensorBoard events, progress.csv, checkpoint-<steps>/, sb3_model.zip, final/ (HF dir) "
                          "(default: runs/sb3-dqn; with --resume: the resumed run's dir)")
    num_envs: int = hparam(8, "parallel envs, advanced in one batched step")
    total_steps: int = hparam(4_000, "env steps (transitions) to train for")
    max_new_tokens: int = hparam(4, "tokens per episode")
    kl_coef: float = hparam(0.0, "beta of the env's beta*log pi_ref shaping (DQN has no entropy bonus)")
    lr: float = hparam(1e-3, "Adam learning rate")
    buffer_size: int = hparam(20_000, "replay capacity (SB3's DictReplayBuffer)")
    learning_starts: int = hparam(200, "transitions before learning")
    batch_size: int = hparam(64, "transitions per gradient step")
    train_freq: int = hparam(4, "env steps (per env) between updates")
    gradient_steps: int = hparam(4, "gradient steps per update")
    target_update_interval: int = hparam(200, "env steps between hard target-network updates")
    exploration_eps: float = hparam(0.0, "epsilon of SB3's epsilon-greedy (uniform over valid tokens); 0 = Boltzmann only")
    temperature: float = hparam(1.0, "Boltzmann exploration temperature T: sample softmax(Q / T)")
    q_form: str = hparam("log_policy", "'log_policy' (Q = V + T log pi, zero-init V head) or 'logits' (Q = the LM's logits)")

    def algorithm_kwargs(self) -> dict:
        return dict(buffer_size=self.buffer_size, learning_starts=self.learning_starts, batch_size=self.batch_size,
                    train_freq=self.train_freq, gradient_steps=self.gradient_steps,
                    target_update_interval=self.target_update_interval, exploration_initial_eps=self.exploration_eps,
                    exploration_final_eps=self.exploration_eps,
                    policy_kwargs={"temperature": self.temperature, "q_form": self.q_form})


def train(cfg: SB3PPOConfig | SB3A2CConfig | SB3DQNConfig, algorithm: str) -> dict:
    """``textgym train sb3-{ppo,a2c,dqn}``: learn (checkpointing), then save ``final/`` (HF dir) and ``sb3_model.zip``."""
    device = resolve_device(cfg.device)
    command = f"train sb3-{algorithm}"
    out = resolve_out(cfg, f"sb3-{algorithm}")
    run_dir = RunDir(out, command, resume=bool(cfg.resume), overwrite=cfg.overwrite, keep_checkpoints=cfg.keep_checkpoints,
                     config=asdict(cfg))
    checkpoint = run_dir.latest_checkpoint() if cfg.resume else None
    if checkpoint is not None:
        check_same_config(asdict(cfg), run_dir.saved_config(checkpoint), checkpoint)
    if cfg.resume and run_dir.final() is not None and (out / "summary.json").is_file():
        print(f"{out} already finished; final model: {run_dir.final()}", file=sys.stderr)
        return json.loads((out / "summary.json").read_text())
    torch.manual_seed(cfg.seed)
    venv = make_sb3_vec_env(cfg.env, cfg.num_envs, cfg.seed, device, model=cfg.model, max_new_tokens=cfg.max_new_tokens,
                            ref_logprob_coef=cfg.kl_coef, **task_kwargs(cfg))
    model_dir = make_policy_model(cfg.model, venv.unwrapped.env, out, cfg.seed)
    agent = make_sb3_agent(algorithm, venv, model=model_dir, learning_rate=cfg.lr, gamma=cfg.gamma, seed=cfg.seed,
                           device=device, **cfg.algorithm_kwargs())
    if checkpoint is not None:
        load_sb3_state(agent, checkpoint)
    agent.set_logger(sb3_logger(out, agent.num_timesteps, algorithm))
    if checkpoint is None:
        agent.logger.record("hparams", "\n".join(f"    {k} = {v!r}" for k, v in asdict(cfg).items()),
                            exclude=("stdout", "log", "json", "csv"))
    callback = TextGenCallback(cfg.sample_every, kl_coef=cfg.callback_kl_coef())
    t0 = time.perf_counter()
    try:
        with StopOnInterrupt() as interrupt, progress_bar(f"sb3-{algorithm}") as bar:
            checkpoints = CheckpointCallback(run_dir, cfg.checkpoint_every, asdict(cfg), interrupt)
            display = ProgressCallback(bar, bar.add_task(f"sb3-{algorithm}", total=cfg.total_steps, completed=agent.num_timesteps), callback)
            remaining = cfg.total_steps - agent.num_timesteps
            if remaining > 0:
                agent.learn(remaining, callback=[callback, checkpoints, display], reset_num_timesteps=checkpoint is None)
            path = checkpoints.save()
    finally:
        agent.logger.close()  # progress.csv and the event file, whatever happened
    if interrupt.requested:
        print(f"\ninterrupted after {agent.num_timesteps} env steps of {cfg.total_steps}; checkpoint: {path}\n"
              f"resume with: textgym {command} --resume {out}", file=sys.stderr)
        raise KeyboardInterrupt
    final = run_dir.save_final(lambda d: export_hf(agent, d), int(agent.num_timesteps))
    agent.save(out / "sb3_model.zip")  # SB3's own format too (a cloudpickle zip: load only files you trust)
    seconds = time.perf_counter() - t0
    summary = {"algorithm": f"sb3-{algorithm}", "env_steps": int(agent.num_timesteps), "seconds": round(seconds, 1),
               "tokens_per_s": round(agent.num_timesteps / seconds, 1), **callback.summary(), "final": str(final),
               "initial_model": str(model_dir)}
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return summary


# SB3's TensorBoard tags in the library's scheme (README, "TensorBoard tags"); progress.csv keeps SB3's names.
TAGS = {
    "train/approx_kl": "policy/approx_kl",
    "train/clip_fraction": "policy/clipfrac",
    "train/entropy_loss": "policy/entropy",  # negated: SB3 logs the loss -H
    "train/policy_gradient_loss": "loss/policy",
    "train/value_loss": "loss/value",
    "train/loss": "loss/total",
    "train/explained_variance": "value/explained_variance",
    "train/learning_rate": "lr",
    "rollout/exploration_rate": "explore/epsilon",
}
DQN_TAGS = {**TAGS, "train/loss": "loss/value"}  # DQN's only loss is the TD loss


class TagScheme(KVWriter):
    """Renames SB3's keys (``TAGS``) before another writer (TensorBoard) sees them."""

    def __init__(self, writer: KVWriter, tags: dict[str, str]):
        self.writer, self.tags = writer, tags

    def write(self, key_values: dict, key_excluded: dict, step: int = 0) -> None:
        renamed = {self.tags.get(k, k): (-v if k == "train/entropy_loss" else v) for k, v in key_values.items()}
        excluded = {self.tags.get(k, k): v for k, v in key_excluded.items()}
        self.writer.write(renamed, excluded, step)

    def close(self) -> None:
        self.writer.close()


def sb3_logger(out: Path, num_timesteps: int, algorithm: str = "ppo"):
    """SB3's TensorBoard (in the library's tag scheme) + CSV logger in ``out``; resumed at
    ``num_timesteps``, TensorBoard drops the later steps of the interrupted session and progress.csv
    keeps its rows up to the checkpoint."""
    kept: list[list[str]] = []
    if num_timesteps and (out / "progress.csv").is_file():
        rows = list(csv.reader((out / "progress.csv").read_text().splitlines()))
        if rows and "time/total_timesteps" in rows[0]:
            column = rows[0].index("time/total_timesteps")
            kept = rows[:1] + [r for r in rows[1:] if r[column] and float(r[column]) <= num_timesteps]
    logger = configure(str(out), ["csv"])  # progress.csv starts anew
    tensorboard = TensorBoardOutputFormat(str(out))
    if num_timesteps:
        tensorboard.writer.close()  # SB3's own writer cannot purge: ours drops the steps after the checkpoint
        tensorboard.writer = SummaryWriter(str(out), purge_step=num_timesteps + 1)
    logger.output_formats.append(TagScheme(tensorboard, DQN_TAGS if algorithm == "dqn" else TAGS))
    if kept:
        table = next(f for f in logger.output_formats if isinstance(f, CSVOutputFormat))
        csv.writer(table.file, lineterminator="\n").writerows(kept)
        table.file.flush()
        table.keys = kept[0]
    return logger
