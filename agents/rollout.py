"""Collect one batch of complete episodes from a vector env with an LM policy (PPO, REINFORCE, eval).

Every sub-env starts an episode at the same time; the policy samples tokens with its own KV cache
and the vector env advances all episodes in one tensor step, until every episode has ended
(EOS or ``max_new_tokens``). When the env runs a reference LM (its per-step KL), the policy's
forward on each step's tokens runs beside the env's step on a CPU side thread
(``pretrain.side_thread``). Sub-envs that finish early are auto-reset by the env; the steps of
those new episodes are not recorded (their actions are ignored anyway). Only the env's tensor API
is used (``envs.api.TextVectorEnv``). The result is laid out for a single teacher-forced pass over
[context | completion]:

    input_ids        (N, C + T)   left-padded context, then the right-padded completion
    attention_mask   (N, C + T)
    completion_mask  (N, T)       1 on generated tokens (the EOS that ended an episode included)
    env_rewards      (N, T)       the env's per-step rewards (its reward on the last token, plus its
                                  beta * log pi_ref shaping when ref_logprob_coef > 0)
    ref_logprobs     (N, T)       the env's log pi_ref(a_t | s_t) of each generated token when it runs
                                  a reference LM (else None); 0 on padding
    logprobs, entropy, values     (N, T) each, with ``record_logprobs``: the policy's log pi(a_t | s_t),
                                  H(pi(. | s_t)) and V(s_t) as it acted (``LMPolicy.evaluate_next``;
                                  values None without a value head), else None; 0 on padding
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from agents.policy import LMPolicy
from envs.api import TextVectorEnv
from pretrain.side_thread import SideThread


@dataclass
class Rollout:
    input_ids: torch.Tensor  # (N, C + T) int64
    attention_mask: torch.Tensor  # (N, C + T) int64
    completion_start: int  # C: the first completion column
    completion_mask: torch.Tensor  # (N, T) bool
    env_rewards: torch.Tensor  # (N, T) float32
    ref_logprobs: torch.Tensor | None  # (N, T) float32, from the env's reference LM (None without one)
    rm_scores: torch.Tensor  # (N,) the reward of each finished episode ("rm_score")
    gold_scores: np.ndarray  # (N,)
    texts: list[str]  # the completions
    prompts: list[str]
    reward_terms: dict[str, np.ndarray]  # each term of a weighted reward, (N,) per name (empty otherwise)
    logprobs: torch.Tensor | None = None  # (N, T) float32 log pi(a_t | s_t) as the policy acted (record_logprobs)
    entropy: torch.Tensor | None = None  # (N, T) float32 H(pi(. | s_t)) in nats (record_logprobs)
    values: torch.Tensor | None = None  # (N, T) float32 V(s_t) (record_logprobs, with a value head)

    @property
    def n_tokens(self) -> int:
        return int(self.completion_mask.sum())


def acting_gives_old_logprobs(cfg) -> bool:
    """Whether an agent takes pi_old (and V) from the rollout's acting pass (``record_logprobs``)
    rather than from a teacher-forced pass of its own, for a config with ``pretrain.adapters.ModelOptions``'
    ``dtype`` and ``peft``: only when the policy computes in float32. There the two agree to float
    rounding (shipped LM, 32 x 16 tokens: 4e-6 at most); in bf16 (``--dtype bfloat16``, or QLoRA,
    whose 4-bit base computes in bf16) by bf16's (0.03 at most, 0.004 on average), which would tilt
    the ratio pi / pi_old at theta_old, so the pass stays."""
    return cfg.dtype == "float32" and cfg.peft != "qlora"


@torch.no_grad()
def collect_rollout(env: TextVectorEnv, policy: LMPolicy, prompts: list[str] | None = None, side_thread: bool = True,
                    record_logprobs: bool = False) -> Rollout:
    """Run one episode in every sub-env; ``prompts`` forces them (e.g. k copies each, for RLOO).

    ``record_logprobs``: also keep the policy's log-prob, entropy and value at each step, read off
    the logits and hidden state it samples from (``LMPolicy.evaluate_next``): pi_old for PPO and
    GRPO, which then need no teacher-forced pass of their own (32 x 16 tokens of the shipped LM:
    0.7 ms a step against ~90 ms for the pass).

    ``side_thread``: when the env runs a reference LM, step the policy beside it on a CPU side thread
    (see below); False steps them one after the other on all threads. The two draw the same
    distribution, but fp32 attention rounds differently at another thread count, so a long rollout
    can sample other tokens."""
    start = env.reset_tensor(options={"prompt": prompts} if prompts is not None else None)
    context_ids, context_mask = start.input_ids.clone(), start.attention_mask.clone()
    n, horizon, device = env.num_envs, env.max_new_tokens, env.device
    values_kept = record_logprobs and policy.value_head is not None
    policy.start([row[mask.bool()].tolist() for row, mask in zip(context_ids, context_mask)], keep_hidden=values_kept)
    completions = torch.full((n, horizon), env.pad_token_id, dtype=torch.long, device=device)
    completion_mask = torch.zeros((n, horizon), dtype=torch.bool, device=device)
    env_rewards = torch.zeros((n, horizon), device=device)
    ref_logprobs = torch.zeros((n, horizon), device=device)
    has_ref = True
    recorded_names = (("logprobs", "entropy") + (("values",) if values_kept else ())) if record_logprobs else ()
    recorded = {name: torch.zeros((n, horizon), device=device) for name in recorded_names}
    rm_scores = torch.zeros(n, device=device)
    gold, texts = np.zeros(n), [""] * n
    terms: dict[str, np.ndarray] = {}
    done = torch.zeros(n, dtype=torch.bool, device=device)
    # When the env runs a reference LM, a step is two decode forwards: the policy's on the sampled
    # tokens then runs on a side thread while the env steps, each on half of the CPU's threads
    # (pretrain.side_thread). The last step, where the reward model scores every episode still
    # running, gets all threads back (episodes that end earlier are scored on the caller's half).
    # Not for an adapter policy: its reference is its own layers with the adapter switched off.
    side = None
    if side_thread and horizon > 1 and env.reference_model is not None and not policy.is_adapted and SideThread.useful(device):
        side = SideThread()
    try:
        for t in range(horizon):
            actions = policy.sample()
            # read now: the side thread's advance replaces the logits the policy sampled from
            now = dict(zip(recorded_names, policy.evaluate_next(actions))) if record_logprobs else {}
            if side is not None and t == horizon - 1:
                side.close()
                side = None
            if side is not None:  # policy.advance runs even if this step ends every episode: a wasted forward, no harm
                with side.alongside(policy.advance, actions):
                    step = env.step_tensor(actions)
            else:
                step = env.step_tensor(actions)
            live = ~done
            completions[:, t] = torch.where(live, actions.to(device), completions[:, t])
            completion_mask[:, t] = live
            env_rewards[:, t] = torch.where(live, step.rewards, env_rewards[:, t])
            if step.ref_logprobs is None:
                has_ref = False
            else:
                ref_logprobs[:, t] = torch.where(live, step.ref_logprobs, ref_logprobs[:, t])
            for name, value in now.items():
                recorded[name][:, t] = torch.where(live, value.to(device), 0.0)
            for i, info in step.finished.items():  # only live episodes can finish
                rm_scores[i], gold[i], texts[i] = info["rm_score"], info["gold_score"], info["text"]
                for name, value in info.get("reward_terms", {}).items():
                    terms.setdefault(name, np.zeros(n))[i] = value
            done |= step.terminated & live
            if bool(done.all()):
                break
            if side is None:
                policy.advance(actions)
    finally:
        if side is not None:
            side.close()
    # Drop context columns that are padding in every row.
    first = int(context_mask.any(0).nonzero()[0])
    context_ids, context_mask = context_ids[:, first:], context_mask[:, first:]
    return Rollout(
        input_ids=torch.cat([context_ids, completions], 1),
        attention_mask=torch.cat([context_mask, completion_mask.long()], 1),
        completion_start=context_ids.shape[1],
        completion_mask=completion_mask,
        env_rewards=env_rewards,
        ref_logprobs=ref_logprobs if has_ref else None,
        rm_scores=rm_scores,
        gold_scores=gold,
        texts=texts,
        prompts=start.prompts,
        reward_terms=terms,
        logprobs=recorded.get("logprobs"),
        entropy=recorded.get("entropy"),
        values=recorded.get("values"),
    )
