"""Path consistency learning: soft Q-learning over whole episodes, on- and off-policy (``textgym train dqn``).

    textgym train dqn                          # objective "pcl", the default (the config is agents/dqn.DQNConfig)

Nachum, Norouzi, Xu & Schuurmans, "Bridging the Gap Between Value and Policy Based Reinforcement
Learning" (NeurIPS 2017), with the relative entropy to a prior (Trust-PCL, Nachum et al. 2018), as
Guo et al. ("Efficient (Soft) Q-Learning for Text Generation with Limited Good Data", 2022) use it
for text. The objective is the one PPO and REINFORCE maximise, the KL-regularised return

    J(pi) = E_pi[ sum_t gamma^t (r_t - beta log pi(a_t | s_t) / pi_ref(a_t | s_t)) ],   beta = ``kl_coef``

where r_t is the env's reward (the reward model's score on an episode's last token). Text
transitions are deterministic (s_{t+1} = s_t + a_t), so its optimum pi* with soft value V* satisfies,
for every state and *every* action (not only the ones pi* would take):

    V*(s_t) = r_t - beta (log pi*(a_t | s_t) - log pi_ref(a_t | s_t)) + gamma V*(s_{t+1})        (soft Bellman)

In soft-Q terms this is Q*(s, a) = V*(s) + beta log pi*(a | s): the LM's log-probabilities plus a
value head *are* a soft Q-function (the ``log_policy`` form of ``agents.dqn``), Boltzmann acting
softmax(Q / beta) is sampling the LM, and its soft value beta log sum_a exp(Q / beta) is V. Chaining
the equation d steps along any stored path gives the d-step path consistency (Nachum et al., eq. 9)

    C_t = -V(s_t) + gamma^d V'(s_{t+d}) + sum_{i<d} gamma^i (r_{t+i} - beta (log pi(a_{t+i} | s_{t+i}) - log pi_ref(a_{t+i} | s_{t+i})))

which is 0 at every t of every path exactly at the optimum; V'(s) = 0 at and past an episode's end
(nothing follows the reward model's score). Each gradient step minimises

    L = sum_{episodes b, t} w_b 1/2 C_{b,t}^2 / (number of valid t)

over ``num_envs`` fresh (on-policy) episodes plus ``replay_batch_size`` replayed ones; w_b are the
importance-sampling weights of prioritized replay (1 otherwise), and an episode's priority is
max_t |C_t|. A single-step TD update (``--objective td``) moves the value of the last token's
reward back one token per update; d = T (``pcl_steps`` 0, the default) reaches every token of the
episode in one. The gradient moves log pi along each window (the actor) and V(s_t) (the critic).

The KL to the reference lives *inside* the consistency (beta = ``kl_coef``, the env's own shaping
``env_ref_logprob_coef`` stays 0), with pi_ref's log-probs stored with each episode, so the replay
holds everything C needs but the current pi and V. The critic is the value head on the policy's
detached last hidden states, scaled by ``value_scale`` (so only the consistency's log pi terms move
the LM); its target V' is the Polyak average of that head (``critic_tau`` per gradient step), read on
the current features; only d > 0 reads it.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import torch

from agents.policy import reference_logprobs
from agents.replay import EpisodeReplayBuffer, PrioritizedEpisodeReplayBuffer
from agents.rollout import collect_rollout
from agents.run import check_finite, make_adam, optimizer_step, reward_metrics, start_policy_run
from rlhf.logprobs import gather_logprobs


def window_matrix(horizon: int, steps: int, gamma: float, device=None) -> torch.Tensor:
    """(T, T) W with W[t, j] = gamma^(j - t) for t <= j < t + d, else 0 (d = ``steps``, 0 = T):
    sum_j W[t, j] u_j is the discounted d-step sum of u from t."""
    d = steps or horizon
    t = torch.arange(horizon, device=device)
    lag = (t[None, :] - t[:, None]).double()  # j - t
    inside = (lag >= 0) & (lag < d)
    return torch.where(inside, gamma**lag.clamp(min=0), torch.zeros((), dtype=torch.float64, device=device)).float()


def path_consistency(values: torch.Tensor, target_values: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                     rewards: torch.Tensor, mask: torch.Tensor, kl_coef: float, gamma: float, steps: int) -> torch.Tensor:
    """The d-step path consistency C_t of every start t of every episode (module docstring).

    All inputs are (B, T) float32 over the completion tokens, ``mask`` 1 on generated tokens (each
    episode's tokens first, then padding): ``values`` V(s_t) (in the graph), ``target_values`` V'(s_t)
    (the bootstrap, detached), ``logprobs`` log pi(a_t | s_t) (in the graph), ``ref_logprobs``,
    ``rewards`` r_t. ``steps`` is d (0: to the episode's end). Returns C, (B, T), 0 on padding.
    """
    mask = mask.float()
    horizon = mask.shape[1]
    d = steps or horizon
    u = (rewards - kl_coef * (logprobs - ref_logprobs)) * mask  # the regularised per-token reward
    window = window_matrix(horizon, d, gamma, mask.device)
    path_return = u @ window.T  # sum_{i<d} gamma^i u_{t+i}, the path's own tokens only (u = 0 on padding)
    bootstrap = torch.zeros_like(target_values)
    if d < horizon:  # V'(s_{t+d}), 0 at and past the end (target_values are 0 on padding)
        bootstrap[:, : horizon - d] = (gamma**d) * (target_values * mask)[:, d:]
    return (path_return + bootstrap - values) * mask


def consistency_loss(consistency: torch.Tensor, mask: torch.Tensor, is_weights: torch.Tensor) -> torch.Tensor:
    """sum_{b, t} w_b 1/2 C_{b,t}^2 / (number of valid t)."""
    mask = mask.float()
    return (is_weights[:, None] * 0.5 * consistency.square() * mask).sum() / mask.sum().clamp(min=1)


def critic_values(head: torch.nn.Module, features: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """V(s_t) = scale * head(h_t) on (B, T, H) features, (B, T), 0 on padding."""
    return scale * head(features).squeeze(-1) * mask


def train(cfg) -> dict:
    """Run PCL as ``cfg`` (an ``agents.dqn.DQNConfig`` with ``objective == "pcl"``; ``agents.dqn.train``
    calls this) says, with the same run dir, resume, errors and summary as ``agents.ppo.train``; the
    episode replay buffer and the target critic are checkpointed with the run."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("train dqn runs in one process (its replay buffer is per process); launch it without torchrun")
    dist, run, env, policy, reference = start_policy_run(cfg, "dqn", value_head=True)  # reference None: the env's ref_logprobs
    device = dist.device
    head = policy.value_head
    target_head = copy.deepcopy(head).requires_grad_(False)  # V', the Polyak-averaged critic
    params = policy.trainable_parameters()
    optimizer = make_adam(params, lr=cfg.lr, eps=1e-5)
    context_length = env.single_observation_space["input_ids"].shape[0] - env.max_new_tokens  # the observation: context + completion
    buffer_cls = PrioritizedEpisodeReplayBuffer if cfg.prioritized else EpisodeReplayBuffer
    kwargs = dict(alpha=cfg.per_alpha, beta=cfg.per_beta0) if cfg.prioritized else {}
    buffer = buffer_cls(cfg.replay_episodes, context_length, cfg.max_new_tokens, ref_logprobs=True, seed=cfg.seed,
                        pad_id=env.pad_token_id, **kwargs)
    grad_steps = 0
    if cfg.resume:
        state = run.restore(optimizer, env)
        buffer.load(run.resume_from)
        prefix = "target_head."
        target_head.load_state_dict({k[len(prefix):]: v for k, v in state["tensors"].items() if k.startswith(prefix)})
        grad_steps = state["grad_steps"]

    with run:
        while run.update < run.total_updates and not run.should_stop():
            # ---- act: Boltzmann softmax(Q / beta) = pi, sampled with the KV cache --------------------------
            policy.eval()
            rollout = collect_rollout(env, policy)
            run.env_steps += rollout.n_tokens
            fresh = np.array(buffer.add_rollout(rollout, reference_logprobs(rollout, reference, policy.valid_actions)))

            # ---- learn: fresh episodes + replayed ones, d-step consistency ---------------------------------
            policy.train()
            log: dict[str, list[float]] = {}
            for step in range(cfg.gradient_steps):
                indices, is_weights = fresh, np.ones(len(fresh), dtype=np.float32)
                if cfg.replay_batch_size and len(buffer) > len(fresh):
                    if cfg.prioritized:
                        buffer.anneal_beta(run.update / run.total_updates, cfg.per_beta0)
                    replayed, replay_weights = buffer.sample_indices(cfg.replay_batch_size)
                    indices, is_weights = np.concatenate([fresh, replayed]), np.concatenate([is_weights, replay_weights])
                batch = buffer.batch(indices, is_weights, device)
                ids, attn, start, mask = batch.input_ids, batch.attention_mask, batch.completion_start, batch.completion_mask
                log_probs, hidden = policy.next_token_log_probs(ids, attn, start, hidden_states=True)
                logprobs = gather_logprobs(log_probs, ids[:, start:], mask)
                features = hidden.detach().float()  # the critic reads the policy's features, never moves them
                values = critic_values(head, features, mask, cfg.value_scale)
                with torch.no_grad():
                    target_values = critic_values(target_head, features, mask, cfg.value_scale)
                consistency = path_consistency(values, target_values, logprobs, batch.ref_logprobs, batch.rewards, mask,
                                               cfg.kl_coef, cfg.gamma, cfg.pcl_steps)
                check_finite("the path consistency", consistency)
                loss = consistency_loss(consistency, mask, batch.is_weights)
                optimizer_step(loss, optimizer, params, cfg.max_grad_norm)
                grad_steps += 1
                if cfg.prioritized:  # an episode's priority: its largest |C_t|
                    buffer.update_priorities(indices, consistency.detach().abs().amax(1).cpu().numpy())
                with torch.no_grad():  # Polyak: theta' <- (1 - tau) theta' + tau theta
                    for p_target, p in zip(target_head.parameters(), head.parameters()):
                        p_target.lerp_(p, cfg.critic_tau)
                log.setdefault("loss/consistency", []).append(float(loss.detach()))
                log.setdefault("consistency/abs_mean", []).append(float((consistency.detach().abs() * mask).sum() / mask.sum()))
                if step == 0:  # the fresh episodes under the policy that sampled them
                    n, fresh_mask = len(fresh), mask[: len(fresh)].float()
                    kl = ((logprobs.detach()[:n] - batch.ref_logprobs[:n]) * fresh_mask).sum(1)
                    log["kl/ref"] = [float(kl.mean())]
                    log["value/mean"] = [float(values.detach()[:n, 0].mean())]  # V(s_0) of the fresh prompts
                    log["value/abs_max"] = [float(values.detach().abs().max())]
                    log["replay/on_policy_fraction"] = [n / len(indices)]

            metrics = {
                **reward_metrics(rollout.rm_scores, rollout.gold_scores, rollout.reward_terms),
                **{k: float(np.mean(v)) for k, v in log.items()},
                "replay/size": len(buffer),
                "lr": optimizer.param_groups[0]["lr"],
                "perf/tokens_per_s": rollout.n_tokens / run.seconds_since_last_log(),
            }
            run.log(metrics, [p + t for p, t in zip(rollout.prompts, rollout.texts)])
            if run.due():
                start = rollout.completion_start
                tensors = {f"target_head.{k}": v.detach().cpu().clone() for k, v in target_head.state_dict().items()}
                run.checkpoint(policy, optimizer, env, (rollout.input_ids[:4, :start], rollout.attention_mask[:4, :start]),
                               {"grad_steps": grad_steps}, tensors, buffer.save)
        summary = run.finish(policy)
    if run.should_stop():
        raise KeyboardInterrupt
    return summary
