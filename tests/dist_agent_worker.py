"""Run by ``tests/test_distributed.py``: for each MODE, one update on a fixed batch of 8 sequences,
in one process (all 8) or under a launcher (each of N processes takes its 8 / N); the main process
saves the updated weights to ``OUT_DIR/<mode>.safetensors``. A MODE is ``<peft>:<algorithm>``, e.g.
``full:ppo``, ``lora:ppo``, ``full:trpo`` (all in one launch: a launch costs seconds).

    python tests/dist_agent_worker.py MODEL_DIR OUT_DIR WORLD_SIZE MODE [MODE ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from agents.policy import LMPolicy
from agents.ppo import PPOBatch, PPOConfig, compute_gae, ppo_update, whiten
from agents.trpo import TRPOConfig, trpo_step
from pretrain.adapters import ModelOptions
from pretrain.distributed import Distributed
from rlhf.logprobs import gather_logprobs


def main(model_dir: str, out_dir: str, world_size: str, *modes: str) -> None:
    dist = Distributed("cpu")
    assert dist.world_size == int(world_size), f"launched {dist.world_size} process(es), expected {world_size}"
    for mode in modes:
        peft, algo = mode.split(":")
        one_update(dist, model_dir, Path(out_dir) / f"{mode.replace(':', '-')}.safetensors", "" if peft == "full" else peft, algo)


def one_update(dist: Distributed, model_dir: str, out: Path, peft: str, algo: str) -> None:
    torch.manual_seed(0)  # the same LoRA init in every process (DDP also broadcasts rank 0's weights)
    policy = LMPolicy.load(model_dir, "cpu", options=ModelOptions(peft=peft))
    # The batch: 8 sequences of a 3-token context and up to 4 completion tokens, of different
    # lengths (episodes that ended early), with made-up rewards; the same in every process.
    g = torch.Generator().manual_seed(1)
    n, c, t = 8, 3, 4
    ids = torch.randint(3, 11, (n, c + t), generator=g)
    mask = torch.zeros(n, t)
    for i, length in enumerate([4, 2, 3, 4, 1, 4, 3, 2]):
        mask[i, :length] = 1
    attn = torch.cat([torch.ones(n, c, dtype=torch.long), mask.long()], 1)
    rewards = torch.randn(n, t, generator=g) * mask
    with torch.no_grad():
        old_logprobs, _, old_values = policy.evaluate(ids, attn, c, entropy="none")
    rows = slice(dist.rank * n // dist.world_size, (dist.rank + 1) * n // dist.world_size)  # this process's share
    ids, attn, mask, rewards, old_logprobs, old_values = (x[rows] for x in (ids, attn, mask, rewards, old_logprobs, old_values))
    old_values = old_values * mask
    advantages, returns = compute_gae(rewards, old_values, mask, 1.0, 0.95)
    advantages = whiten(advantages, mask, dist)  # over all 8 sequences, whatever the process count
    if algo == "trpo":  # the gradient and every Fisher-vector product averaged over processes
        params = [p for p in policy.model.parameters() if p.requires_grad]
        log_probs, _ = policy.next_token_log_probs(ids, attn, c)
        logprobs = gather_logprobs(log_probs, ids[:, c:], mask.bool())
        cfg = TRPOConfig(env="TextGenToy-v0", max_kl=0.05, fvp_fraction=1.0)
        record = trpo_step(policy, params, (ids, attn, c, mask), log_probs.detach(), logprobs, advantages, cfg,
                           np.random.default_rng(0), dist)
        assert record["accepted"], record
    else:
        ppo_step(policy, dist, ids, attn, c, mask, old_logprobs, old_values, advantages, returns)
    if dist.is_main:
        save_file({k: v.detach().clone().contiguous() for k, v in policy.state_dict().items() if k != "model.lm_head.weight"}, str(out))
    dist.wait()


def ppo_step(policy, dist, ids, attn, c, mask, old_logprobs, old_values, advantages, returns) -> None:
    n = ids.shape[0] * dist.world_size
    cfg = PPOConfig(num_envs=n // dist.world_size, num_minibatches=1, update_epochs=2, target_kl=0.0, lr=1e-2, vf_coef=0.5)
    model = dist.prepare(policy)
    params = policy.trainable_parameters()
    optimizer = torch.optim.Adam(params, lr=cfg.lr, eps=1e-5)
    batch = PPOBatch(ids, attn, c, mask, old_logprobs, old_values, advantages, returns)
    ppo_update(model, optimizer, batch, cfg, np.random.default_rng(0), params, dist=dist)


if __name__ == "__main__":
    main(*sys.argv[1:])
