"""Agent training throughput on the embedded default vs the naive loop a user would write.

    python benchmarks/train_throughput.py [--device cpu|cuda] [--updates 5] [--batch 32]

Prints one JSON object: updates/s and generated tokens/s of our PPO and REINFORCE (RLOO) on
TextGen-v0, and of a naive REINFORCE written with plain transformers (``model.generate`` for the
rollout, decode, ``RewardModel.score`` on the texts, re-tokenize, one forward for the log-probs,
loss, step) at the same batch size, length and learning rate, with the ratios. Gold gain per minute
(the gold score gained over the run divided by its wall time) is reported for each as well.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch

from agents import ppo, reinforce
from pretrain import load_lm
from pretrain.model import resolve_device
from pretrain.sample import generate_ids
from rlhf.gold import VaderGold
from rlhf.reward_model import RewardModel


def naive_reinforce(updates: int, batch: int, max_new_tokens: int, lr: float, device) -> dict:
    """What a user writes without the library's env: generate, score texts, one policy-gradient step."""
    model, tokenizer = load_lm("default", device=device)
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
        loss = -((rewards - rewards.mean()) * (logp * mask).sum(1)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        tokens += int(mask.sum())
    seconds = time.perf_counter() - start
    return {"updates_per_s": updates / seconds, "tokens_per_s": tokens / seconds,
            "gold_gain_per_min": (golds[-1] - golds[0]) / (seconds / 60)}


def ours(module, cfg_cls, updates, batch, max_new_tokens, lr, device, **kw) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cfg = cfg_cls(num_envs=batch, max_new_tokens=max_new_tokens, total_steps=updates * batch * max_new_tokens,
                      lr=lr, device=str(device), out=out, **kw)
        start = time.perf_counter()
        module.train(cfg)
        seconds = time.perf_counter() - start
        rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    return {"updates_per_s": len(rows) / seconds, "tokens_per_s": rows[-1]["env_steps"] / seconds,
            "gold_gain_per_min": (rows[-1]["reward/gold"] - rows[0]["reward/gold"]) / (seconds / 60)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--updates", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-5)
    args = parser.parse_args()
    device = resolve_device(args.device)
    common = (args.updates, args.batch, args.max_new_tokens, args.lr, device)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
              "batch": args.batch, "max_new_tokens": args.max_new_tokens, "updates": args.updates}
    result["naive_reinforce"] = naive_reinforce(*common)
    result["ppo"] = ours(ppo, ppo.PPOConfig, *common)
    result["reinforce_rloo"] = ours(reinforce, reinforce.ReinforceConfig, *common)
    for name in ("ppo", "reinforce_rloo"):
        result[f"{name}_tokens_per_s_ratio_vs_naive"] = round(result[name]["tokens_per_s"] / result["naive_reinforce"]["tokens_per_s"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
