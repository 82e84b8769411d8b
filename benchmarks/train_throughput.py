"""Agent training throughput on the embedded default vs the naive loop a user would write.

    python benchmarks/train_throughput.py [--device cpu|cuda] [--updates 16] [--batch 32]

Prints one JSON object: updates/s and generated tokens/s of our PPO and REINFORCE (RLOO) on
TextGen-v0, of Stable-Baselines3 PPO with ``agents.sb3.LMActorCriticPolicy`` on the same env and
budget (one rollout of num_envs x max_new_tokens transitions per update, the same epochs and
minibatch count, the same per-token KL penalty charged in the reward), plus SB3's acting
throughput with and without the policy's KV cache, and of a naive KL-regularised REINFORCE written
with plain transformers (``model.generate`` for the rollout, decode, ``RewardModel.score`` on the
texts, one forward for the log-probs, one reference forward for the per-token KL penalty
beta (log pi - log pi_ref), beta = 0.05 as ours, loss, step) at the same batch size, length and
learning rate, with the ratios (``--no-sb3`` skips the slow SB3 part). Gold gain per minute
(the mean training-episode gold score of the last quarter of updates minus the first quarter's,
divided by the run's wall time) is reported for each as well.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time

import numpy as np
import torch
from stable_baselines3.common.logger import configure

from agents import ppo, reinforce
from agents.sb3 import TextGenCallback, make_sb3_agent, make_sb3_vec_env
from pretrain import load_lm
from pretrain.model import resolve_device
from pretrain.sample import generate_ids
from rlhf.gold import VaderGold
from rlhf.reward_model import RewardModel


def gold_gain(golds: list[float]) -> float:
    """Mean training-episode gold of the last quarter of updates minus the first quarter's."""
    k = max(1, len(golds) // 4)
    return float(np.mean(golds[-k:]) - np.mean(golds[:k]))


def naive_reinforce(updates: int, batch: int, max_new_tokens: int, lr: float, device, kl_coef: float = 0.05) -> dict:
    """What a user writes without the library's env: generate, score texts, one policy-gradient step."""
    model, tokenizer = load_lm("default", device=device)
    reference, _ = load_lm("default", device=device)
    reference.requires_grad_(False)
    rm = RewardModel.load("default", device=device)
    gold = VaderGold()
    from pretrain.corpus import load_prompts

    prompts = [p.text for p in load_prompts("train")]
    rng = np.random.default_rng(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    golds, tokens = [], 0
    start = time.perf_counter()
    for update in range(updates):
        batch_prompts = [prompts[i] for i in rng.choice(len(prompts), batch)]
        model.eval()
        out = generate_ids(model, tokenizer, batch_prompts, max_new_tokens, seed=update)
        texts = tokenizer.batch_decode(out["input_ids"][:, -max_new_tokens:], skip_special_tokens=True)
        rewards = torch.tensor(rm.score(batch_prompts, texts), device=device)
        golds.append(float(np.mean(gold([p + t for p, t in zip(batch_prompts, texts)]))))
        model.train()
        logits = model(input_ids=out["input_ids"], attention_mask=out["attention_mask"]).logits[:, -max_new_tokens - 1 : -1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, out["input_ids"][:, -max_new_tokens:, None]).squeeze(-1)
        mask = out["completion_mask"][:, -max_new_tokens:].float()
        with torch.no_grad():
            ref_logits = reference(input_ids=out["input_ids"], attention_mask=out["attention_mask"]).logits[:, -max_new_tokens - 1 : -1]
            ref_logp = torch.log_softmax(ref_logits.float(), -1).gather(-1, out["input_ids"][:, -max_new_tokens:, None]).squeeze(-1)
        returns = rewards - kl_coef * ((logp.detach() - ref_logp) * mask).sum(1)
        loss = -((returns - returns.mean()) * (logp * mask).sum(1)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        tokens += int(mask.sum())
    seconds = time.perf_counter() - start
    return {"updates_per_s": updates / seconds, "tokens_per_s": tokens / seconds,
            "gold_gain_per_min": gold_gain(golds) / (seconds / 60)}


def ours(module, cfg_cls, updates, batch, max_new_tokens, lr, device, **kw) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cfg = cfg_cls(num_envs=batch, max_new_tokens=max_new_tokens, total_steps=updates * batch * max_new_tokens,
                      lr=lr, device=str(device), out=out, **kw)
        start = time.perf_counter()
        module.train(cfg)
        seconds = time.perf_counter() - start
        rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    return {"updates_per_s": len(rows) / seconds, "tokens_per_s": rows[-1]["env_steps"] / seconds,
            "gold_gain_per_min": gold_gain([r["reward/gold"] for r in rows]) / (seconds / 60)}


def sb3_ppo(updates, batch, max_new_tokens, lr, device, epochs=4, minibatches=4, kl_coef=0.05) -> dict:
    with tempfile.TemporaryDirectory() as out:
        env = make_sb3_vec_env("TextGen-v0", batch, seed=0, device=device, max_new_tokens=max_new_tokens, kl_coef=kl_coef)
        agent = make_sb3_agent("ppo", env, n_steps=max_new_tokens, batch_size=batch * max_new_tokens // minibatches,
                               n_epochs=epochs, learning_rate=lr, gamma=1.0, vf_coef=0.1, target_kl=0.05, seed=0,
                               device=device)
        agent.set_logger(configure(out, ["csv"]))
        start = time.perf_counter()
        agent.learn(updates * batch * max_new_tokens, callback=TextGenCallback(kl_coef=kl_coef))
        seconds = time.perf_counter() - start
        rows = [r for r in csv.DictReader(open(f"{out}/progress.csv")) if r.get("reward/gold")]
    gold = [float(r["reward/gold"]) for r in rows]
    return {"updates_per_s": len(rows) / seconds, "tokens_per_s": agent.num_timesteps / seconds,
            "gold_gain_per_min": gold_gain(gold) / (seconds / 60)}


def sb3_acting(batch, max_new_tokens, device, steps=128) -> dict:
    """Tokens/s of SB3-style acting (policy forward on the full observation + env step), cache on/off."""
    result = {}
    for use_cache in (True, False):
        env = make_sb3_vec_env("TextGen-v0", batch, seed=0, device=device, max_new_tokens=max_new_tokens)
        agent = make_sb3_agent("ppo", env, n_steps=max_new_tokens, batch_size=batch, seed=0, device=device,
                               policy_kwargs={"use_cache": use_cache})
        obs = env.reset()
        start = time.perf_counter()
        for _ in range(steps):
            with torch.no_grad():
                actions, _, _ = agent.policy(agent.policy.obs_to_tensor(obs)[0])
            obs, _, _, _ = env.step(actions.cpu().numpy())
        result["cached" if use_cache else "uncached"] = steps * batch / (time.perf_counter() - start)
    return {"acting_tokens_per_s": result, "cache_speedup": round(result["cached"] / result["uncached"], 3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--updates", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--no-sb3", action="store_true", help="skip SB3 PPO (its updates take minutes on a CPU)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    common = (args.updates, args.batch, args.max_new_tokens, args.lr, device)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
              "batch": args.batch, "max_new_tokens": args.max_new_tokens, "updates": args.updates}
    result["naive_reinforce"] = naive_reinforce(*common)
    result["ppo"] = ours(ppo, ppo.PPOConfig, *common)
    result["reinforce_rloo"] = ours(reinforce, reinforce.ReinforceConfig, *common)
    names = ["ppo", "reinforce_rloo"]
    if not args.no_sb3:
        result["sb3_ppo"] = sb3_ppo(*common)
        result["sb3_acting"] = sb3_acting(args.batch, args.max_new_tokens, device)
        result["ppo_tokens_per_s_ratio_vs_sb3_ppo"] = round(result["ppo"]["tokens_per_s"] / result["sb3_ppo"]["tokens_per_s"], 3)
        names.append("sb3_ppo")
    for name in names:
        result[f"{name}_tokens_per_s_ratio_vs_naive"] = round(result[name]["tokens_per_s"] / result["naive_reinforce"]["tokens_per_s"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
