"""Stable-Baselines3 agents (PPO, A2C, DQN) whose networks are the pretrained LM.

    import gymnasium as gym, envs
    from stable_baselines3 import PPO
    from agents.sb3 import LMActorCriticPolicy

    beta = 0.05
    model = PPO(LMActorCriticPolicy, gym.make("TextGen-v0", ref_logprob_coef=beta), policy_kwargs={"model": "default"})
    model.learn(4096, callback=TextGenCallback(kl_coef=beta))   # + reward -= beta log pi: the KL penalty

or ``textgym train sb3-ppo | sb3-a2c | sb3-dqn``. What this file adds to SB3, and nothing more:

* ``LMActorCriticPolicy`` (PPO, A2C): the action distribution is the LM's own next-token
  categorical (its LM head's logits, invalid tokens at -inf), not a fresh linear layer over
  features, so training starts from the pretrained LM; the value is a zero-initialised
  ``Linear(hidden, 1)`` on the last layer's hidden state of the newest token (shared backbone),
  scaled by ``value_scale``: V = s * Linear(h). SB3 has one learning rate for all parameters, and
  the LM's (~1e-5) leaves a fresh head unable to follow returns of a few nats; under Adam/RMSprop
  the factor s multiplies the head's effective learning rate by s.
* ``LMQNetworkPolicy`` (DQN): Q(s, a) = V(s) + T log pi(a | s) with pi the LM's next-token softmax
  and V a zero-initialised head (``q_form="log_policy"``, as in ``agents.dqn``; or the raw logits,
  ``q_form="logits"``), so the Boltzmann policy softmax(Q / T) starts as the pretrained LM. SB3's own
  replay buffer and target network.
  Exploration: SB3's epsilon-greedy samples uniformly from the whole vocabulary (only valid tokens,
  see ``envs.text_gen.TokenActions``), which on a real LM mostly writes noise; the setting that
  works is ``exploration_initial_eps = exploration_final_eps = 0`` with Boltzmann sampling from
  softmax(Q / temperature) (``policy_kwargs={"temperature": 1.0}``), what ``textgym train
  sb3-dqn`` uses. ``deterministic=True`` (evaluation) is greedy.
* ``SB3VecEnv``: an SB3 ``VecEnv`` over the batched ``envs.vector.TextGenVectorEnv`` in
  ``same_step`` autoreset mode, so an SB3 rollout advances all envs in one tensor step (not a
  ``DummyVecEnv`` looping over N envs), with SB3's ``terminal_observation`` convention.
* ``TextGenCallback``: ``reward/rm``, ``reward/gold``, ``kl/ref`` and sample texts in SB3's logger;
  with ``kl_coef=beta`` it also charges the policy's own log-prob, see below.

KL regularisation. The env pays beta * log pi_ref(a_t | s_t) per token (``ref_logprob_coef=beta``; default
beta = 0.05, the custom PPO's). Two ways to supply the missing -beta log pi term of the per-token
KL penalty r_t = RM [t = T] - beta (log pi(a_t|s_t) - log pi_ref(a_t|s_t)):

* ``kl_route="reward"`` (default): ``TextGenCallback(kl_coef=beta)`` subtracts beta log pi_old(a_t|s_t)
  (the rollout's log-prob) from each reward before SB3 stores it, so returns and advantages carry
  the exact KL-penalised reward, as in Ziegler et al. and ``agents.ppo``; ``ent_coef = 0``.
* ``kl_route="entropy"``: ``ent_coef = beta``, as E_pi[-beta log pi] = beta H(pi). Exact for one
  token, but SB3's entropy bonus is a loss on the current state only, not part of the return, so an
  action is never charged for the entropy it removes from *later* states: the policy drifts to
  low-entropy continuations that the reference likes (measured on TextGen-v0, 8,192 steps: entropy
  5.2 -> 3.7 nats, KL 4.7, reward-model score unchanged). It also needs ``normalize_advantage=False``
  (normalisation rescales the shaping but not the bonus; with it, entropy grew 5.2 -> 6.4 instead).

Caching. SB3 hands the policy whole observations (the left-padded context) every step, so a plain
policy re-encodes the full context for every generated token. While *acting* (no gradients),
our policies keep a KV cache (``pretrain.kv_cache.CachedLM``) and check each row of the new
observation against the last one: a row that equals the previous row shifted left by one token
continues its episode and costs a (B, 1) forward; any other row (a reset, another env) is
re-encoded. Any optimizer step or weight load drops the cache, since the cached keys/values were
computed by the old weights. Learning (``evaluate_actions``, the Q-network's TD targets) runs on
SB3's stored transitions, one full-context forward per transition: that is SB3's design and the
reason it spends more compute per token than ``agents.ppo``, which re-scores each episode in one
pass (numbers: ``benchmarks/train_throughput.py``).

Saving: ``model.save`` / ``PPO.load`` are SB3's (a zip with cloudpickled settings: load only
files you trust); ``export_hf`` writes the policy LM as an HF dir for ``textgym eval``.
"""

from __future__ import annotations

import copy
import csv
import json
import sys
import time
import warnings
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from gymnasium import spaces
from safetensors.torch import load_model, save_file, save_model
from stable_baselines3 import A2C, DQN, PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import CSVOutputFormat, TensorBoardOutputFormat, configure
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.common.vec_env import VecEnv, VecMonitor
from stable_baselines3.dqn.policies import DQNPolicy
from torch.utils.tensorboard import SummaryWriter
from tqdm import TqdmExperimentalWarning

import envs  # noqa: F401  (registers the suite)
from agents.policy import VALUE_HEAD_FILE, sample_categorical, zero_value_head
from agents.run import make_env, make_policy_model
from envs.task import valid_action_mask
from envs.vector import TextGenVectorEnv
from pretrain import load_lm, save_lm
from pretrain.checkpoint import load_training_state, save_training_state, write_text_atomic
from pretrain.config import hparam, require_non_negative, require_positive, require_unit_interval, validate_fields
from pretrain.kv_cache import CachedLM
from pretrain.model import disable_dropout, resolve_device
from pretrain.padding import position_ids_from_mask
from pretrain.run_dir import RunDir, StopOnInterrupt, check_same_config, resolve_out

ALGORITHMS = {"ppo": PPO, "a2c": A2C, "dqn": DQN}


# -- the LM inside an SB3 policy -------------------------------------------------------------------
def load_policy_lm(model, tokenizer, action_space: spaces.Space):
    """(model, tokenizer) from a dir / "default" / an instance, checked against the env's actions."""
    if not isinstance(action_space, spaces.Discrete):
        raise ValueError(f"the LM policies need a Discrete token action space, got {action_space}")
    if isinstance(model, (str, Path)):
        model, tokenizer = load_lm(model)
    elif tokenizer is None:
        raise ValueError("pass tokenizer= with a model instance (its special tokens decide the valid actions)")
    n_logits = model.get_output_embeddings().weight.shape[0]
    if n_logits != action_space.n:
        raise ValueError(
            f"the policy model has {n_logits} logits but the env has {action_space.n} actions: "
            "the model's vocabulary must match the env's action space (use the env's own model or tokenizer)"
        )
    return model, tokenizer


def split_obs(obs) -> tuple[torch.Tensor, torch.Tensor]:
    """SB3 observations (dict of tensors; its buffers store them as float) -> int64 ids and mask.

    Raises ``ValueError`` naming the key for values that are not token ids / a 0-1 mask (e.g. after
    SB3's ``VecNormalize``, which normalises observations by default).
    """
    if not isinstance(obs, dict) or set(obs) != {"input_ids", "attention_mask"}:
        raise ValueError(f"expected a TextGen observation dict with input_ids and attention_mask, got {type(obs).__name__}")
    for key in ("input_ids", "attention_mask"):
        value = obs[key]
        if value.is_floating_point() and not torch.equal(value, value.round()):
            bad = value[value != value.round()][0].item()
            raise ValueError(f"observation {key!r} holds {bad:.4g}, not a token id: the LM policies need the raw observation "
                             "(with VecNormalize, normalise rewards only: VecNormalize(venv, norm_obs=False))")
    ids, mask = obs["input_ids"].long(), obs["attention_mask"].long()
    if ((mask != 0) & (mask != 1)).any():
        raise ValueError(f"observation 'attention_mask' holds {mask[(mask != 0) & (mask != 1)][0].item()}, not 0 or 1")
    return ids, mask


class ObservationCache:
    """KV-cached next-token logits (and hidden states) for a stream of full left-padded observations."""

    def __init__(self, model, pad_token_id: int, keep_hidden: bool):
        self.model, self.pad_token_id, self.keep_hidden = model, pad_token_id, keep_hidden
        self.invalidate()

    def invalidate(self) -> None:
        self.cache: CachedLM | None = None
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch = ids.shape[0]
        if self.cache is None or self.last[0].shape != ids.shape:  # first call, or another env's stream
            self.cache = CachedLM(self.model, batch, self.pad_token_id, keep_hidden=self.keep_hidden)
            fresh = torch.ones(batch, dtype=torch.bool, device=ids.device)
        else:
            prev_ids, prev_mask = self.last
            # Row continues its episode iff it is the previous row shifted left by one new token.
            continued = (
                (mask[:, -1] == 1) & (prev_mask[:, 0] == 0)
                & (ids[:, :-1] == prev_ids[:, 1:]).all(1) & (mask[:, :-1] == prev_mask[:, 1:]).all(1)
            )
            fresh = ~continued
            if continued.any():  # one (B, 1) step; rows being re-encoded below are overwritten
                self.cache.step(ids[:, -1])
        if fresh.any():
            rows = fresh.nonzero().flatten().tolist()
            self.cache.reset_rows(rows, [ids[r][mask[r].bool()].tolist() for r in rows])
        self.last = (ids.clone(), mask.clone())
        return self.cache.next_logits, self.cache.next_hidden


class _LMModule:
    """What both LM policies share: the LM, its valid-action mask, full and cached next-token passes."""

    def _init_lm(self, model, tokenizer, action_space, keep_hidden: bool, use_cache: bool) -> None:
        # Dropout off: the rollout's log-probs and the update's must come from the same network.
        self.lm, self.tokenizer = disable_dropout(model), tokenizer
        self.register_buffer("valid_actions", valid_action_mask(tokenizer, action_space.n, "cpu"), persistent=False)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.use_cache = use_cache
        self.acting = ObservationCache(model, pad, keep_hidden)
        self.last_log_policy: torch.Tensor | None = None  # (B, V) log pi(. | s) of the last acting step

    def load_state_dict(self, *args, **kwargs):
        self.acting.invalidate()
        return super().load_state_dict(*args, **kwargs)

    def full_pass(self, ids: torch.Tensor, mask: torch.Tensor, hidden: bool):
        """Next-token logits (B, V) and optionally last hidden state (B, H) at the newest token."""
        out = self.lm(
            input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
            output_hidden_states=hidden, logits_to_keep=1,
        )
        return out.logits[:, -1].float(), out.hidden_states[-1][:, -1].float() if hidden else None

    def next_token(self, obs, hidden: bool):
        ids, mask = split_obs(obs)
        if self.use_cache and not torch.is_grad_enabled():
            logits, h = self.acting(ids, mask)
        else:
            logits, h = self.full_pass(ids, mask, hidden)
        return logits.masked_fill(~self.valid_actions, float("-inf")), h


# -- PPO / A2C --------------------------------------------------------------------------------------
class LMActorCriticPolicy(_LMModule, ActorCriticPolicy):
    """SB3 actor-critic policy: pi(a|s) = the LM's next-token softmax, V(s) = Linear(hidden state).

    ``policy_kwargs``: ``model`` ("default", an HF causal-LM dir, or an instance with ``tokenizer``),
    ``value_scale`` (V = s * Linear(h), default 10), ``use_cache`` (KV cache while acting, default
    True). SB3's ``net_arch``/``ortho_init`` do not apply.
    """

    def __init__(self, observation_space, action_space, lr_schedule, model="default", tokenizer=None,
                 value_scale: float = 10.0, use_cache: bool = True, **kwargs):
        if value_scale <= 0:
            raise ValueError(f"value_scale must be positive, got {value_scale}")
        # Plain attributes set before nn.Module.__init__ (a model instance must not register here).
        object.__setattr__(self, "_model_source", model)
        self._tokenizer_arg, self._use_cache, self.value_scale = tokenizer, use_cache, value_scale
        kwargs["ortho_init"] = False  # the LM is pretrained; the value head is zero-initialised below
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)

    def _build(self, lr_schedule) -> None:
        model, tokenizer = load_policy_lm(self._model_source, self._tokenizer_arg, self.action_space)
        self._init_lm(model, tokenizer, self.action_space, keep_hidden=True, use_cache=self._use_cache)
        self.value_net = zero_value_head(model)
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)
        self.optimizer.register_step_post_hook(lambda *_: self.acting.invalidate())

    def _get_constructor_parameters(self) -> dict:
        data = super()._get_constructor_parameters()
        data.update(model=self._model_source, tokenizer=self._tokenizer_arg, value_scale=self.value_scale,
                    use_cache=self._use_cache)
        return data

    def forward(self, obs, deterministic: bool = False):
        logits, hidden = self.next_token(obs, hidden=True)
        distribution = self.action_dist.proba_distribution(action_logits=logits)
        actions = distribution.get_actions(deterministic=deterministic)
        self.last_log_policy = distribution.distribution.logits  # torch's Categorical keeps them normalised
        return actions, self.value(hidden), distribution.log_prob(actions)

    def evaluate_actions(self, obs, actions: torch.Tensor):
        logits, hidden = self.next_token(obs, hidden=True)
        distribution = self.action_dist.proba_distribution(action_logits=logits)
        return self.value(hidden), distribution.log_prob(actions), distribution.entropy()

    def get_distribution(self, obs):
        logits, _ = self.next_token(obs, hidden=False)
        return self.action_dist.proba_distribution(action_logits=logits)

    def predict_values(self, obs) -> torch.Tensor:
        ids, mask = split_obs(obs)  # bootstrap values: a full pass, so the acting cache stays in step
        return self.value(self.full_pass(ids, mask, hidden=True)[1])

    def value(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.value_scale * self.value_net(hidden)


# -- DQN --------------------------------------------------------------------------------------------
class LMQNetwork(_LMModule, BasePolicy):
    """Q(s, .) over valid tokens (-inf elsewhere): V(s) + T log pi(. | s), or the LM's raw logits."""

    def __init__(self, observation_space, action_space, model, tokenizer, temperature: float, use_cache: bool, q_form: str,
                 value_scale: float):
        super().__init__(observation_space, action_space)
        self.q_form, self.temperature, self.value_scale = q_form, temperature, value_scale
        self._init_lm(model, tokenizer, action_space, keep_hidden=q_form == "log_policy", use_cache=use_cache)
        if q_form == "log_policy":
            self.value_net = zero_value_head(model)

    def q_from(self, logits: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor:
        if self.q_form == "logits":
            return logits
        return self.value_scale * self.value_net(hidden) + self.temperature * F.log_softmax(logits, dim=-1)

    def forward(self, obs) -> torch.Tensor:
        ids, mask = split_obs(obs)  # TD targets and updates: full passes over replayed transitions
        logits, hidden = self.full_pass(ids, mask, hidden=self.q_form == "log_policy")
        return self.q_from(logits.masked_fill(~self.valid_actions, float("-inf")), hidden)

    def _predict(self, obs, deterministic: bool = True) -> torch.Tensor:
        q = self.q_from(*self.next_token(obs, hidden=self.q_form == "log_policy"))
        if deterministic:
            return q.argmax(dim=1)
        log_policy = F.log_softmax(q / self.temperature, dim=-1)  # Boltzmann exploration
        self.last_log_policy = log_policy
        return sample_categorical(log_policy.exp())


class LMQNetworkPolicy(DQNPolicy):
    """SB3 DQN policy whose Q-network (and target network) is the LM; ``policy_kwargs``: ``model``,
    ``tokenizer`` (with an instance), ``temperature`` T (Boltzmann exploration), ``q_form``, ``value_scale``
    (V = s * Linear(h) in the log-policy form, as in ``LMActorCriticPolicy``), ``use_cache``."""

    def __init__(self, observation_space, action_space, lr_schedule, model="default", tokenizer=None,
                 temperature: float = 1.0, q_form: str = "log_policy", value_scale: float = 10.0, use_cache: bool = True,
                 **kwargs):
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if q_form not in ("log_policy", "logits"):
            raise ValueError(f"unknown q_form {q_form!r}; expected 'log_policy' or 'logits'")
        object.__setattr__(self, "_model_source", model)
        self._tokenizer_arg, self._temperature, self._use_cache, self._q_form = tokenizer, temperature, use_cache, q_form
        self._value_scale = value_scale
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)

    def make_q_net(self) -> LMQNetwork:
        model, tokenizer = load_policy_lm(self._model_source, self._tokenizer_arg, self.action_space)
        if hasattr(self, "q_net") and not isinstance(self._model_source, (str, Path)):
            model = copy.deepcopy(model)  # the target network gets its own copy of an instance
        return LMQNetwork(self.observation_space, self.action_space, model, tokenizer, self._temperature, self._use_cache,
                          self._q_form, self._value_scale).to(self.device)

    def _build(self, lr_schedule) -> None:
        super()._build(lr_schedule)
        self.optimizer.register_step_post_hook(lambda *_: self.q_net.acting.invalidate())

    def _get_constructor_parameters(self) -> dict:
        data = super()._get_constructor_parameters()
        data.update(model=self._model_source, tokenizer=self._tokenizer_arg, temperature=self._temperature,
                    q_form=self._q_form, value_scale=self._value_scale, use_cache=self._use_cache)
        return data

    def load_state_dict(self, *args, **kwargs):
        self.q_net.acting.invalidate()  # new weights: cached keys/values are stale
        return super().load_state_dict(*args, **kwargs)


POLICIES = {"ppo": LMActorCriticPolicy, "a2c": LMActorCriticPolicy, "dqn": LMQNetworkPolicy}


def make_sb3_agent(algorithm, env, model="default", **kwargs):
    """``PPO``/``A2C``/``DQN`` (class or name) with the matching LM policy over ``model``."""
    name = algorithm.lower() if isinstance(algorithm, str) else next((k for k, v in ALGORITHMS.items() if v is algorithm), None)
    if name not in ALGORITHMS:
        label = algorithm if isinstance(algorithm, str) else getattr(algorithm, "__name__", repr(algorithm))
        raise ValueError(f"SB3 algorithm {label!r} is not supported with the LM policies; supported: {', '.join(ALGORITHMS)}")
    policy_kwargs = {"model": model, **kwargs.pop("policy_kwargs", {})}
    if name == "dqn":
        kwargs.setdefault("exploration_initial_eps", 0.0)  # Boltzmann exploration instead (see above)
        kwargs.setdefault("exploration_final_eps", 0.0)
    return ALGORITHMS[name](POLICIES[name], env, policy_kwargs=policy_kwargs, **kwargs)


def acting_net(agent) -> LMActorCriticPolicy | LMQNetwork:
    """The LM module an SB3 agent acts with (the Q-network for DQN)."""
    return agent.policy.q_net if isinstance(agent.policy, LMQNetworkPolicy) else agent.policy


def policy_lm(agent):
    """The (model, tokenizer) an SB3 agent acts with."""
    net = acting_net(agent)
    return net.lm, net.tokenizer


def export_hf(agent, path: str | Path) -> Path:
    """The agent's policy LM as an HF dir (model + tokenizer; plus the value head for actor-critics)."""
    model, tokenizer = policy_lm(agent)
    path = save_lm(model, tokenizer, path)
    if isinstance(agent.policy, LMActorCriticPolicy):
        # Stored as the plain Linear that agents.policy.LMPolicy reads: the scale folded in.
        head = {k: (agent.policy.value_scale * v).detach().cpu().contiguous() for k, v in agent.policy.value_net.state_dict().items()}
        save_file(head, str(path / VALUE_HEAD_FILE))
    return path


# -- the batched vector env as an SB3 VecEnv ---------------------------------------------------------
class SB3VecEnv(VecEnv):
    """SB3 ``VecEnv`` over a ``TextGenVectorEnv(autoreset_mode="same_step")``: one tensor step for all envs.

    ``infos[i]`` carries ``ref_logprob`` every step (with a reference loaded) and, when episode i
    ends, ``rm_score``, ``gold_score``, ``text``, ``prompt`` and ``terminal_observation``.
    """

    def __init__(self, env: TextGenVectorEnv):
        if env.metadata["autoreset_mode"].name != "SAME_STEP":
            raise ValueError("SB3VecEnv needs the vector env in same-step autoreset mode: "
                             "TextGenVectorEnv(..., autoreset_mode='same_step')")
        self.env = env
        super().__init__(env.num_envs, env.single_observation_space, env.single_action_space)

    def reset(self):
        seeds = self._seeds if any(s is not None for s in self._seeds) else None
        options = None
        if any(self._options):
            prompts = [o.get("prompt") for o in self._options]
            if not all(prompts) or any(set(o) - {"prompt"} for o in self._options):
                raise ValueError(f"SB3VecEnv reset options must give every env a 'prompt' and nothing else, got {self._options}")
            options = {"prompt": prompts}
        obs, _ = self.env.reset(seed=seeds, options=options)
        self._reset_seeds()
        self._reset_options()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions).reshape(self.num_envs)

    def step_wait(self):
        if self._actions.dtype.kind not in "iu":
            raise ValueError(f"actions must be integer token ids, got dtype {self._actions.dtype}")
        out = self.env.step_tensor(torch.as_tensor(self._actions))
        infos = [{"TimeLimit.truncated": False} for _ in range(self.num_envs)]
        if out.ref_logprobs is not None:
            for info, lp in zip(infos, out.ref_logprobs.tolist()):
                info["ref_logprob"] = lp
        dones = out.terminated.cpu().numpy()
        if dones.any():
            final_ids, final_mask = out.final_input_ids.cpu().numpy(), out.final_attention_mask.cpu().numpy()
            for i in np.flatnonzero(dones):
                infos[i].update(out.finished[int(i)])
                infos[i]["terminal_observation"] = {"input_ids": final_ids[i].copy(), "attention_mask": final_mask[i].copy()}
        obs = {"input_ids": out.input_ids.cpu().numpy().copy(), "attention_mask": out.attention_mask.cpu().numpy().copy()}
        return obs, out.rewards.cpu().numpy().astype(np.float32), dones, infos

    def close(self) -> None:
        self.env.close()

    def get_attr(self, attr_name, indices=None):
        return [getattr(self.env, attr_name)] * len(list(self._get_indices(indices)))

    def set_attr(self, attr_name, value, indices=None) -> None:
        raise AttributeError(f"the {self.num_envs} sub-envs share one batched env; set {attr_name!r} on SB3VecEnv.env")

    def env_method(self, method_name, *method_args, indices=None, **method_kwargs):
        if method_name == "action_masks":  # sb3-contrib's MaskablePPO asks each sub-env
            masks = self.env.action_masks()
            return [masks[i] for i in self._get_indices(indices)]
        raise AttributeError(f"SB3VecEnv does not forward {method_name!r} to sub-envs (they are rows of one batched env)")

    def env_is_wrapped(self, wrapper_class, indices=None):
        return [False] * len(list(self._get_indices(indices)))

    def get_images(self):
        return [None] * self.num_envs


def make_sb3_vec_env(env_id: str = "TextGen-v0", num_envs: int = 16, seed: int = 0, device="cpu", **env_kwargs) -> VecMonitor:
    """The registered env's batched version as an SB3 VecEnv, with SB3's episode statistics."""
    vector = make_env(env_id, num_envs, device, seed, autoreset_mode="same_step", **env_kwargs)
    venv = SB3VecEnv(vector)
    venv.seed(seed)
    return VecMonitor(venv)


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
                self.texts.append(info["prompt"] + " ->" + info["text"])
            if self.kl_ok[i]:
                self.episodes["kl"].append(self.kl[i])
            self.kl[i], self.kl_ok[i] = 0.0, True
        return True

    def _on_rollout_end(self) -> None:
        self.rollouts += 1
        for key, tag in (("rm_score", "reward/rm"), ("gold_score", "reward/gold"), ("kl", "kl/ref")):
            if self.episodes[key]:
                self.logger.record(tag, float(np.mean(self.episodes[key])))
        if self.texts and self.rollouts % self.sample_every == 0:
            self.logger.record("samples", "\n\n".join(f"    {t}" for t in self.texts), exclude=("stdout", "log", "json", "csv"))

    def summary(self) -> dict:
        return {f"final_{k}": float(np.mean(v)) for k, v in self.episodes.items() if v}


# -- textgym train sb3-* ----------------------------------------------------------------------------
@dataclass
class SB3Config:
    """Shared settings of the SB3 agents (defaults: the embedded default task)."""

    env: str = hparam("TextGen-v0", "registered env id (TextGen-v0, TextGenFewShot-v0, TextGenInstruct-v0, TextGenToy-v0)")
    model: str = hparam("auto", "initial policy: 'auto' (shipped LM; a tiny LM for the toy env), 'default' or an HF dir")
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

    env: str = hparam("TextGenToy-v0", "registered env id")
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
    venv = make_sb3_vec_env(cfg.env, cfg.num_envs, cfg.seed, device, max_new_tokens=cfg.max_new_tokens, ref_logprob_coef=cfg.kl_coef)
    model_dir = make_policy_model(cfg.model, venv.unwrapped.env, out, cfg.seed)
    agent = make_sb3_agent(algorithm, venv, model=model_dir, learning_rate=cfg.lr, gamma=cfg.gamma, seed=cfg.seed,
                           device=device, **cfg.algorithm_kwargs())
    if checkpoint is not None:
        load_sb3_state(agent, checkpoint)
    agent.set_logger(sb3_logger(out, agent.num_timesteps))
    if checkpoint is None:
        agent.logger.record("hparams", "\n".join(f"    {k} = {v!r}" for k, v in asdict(cfg).items()),
                            exclude=("stdout", "log", "json", "csv"))
    callback = TextGenCallback(cfg.sample_every, kl_coef=cfg.callback_kl_coef())
    t0 = time.perf_counter()
    warnings.filterwarnings("ignore", category=TqdmExperimentalWarning)  # SB3's rich progress bar
    try:
        with StopOnInterrupt() as interrupt:
            checkpoints = CheckpointCallback(run_dir, cfg.checkpoint_every, asdict(cfg), interrupt)
            remaining = cfg.total_steps - agent.num_timesteps
            if remaining > 0:
                agent.learn(remaining, callback=[callback, checkpoints], progress_bar=True, reset_num_timesteps=checkpoint is None)
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


def sb3_logger(out: Path, num_timesteps: int):
    """SB3's TensorBoard + CSV logger in ``out``; resumed at ``num_timesteps``, TensorBoard drops the
    later steps of the interrupted session and progress.csv keeps its rows up to the checkpoint."""
    kept: list[list[str]] = []
    if num_timesteps and (out / "progress.csv").is_file():
        rows = list(csv.reader((out / "progress.csv").read_text().splitlines()))
        if rows and "time/total_timesteps" in rows[0]:
            column = rows[0].index("time/total_timesteps")
            kept = rows[:1] + [r for r in rows[1:] if r[column] and float(r[column]) <= num_timesteps]
    logger = configure(str(out), ["csv"] if num_timesteps else ["tensorboard", "csv"])  # progress.csv starts anew
    if num_timesteps:
        tensorboard = TensorBoardOutputFormat(str(out))
        tensorboard.writer.close()  # SB3's own writer cannot purge: ours drops the steps after the checkpoint
        tensorboard.writer = SummaryWriter(str(out), purge_step=num_timesteps + 1)
        logger.output_formats.append(tensorboard)
    if kept:
        table = next(f for f in logger.output_formats if isinstance(f, CSVOutputFormat))
        csv.writer(table.file, lineterminator="\n").writerows(kept)
        table.file.flush()
        table.keys = kept[0]
    return logger
