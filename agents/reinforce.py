"""REINFORCE for language models (Williams 1992), with a baseline; RLOO (Ahmadian et al. 2024).

    textgym train reinforce --baseline rloo --rloo-k 4

The likelihood-ratio gradient of J = E_pi[R] over whole sequences y = (a_1 .. a_T):

    grad J = E[(R(y) - b) * sum_t grad log pi(a_t | s_t)]

with the sequence return R(y) = sum_t r_t of the same per-token rewards PPO uses (the env's
reward plus the KL penalty -beta (log pi - log pi_ref), so E[R] is the KL-regularised objective)
and a baseline b that does not depend on y (unbiased, lower variance):

* ``none``            b = 0
* ``moving_average``  b = an exponential moving average of past returns
* ``rloo``            k samples per prompt; each sample's baseline is the mean return of the
                      other k - 1 samples of its prompt (leave-one-out)

One gradient step per batch of episodes; no value function, no importance ratios.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from agents.policy import reference_logprobs
from agents.rollout import collect_rollout
from agents.run import RunOptions, check_finite, make_adam, optimizer_step, reward_metrics, start_policy_run
from agents.task_config import TaskConfig
from pretrain.adapters import ModelOptions, autocast
from pretrain.config import hparam, require_non_negative, require_positive, require_unit_interval, validate_fields
from rlhf.kl import kl_controller, kl_estimate, warn_if_negative_kl

BASELINES = ("none", "moving_average", "rloo")


@dataclass
class ReinforceConfig(ModelOptions, TaskConfig, RunOptions):
    """REINFORCE fine-tuning of an LM policy on a TextGen env."""

    num_envs: int = hparam(32, "episodes per update (the vector env's num_envs)")
    total_steps: int = hparam(32_768, "env steps (generated tokens) to train for")
    max_new_tokens: int = hparam(16, "tokens per episode")
    env_ref_logprob_coef: float = hparam(0.0, "beta of the env's own beta*log pi_ref shaping; 0 = off")
    baseline: str = hparam("rloo", f"one of {BASELINES}")
    rloo_k: int = hparam(4, "samples per prompt for the RLOO baseline (num_envs must be a multiple)")
    baseline_decay: float = hparam(0.9, "decay of the moving-average baseline")
    lr: float = hparam(1e-4, "Adam learning rate")
    kl_coef: float = hparam(0.05, "beta of the per-token KL penalty to the reference")
    adaptive_kl: bool = hparam(False, "adapt kl_coef toward adaptive_kl_target")
    adaptive_kl_target: float = hparam(6.0, "target sequence KL for the adaptive controller")
    adaptive_kl_horizon: int = hparam(10_000, "adaptive controller horizon")
    ent_coef: float = hparam(0.0, "entropy bonus (set to env_ref_logprob_coef for the entropy route)")
    max_grad_norm: float = hparam(1.0, "clip the global gradient norm")

    def __post_init__(self):
        validate_fields(self)
        self.validate_task()
        self.validate_model_options()
        if self.baseline not in BASELINES:
            raise ValueError(f"unknown baseline {self.baseline!r}; expected one of {BASELINES}")
        if self.baseline == "rloo" and (self.rloo_k < 2 or self.num_envs % self.rloo_k):
            raise ValueError(f"rloo needs rloo_k >= 2 dividing num_envs, got rloo_k={self.rloo_k}, num_envs={self.num_envs}")
        require_positive(self, "num_envs", "total_steps", "max_new_tokens", "adaptive_kl_target", "adaptive_kl_horizon", "checkpoint_every", "sample_every", "keep_checkpoints")
        require_non_negative(self, "env_ref_logprob_coef", "lr", "kl_coef", "ent_coef", "max_grad_norm")
        require_unit_interval(self, "baseline_decay")


def rloo_baseline(returns: torch.Tensor, k: int) -> torch.Tensor:
    """Leave-one-out mean of the other k - 1 returns of the same prompt; returns laid out prompt-major."""
    grouped = returns.view(-1, k)
    return ((grouped.sum(1, keepdim=True) - grouped) / (k - 1)).view(-1)


def reinforce_loss(logprobs: torch.Tensor, mask: torch.Tensor, returns: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """-mean over sequences of (R - b) * sum_t log pi(a_t | s_t)."""
    seq_logprob = (logprobs * mask).sum(1)
    return -((returns - baseline).detach() * seq_logprob).mean()


def train(cfg: ReinforceConfig) -> dict:
    """Run REINFORCE as ``cfg`` says (the same run dir, resume, errors, summary and data-parallel
    launch as ``agents.ppo.train``)."""
    dist, run, env, policy, reference = start_policy_run(cfg, "reinforce", value_head=False)  # reference None: the env's ref_logprobs
    device = dist.device
    model = dist.prepare(policy)  # gradients all-reduced across processes (the policy itself in one process)
    params = policy.trainable_parameters()
    optimizer = make_adam(params, lr=cfg.lr, eps=1e-5)
    kl_ctl = kl_controller(cfg.kl_coef, cfg.adaptive_kl, cfg.adaptive_kl_target, cfg.adaptive_kl_horizon)
    moving_baseline = 0.0
    if cfg.resume:
        state = run.restore(optimizer, env)
        kl_ctl.value, moving_baseline = state["kl_coef"], state["moving_baseline"]

    with run, autocast(cfg.dtype, device):
        while run.update < run.total_updates and not run.should_stop():
            prompts = None
            if cfg.baseline == "rloo":  # k copies of num_envs / k prompts, laid out prompt-major
                chosen = run.np_rng.choice(len(env.prompts), size=cfg.num_envs // cfg.rloo_k)
                prompts = [env.prompts[i] for i in chosen for _ in range(cfg.rloo_k)]
            policy.eval()
            rollout = collect_rollout(env, policy, prompts)
            run.env_steps += int(dist.sum(rollout.n_tokens))
            ids, attn, start, mask = rollout.input_ids, rollout.attention_mask, rollout.completion_start, rollout.completion_mask.float()

            policy.train()
            logprobs, entropy, _ = model(ids, attn, start, entropy="grad" if cfg.ent_coef else "detached")
            with torch.no_grad():
                ref_logprobs = reference_logprobs(rollout, reference, policy.valid_actions)
                kl = kl_estimate(logprobs.detach(), ref_logprobs, "k1") * mask
                returns = (rollout.env_rewards * mask - kl_ctl.value * kl).sum(1)  # R = sum_t r_t
            check_finite("the return", returns)
            if cfg.baseline == "rloo":
                baseline = rloo_baseline(returns, cfg.rloo_k)
            elif cfg.baseline == "moving_average":
                baseline = torch.full_like(returns, moving_baseline)
                moving_baseline = cfg.baseline_decay * moving_baseline + (1 - cfg.baseline_decay) * float(dist.mean(float(returns.mean())))
            else:
                baseline = torch.zeros_like(returns)
            ent = (entropy * mask).sum() / dist.global_count(mask)  # the token mean over every process's batch
            loss = reinforce_loss(logprobs, mask, returns, baseline) - cfg.ent_coef * ent
            optimizer_step(loss, optimizer, params, cfg.max_grad_norm)

            warn_if_negative_kl(kl.sum(1))
            seq_kl = float(dist.mean(float(kl.sum(1).mean())))
            kl_ctl.update(seq_kl, cfg.num_envs * dist.world_size)
            metrics = dist.mean_metrics({
                **reward_metrics(rollout.rm_scores, rollout.gold_scores, rollout.reward_terms),
                "reward/total": float(returns.mean()),
                "kl/ref": seq_kl,
                "kl/coef": kl_ctl.value,
                "policy/entropy": float(ent.detach()),
                "loss/policy": float(loss.detach()),
                "value/baseline": float(baseline.mean()),
                "lr": optimizer.param_groups[0]["lr"],
                "perf/tokens_per_s": rollout.n_tokens / run.seconds_since_last_log(),
            }, summed=("perf/tokens_per_s",))
            run.log(metrics, [p + t for p, t in zip(rollout.prompts, rollout.texts)])
            if run.due():
                run.checkpoint(policy, optimizer, env, (ids[:4, :start], attn[:4, :start]),
                               {"kl_coef": kl_ctl.value, "moving_baseline": moving_baseline})
        summary = run.finish(policy)
    if run.should_stop():
        raise KeyboardInterrupt
    return summary
