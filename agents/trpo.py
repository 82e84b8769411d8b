"""TRPO for language models: the natural-gradient step inside a KL trust region (Schulman et al.
2015, "Trust Region Policy Optimization"), with GAE advantages (Schulman et al. 2016).

    textgym train trpo --max-kl 0.01

Each update samples a batch of episodes, scores it (pi_old, V, pi_ref) and the per-token reward,
advantages and returns exactly as ``agents.ppo`` does:

    r_t = r^env_t - beta (log pi_old - log pi_ref)(a_t|s_t),   A_t = GAE(gamma, lambda),   R_t = A_t + V(s_t)

then maximises the surrogate subject to the trust region (TRPO eq. 12; per-token means)

    maximise  L(theta) = E_t[rho_t(theta) A_t],   rho_t = pi_theta(a_t|s_t) / pi_old(a_t|s_t)
    s.t.      KLbar(theta) = E_t[KL(pi_old(.|s_t) || pi_theta(.|s_t))] <= delta = max_kl

by the steps of the paper's Appendix C:

    g        = grad L at theta_old (= E_t[A_t grad log pi(a_t|s_t)])
    F v      = grad (grad KLbar . v): the Hessian of KLbar at theta_old (the Fisher matrix) times v,
               by double backprop on an exact KL over the vocabulary, plus damping * v
    s        ~ F^-1 g by ``cg_iters`` steps of conjugate gradient (F is never formed)
    step     = sqrt(2 delta / s^T F s) s              (the largest step of the quadratic KL model)
    accept   theta_old + backtrack_coef^j step for the first j < line_search_steps with L improved
             and the exact KLbar <= delta; none: theta stays theta_old

The value head is trained by its own regression steps (``vf_iters`` epochs of Adam on 1/2 (V - R)^2)
on the policy's last hidden states, detached: the critic reads the policy's features but never moves
them, so the trust region bounds every change of pi. The Fisher-vector products may use a share of
the batch's episodes (``fvp_fraction``; the paper's Appendix C.1 subsamples them too): each is a
double backward pass through the LM, the cost of the update. Only the trained parameters take the
step: the full model, or the adapter with ``--peft``.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from agents.policy import LMPolicy, reference_logprobs
from agents.ppo import compute_gae, explained_variance, masked_mean, whiten
from agents.rollout import collect_rollout
from agents.run import RunOptions, check_finite, make_adam, optimizer_step, reward_metrics, start_policy_run
from agents.task_config import TaskConfig
from pretrain.adapters import ModelOptions, autocast
from pretrain.config import hparam, require_non_negative, require_positive, require_unit_interval, validate_fields
from pretrain.distributed import Distributed, SingleProcess
from rlhf.kl import kl_controller, kl_estimate, warn_if_negative_kl
from rlhf.logprobs import categorical_entropy, gather_logprobs


@dataclass
class TRPOConfig(ModelOptions, TaskConfig, RunOptions):
    """TRPO fine-tuning of an LM policy on a TextGen env (defaults: the embedded default task)."""

    num_envs: int = hparam(32, "parallel episodes per rollout (the vector env's num_envs)")
    total_steps: int = hparam(16_384, "env steps (generated tokens) to train for")
    max_new_tokens: int = hparam(16, "tokens per episode")
    env_ref_logprob_coef: float = hparam(0.0, "beta of the env's own beta*log pi_ref shaping; 0 = off")
    max_kl: float = hparam(0.05, "delta: the trust region, the largest mean per-token KL(pi_old || pi) of one update (nats)")
    cg_iters: int = hparam(10, "conjugate-gradient iterations for F^-1 g")
    cg_damping: float = hparam(0.1, "damping added to the Fisher matrix (F + damping I)")
    line_search_steps: int = hparam(10, "most step sizes the backtracking line search tries")
    backtrack_coef: float = hparam(0.5, "each try shrinks the step by this factor")
    fvp_fraction: float = hparam(0.25, "share of the batch's episodes the Fisher-vector products run on (0, 1]")
    gamma: float = hparam(1.0, "discount")
    gae_lambda: float = hparam(0.95, "GAE lambda")
    whiten_advantages: bool = hparam(True, "normalise advantages to mean 0, std 1 per rollout")
    vf_lr: float = hparam(1e-3, "Adam learning rate of the value head's regression")
    vf_iters: int = hparam(5, "epochs of value regression per update")
    num_minibatches: int = hparam(4, "value-regression minibatches per epoch")
    kl_coef: float = hparam(0.05, "beta of the per-token KL penalty to the reference, in the reward")
    adaptive_kl: bool = hparam(False, "adapt kl_coef toward adaptive_kl_target (Ziegler et al. 2019)")
    adaptive_kl_target: float = hparam(6.0, "target sequence KL for the adaptive controller")
    adaptive_kl_horizon: int = hparam(10_000, "adaptive controller horizon")
    max_grad_norm: float = hparam(1.0, "clip the value head's gradient norm (the policy's step is set by max_kl)")

    def __post_init__(self):
        validate_fields(self)
        self.validate_task()
        self.validate_model_options()
        require_positive(self, "num_envs", "total_steps", "max_new_tokens", "max_kl", "cg_iters", "line_search_steps",
                         "vf_iters", "num_minibatches", "adaptive_kl_target", "adaptive_kl_horizon",
                         "checkpoint_every", "sample_every", "keep_checkpoints")
        require_non_negative(self, "env_ref_logprob_coef", "cg_damping", "vf_lr", "kl_coef", "max_grad_norm")
        require_unit_interval(self, "gamma", "gae_lambda")
        if not 0 < self.fvp_fraction <= 1:
            raise ValueError(f"fvp_fraction must be in (0, 1], got {self.fvp_fraction}")
        if not 0 < self.backtrack_coef < 1:
            raise ValueError(f"backtrack_coef must be in (0, 1), got {self.backtrack_coef}")
        if self.num_envs % self.num_minibatches:
            raise ValueError(f"num_envs={self.num_envs} must be divisible by num_minibatches={self.num_minibatches}")


# ---- the three pieces of the natural-gradient step ------------------------------------------------

class NoStepWarning(RuntimeWarning):
    """A TRPO update ended without a step: the line search accepted none (the policy did not move)."""


def conjugate_gradient(matvec, b: torch.Tensor, iters: int, tol: float = 1e-10) -> tuple[torch.Tensor, int]:
    """x ~ A^-1 b for a symmetric positive-definite A known only through ``matvec(v) = A v``
    (Hestenes & Stiefel 1952; Nocedal & Wright Alg. 5.2). Stops after ``iters`` products or once the
    squared residual |b - A x|^2 < ``tol``; returns x and the number of products used."""
    x = torch.zeros_like(b)
    r = b.clone()  # residual b - A x
    p = b.clone()  # search direction, A-conjugate to the previous ones
    rr = torch.dot(r, r)
    for i in range(iters):
        if rr < tol:
            return x, i
        Ap = matvec(p)
        alpha = rr / torch.dot(p, Ap)
        x += alpha * p
        r -= alpha * Ap
        rr_new = torch.dot(r, r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x, iters


def mean_kl(old_log_probs: torch.Tensor, log_probs: torch.Tensor, mask: torch.Tensor, valid_actions: torch.Tensor,
            count: torch.Tensor | None = None) -> torch.Tensor:
    """KLbar = the mask-weighted mean over positions of the exact KL(pi_old(.|s) || pi(.|s)) =
    sum_a pi_old(a|s) (log pi_old(a|s) - log pi(a|s)), summed over the valid actions. ``old_log_probs``,
    ``log_probs`` (B, T, V), ``mask`` (B, T) float; ``count`` the denominator (default mask.sum())."""
    old, new = old_log_probs[..., valid_actions], log_probs[..., valid_actions]  # invalid actions: -inf in both
    per_state = (old.exp() * (old - new)).sum(-1)
    return masked_mean(per_state, mask, count)


@contextmanager
def double_backward_attention():
    """Attention kernels with a second derivative: PyTorch's fused SDPA kernels (flash, memory-efficient)
    have none, so the Fisher-vector products run on the math kernel (the same function)."""
    with sdpa_kernel(SDPBackend.MATH):
        yield


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def fisher_vector_product(policy: LMPolicy, params: list[torch.nn.Parameter], rows: tuple, damping: float,
                          dist: Distributed):
    """``v -> F v + damping v`` on the episodes ``rows`` = (input_ids, attention_mask, completion_start, mask):
    F is the Hessian of KLbar(pi_old || pi_theta) at theta = theta_old, which is the Fisher information
    matrix of pi (TRPO App. C). One forward builds grad KLbar with its graph; each product is then one
    backward through it (double backprop), averaged over processes."""
    ids, attn, start, mask = rows
    with double_backward_attention():
        log_probs, _ = policy.next_token_log_probs(ids, attn, start)
        kl = mean_kl(log_probs.detach(), log_probs, mask, policy.valid_actions, dist.global_count(mask))
        grad_kl = flat(torch.autograd.grad(kl, params, create_graph=True))

    def product(v: torch.Tensor) -> torch.Tensor:
        with double_backward_attention():
            fv = flat(torch.autograd.grad(torch.dot(grad_kl, v), params, retain_graph=True))
        return dist.average(fv) + damping * v

    return product


@torch.no_grad()
def set_flat(params: list[torch.nn.Parameter], vector: torch.Tensor) -> None:
    """Write the flat ``vector`` into ``params`` in place (shapes as ``flat`` read them)."""
    offset = 0
    for p in params:
        p.copy_(vector[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


def line_search(policy: LMPolicy, params, old_params: torch.Tensor, full_step: torch.Tensor, batch, old_logprobs,
                old_log_probs, advantages, cfg: TRPOConfig, dist: Distributed) -> dict:
    """Backtracking line search on theta_old + backtrack_coef^j * full_step, j = 0, 1, ...: the first
    step that improves the surrogate and keeps the exact KLbar <= max_kl is taken; if none does, theta
    is restored to theta_old. Returns ``accepted`` (bool), ``steps`` (j of the accepted step, or
    ``line_search_steps`` when none was), ``kl`` and ``improvement`` (of the step taken, 0 without one)
    and ``full_step_kl`` (the exact KLbar of the first try: how far the quadratic model was off)."""
    ids, attn, start, mask = batch
    count = dist.global_count(mask)
    surrogate_old = float(dist.mean(float(masked_mean(advantages, mask, count))))  # rho = 1 at theta_old
    full_step_kl = float("nan")
    for j in range(cfg.line_search_steps):
        set_flat(params, old_params + cfg.backtrack_coef**j * full_step)
        with torch.no_grad():
            log_probs, _ = policy.next_token_log_probs(ids, attn, start)
            logprobs = gather_logprobs(log_probs, ids[:, start:], mask.bool())
            surrogate = float(dist.mean(float(masked_mean(torch.exp(logprobs - old_logprobs) * advantages, mask, count))))
            kl = float(dist.mean(float(mean_kl(old_log_probs, log_probs, mask, policy.valid_actions, count))))
        if j == 0:
            full_step_kl = kl
        if math.isfinite(kl) and kl <= cfg.max_kl and surrogate - surrogate_old > 0:
            return {"accepted": True, "steps": j, "kl": kl, "improvement": surrogate - surrogate_old, "full_step_kl": full_step_kl}
    set_flat(params, old_params)
    return {"accepted": False, "steps": cfg.line_search_steps, "kl": 0.0, "improvement": 0.0, "full_step_kl": full_step_kl}


def trpo_step(policy: LMPolicy, params, batch, old_log_probs, logprobs_graph, advantages, cfg: TRPOConfig,
              np_rng: np.random.Generator, dist: Distributed | None = None) -> dict:
    """One natural-gradient update of ``params`` (the policy's trained parameters) in the trust region.

    ``batch`` = (input_ids, attention_mask, completion_start, mask); ``logprobs_graph`` (N, T) are
    log pi_theta_old(a_t|s_t) with their graph, ``old_log_probs`` (N, T, V) the full distributions,
    detached; ``advantages`` (N, T). Returns the line search's record plus ``cg_iters``."""
    dist = dist or SingleProcess()
    ids, attn, start, mask = batch
    count = dist.global_count(mask)
    old_logprobs = logprobs_graph.detach()
    surrogate = masked_mean(torch.exp(logprobs_graph - old_logprobs) * advantages, mask, count)
    g = dist.average(flat(torch.autograd.grad(surrogate, params)))
    check_finite("the policy gradient", g)

    n = ids.shape[0]
    rows = torch.from_numpy(np.sort(np_rng.permutation(n)[: max(1, round(cfg.fvp_fraction * n))])).to(ids.device)
    fvp = fisher_vector_product(policy, params, (ids[rows], attn[rows], start, mask[rows]), cfg.cg_damping, dist)
    direction, cg_iters = conjugate_gradient(fvp, g, cfg.cg_iters)
    shs = torch.dot(direction, fvp(direction))  # s^T F s
    check_finite("the natural-gradient direction", shs)
    old_params = flat([p.detach() for p in params]).clone()
    if shs <= 0:  # a zero gradient (e.g. all advantages 0): nothing to step along
        return {"accepted": False, "steps": cfg.line_search_steps, "kl": 0.0, "improvement": 0.0, "full_step_kl": 0.0,
                "cg_iters": cg_iters}
    full_step = torch.sqrt(2 * cfg.max_kl / shs) * direction
    record = line_search(policy, params, old_params, full_step, batch, old_logprobs, old_log_probs, advantages, cfg, dist)
    return {**record, "cg_iters": cg_iters}


def policy_parameters(policy: LMPolicy) -> list[torch.nn.Parameter]:
    """What the trust-region step moves: the policy's trained parameters (all weights, or the
    adapter's with ``--peft``), without the value head (fitted by its own regression)."""
    head = [] if policy.value_head is None else list(policy.value_head.parameters())
    return [p for p in policy.trainable_parameters() if not any(p is q for q in head)]


def train(cfg: TRPOConfig) -> dict:
    """Run TRPO as ``cfg`` says (the same run dir, resume, errors, summary and data-parallel launch as
    ``agents.ppo.train``; across processes the gradient and every Fisher-vector product are averaged,
    so each process takes the same step)."""
    dist, run, env, policy, reference = start_policy_run(cfg, "trpo", value_head=True)  # reference None: the env's ref_logprobs
    device = dist.device
    head = policy.value_head
    params = policy_parameters(policy)
    value_model = dist.prepare(head)  # the critic's gradients are all-reduced; the policy's are averaged by hand
    value_optimizer = make_adam(head.parameters(), lr=cfg.vf_lr, eps=1e-5)
    kl_ctl = kl_controller(cfg.kl_coef, cfg.adaptive_kl, cfg.adaptive_kl_target, cfg.adaptive_kl_horizon)
    if cfg.resume:
        state = run.restore(value_optimizer, env)
        kl_ctl.value = state["kl_coef"]

    with run, autocast(cfg.dtype, device):
        while run.update < run.total_updates and not run.should_stop():
            # ---- rollout, and one pass at theta_old: log-probs (with their graph), values, features ------
            policy.eval()
            rollout = collect_rollout(env, policy)
            run.env_steps += int(dist.sum(rollout.n_tokens))
            ids, attn, start = rollout.input_ids, rollout.attention_mask, rollout.completion_start
            mask = rollout.completion_mask.float()
            policy.train()  # (dropout stays off: LMPolicy); gradient checkpointing, when asked, acts in train mode
            log_probs, hidden = policy.next_token_log_probs(ids, attn, start, hidden_states=True)
            logprobs = gather_logprobs(log_probs, ids[:, start:], rollout.completion_mask)
            old_log_probs, features = log_probs.detach(), hidden.detach().float()
            with torch.no_grad():
                old_logprobs = logprobs.detach()
                old_values = head(features).squeeze(-1) * mask
                entropy = masked_mean(categorical_entropy(old_log_probs), mask)
                ref_logprobs = reference_logprobs(rollout, reference, policy.valid_actions)
                kl = kl_estimate(old_logprobs, ref_logprobs, "k1") * mask
                rewards = rollout.env_rewards - kl_ctl.value * kl  # r_t = r_env - beta (log pi - log pi_ref)
                advantages, returns = compute_gae(rewards, old_values, mask, cfg.gamma, cfg.gae_lambda)
                if cfg.whiten_advantages:
                    advantages = whiten(advantages, mask, dist)
            check_finite("the rollout's log-probs", old_logprobs)
            check_finite("the reward", rewards)

            # ---- the policy: natural gradient, trust-region line search ---------------------------------
            step = trpo_step(policy, params, (ids, attn, start, mask), old_log_probs, logprobs, advantages, cfg, run.np_rng, dist)
            del log_probs, logprobs  # the graph of the pass at theta_old
            if not step["accepted"]:
                warnings.warn(NoStepWarning(
                    f"TRPO took no step in update {run.update + 1}: none of the {cfg.line_search_steps} step sizes tried improved "
                    f"the surrogate with KL <= max_kl = {cfg.max_kl} (the full step's KL: {step['full_step_kl']:.3g}). Allow more "
                    "backtracking (--line-search-steps) or a better Fisher estimate (--fvp-fraction, --cg-damping)."), stacklevel=1)

            # ---- the critic: regression of V on the returns, features fixed --------------------------
            n = ids.shape[0]
            minibatch_size = n // cfg.num_minibatches
            value_losses = []
            for _ in range(cfg.vf_iters):
                order = torch.from_numpy(run.np_rng.permutation(n)).to(ids.device)
                for mb_start in range(0, n, minibatch_size):
                    idx = order[mb_start : mb_start + minibatch_size]
                    values = value_model(features[idx]).squeeze(-1)
                    v_loss = 0.5 * masked_mean((values - returns[idx]) ** 2, mask[idx], dist.global_count(mask[idx]))
                    optimizer_step(v_loss, value_optimizer, head.parameters(), cfg.max_grad_norm)
                    value_losses.append(float(v_loss.detach()))

            warn_if_negative_kl(kl.sum(1))
            seq_kl = float(dist.mean(float(kl.sum(1).mean())))
            kl_ctl.update(seq_kl, cfg.num_envs * dist.world_size)
            metrics = dist.mean_metrics({
                **reward_metrics(rollout.rm_scores, rollout.gold_scores, rollout.reward_terms),
                "reward/total": float((rewards * mask).sum(1).mean()),
                "kl/ref": seq_kl,
                "kl/coef": kl_ctl.value,
                "policy/entropy": float(entropy),  # of pi_old, on the rollout
                "loss/value": float(np.mean(value_losses)),
                "value/explained_variance": explained_variance(old_values, returns, mask),
                "trpo/kl": step["kl"],
                "trpo/cg_iters": step["cg_iters"],
                "trpo/line_search_steps": step["steps"],
                "trpo/step_accepted": float(step["accepted"]),
                "trpo/full_step_kl": step["full_step_kl"],
                "trpo/surrogate_improvement": step["improvement"],
                "lr": cfg.vf_lr,
                "perf/tokens_per_s": rollout.n_tokens / run.seconds_since_last_log(),
            }, summed=("perf/tokens_per_s",))
            run.log(metrics, [p + t for p, t in zip(rollout.prompts, rollout.texts)])
            if run.due():
                run.checkpoint(policy, value_optimizer, env, (ids[:4, :start], attn[:4, :start]), {"kl_coef": kl_ctl.value})
        summary = run.finish(policy)
    if run.should_stop():
        raise KeyboardInterrupt
    return summary
