"""Rollout throughput: policy sampling + vector env steps + RM scoring vs ``model.generate`` alone.

    python benchmarks/rollout.py [--device cpu|cuda] [--batches 64 256] [--max-new-tokens 24]

For the shipped LM and for a GPT-2-small-size random-init model (same tokenizer), prints one JSON
object with, per batch size (both sides get the same IMDb review openings from the task's prompt
list, seed 0; each number is the median of ``--repeats`` timed runs after one warm-up run, and
``spread`` gives each ratio's min and max over the repeats):

* ``generate_tokens_per_s``: the naive baseline, ``model.generate(do_sample=True)`` for the batch
  (no environment, no reward, nothing else);
* ``rollout_tokens_per_s`` with ``ref_logprob_coef=0`` and ``ref_logprob_coef>0``: ``agents.rollout.collect_rollout``
  on ``TextGenVectorEnv`` (the policy samples with its own KV cache, the env steps all episodes in
  one tensor step, the reward model scores finished episodes in one batch; with ref_logprob_coef > 0 the env
  also runs the KV-cached reference LM, and on a CPU the policy's forward runs beside it on a side
  thread), and each one's ratio to generate; with ref_logprob_coef>0 also the same rollout with
  ``side_thread=False`` (the two forwards one after the other), alternating with it in each repeat,
  and ``side_thread_speedup``, the ratio of the two;
* ``rollout_classifier_tokens_per_s``: the same rollout (``ref_logprob_coef=0``) rewarded by a
  cross-tokenizer classifier (``--classifier``, default: the shipped BERT-style classifier of human
  labels, its own WordPiece tokenizer) instead of the reward model, its ratio to generate, and
  ``classifier_time_share``: the fraction of that rollout's time spent in the classifier (decode,
  re-tokenise, score);
* ``single_env_step_overhead``: a ``TextGenEnv.step`` with ``ref_logprob_coef>0`` (one cached reference
  forward + bookkeeping) vs one bare cached forward of the same model, as a fraction.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time

import torch

from agents.policy import LMPolicy
from agents.rollout import collect_rollout
from envs.prompts import read_prompts
from envs.text_gen import TextGenEnv
from envs.vector import TextGenVectorEnv
from pretrain import default_model_dir, load_lm, save_lm
from pretrain.kv_cache import CachedLM
from pretrain.model import build_gpt2, count_parameters, resolve_device


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def rates(runs, repeats: int, device) -> list[list[float]]:
    """Tokens/s of each of ``repeats`` timed calls of each of ``runs`` (each returns its token count),
    the runs alternating within a repeat, after one warm-up round."""
    out = [[] for _ in runs]
    for i in range(repeats + 1):
        for run, rate in zip(runs, out):
            sync(device)
            start = time.perf_counter()
            n_tokens = run()
            sync(device)
            if i:  # round 0 warms up
                rate.append(n_tokens / (time.perf_counter() - start))
    return out


def time_generate(model, tokenizer, prompts, max_new_tokens, device, repeats: int) -> list[float]:
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)

    def run():
        model.generate(**enc, do_sample=True, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, top_k=None, top_p=None)
        return len(prompts) * max_new_tokens

    return rates([run], repeats, device)[0]


class TimedReward:
    """The env's reward function, timing its calls (seconds in ``self.seconds``)."""

    def __init__(self, reward_fn, device):
        self.reward_fn, self.device, self.seconds = reward_fn, device, 0.0

    def __call__(self, *args):
        sync(self.device)
        start = time.perf_counter()
        out = self.reward_fn(*args)
        sync(self.device)
        self.seconds += time.perf_counter() - start
        return out


def time_rollout(model_dir, prompts, max_new_tokens, ref_logprob_coef, device, repeats: int, reward="default",
                 side_thread: tuple[bool, ...] = (True,)) -> tuple[list[list[float]], float]:
    """Rollout tokens/s of each repeat for each ``side_thread`` setting of ``collect_rollout`` (the
    settings alternate within a repeat, one env and policy for all), and the fraction of the
    rollouts' time spent in the reward function."""
    env = TextGenVectorEnv(num_envs=len(prompts), model=model_dir, max_new_tokens=max_new_tokens, ref_logprob_coef=ref_logprob_coef,
                           device=str(device), gold=False, reward=reward)
    env.task.reward_fn = timed = TimedReward(env.task.reward_fn, device)
    env.reset(seed=0)
    policy = LMPolicy.load(model_dir, device, valid_actions=env.valid_actions, value_head=False)
    policy.valid_actions[env.tokenizer.eos_token_id] = False  # full-length episodes, like min_new_tokens
    start = time.perf_counter()
    runs = [lambda side=side: collect_rollout(env, policy, prompts, side_thread=side).n_tokens for side in side_thread]
    return rates(runs, repeats, device), timed.seconds / (time.perf_counter() - start)


def single_env_overhead(model_dir, device, steps: int = 63, repeats: int = 15) -> float:
    """Median over ``repeats`` of (time of ``steps`` env steps) / (time of ``steps`` bare forwards) - 1.

    The env is ``TextGenEnv`` with ref_logprob_coef > 0, so each step runs its KV-cached reference LM; the
    bare side is that same model advanced by ``CachedLM.step`` from the same prompt, alone.
    """
    env = TextGenEnv(model=model_dir, ref_logprob_coef=0.05, max_new_tokens=steps + 1, device=str(device), gold=False)
    prompt = "This movie was"
    prompt_ids = env.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    token = int(env.tokenizer(" good", add_special_tokens=False)["input_ids"][0])
    bare = CachedLM(env.batch.reference.model, 1, env.tokenizer.pad_token_id)  # the very model the env runs
    tokens = torch.tensor([token], device=device)

    def timed(start_episode, step) -> float:
        start_episode()
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        return time.perf_counter() - start

    ratios = []
    for _ in range(repeats + 1):  # the first pair warms up
        env_time = timed(lambda: env.reset(seed=0, options={"prompt": prompt}), lambda: env.step(token))
        bare_time = timed(lambda: bare.reset_rows([0], [prompt_ids]), lambda: bare.step(tokens))
        ratios.append(env_time / bare_time - 1)
    return statistics.median(ratios[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--models", nargs="+", default=["default", "gpt2-small"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--classifier", default="default-classifier", help="the cross-tokenizer classifier reward ('' = skip)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
              "max_new_tokens": args.max_new_tokens, "models": {}}
    all_prompts = read_prompts(None, "train")  # the task's review openings
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            if name == "default":
                model_dir = str(default_model_dir())
            else:  # GPT-2 small's shape (12 layers, d=768) on our tokenizer, random init
                _, tokenizer = load_lm("default")
                big = build_gpt2(len(tokenizer), n_layer=12, n_embd=768, n_head=12, n_positions=256)
                model_dir = str(save_lm(big, tokenizer, f"{tmp}/gpt2-small"))
            model, tokenizer = load_lm(model_dir, device=device)
            entry = {"parameters": count_parameters(model), "batches": {}}
            # First, in a fresh process state (as a single-env user has it), before the batched runs.
            entry["single_env_step_overhead"] = round(single_env_overhead(model_dir, device), 3)
            for batch in args.batches:
                prompts = random.Random(0).sample(all_prompts, batch)
                gen = time_generate(model, tokenizer, prompts, args.max_new_tokens, device, args.repeats)
                (r0,), rm_share = time_rollout(model_dir, prompts, args.max_new_tokens, 0.0, device, args.repeats)
                (r1, r1_alone), _ = time_rollout(model_dir, prompts, args.max_new_tokens, 0.05, device, args.repeats, side_thread=(True, False))
                med = statistics.median
                side_gain = [a / b for a, b in zip(r1, r1_alone)]
                entry["batches"][batch] = {
                    "generate_tokens_per_s": round(med(gen), 1),
                    "rollout_kl0_tokens_per_s": round(med(r0), 1),
                    "rollout_kl0_ratio_vs_generate": round(med(r0) / med(gen), 3),
                    "rm_time_share": round(rm_share, 3),
                    "rollout_kl_tokens_per_s": round(med(r1), 1),
                    "rollout_kl_ratio_vs_generate": round(med(r1) / med(gen), 3),
                    # the same rollout with collect_rollout(side_thread=False), alternating with it in each repeat
                    "rollout_kl_no_side_thread_tokens_per_s": round(med(r1_alone), 1),
                    "side_thread_speedup": round(med(side_gain), 3),
                    # the i-th rollout over the i-th generate, min and max over the repeats
                    "spread": {name: [round(min(a / g for a, g in zip(rollout, gen)), 3), round(max(a / g for a, g in zip(rollout, gen)), 3)]
                               for name, rollout in (("rollout_kl0_ratio_vs_generate", r0), ("rollout_kl_ratio_vs_generate", r1))}
                              | {"side_thread_speedup": [round(min(side_gain), 3), round(max(side_gain), 3)]},
                }
                if args.classifier:
                    (rc,), share = time_rollout(model_dir, prompts, args.max_new_tokens, 0.0, device, args.repeats, args.classifier)
                    entry["batches"][batch].update(rollout_classifier_tokens_per_s=round(med(rc), 1),
                                                   rollout_classifier_ratio_vs_generate=round(med(rc) / med(gen), 3),
                                                   classifier_time_share=round(share, 3))
                print(json.dumps({name: entry["batches"][batch], "batch": batch}), flush=True)
            result["models"][name] = entry
    print(json.dumps(result))


if __name__ == "__main__":
    main()
