"""PPO for language models (Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022).

    textgym train ppo --env TextGen-v0 --total-steps 12000

Each update: sample a batch of episodes from the vector env (``agents.rollout``), keeping the
policy's log-probs pi_old and values V as it acted (in float32; in bf16, by autocast or QLoRA,
one teacher-forced pass re-scores them), score the reference log-probs pi_ref, then

    per-token reward    r_t = r^env_t - beta * (log pi_old(a_t|s_t) - log pi_ref(a_t|s_t))     (rlhf.kl, k1)
    TD error            delta_t = r_t + gamma V(s_{t+1}) - V(s_t)
    GAE                 A_t = delta_t + gamma lambda A_{t+1},     returns R_t = A_t + V(s_t)
    ratio               rho_t = pi(a_t|s_t) / pi_old(a_t|s_t)
    clipped surrogate   L^clip = -E[min(rho A, clip(rho, 1-eps, 1+eps) A)]
    clipped value loss  L^V = 1/2 E[max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2)]
    total               L = L^clip + c_v L^V - c_e H(pi)

for several epochs of minibatches, with advantage whitening, grad-norm clipping and an early stop
when the approximate KL(pi_old || pi) exceeds ``target_kl``. ``loss_type="kl_penalty"`` swaps the
clip for the PPO paper's adaptive KL penalty, L = -E[rho A] + beta_ppo KL(pi_old || pi).

KL to the reference: by default the agent adds the per-token penalty itself (``kl_coef``, fixed
or adaptive toward ``adaptive_kl_target`` as in Ziegler et al.). The alternative is the env's route: make
the env pay beta * log pi_ref (``--env-ref-logprob-coef beta``) and set ``ent_coef = beta`` with
``kl_coef = 0``; both optimise E[R] - beta KL(pi || pi_ref).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from agents.policy import reference_logprobs
from agents.rollout import Rollout, acting_gives_old_logprobs, collect_rollout
from agents.run import RunOptions, check_finite, make_adam, optimizer_step, reward_metrics, start_policy_run
from agents.task_config import TaskConfig
from pretrain.adapters import ModelOptions, autocast
from pretrain.config import hparam, require_non_negative, require_positive, require_unit_interval, validate_fields
from pretrain.distributed import Distributed, SingleProcess
from rlhf.kl import kl_controller, kl_estimate, warn_if_negative_kl


@dataclass
class PPOConfig(ModelOptions, TaskConfig, RunOptions):
    """PPO fine-tuning of an LM policy on a TextGen env (defaults: the embedded default task)."""

    num_envs: int = hparam(32, "parallel episodes per rollout (the vector env's num_envs)")
    total_steps: int = hparam(16_384, "env steps (generated tokens) to train for")
    max_new_tokens: int = hparam(16, "tokens per episode")
    env_ref_logprob_coef: float = hparam(0.0, "beta of the env's own beta*log pi_ref shaping (the entropy route); 0 = off")
    lr: float = hparam(5e-5, "Adam learning rate")
    gamma: float = hparam(1.0, "discount")
    gae_lambda: float = hparam(0.95, "GAE lambda")
    update_epochs: int = hparam(4, "passes over each rollout")
    num_minibatches: int = hparam(4, "minibatches per epoch")
    clip_coef: float = hparam(0.2, "surrogate clipping epsilon")
    vf_clip: float = hparam(0.2, "value clipping epsilon (0 = no value clipping)")
    vf_coef: float = hparam(0.1, "value loss coefficient c_v")
    ent_coef: float = hparam(0.0, "entropy bonus c_e (set to env_ref_logprob_coef for the entropy route)")
    kl_coef: float = hparam(0.05, "beta of the agent's per-token KL penalty to the reference")
    adaptive_kl: bool = hparam(False, "adapt kl_coef toward adaptive_kl_target (Ziegler et al. 2019)")
    adaptive_kl_target: float = hparam(6.0, "target sequence KL for the adaptive controller")
    adaptive_kl_horizon: int = hparam(10_000, "adaptive controller horizon")
    target_kl: float = hparam(0.05, "stop the epochs early when approx KL(pi_old||pi) exceeds 1.5x this (0 = never)")
    loss_type: str = hparam("clip", "'clip' (PPO-clip) or 'kl_penalty' (PPO's adaptive KL penalty variant)")
    penalty_coef: float = hparam(1.0, "initial beta_ppo of the kl_penalty variant")
    whiten_advantages: bool = hparam(True, "normalise advantages to mean 0, std 1 per rollout")
    max_grad_norm: float = hparam(1.0, "clip the global gradient norm")

    def __post_init__(self):
        validate_fields(self)
        self.validate_task()
        self.validate_model_options()
        if self.loss_type not in ("clip", "kl_penalty"):
            raise ValueError(f"unknown loss_type {self.loss_type!r}; expected 'clip' or 'kl_penalty'")
        require_positive(self, "num_envs", "total_steps", "max_new_tokens", "update_epochs", "num_minibatches",
                         "clip_coef", "penalty_coef", "adaptive_kl_target", "adaptive_kl_horizon", "checkpoint_every", "sample_every", "keep_checkpoints")
        require_non_negative(self, "env_ref_logprob_coef", "lr", "vf_clip", "vf_coef", "ent_coef", "kl_coef", "target_kl", "max_grad_norm")
        require_unit_interval(self, "gamma", "gae_lambda")
        if self.num_envs % self.num_minibatches:
            raise ValueError(f"num_envs={self.num_envs} must be divisible by num_minibatches={self.num_minibatches}")


def masked_mean(x: torch.Tensor, mask: torch.Tensor, count: torch.Tensor | None = None) -> torch.Tensor:
    """sum(x * mask) / count, count = mask.sum() by default (``Distributed.global_count`` across processes)."""
    return (x * mask).sum() / (mask.sum().clamp(min=1) if count is None else count)


def whiten(x: torch.Tensor, mask: torch.Tensor, dist: Distributed | None = None) -> torch.Tensor:
    """(x - mean) / std over the masked entries (of every process's batch, with ``dist``)."""
    if dist is None or dist.world_size == 1:
        mean = masked_mean(x, mask)
        var = masked_mean((x - mean) ** 2, mask)
    else:  # the global moments: sums over every process
        n = dist.sum(mask.sum())
        mean = (dist.sum((x * mask).sum()) / n).to(x.dtype)
        var = (dist.sum((((x - mean) * mask) ** 2).sum()) / n).to(x.dtype)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over response tokens; (B, T) each. V after the end is 0."""
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])
    horizon = rewards.shape[1]
    for t in reversed(range(horizon)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < horizon else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = (delta + gamma * lam * last_gae) * mask[:, t]
        advantages[:, t] = last_gae
    returns = advantages + values
    return advantages * mask, returns * mask


def clipped_policy_loss(logprobs, old_logprobs, advantages, mask, clip_coef, count=None):
    """-E[min(rho A, clip(rho, 1 - eps, 1 + eps) A)]; also the fraction of clipped tokens."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef)
    loss = masked_mean(torch.max(unclipped, clipped), mask, count)
    clipfrac = masked_mean(((ratio - 1).abs() > clip_coef).float(), mask)
    return loss, clipfrac


def clipped_value_loss(values, old_values, returns, mask, vf_clip, count=None):
    """1/2 E[max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)] (plain MSE when c = 0)."""
    loss = (values - returns) ** 2
    if vf_clip > 0:
        clipped = old_values + torch.clamp(values - old_values, -vf_clip, vf_clip)
        loss = torch.max(loss, (clipped - returns) ** 2)
    return 0.5 * masked_mean(loss, mask, count)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    residual = returns - values
    var_residual = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    return float(1 - var_residual / var_returns) if var_returns > 0 else float("nan")


@dataclass
class PPOBatch:
    """One rollout, scored and ready for the update: (N, C + T) ``input_ids`` / ``attention_mask``
    with the completion from column ``completion_start``; (N, T) float32 ``mask``, ``old_logprobs``,
    ``old_values``, ``advantages`` (whitened if asked) and ``returns``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_start: int
    mask: torch.Tensor
    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


def ppo_update(model, optimizer, batch: PPOBatch, cfg: PPOConfig, np_rng: np.random.Generator, params,
               penalty_coef: float = 1.0, dist: Distributed | None = None) -> dict[str, list[float] | int]:
    """``update_epochs`` passes of minibatch steps over ``batch``; returns the per-minibatch stats
    (``clipfrac``, ``approx_kl``, ``policy``, ``value``) and ``epochs`` run. ``model`` is the policy
    or its data-parallel wrapper (``dist.prepare``): its forward is ``LMPolicy.evaluate``. Across
    processes every token mean is divided by the global token count, and the early stop reads the
    mean approx KL of all processes, so they take the same steps."""
    dist = dist or SingleProcess()
    n = batch.input_ids.shape[0]
    minibatch_size = n // cfg.num_minibatches
    stats = {"clipfrac": [], "approx_kl": [], "policy": [], "value": []}
    epoch = 0
    for epoch in range(1, cfg.update_epochs + 1):  # noqa: B007 - returned (ppo/epochs)
        order = torch.from_numpy(np_rng.permutation(n)).to(batch.input_ids.device)
        for mb_start in range(0, n, minibatch_size):
            idx = order[mb_start : mb_start + minibatch_size]
            mb_mask = batch.mask[idx]
            count = dist.global_count(mb_mask)
            # The entropy bonus needs H(pi) in the graph; without one, skip its (B, T, vocab) passes.
            logprobs, entropy, values = model(batch.input_ids[idx], batch.attention_mask[idx], batch.completion_start,
                                              entropy="grad" if cfg.ent_coef else "none")
            old_logprobs = batch.old_logprobs[idx]
            log_ratio = logprobs - old_logprobs
            approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mb_mask)  # k3 of KL(pi_old || pi)
            if cfg.loss_type == "clip":
                pg_loss, clipfrac = clipped_policy_loss(logprobs, old_logprobs, batch.advantages[idx], mb_mask, cfg.clip_coef, count)
            else:  # PPO-penalty: -E[rho A] + beta_ppo KL(pi_old || pi)
                pg_loss = (masked_mean(-batch.advantages[idx] * log_ratio.exp(), mb_mask, count)
                           + penalty_coef * masked_mean(torch.expm1(log_ratio) - log_ratio, mb_mask, count))
                clipfrac = masked_mean(((log_ratio.exp() - 1).abs() > cfg.clip_coef).float(), mb_mask)
            v_loss = clipped_value_loss(values, batch.old_values[idx], batch.returns[idx], mb_mask, cfg.vf_clip, count)
            loss = pg_loss + cfg.vf_coef * v_loss
            if cfg.ent_coef:
                loss = loss - cfg.ent_coef * masked_mean(entropy, mb_mask, count)
            optimizer_step(loss, optimizer, params, cfg.max_grad_norm)
            for key, value in (("clipfrac", clipfrac), ("approx_kl", approx_kl), ("policy", pg_loss), ("value", v_loss)):
                stats[key].append(float(value.detach()))
        recent_kl = float(dist.mean(float(np.mean(stats["approx_kl"][-cfg.num_minibatches:]))))
        if cfg.target_kl and recent_kl > 1.5 * cfg.target_kl:
            break
    return {**stats, "epochs": epoch}


def train(cfg: PPOConfig) -> dict:
    """Run PPO as ``cfg`` says, in the run dir ``cfg.out`` (or resume ``cfg.resume``); returns the
    run's summary: ``final`` (the final/ HF dir) and the last update's metrics. Raises ``ValueError``
    for settings that do not fit the env or the checkpoint, ``NonFiniteError`` when a value blows up,
    ``KeyboardInterrupt`` after a Ctrl-C (once the checkpoint is written).

    Under ``accelerate launch`` / ``torchrun`` (``pretrain.distributed``) each process collects
    ``num_envs`` episodes per update from its own prompt shard, and ``total_steps`` counts the env
    steps of all processes."""
    dist, run, env, policy, reference = start_policy_run(cfg, "ppo", value_head=True)  # reference None: the env's ref_logprobs
    device = dist.device
    model = dist.prepare(policy)  # gradients all-reduced across processes (the policy itself in one process)
    params = policy.trainable_parameters()  # all weights, or the adapter's + the value head
    optimizer = make_adam(params, lr=cfg.lr, eps=1e-5)
    kl_ctl = kl_controller(cfg.kl_coef, cfg.adaptive_kl, cfg.adaptive_kl_target, cfg.adaptive_kl_horizon)
    penalty_coef = cfg.penalty_coef
    acting_is_old = acting_gives_old_logprobs(cfg)
    if cfg.resume:
        state = run.restore(optimizer, env)
        kl_ctl.value, penalty_coef = state["kl_coef"], state["penalty_coef"]

    with run, autocast(cfg.dtype, device):  # bf16 matmuls for policy, reference and reward model when asked
        while run.update < run.total_updates and not run.should_stop():
            # ---- rollout ------------------------------------------------------------------------
            policy.eval()
            rollout: Rollout = collect_rollout(env, policy, record_logprobs=acting_is_old)
            run.env_steps += int(dist.sum(rollout.n_tokens))
            ids, attn, start = rollout.input_ids, rollout.attention_mask, rollout.completion_start
            mask = rollout.completion_mask.float()
            with torch.no_grad():
                if acting_is_old:
                    old_logprobs, old_entropy, old_values = rollout.logprobs, rollout.entropy, rollout.values
                else:
                    old_logprobs, old_entropy, old_values = policy.evaluate(ids, attn, start, entropy="detached")
                ref_logprobs = reference_logprobs(rollout, reference, policy.valid_actions)
                kl = kl_estimate(old_logprobs, ref_logprobs, "k1") * mask
                rewards = rollout.env_rewards - kl_ctl.value * kl  # r_t = r_env - beta (log pi - log pi_ref)
                old_values = old_values * mask
                advantages, returns = compute_gae(rewards, old_values, mask, cfg.gamma, cfg.gae_lambda)
                if cfg.whiten_advantages:
                    advantages = whiten(advantages, mask, dist)
            check_finite("the rollout's log-probs", old_logprobs)
            check_finite("the reward", rewards)

            # ---- update: epochs x minibatches of episodes ------------------------------------------
            policy.train()
            batch = PPOBatch(ids, attn, start, mask, old_logprobs, old_values, advantages, returns)
            stats = ppo_update(model, optimizer, batch, cfg, run.np_rng, params, penalty_coef, dist)
            if cfg.loss_type == "kl_penalty":  # the PPO paper's adaptive beta_ppo, d_targ = target_kl
                d = float(dist.mean(float(np.mean(stats["approx_kl"]))))
                penalty_coef *= 2.0 if d > 1.5 * cfg.target_kl else 0.5 if d < cfg.target_kl / 1.5 else 1.0

            warn_if_negative_kl(kl.sum(1))
            seq_kl = float(dist.mean(float(kl.sum(1).mean())))
            kl_ctl.update(seq_kl, cfg.num_envs * dist.world_size)
            metrics = dist.mean_metrics({
                **reward_metrics(rollout.rm_scores, rollout.gold_scores, rollout.reward_terms),
                "reward/total": float((rewards * mask).sum(1).mean()),
                "kl/ref": seq_kl,
                "kl/coef": kl_ctl.value,
                "policy/entropy": float(masked_mean(old_entropy, mask)),  # of pi_old, on the rollout
                "loss/policy": float(np.mean(stats["policy"])),
                "loss/value": float(np.mean(stats["value"])),
                "policy/clipfrac": float(np.mean(stats["clipfrac"])),
                "policy/approx_kl": float(np.mean(stats["approx_kl"])),
                "policy/epochs": stats["epochs"],
                "value/explained_variance": explained_variance(old_values, returns, mask),
                "lr": optimizer.param_groups[0]["lr"],
                "perf/tokens_per_s": rollout.n_tokens / run.seconds_since_last_log(),
            }, summed=("perf/tokens_per_s",))
            run.log(metrics, [p + t for p, t in zip(rollout.prompts, rollout.texts)])
            if run.due():
                run.checkpoint(policy, optimizer, env, (ids[:4, :start], attn[:4, :start]),
                               {"kl_coef": kl_ctl.value, "penalty_coef": penalty_coef})
        summary = run.finish(policy)
    if run.should_stop():
        raise KeyboardInterrupt
    return summary
