"""Collect one batch of complete episodes from the vector env with an LM policy (PPO, REINFORCE).

Every sub-env starts an episode at the same time; the policy samples tokens with its own KV cache
and the vector env advances all episodes in one tensor step, until every episode has ended
(EOS or ``max_new_tokens``). Sub-envs that finish early are auto-reset by the env; the steps of
those new episodes are not recorded (their actions are ignored anyway). The result is laid out
for a single teacher-forced pass over [context | response]:

    input_ids       (N, C + T)   left-padded context, then the right-padded response
    attention_mask  (N, C + T)
    response_mask   (N, T)       1 on generated tokens (the EOS that ended an episode included)
    env_rewards     (N, T)       the env's per-step rewards (RM score on the last token, plus the
                                 env's beta * log pi_ref shaping when its kl_coef > 0)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from agents.policy import LMPolicy
from envs.vector import TextGenVectorEnv


@dataclass
class Rollout:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_start: int
    response_mask: torch.Tensor
    env_rewards: torch.Tensor
    rm_scores: torch.Tensor  # (N,)
    gold_scores: np.ndarray  # (N,)
    texts: list[str]
    prompts: list[str]

    @property
    def n_tokens(self) -> int:
        return int(self.response_mask.sum())


@torch.no_grad()
def collect_rollout(env: TextGenVectorEnv, policy: LMPolicy, prompts: list[str] | None = None) -> Rollout:
    """Run one episode in every sub-env; ``prompts`` forces them (e.g. k copies each, for RLOO)."""
    env.reset(options={"prompt": prompts} if prompts is not None else None)
    context_ids, context_mask = env.batch.input_ids.clone(), env.batch.attention_mask.clone()
    n, horizon = env.num_envs, env.task.max_new_tokens
    policy.start([row[mask.bool()].tolist() for row, mask in zip(context_ids, context_mask)])
    device = env.task.device
    pad = env.batch.pad_id
    responses = torch.full((n, horizon), pad, dtype=torch.long, device=device)
    response_mask = torch.zeros((n, horizon), dtype=torch.bool, device=device)
    env_rewards = torch.zeros((n, horizon), device=device)
    rm_scores = torch.zeros(n, device=device)
    gold, texts, episode_prompts = np.zeros(n), [""] * n, [e.prompt for e in env.batch.episodes]
    done = torch.zeros(n, dtype=torch.bool, device=device)
    for t in range(horizon):
        actions = policy.sample()
        step = env.step_tensor(actions)
        live = ~done
        responses[:, t] = torch.where(live, actions.to(device), responses[:, t])
        response_mask[:, t] = live
        env_rewards[:, t] = torch.where(live, step.rewards, env_rewards[:, t])
        for i, info in step.finished.items():  # only live episodes can finish
            rm_scores[i], gold[i], texts[i] = info["rm_score"], info["gold_score"], info["text"]
        done |= step.terminated & live
        if bool(done.all()):
            break
        policy.advance(actions)
    # Drop context columns that are padding in every row.
    first = int(context_mask.any(0).nonzero()[0])
    context_ids, context_mask = context_ids[:, first:], context_mask[:, first:]
    return Rollout(
        input_ids=torch.cat([context_ids, responses], 1),
        attention_mask=torch.cat([context_mask, response_mask.long()], 1),
        response_start=context_ids.shape[1],
        response_mask=response_mask,
        env_rewards=env_rewards,
        rm_scores=rm_scores,
        gold_scores=gold,
        texts=texts,
        prompts=episode_prompts,
    )
