"""Value-based fine-tuning over the token action space, initialised from the LM: ``DQNConfig`` and TD learning.

    textgym train dqn                   # objective 'pcl': soft Q-learning by path consistency (agents/pcl.py)
    textgym train dqn --objective td --env TextGenToy-v0 --max-new-tokens 4 --num-envs 16 --lr 1e-3 \
        --gradient-steps 8 --max-grad-norm 10 --total-steps 4000    # DQN over transitions (below)

The default objective learns the whole episode's reward at every token in one update, from fresh and
replayed episodes, and is the one that fine-tunes the LM on TextGen-v0 (see ``agents.pcl``). The TD
objective below (Mnih et al. 2015) moves a reward paid on the last token back by n tokens per
update; it reaches the optimum of TextGenToy-v0 but barely moves the LM on TextGen-v0.

TD learning. Q(s, .) comes from the LM itself, in one of two forms (``q_form``), invalid tokens at -inf:

    "logits"       Q(s, a) = logit(s, a)
    "log_policy"   Q(s, a) = V(s) + beta log pi(a | s),   pi = softmax(logits),  V = s * (zero-init head)

so before any update the Boltzmann policy softmax(Q / beta) *is* the pretrained LM either way. The
second is the soft-Q form: its soft value beta log sum_a exp(Q(s, a) / beta) is exactly V(s), and
with the env's beta log pi_ref shaping the initial TD errors are zero everywhere except where the
reward model pays (Q = V + beta log pi_ref, V = 0 is the fixed point of the shaping alone). Raw
logits carry an arbitrary per-state offset logsumexp(logits(s)); the TD updates then spend their
first steps erasing those offsets, which wrecks the LM before the reward can teach it anything.
The value head's output is scaled by ``value_scale`` s: with one learning rate for the LM and the
fresh head, s multiplies the head's effective (Adam) step, so V can follow returns of a few nats
while the LM moves slowly; without it the TD errors land on beta log pi, i.e. on the policy.
Transitions go to a uniform or prioritized replay buffer (``agents.replay``); each gradient step
minimises the Huber loss of the TD error

    n-step target   y = R_t^(n) + gamma^n (1 - done) V_target(s_{t+n})
    DQN             V_target(s') = max_a Q_target(s', a)
    double DQN      V_target(s') = Q_target(s', argmax_a Q(s', a))          (van Hasselt et al. 2016)
    soft-Q          V_target(s') = beta log sum_a exp(Q_target(s', a) / beta)   (soft Bellman backup)

weighted by the importance-sampling weights under prioritized replay (whose priorities become
|delta|). The soft-Q backup with temperature beta is the KL-regularised objective in Q-learning
form: its optimal policy softmax(Q / beta) maximises E[R] + beta H, i.e. E[R] - beta KL(pi || pi_ref)
when the env pays beta log pi_ref (``--env-ref-logprob-coef beta``). The target network is a copy updated
hard every ``target_update_every`` steps, or by Polyak averaging with ``tau < 1``. Exploration:
epsilon-greedy with epsilon annealed linearly, or Boltzmann sampling softmax(Q / T) (``temperature``; by
default T = the Q-form's beta, so exploration starts as the LM itself).
"""

from __future__ import annotations

import copy
from collections import deque
from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from agents import pcl
from agents.policy import LMPolicy, check_policy_fits_env, sample_categorical
from agents.replay import PrioritizedReplayBuffer, ReplayBuffer
from agents.run import Run, RunOptions, check_finite, device_of, make_env, make_policy_model, optimizer_step, reward_metrics
from agents.task_config import TaskConfig, task_kwargs
from pretrain.config import hparam, require_non_negative, require_positive, require_unit_interval, validate_fields
from pretrain.optim import make_adam
from pretrain.padding import position_ids_from_mask
from rlhf.logprobs import mask_invalid_actions


@dataclass
class DQNConfig(TaskConfig, RunOptions):
    """Value-based fine-tuning of an LM on a TextGen env: soft Q-learning by path consistency over
    whole episodes (``objective`` 'pcl', ``agents.pcl``; the default, tuned for TextGen-v0) or TD
    learning over transitions (``objective`` 'td', this module). Fields marked pcl: or td: belong to
    that objective only; setting one under the other is an error."""

    objective: str = hparam("pcl", "'pcl': d-step path consistency over whole fresh + replayed episodes (agents/pcl.py); "
                                   "'td': one- or n-step TD learning over replayed transitions")
    env: str = hparam("TextGen-v0", "registered env id (module:MyTask-v0 imports module first)")
    num_envs: int = hparam(32, "parallel envs (episodes collected per update)")
    total_steps: int = hparam(32_768, "env steps (generated tokens) to train for")
    max_new_tokens: int = hparam(16, "tokens per episode")
    lr: float = hparam(1e-4, "Adam learning rate")
    gamma: float = hparam(1.0, "discount")
    gradient_steps: int = hparam(2, "gradient steps after each batch of episodes")
    prioritized: bool = hparam(False, "prioritized replay (proportional, sum tree)")
    per_alpha: float = hparam(0.6, "priority exponent alpha")
    per_beta0: float = hparam(0.4, "initial importance-sampling exponent beta (annealed to 1)")
    value_scale: float = hparam(10.0, "V = value_scale * Linear(h) (the head's effective lr multiplier)")
    max_grad_norm: float = hparam(1.0, "clip the global gradient norm")
    # -- pcl ---------------------------------------------------------------------------------------
    kl_coef: float = hparam(0.1, "pcl: beta of the KL to the reference inside the consistency (the soft-Q temperature)")
    pcl_steps: int = hparam(0, "pcl: d of the d-step consistency (0 = to each episode's end)")
    replay_episodes: int = hparam(1024, "pcl: replay capacity (whole episodes)")
    replay_batch_size: int = hparam(32, "pcl: replayed episodes per gradient step, next to the num_envs fresh ones (0 = on-policy)")
    critic_tau: float = hparam(0.05, "pcl: Polyak coefficient of the target critic V' per gradient step (read only when pcl_steps > 0)")
    # -- td ----------------------------------------------------------------------------------------
    env_ref_logprob_coef: float = hparam(0.0, "td: beta of the env's beta*log pi_ref shaping (pair with soft-Q at the same beta)")
    n_step: int = hparam(1, "td: n-step returns")
    buffer_size: int = hparam(20_000, "td: replay capacity (transitions)")
    batch_size: int = hparam(64, "td: transitions per gradient step")
    learning_starts: int = hparam(128, "td: transitions collected before learning")
    target_update_every: int = hparam(100, "td: gradient steps between hard target updates (when tau = 1)")
    tau: float = hparam(1.0, "td: Polyak coefficient for the target network (1 = hard updates)")
    double_dqn: bool = hparam(True, "td: double DQN targets")
    soft_q: bool = hparam(False, "td: soft Bellman backup V = beta log sum exp(Q / beta)")
    soft_q_beta: float = hparam(0.1, "td: temperature beta of the soft backup")
    q_form: str = hparam("log_policy", "td: 'log_policy' (Q = V + beta log pi; beta = soft_q_beta with soft-Q, else 1) or 'logits' (Q = logits)")
    exploration: str = hparam("epsilon", "td: 'epsilon' (epsilon-greedy) or 'boltzmann' (softmax(Q / temperature))")
    epsilon_start: float = hparam(1.0, "td: initial epsilon")
    epsilon_end: float = hparam(0.05, "td: final epsilon")
    epsilon_fraction: float = hparam(0.5, "td: fraction of training over which epsilon anneals")
    temperature: float = hparam(0.0, "td: Boltzmann temperature; 0 = the Q-scale beta (soft_q_beta with soft-Q, else 1): the LM's own distribution at the start")

    # What a run saved before a field existed ran with: resuming it fills the field in (and checks it).
    OLDER_RUNS: ClassVar[dict] = {"objective": "td"}

    def __post_init__(self):
        validate_fields(self)
        self.validate_task()
        if self.objective not in ("pcl", "td"):
            raise ValueError(f"unknown objective {self.objective!r}; expected 'pcl' or 'td'")
        other = "td" if self.objective == "pcl" else "pcl"
        for f in fields(self):
            if f.metadata.get("help", "").startswith(f"{other}:") and getattr(self, f.name) != f.default:
                raise ValueError(f"{f.name}={getattr(self, f.name)!r} is an option of objective '{other}', not of "
                                 f"'{self.objective}': drop it, or add --objective {other}")
        if self.objective == "pcl" and self.replay_episodes <= self.num_envs * (self.replay_batch_size > 0):
            raise ValueError(f"replay_episodes ({self.replay_episodes}) must hold more than one batch of num_envs ({self.num_envs}) "
                             "episodes, or there is nothing to replay (replay_batch_size 0: on-policy only)")
        if not 0 < self.critic_tau <= 1:
            raise ValueError(f"critic_tau must be in (0, 1], got {self.critic_tau}")
        if self.q_form not in ("log_policy", "logits"):
            raise ValueError(f"unknown q_form {self.q_form!r}; expected 'log_policy' or 'logits'")
        if self.exploration not in ("epsilon", "boltzmann"):
            raise ValueError(f"unknown exploration {self.exploration!r}; expected 'epsilon' or 'boltzmann'")
        if not 0 < self.tau <= 1:
            raise ValueError(f"tau must be in (0, 1], got {self.tau}")
        require_positive(self, "num_envs", "total_steps", "n_step", "batch_size", "buffer_size", "gradient_steps", "soft_q_beta",
                         "value_scale", "replay_episodes")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = the Q-scale beta), got {self.temperature}")
        require_positive(self, "max_new_tokens", "target_update_every", "checkpoint_every", "sample_every", "keep_checkpoints")
        require_non_negative(self, "kl_coef", "pcl_steps", "replay_batch_size", "env_ref_logprob_coef", "lr", "per_alpha",
                             "learning_starts", "max_grad_norm")
        require_unit_interval(self, "gamma", "per_beta0", "epsilon_start", "epsilon_end", "epsilon_fraction")

    @property
    def q_beta(self) -> float:
        """The scale beta of the log-policy Q-form: softmax(Q / beta) is the LM's distribution."""
        return self.soft_q_beta if self.soft_q else 1.0


def q_values(policy: LMPolicy, input_ids: torch.Tensor, attention_mask: torch.Tensor, cfg: DQNConfig) -> torch.Tensor:
    """Q(s, .) for left-padded contexts (see ``q_form``), invalid actions at -inf."""
    log_policy_form = cfg.q_form == "log_policy"
    out = policy.model(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=position_ids_from_mask(attention_mask), output_hidden_states=log_policy_form,
                       logits_to_keep=1)  # Q(s, .) needs the last position only
    logits = mask_invalid_actions(out.logits[:, -1].float(), policy.valid_actions)
    if not log_policy_form:
        return logits
    beta = cfg.q_beta
    value = cfg.value_scale * policy.value_head(out.hidden_states[-1][:, -1].float())  # (B, 1)
    return value + beta * F.log_softmax(logits, dim=-1)


def td_targets(batch, q_net, target_net, cfg: DQNConfig) -> torch.Tensor:
    """y = R^(n) + gamma^n (1 - done) V_target(s')."""
    with torch.no_grad():
        q_next_target = q_values(target_net, batch.next_contexts, batch.next_mask, cfg)
        if cfg.soft_q:
            v_next = cfg.soft_q_beta * torch.logsumexp(q_next_target / cfg.soft_q_beta, dim=-1)
        elif cfg.double_dqn:
            best = q_values(q_net, batch.next_contexts, batch.next_mask, cfg).argmax(-1, keepdim=True)
            v_next = q_next_target.gather(-1, best).squeeze(-1)
        else:
            v_next = q_next_target.max(-1).values
        v_next = torch.where(batch.dones.bool(), torch.zeros_like(v_next), v_next)
        return batch.rewards + batch.discounts * v_next


def epsilon_at(step: int, total: int, cfg: DQNConfig) -> float:
    end = max(1, int(cfg.epsilon_fraction * total))
    return cfg.epsilon_end + (cfg.epsilon_start - cfg.epsilon_end) * max(0.0, 1 - step / end)


def train(cfg: DQNConfig) -> dict:
    """Run DQN as ``cfg`` says (the same run dir, resume, errors and summary as ``agents.ppo.train``);
    the replay buffer is checkpointed with the run. ``objective`` 'pcl' runs ``agents.pcl.train``."""
    if cfg.objective == "pcl":
        return pcl.train(cfg)
    device = device_of(cfg)
    torch.manual_seed(cfg.seed)
    run = Run(cfg, "dqn", total_updates=max(1, cfg.total_steps // (cfg.num_envs * cfg.max_new_tokens)))
    env = make_env(cfg.env, cfg.num_envs, device, cfg.seed, model=cfg.model, max_new_tokens=cfg.max_new_tokens,
                   ref_logprob_coef=cfg.env_ref_logprob_coef, **task_kwargs(cfg))
    initial_dir = make_policy_model(cfg.model, env, run.out, cfg.seed)
    policy = LMPolicy.load(run.resume_model_dir() or initial_dir, device, valid_actions=env.valid_actions,
                           value_head=cfg.q_form == "log_policy")
    check_policy_fits_env(policy, env)
    q_net, valid = policy, policy.valid_actions  # the Q-network: the LM (+ the value head for "log_policy")
    valid_host = valid.cpu()
    target_net = copy.deepcopy(q_net).eval().requires_grad_(False)
    optimizer = make_adam(q_net.parameters(), lr=cfg.lr)
    buffer_cls = PrioritizedReplayBuffer if cfg.prioritized else ReplayBuffer
    kwargs = dict(alpha=cfg.per_alpha, beta=cfg.per_beta0) if cfg.prioritized else {}
    context_length = env.single_observation_space["input_ids"].shape[0]  # the observation window
    buffer = buffer_cls(cfg.buffer_size, context_length, seed=cfg.seed, pad_id=env.pad_token_id, **kwargs)
    gen = torch.Generator().manual_seed(cfg.seed)  # exploration randomness (checkpointed)
    grad_steps = 0
    if cfg.resume:
        state = run.restore(optimizer, env)
        buffer.load(run.resume_from)
        target_net.load_state_dict({k[len("target."):]: v for k, v in state["tensors"].items() if k.startswith("target.")})
        gen.set_state(state["tensors"]["explore_rng"])
        grad_steps = state["grad_steps"]
    total_transitions = run.total_updates * cfg.num_envs * cfg.max_new_tokens

    def context_of(row_ids, row_mask) -> list[int]:
        return row_ids[row_mask.bool()].tolist()

    def emit(window: deque, next_context: list[int], done: bool, all_remaining: bool) -> None:
        """n-step transitions (s_t, a_t, sum_k gamma^k r_{t+k}, s_{t+n}, done, gamma^n) from a window."""
        while window and (len(window) >= cfg.n_step or all_remaining):
            ret, discount = 0.0, 1.0
            for _, _, r in window:
                ret += discount * r
                discount *= cfg.gamma
            context, action, _ = window.popleft()
            buffer.add(context, action, ret, next_context, done, discount)
            if not all_remaining:
                break

    with run:
        while run.update < run.total_updates and not run.should_stop():
            # ---- collect one episode per env ------------------------------------------------------
            start = env.reset_tensor()
            steps_before = run.env_steps
            ids, attn = start.input_ids.clone(), start.attention_mask.clone()
            windows = [deque() for _ in range(cfg.num_envs)]
            done = torch.zeros(cfg.num_envs, dtype=torch.bool)
            episode_rm, episode_gold, texts, td_log, loss_log = [], [], [], [], []
            episode_terms: dict[str, list[float]] = {}
            eps = epsilon_at(run.env_steps, total_transitions, cfg) if cfg.exploration == "epsilon" else 0.0
            for _t in range(cfg.max_new_tokens):
                with torch.no_grad():
                    q = q_values(q_net, ids, attn, cfg).cpu()
                check_finite("the Q-values of the valid actions", q[:, valid_host])
                if cfg.exploration == "epsilon":  # epsilon-greedy over the valid tokens
                    random_actions = torch.multinomial(valid.float().cpu().expand(cfg.num_envs, -1), 1, generator=gen).squeeze(1)
                    explore = torch.rand(cfg.num_envs, generator=gen) < eps
                    actions = torch.where(explore, random_actions, q.argmax(-1))
                else:  # Boltzmann: softmax(Q / T); at T = 1 and before training this is the LM itself
                    actions = sample_categorical(torch.softmax(q / (cfg.temperature or cfg.q_beta), -1), gen)
                out = env.step_tensor(actions.to(device))
                next_ids, next_attn = out.input_ids.clone(), out.attention_mask.clone()
                terminated = out.terminated.cpu()
                for i in range(cfg.num_envs):
                    if done[i]:  # this sub-env's episode is over (it was auto-reset); not recorded
                        continue
                    windows[i].append((context_of(ids[i], attn[i]), int(actions[i]), float(out.rewards[i])))
                    ended = bool(terminated[i])
                    emit(windows[i], [] if ended else context_of(next_ids[i], next_attn[i]), ended, all_remaining=ended)
                    run.env_steps += 1
                for i, info in out.finished.items():
                    if not done[i]:
                        episode_rm.append(info["rm_score"])
                        episode_gold.append(info["gold_score"])
                        for name, value in info.get("reward_terms", {}).items():
                            episode_terms.setdefault(name, []).append(value)
                        texts.append(info["prompt"] + info["text"])
                done |= terminated
                ids, attn = next_ids, next_attn
                if bool(done.all()):
                    break

            # ---- learn from replay ----------------------------------------------------------------
            if len(buffer) >= cfg.learning_starts:
                for _g in range(cfg.gradient_steps):
                    if cfg.prioritized:
                        buffer.anneal_beta(run.env_steps / total_transitions, cfg.per_beta0)
                    batch = buffer.sample(cfg.batch_size, device)
                    targets = td_targets(batch, q_net, target_net, cfg)
                    q_sa = q_values(q_net, batch.contexts, batch.context_mask, cfg).gather(-1, batch.actions.view(-1, 1)).squeeze(-1)
                    td_error = q_sa - targets
                    loss = (batch.is_weights * F.smooth_l1_loss(q_sa, targets, reduction="none")).mean()  # Huber, IS-weighted
                    optimizer_step(loss, optimizer, q_net.parameters(), cfg.max_grad_norm)
                    grad_steps += 1
                    if cfg.prioritized:
                        buffer.update_priorities(batch.indices, td_error.detach().cpu().numpy())
                    if cfg.tau < 1:  # Polyak: theta_target <- (1 - tau) theta_target + tau theta
                        with torch.no_grad():
                            for p_target, p in zip(target_net.parameters(), q_net.parameters()):
                                p_target.lerp_(p, cfg.tau)
                    elif grad_steps % cfg.target_update_every == 0:
                        target_net.load_state_dict(q_net.state_dict())
                    td_log.append(float(td_error.detach().abs().mean()))
                    loss_log.append(float(loss.detach()))

            metrics = {
                **reward_metrics(episode_rm, episode_gold, episode_terms),
                "value/td_error": float(np.mean(td_log)) if td_log else 0.0,
                "loss/value": float(np.mean(loss_log)) if loss_log else 0.0,
                "explore/epsilon": eps,
                "replay/size": len(buffer),
                "lr": optimizer.param_groups[0]["lr"],
                "perf/tokens_per_s": (run.env_steps - steps_before) / run.seconds_since_last_log(),
            }
            run.log(metrics, texts)
            if run.due():
                tensors = {f"target.{k}": v.detach().cpu().clone() for k, v in target_net.state_dict().items()}  # clone: tied weights
                tensors["explore_rng"] = gen.get_state()
                run.checkpoint(policy, optimizer, env, (ids[:4], attn[:4]), {"grad_steps": grad_steps}, tensors, buffer.save)
        summary = run.finish(policy)
    if run.should_stop():
        raise KeyboardInterrupt
    return summary
