"""SB3 policies whose networks are the pretrained LM: ``LMActorCriticPolicy`` (PPO, A2C) and
``LMQNetworkPolicy`` (DQN), their KV cache while acting, and the HF export (see ``agents.sb3``)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from gymnasium import spaces
from safetensors.torch import save_file
from stable_baselines3 import A2C, DQN, PPO
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.dqn.policies import DQNPolicy

import envs  # noqa: F401  (registers the suite)
from agents.policy import VALUE_HEAD_FILE, sample_categorical, zero_value_head
from envs.task import valid_action_mask
from pretrain import load_lm, save_lm
from pretrain.kv_cache import CachedLM
from pretrain.model import disable_dropout
from pretrain.padding import position_ids_from_mask
from rlhf.logprobs import mask_invalid_actions

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
        return mask_invalid_actions(logits, self.valid_actions), h


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
        return self.q_from(mask_invalid_actions(logits, self.valid_actions), hidden)

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
