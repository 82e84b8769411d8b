"""GRPO for language models: group-relative advantages, no value network (Shao et al. 2024,
DeepSeekMath, §4.1), with the loss variants of Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like
Training") and DAPO (Yu et al. 2025).

    textgym train grpo --group-size 4
    textgym train grpo --loss-type dapo --epsilon-high 0.28 --mask-zero-std-groups     (DAPO)
    textgym train grpo --loss-type dr_grpo --scale-rewards none                        (Dr. GRPO)

Each update samples G = ``group_size`` completions o_1 .. o_G of each of num_envs / G prompts q
from the vector env (its reward R_i at each episode's end), keeps the policy's log-probs as it
acted (pi_old; in float32, in bf16 one teacher-forced pass re-scores them), scores the reference
(pi_ref), then, for ``num_iterations`` passes of ``num_minibatches`` steps:

    group-relative advantage  A_i = (R_i - mean(R_1 .. R_G)) / (std(R_1 .. R_G) + 1e-4)       (every token of o_i)
                              scale_rewards: "group" as written, "batch" the std of the whole batch,
                              "none" no division (Dr. GRPO: the std reweights prompts by difficulty)
    token ratio               rho_it = pi(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t)
    clipped objective         l_it = min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i)
                              (DAPO's clip-higher: eps_high > eps_low lets unlikely tokens grow)
    KL to the reference       k3_it = pi_ref/pi - log(pi_ref/pi) - 1    (Schulman 2020: unbiased, >= 0)
    loss                      L = -agg(l_it - beta k3_it) over the tokens of the batch, where agg is
       "grpo"     1/G sum_i 1/|o_i| sum_t        DeepSeekMath eq. 3: a mean per sequence, then over sequences
       "dr_grpo"  1/(G L_max) sum_i sum_t        Dr. GRPO: a constant denominator (L_max = max_new_tokens),
                                                 so a long wrong answer is not penalised less per token
       "dapo"     1/(sum_i |o_i|) sum_i sum_t    DAPO eq. 8: the token-level mean over the batch

``kl_penalty="reward"`` charges the KL the way ``ppo`` and ``reinforce`` do instead: each return
becomes R_i - beta sum_t (log pi_old - log pi_ref)(o_it) before the group normalisation, and the
loss has no k3 term.

A group whose rewards are all equal has A_i = 0: it carries no signal, only the KL term and a share
of the denominators. Their fraction is logged (``grpo/frac_zero_std_groups``); DAPO's dynamic
sampling drops them (``mask_zero_std_groups``). DAPO then samples more prompts to refill the batch;
here the batch just has fewer sequences that update.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from agents.policy import reference_logprobs
from agents.rollout import acting_gives_old_logprobs, collect_rollout
from agents.run import RunOptions, check_finite, make_adam, optimizer_step, reward_metrics, start_policy_run
from agents.task_config import TaskConfig
from pretrain.adapters import ModelOptions, autocast
from pretrain.config import hparam, require_non_negative, require_positive, validate_fields
from pretrain.distributed import Distributed, SingleProcess
from rlhf.kl import kl_estimate, warn_if_negative_kl

SCALE_REWARDS = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
KL_PENALTIES = ("loss", "reward")
STD_EPS = 1e-4  # added to the std, so a zero-std group gets A = 0, not 0/0


@dataclass
class GRPOConfig(ModelOptions, TaskConfig, RunOptions):
    """GRPO fine-tuning of an LM policy on a TextGen env (defaults: the embedded default task)."""

    num_envs: int = hparam(32, "episodes per update: num_envs / group_size prompts, group_size completions of each")
    group_size: int = hparam(4, "G: completions sampled per prompt (>= 2, must divide num_envs)")
    total_steps: int = hparam(16_384, "env steps (generated tokens) to train for")
    max_new_tokens: int = hparam(16, "tokens per episode (L_max of the dr_grpo loss)")
    env_ref_logprob_coef: float = hparam(0.0, "beta of the env's own beta*log pi_ref shaping; 0 = off")
    lr: float = hparam(5e-5, "Adam learning rate")
    num_iterations: int = hparam(2, "mu: optimisation passes over each batch (1 = on-policy: the ratio is 1, the clip idle)")
    num_minibatches: int = hparam(2, "optimizer steps per pass (must divide num_envs)")
    epsilon_low: float = hparam(0.2, "clip the ratio below at 1 - epsilon_low")
    epsilon_high: float = hparam(0.2, "clip the ratio above at 1 + epsilon_high (DAPO's clip-higher: 0.28)")
    scale_rewards: str = hparam("group", f"divide the group-centred reward by the std of: {', '.join(SCALE_REWARDS)} (none = Dr. GRPO)")
    loss_type: str = hparam("grpo", f"loss aggregation over tokens: {', '.join(LOSS_TYPES)} (see the module docstring)")
    kl_coef: float = hparam(0.05, "beta of the KL to the reference (0 = no KL term)")
    kl_penalty: str = hparam("reward", "where the KL is charged: 'loss' (beta * k3 per token, DeepSeekMath) or 'reward' "
                                       "(-beta * k1 per token in the return, like ppo and reinforce)")
    mask_zero_std_groups: bool = hparam(False, "leave groups whose rewards are all equal out of the loss (DAPO's dynamic sampling filter)")
    max_grad_norm: float = hparam(1.0, "clip the global gradient norm")

    def __post_init__(self):
        validate_fields(self)
        self.validate_task()
        self.validate_model_options()
        for name, value, allowed in (("scale_rewards", self.scale_rewards, SCALE_REWARDS), ("loss_type", self.loss_type, LOSS_TYPES),
                                     ("kl_penalty", self.kl_penalty, KL_PENALTIES)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(allowed)}")
        require_positive(self, "num_envs", "group_size", "total_steps", "max_new_tokens", "num_iterations", "num_minibatches",
                         "epsilon_low", "epsilon_high", "checkpoint_every", "sample_every", "keep_checkpoints")
        require_non_negative(self, "env_ref_logprob_coef", "lr", "kl_coef", "max_grad_norm")
        if self.group_size < 2 or self.num_envs % self.group_size:
            raise ValueError(f"group_size must be >= 2 and divide num_envs, got group_size={self.group_size}, num_envs={self.num_envs}")
        if self.num_envs % self.num_minibatches:
            raise ValueError(f"num_envs={self.num_envs} must be divisible by num_minibatches={self.num_minibatches}")
        if self.epsilon_low >= 1:
            raise ValueError(f"epsilon_low must be < 1 (the ratio is clipped below at 1 - epsilon_low > 0), got {self.epsilon_low}")


def group_advantages(returns: torch.Tensor, group_size: int, scale_rewards: str = "group",
                     dist: Distributed | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A_i = (R_i - group mean) / (std + 1e-4) for ``returns`` (N,) laid out group-major (G consecutive
    completions of each prompt). ``scale_rewards``: "group" (the sample std of each group, as TRL),
    "batch" (the std of the whole batch, over every process with ``dist``) or "none" (Dr. GRPO).
    Returns the advantages (N,) and which groups (N / G,) bool have rewards that are all equal."""
    grouped = returns.view(-1, group_size)
    centred = grouped - grouped.mean(1, keepdim=True)
    std = grouped.std(1, keepdim=True)
    zero_std = (grouped == grouped[:, :1]).all(1)  # exact: float round-off in std must not hide an equal group
    if scale_rewards == "group":
        centred = centred / (std + STD_EPS)
    elif scale_rewards == "batch":
        dist = dist or SingleProcess()
        n = float(dist.sum(returns.numel()))
        mean = float(dist.sum(float(returns.sum()))) / n
        var = float(dist.sum(float(((returns - mean) ** 2).sum()))) / max(n - 1, 1)
        centred = centred / (var**0.5 + STD_EPS)
    elif scale_rewards != "none":
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}; expected one of {', '.join(SCALE_REWARDS)}")
    return centred.reshape(-1), zero_std


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, max_length: int,
              dist: Distributed | None = None) -> torch.Tensor:
    """Reduce a (N, T) per-token loss over the ``mask``ed tokens as ``loss_type`` says (see the module
    docstring). Sequences whose mask is all 0 do not count. With ``dist`` the denominators are the
    means over processes (``Distributed.global_count``), so the gradient all-reduce gives the loss of
    the whole global batch."""
    dist = dist or SingleProcess()
    kept = (mask.sum(1) > 0).float()  # (N,) sequences in the loss
    if loss_type == "grpo":  # 1/G sum_i 1/|o_i| sum_t
        per_sequence = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
        return per_sequence.sum() / dist.global_count(kept)
    if loss_type == "dr_grpo":  # 1/(G L_max) sum_i sum_t
        return (per_token * mask).sum() / (dist.global_count(kept) * max_length)
    if loss_type == "dapo":  # 1/(sum_i |o_i|) sum_i sum_t
        return (per_token * mask).sum() / dist.global_count(mask)
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              cfg: GRPOConfig, ref_logprobs: torch.Tensor | None = None, dist: Distributed | None = None):
    """The clipped GRPO loss of a (minibatch) of sequences: ``logprobs``, ``old_logprobs``,
    ``ref_logprobs`` (N, T) float32 log pi, log pi_old, log pi_ref of the completion tokens,
    ``advantages`` (N,), ``mask`` (N, T) float 1 on the tokens in the loss. The k3 KL term is added
    when ``ref_logprobs`` is given and ``cfg.kl_coef`` > 0. Returns the loss (a scalar with a graph)
    and detached stats: ``clip_ratio_low`` / ``clip_ratio_high`` (the fraction of tokens whose
    ratio the lower / upper clip holds back: rho < 1 - eps_low with A < 0, rho > 1 + eps_high with A > 0)
    and ``kl`` (the token mean of k3, 0 without a reference)."""
    adv = advantages.unsqueeze(1)  # one advantage for every token of a sequence
    ratio = torch.exp(logprobs - old_logprobs)
    clipped_ratio = torch.clamp(ratio, 1 - cfg.epsilon_low, 1 + cfg.epsilon_high)
    per_token = -torch.min(ratio * adv, clipped_ratio * adv)
    kl = torch.zeros_like(per_token)
    if ref_logprobs is not None and cfg.kl_coef > 0:
        kl = kl_estimate(logprobs, ref_logprobs, "k3")
        per_token = per_token + cfg.kl_coef * kl
    loss = aggregate(per_token, mask, cfg.loss_type, cfg.max_new_tokens, dist)
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        stats = {
            "clip_ratio_low": float((((ratio < 1 - cfg.epsilon_low) & (adv < 0)).float() * mask).sum() / n),
            "clip_ratio_high": float((((ratio > 1 + cfg.epsilon_high) & (adv > 0)).float() * mask).sum() / n),
            "kl": float((kl * mask).sum() / n),
        }
    return loss, stats


def scores_in_the_step(cfg: GRPOConfig) -> bool:
    """One step per batch with the KL in the loss: the step's own forward is at theta_old, so its
    log-probs, detached, are pi_old's (the ratio is 1) and the scoring pass is skipped, as TRL does.
    (With the KL in the reward, pi_old's log-probs are needed before the step, for the returns.)"""
    return cfg.num_iterations * cfg.num_minibatches == 1 and cfg.kl_penalty == "loss"


def train(cfg: GRPOConfig) -> dict:
    """Run GRPO as ``cfg`` says (the same run dir, resume, errors, summary and data-parallel launch as
    ``agents.ppo.train``; each process samples its own groups from its prompt shard)."""
    dist, run, env, policy, reference = start_policy_run(cfg, "grpo", value_head=False)  # reference None: the env's ref_logprobs
    device = dist.device
    model = dist.prepare(policy)  # gradients all-reduced across processes (the policy itself in one process)
    params = policy.trainable_parameters()
    optimizer = make_adam(params, lr=cfg.lr, eps=1e-5)
    if cfg.resume:
        run.restore(optimizer, env)
    on_policy = scores_in_the_step(cfg)
    acting_is_old = acting_gives_old_logprobs(cfg)

    with run, autocast(cfg.dtype, device):
        while run.update < run.total_updates and not run.should_stop():
            # ---- sample G completions of each of num_envs / G prompts, laid out group-major ----------
            chosen = run.np_rng.choice(len(env.prompts), size=cfg.num_envs // cfg.group_size)
            policy.eval()
            rollout = collect_rollout(env, policy, [env.prompts[i] for i in chosen for _ in range(cfg.group_size)],
                                      record_logprobs=not on_policy and acting_is_old)
            run.env_steps += int(dist.sum(rollout.n_tokens))
            ids, attn, start, mask = rollout.input_ids, rollout.attention_mask, rollout.completion_start, rollout.completion_mask.float()
            n = ids.shape[0]
            old_logprobs = None
            with torch.no_grad():
                if not on_policy:  # pi_old, fixed before the weights move: as the policy acted, or scored in a pass
                    if acting_is_old:
                        old_logprobs, old_entropy = rollout.logprobs, rollout.entropy
                    else:
                        old_logprobs, old_entropy, _ = policy.evaluate(ids, attn, start, entropy="detached")
                    check_finite("the rollout's log-probs", old_logprobs)
                ref_logprobs = reference_logprobs(rollout, reference, policy.valid_actions)
                returns = (rollout.env_rewards * mask).sum(1)  # R_i
                if cfg.kl_penalty == "reward":  # R_i - beta sum_t (log pi_old - log pi_ref)
                    returns = returns - cfg.kl_coef * (kl_estimate(old_logprobs, ref_logprobs, "k1") * mask).sum(1)
                advantages, zero_std = group_advantages(returns, cfg.group_size, cfg.scale_rewards, dist)
            check_finite("the reward", returns)
            loss_mask = mask
            if cfg.mask_zero_std_groups:  # DAPO's filter: groups without signal leave the loss
                loss_mask = mask * (~zero_std).repeat_interleave(cfg.group_size).unsqueeze(1).float()
            loss_ref = ref_logprobs if cfg.kl_penalty == "loss" else None

            # ---- mu passes of minibatch steps over the batch, pi_old fixed -------------------------
            policy.train()
            minibatch_size = n // cfg.num_minibatches
            stats: dict[str, list[float]] = {"loss": [], "clip_ratio_low": [], "clip_ratio_high": [], "kl": []}
            for _ in range(cfg.num_iterations):
                order = torch.from_numpy(run.np_rng.permutation(n)).to(ids.device)
                for mb_start in range(0, n, minibatch_size):
                    idx = order[mb_start : mb_start + minibatch_size]
                    if cfg.mask_zero_std_groups and float(dist.sum(float(loss_mask[idx].sum()))) == 0:  # all masked out, everywhere
                        continue
                    logprobs, entropy, _ = model(ids[idx], attn[idx], start, entropy="detached" if on_policy else "none")
                    if on_policy:  # the one step's forward is at theta_old: its log-probs are pi_old's
                        old_logprobs, old_entropy = torch.zeros_like(logprobs), torch.zeros_like(entropy)
                        old_logprobs[idx], old_entropy[idx] = logprobs.detach(), entropy
                    loss, mb_stats = grpo_loss(logprobs, old_logprobs[idx], advantages[idx], loss_mask[idx], cfg,
                                               None if loss_ref is None else loss_ref[idx], dist)
                    optimizer_step(loss, optimizer, params, cfg.max_grad_norm)
                    stats["loss"].append(float(loss.detach()))
                    for key, value in mb_stats.items():
                        stats[key].append(value)

            if not stats["loss"]:
                warnings.warn(f"GRPO took no optimizer step in update {run.update + 1}: the rewards of every group were equal "
                              "and --mask-zero-std-groups left them all out of the loss (is the reward constant?)",
                              RuntimeWarning, stacklevel=1)
            if old_logprobs is None:  # on-policy, and every sequence was masked out: no step was taken
                with torch.no_grad():
                    old_logprobs, old_entropy, _ = policy.evaluate(ids, attn, start, entropy="detached")
            seq_kl = (kl_estimate(old_logprobs, ref_logprobs, "k1") * mask).sum(1)  # KL(pi_old || pi_ref) per sequence
            warn_if_negative_kl(seq_kl)
            metrics = dist.mean_metrics({
                **reward_metrics(rollout.rm_scores, rollout.gold_scores, rollout.reward_terms),
                "reward/total": float(returns.mean()),
                "kl/ref": float(seq_kl.mean()),
                "kl/coef": cfg.kl_coef,
                "policy/entropy": float((old_entropy * mask).sum() / mask.sum().clamp(min=1)),  # of pi_old, on the rollout
                "loss/policy": float(np.mean(stats["loss"])) if stats["loss"] else 0.0,
                "grpo/clip_ratio_low": float(np.mean(stats["clip_ratio_low"])) if stats["loss"] else 0.0,
                "grpo/clip_ratio_high": float(np.mean(stats["clip_ratio_high"])) if stats["loss"] else 0.0,
                "grpo/frac_zero_std_groups": float(zero_std.float().mean()),
                "grpo/optimizer_steps": len(stats["loss"]),
                "lr": optimizer.param_groups[0]["lr"],
                "perf/tokens_per_s": rollout.n_tokens / run.seconds_since_last_log(),
                **({"grpo/kl_k3": float(np.mean(stats["kl"])) if stats["kl"] else 0.0} if loss_ref is not None and cfg.kl_coef else {}),
            }, summed=("perf/tokens_per_s",))
            run.log(metrics, [p + t for p, t in zip(rollout.prompts, rollout.texts)])
            if run.due():
                run.checkpoint(policy, optimizer, env, (ids[:4, :start], attn[:4, :start]))
        summary = run.finish(policy)
    if run.should_stop():
        raise KeyboardInterrupt
    return summary
