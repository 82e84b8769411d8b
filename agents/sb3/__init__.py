"""Stable-Baselines3 agents (PPO, A2C, DQN) whose networks are the pretrained LM.

    import gymnasium as gym, envs
    from stable_baselines3 import PPO
    from agents.sb3 import LMActorCriticPolicy

    beta = 0.05
    model = PPO(LMActorCriticPolicy, gym.make("TextGen-v0", ref_logprob_coef=beta), policy_kwargs={"model": "default"})
    model.learn(4096, callback=TextGenCallback(kl_coef=beta))   # + reward -= beta log pi: the KL penalty

or ``textgym train sb3-ppo | sb3-a2c | sb3-dqn``. What this package adds to SB3, and nothing more, split
the way SB3 is (``policies.py``, ``vec_env.py``, ``callbacks.py``, ``train.py``):

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
* ``SB3VecEnv``: an SB3 ``VecEnv`` over a batched vector env (``envs.api``, e.g. ``TextGenVectorEnv``) in
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

from agents.sb3.callbacks import CheckpointCallback, TextGenCallback, load_sb3_state, save_sb3_state
from agents.sb3.policies import (
    ALGORITHMS,
    POLICIES,
    LMActorCriticPolicy,
    LMQNetwork,
    LMQNetworkPolicy,
    ObservationCache,
    acting_net,
    export_hf,
    load_policy_lm,
    make_sb3_agent,
    policy_lm,
    split_obs,
)
from agents.sb3.train import SB3A2CConfig, SB3ActorCriticConfig, SB3Config, SB3DQNConfig, SB3PPOConfig, sb3_logger, train
from agents.sb3.vec_env import SB3VecEnv, make_sb3_vec_env

__all__ = [
    "ALGORITHMS", "POLICIES", "CheckpointCallback", "LMActorCriticPolicy", "LMQNetwork", "LMQNetworkPolicy", "ObservationCache",
    "SB3A2CConfig", "SB3ActorCriticConfig", "SB3Config", "SB3DQNConfig", "SB3PPOConfig", "SB3VecEnv", "TextGenCallback",
    "acting_net", "export_hf", "load_policy_lm", "load_sb3_state", "make_sb3_agent", "make_sb3_vec_env", "policy_lm",
    "save_sb3_state", "sb3_logger", "split_obs", "train",
]
