"""Agent training throughput on the embedded default vs the loops a user would write instead.

    python benchmarks/train_throughput.py [--device cpu|cuda] [--updates 32] [--batch 32] [--repeats 1] [--no-sb3] [--methods grpo trl_grpo ...]

Prints one JSON object with updates/s, generated tokens/s and gold gain per minute of, all on the
same model, reward model, batch (32 episodes of 16 tokens), learning rate, seed and KL penalty
(beta = 0.05 per token, in the reward):

* ``ppo`` and ``reinforce_rloo``: our agents on TextGen-v0 (``agents.ppo``, ``agents.reinforce``);
* ``naive_reinforce``: KL-regularised REINFORCE with plain transformers (``model.generate``,
  decode, ``RewardModel.score`` on the texts, one forward for the log-probs, one reference
  forward, loss, step);
* ``naive_ppo``: PPO with plain transformers, the same work per update as ours (generate, score,
  old/ref log-probs and values, GAE, 4 epochs x 4 minibatches of clipped surrogate + clipped
  value loss, the same approx-KL early stop);
* ``trl_rloo`` (when ``trl`` is installed): TRL's RLOOTrainer, k = 4 completions per prompt like
  ours, its KL in the sequence reward;
* ``grpo`` and ``trl_grpo``: our GRPO (``agents.grpo``) and TRL's GRPOTrainer with the same group
  size (4), passes per batch (mu = 2), optimizer steps per batch (2 minibatches x 2 passes), clip
  (0.2), loss aggregation ("grpo") and KL: beta = 0.05 times k3 in the loss (TRL's only route);
  ``grpo_mu1`` and ``trl_grpo_mu1``: the same with TRL's defaults of one pass and one optimizer step
  per batch (on-policy: neither scores pi_old in a pass of its own);
* ``trpo``: our TRPO (``agents.trpo``, its defaults), next to our PPO;
* ``pcl``: our DQN as soft Q-learning by path consistency (``textgym train dqn``'s default: fresh +
  replayed whole episodes, 2 gradient steps per batch), next to REINFORCE-RLOO and to ``dqn_td``,
  the transition-level soft-Q DQN (``--objective td``, the settings of the README's TD row);
* ``sb3_ppo`` (unless ``--no-sb3``): Stable-Baselines3 PPO with ``agents.sb3.LMActorCriticPolicy``
  on the same env and budget, plus SB3's acting throughput with and without the policy's KV cache;

and the ratios of ours to each. With ``--repeats N`` every method runs N times in turn, with seeds
``--seed``, ``--seed`` + 1, ...; each figure is then the median over the repeats, each ratio is taken
within a repeat (same seed on both sides), and ``spread`` gives the min and max of every ratio over
the repeats. Gold gain per minute = the mean training-episode gold score of the
last quarter of updates minus the first quarter's, divided by the run's wall time; our agents also
report it per 1,000 generated tokens (``gold_gain_per_1k_tokens``: sample efficiency). Over 32
updates that reading is mostly noise (each quarter averages 8 updates' episodes, on other prompts
for each method), so every method's trained model (SB3's aside) is also scored on the same 1,024 held-out episodes
(the same test prompts in the same order, the same seed) as the shipped LM: ``held_out_gold_gain`` (and ``_per_min`` of training,
``held_out_kl`` the sequence KL reached), outside the timed loop. Both PPOs
report ``epochs_per_update``, the passes their shared approx-KL early stop let run: the work per
token that their tokens per second compare.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import json
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from stable_baselines3.common.logger import configure

from agents import dqn, grpo, ppo, reinforce, trpo
from agents.evaluate import evaluate_model
from agents.policy import load_reference
from agents.run import make_env
from agents.sb3 import TextGenCallback, make_sb3_agent, make_sb3_vec_env
from pretrain import load_lm, save_lm
from pretrain.corpus import load_prompts
from pretrain.model import resolve_device
from pretrain.sample import generate_ids
from rlhf.gold import VaderGold
from rlhf.reward_model import RewardModel


def gold_gain(golds: list[float]) -> float:
    """Mean training-episode gold of the last quarter of updates minus the first quarter's."""
    k = max(1, len(golds) // 4)
    return float(np.mean(golds[-k:]) - np.mean(golds[:k]))


HELD_OUT_EPISODES = 1024  # held-out episodes per model
_held_out_cache: dict = {}


def held_out_gold(model_dir, device, episodes: int = HELD_OUT_EPISODES, seed: int = 1234) -> dict[str, float]:
    """Mean gold and sequence KL to the shipped LM of ``model_dir`` on ``episodes`` held-out episodes
    (plain sampling, ``agents.evaluate.evaluate_model``): the same test prompts, in the same order,
    and the same seed for every model, so two models' gold differ by their policies, not by the
    prompts drawn. What remains is the sampling: a copy of the shipped LM with 0.1% noise on its
    weights draws other tokens from the first one that its changed probabilities move, and scored
    -0.028 against it over 512 episodes (with the env's own prompt draws: +0.046)."""
    if "env" not in _held_out_cache:
        env = make_env("TextGen-v0", 64, device, seed, prompt_split="test")
        rng = np.random.default_rng(seed)
        _held_out_cache["env"], _held_out_cache["reference"] = env, load_reference("default", env, device)
        _held_out_cache["prompts"] = [env.prompts[i] for i in rng.choice(len(env.prompts), episodes, replace=episodes > len(env.prompts))]
    env, reference = _held_out_cache["env"], _held_out_cache["reference"]
    result = evaluate_model(str(model_dir), reference, env, episodes, seed, prompts=_held_out_cache["prompts"])
    return {"gold": result["gold"], "kl": result["kl_ref"]}


def held_out_gain(model_dir, device, seconds: float) -> dict[str, float]:
    """The held-out gold gained over the shipped LM by training (``held_out_gold``), per minute of
    training, and the held-out KL reached: a less noisy reading than the training episodes'."""
    if "initial" not in _held_out_cache:
        _held_out_cache["initial"] = held_out_gold("default", device)["gold"]
    after = held_out_gold(model_dir, device)
    gain = after["gold"] - _held_out_cache["initial"]
    return {"held_out_gold_gain": gain, "held_out_gold_gain_per_min": gain / (seconds / 60), "held_out_kl": after["kl"]}


def naive_held_out_gain(model, tokenizer, device, seconds: float) -> dict[str, float]:
    """``held_out_gain`` of a naive loop's model (saved to a temporary dir, outside the timed loop)."""
    with tempfile.TemporaryDirectory() as directory:
        save_lm(model, tokenizer, directory)
        return held_out_gain(directory, device, seconds)


def naive_setup(device):
    """What both naive loops load: the policy, a frozen reference, the reward model, the gold scorer, prompts."""
    model, tokenizer = load_lm("default", device=device)
    reference, _ = load_lm("default", device=device)
    reference.requires_grad_(False)
    prompts = [p.text for p in load_prompts("train")]
    return model, tokenizer, reference, RewardModel.load("default", device=device), VaderGold(), prompts


def naive_sample(model, tokenizer, rm, gold, prompts, rng, batch: int, max_new_tokens: int, seed: int):
    """``model.generate`` on random prompts, decode, score: (generate output, RM scores, mean gold)."""
    batch_prompts = [prompts[i] for i in rng.choice(len(prompts), batch)]
    model.eval()
    out = generate_ids(model, tokenizer, batch_prompts, max_new_tokens, seed=seed)
    texts = tokenizer.batch_decode(out["input_ids"][:, -max_new_tokens:], skip_special_tokens=True)
    scores = torch.tensor(rm.score(batch_prompts, texts), device=next(model.parameters()).device)
    return out, scores, float(np.mean(gold([p + t for p, t in zip(batch_prompts, texts)])))


def naive_reinforce(updates: int, batch: int, max_new_tokens: int, lr: float, device, kl_coef: float = 0.05,
                    seed: int = 0) -> dict:
    """What a user writes without the library's env: generate, score texts, one policy-gradient step."""
    model, tokenizer, reference, rm, gold, prompts = naive_setup(device)
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    golds, tokens = [], 0
    start = time.perf_counter()
    for update in range(updates):
        out, rewards, mean_gold = naive_sample(model, tokenizer, rm, gold, prompts, rng, batch, max_new_tokens,
                                               seed * 100_003 + update)
        golds.append(mean_gold)
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
            "gold_gain_per_min": gold_gain(golds) / (seconds / 60), **naive_held_out_gain(model, tokenizer, device, seconds)}


def naive_ppo(updates: int, batch: int, max_new_tokens: int, lr: float, device, epochs: int = 4, minibatches: int = 4,
              kl_coef: float = 0.05, clip: float = 0.2, vf_coef: float = 0.1, lam: float = 0.95,
              target_kl: float = 0.05, seed: int = 0) -> dict:
    """What a user writes for PPO without the library: ``generate``, score the texts, then epochs of
    clipped-surrogate minibatch steps with a value head, GAE and the per-token KL penalty (the same
    hyperparameters and work per update as ``agents.ppo``)."""
    model, tokenizer, reference, rm, gold, prompts = naive_setup(device)
    value_head = torch.nn.Linear(model.config.get_text_config().hidden_size, 1).to(device)
    torch.nn.init.zeros_(value_head.weight)
    torch.nn.init.zeros_(value_head.bias)
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.Adam([*model.parameters(), *value_head.parameters()], lr=lr, eps=1e-5)
    T = max_new_tokens
    golds, tokens, epochs_run = [], 0, []
    start = time.perf_counter()
    for update in range(updates):
        out, scores, mean_gold = naive_sample(model, tokenizer, rm, gold, prompts, rng, batch, T, seed * 100_003 + update)
        golds.append(mean_gold)
        ids, attn, mask = out["input_ids"], out["attention_mask"], out["completion_mask"][:, -T:].float()

        def forward(net, rows, ids=ids, attn=attn):  # bound now: the closure runs inside this iteration
            o = net(input_ids=ids[rows], attention_mask=attn[rows], output_hidden_states=True)
            logp = torch.log_softmax(o.logits[:, -T - 1 : -1].float(), -1).gather(-1, ids[rows, -T:, None]).squeeze(-1)
            return logp, o.hidden_states[-1][:, -T - 1 : -1]

        every = torch.arange(batch, device=device)
        with torch.no_grad():
            old_logp, hidden = forward(model, every)
            old_values = value_head(hidden).squeeze(-1) * mask
            ref_logp, _ = forward(reference, every)
            rewards = -kl_coef * (old_logp - ref_logp) * mask
            rewards[every, mask.sum(1).long() - 1] += scores
            advantages, last = torch.zeros_like(rewards), torch.zeros(batch, device=device)
            for t in reversed(range(T)):
                next_value = old_values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
                last = (rewards[:, t] + next_value - old_values[:, t] + lam * last) * mask[:, t]
                advantages[:, t] = last
            returns = advantages + old_values
            mean = (advantages * mask).sum() / mask.sum()
            std = (((advantages - mean) ** 2 * mask).sum() / mask.sum()).sqrt()
            advantages = (advantages - mean) / (std + 1e-8) * mask
        model.train()
        for epoch in range(1, epochs + 1):  # noqa: B007 - counted below
            approx_kls = []
            for rows in torch.randperm(batch, device=device).chunk(minibatches):
                logp, hidden = forward(model, rows)
                values = value_head(hidden).squeeze(-1)
                m = mask[rows]
                ratio = (logp - old_logp[rows]).exp()
                pg = torch.max(-advantages[rows] * ratio, -advantages[rows] * ratio.clamp(1 - clip, 1 + clip))
                v_clipped = old_values[rows] + (values - old_values[rows]).clamp(-clip, clip)
                v_loss = 0.5 * torch.max((values - returns[rows]) ** 2, (v_clipped - returns[rows]) ** 2)
                loss = ((pg + vf_coef * v_loss) * m).sum() / m.sum()
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_([*model.parameters(), *value_head.parameters()], 1.0)
                optimizer.step()
                log_ratio = (logp - old_logp[rows]).detach()
                approx_kls.append(float(((log_ratio.exp() - 1 - log_ratio) * m).sum() / m.sum()))
            if np.mean(approx_kls) > 1.5 * target_kl:  # the same early stop as agents.ppo
                break
        epochs_run.append(epoch)
        tokens += int(mask.sum())
    seconds = time.perf_counter() - start
    return {"updates_per_s": updates / seconds, "tokens_per_s": tokens / seconds,
            "gold_gain_per_min": gold_gain(golds) / (seconds / 60), "epochs_per_update": float(np.mean(epochs_run)),
            **naive_held_out_gain(model, tokenizer, device, seconds)}


def run_trl(trainer_cls, config_cls, updates: int, batch: int, group_size: int, device, seed: int, **config) -> dict:
    """A TRL online trainer (RLOO, GRPO) on the shipped LM, rewarded by the shipped reward model on
    ``updates * batch / group_size`` train prompts (``group_size`` completions each), timed over
    ``trainer.train()``; the gold score and the generated tokens are read inside its reward function."""
    from datasets import Dataset

    model, tokenizer = load_lm("default", device=device)
    tokenizer.padding_side = "left"
    rm = RewardModel.load("default", device=device)
    gold = VaderGold()
    prompts = [p.text for p in load_prompts("train")]
    rng = np.random.default_rng(seed)
    dataset = Dataset.from_dict({"prompt": [prompts[i] for i in rng.choice(len(prompts), updates * batch // group_size)]})
    golds, tokens = [], [0]

    def reward(prompts, completions, completion_ids, **kwargs):
        golds.append(float(np.mean(gold([p + c for p, c in zip(prompts, completions)]))))
        tokens[0] += sum(len(ids) for ids in completion_ids)
        return rm.score(prompts, completions)

    with tempfile.TemporaryDirectory() as out:
        args = config_cls(
            output_dir=out, num_generations=group_size, lr_scheduler_type="constant", temperature=1.0, logging_strategy="no",
            report_to="none", save_strategy="no", seed=seed, disable_tqdm=True, use_cpu=device.type == "cpu", bf16=False,
            fp16=False, dataloader_num_workers=0, log_level="error", **config,
        )
        trainer = trainer_cls(model=model, reward_funcs=reward, args=args, train_dataset=dataset, processing_class=tokenizer)
        start = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # the trainer prints its summary; stdout is for our JSON
            trainer.train()
        seconds = time.perf_counter() - start
    return {"updates_per_s": len(golds) / seconds, "tokens_per_s": tokens[0] / seconds,
            "gold_gain_per_min": gold_gain(golds) / (seconds / 60), **naive_held_out_gain(model, tokenizer, device, seconds)}


def trl_rloo(updates: int, batch: int, max_new_tokens: int, lr: float, device, k: int = 4, kl_coef: float = 0.05,
             seed: int = 0) -> dict:
    """TRL's RLOOTrainer on the same model, reward model, batch (k completions of batch / k prompts),
    length, learning rate and KL coefficient (TRL charges it in the sequence reward, as ours does)."""
    from trl import RLOOConfig, RLOOTrainer

    return run_trl(RLOOTrainer, RLOOConfig, updates, batch, k, device, seed, per_device_train_batch_size=batch,
                   max_completion_length=max_new_tokens, learning_rate=lr, beta=kl_coef, max_steps=updates, num_iterations=1)


def trl_grpo(updates: int, batch: int, max_new_tokens: int, lr: float, device, group_size: int = 4, num_iterations: int = 2,
             minibatches: int = 2, kl_coef: float = 0.05, seed: int = 0) -> dict:
    """TRL's GRPOTrainer on the same model, reward model, batch (group_size completions of
    batch / group_size prompts per generation), length, learning rate, passes, minibatches, clip,
    loss aggregation and KL (beta * k3 in the loss) as ``GRPO_SETTINGS`` gives ours."""
    from trl import GRPOConfig, GRPOTrainer

    return run_trl(GRPOTrainer, GRPOConfig, updates, batch, group_size, device, seed,
                   per_device_train_batch_size=batch // minibatches, steps_per_generation=minibatches,
                   num_iterations=num_iterations, max_completion_length=max_new_tokens, learning_rate=lr, beta=kl_coef,
                   epsilon=0.2, loss_type="grpo", scale_rewards="group", max_steps=updates * minibatches * num_iterations,
                   disable_dropout=True, max_grad_norm=1.0)


# Our GRPO as trl_grpo runs TRL's (trl_grpo_mu1: num_iterations=1, num_minibatches=1).
GRPO_SETTINGS = dict(group_size=4, num_iterations=2, num_minibatches=2, epsilon_low=0.2, epsilon_high=0.2, loss_type="grpo",
                     scale_rewards="group", kl_penalty="loss", kl_coef=0.05)
GRPO_MU1 = {**GRPO_SETTINGS, "num_iterations": 1, "num_minibatches": 1}


def ours(module, cfg_cls, updates, batch, max_new_tokens, lr, device, seed: int = 0, **kw) -> dict:
    """Our agent's training loop, timed like the naive loops: from its first update to its last
    (model and env loading and the final save excluded; periodic checkpoints included). Each
    metrics row's ``perf/tokens_per_s`` is that update's tokens over its wall time."""
    with tempfile.TemporaryDirectory() as out:
        if "lr" in cfg_cls.__dataclass_fields__:  # TRPO has none: its step is set by max_kl
            kw["lr"] = lr
        cfg = cfg_cls(num_envs=batch, max_new_tokens=max_new_tokens, total_steps=updates * batch * max_new_tokens,
                      device=str(device), out=out, seed=seed, **kw)
        module.train(cfg)
        rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
        steps = [0] + [r["env_steps"] for r in rows]
        seconds = sum((b - a) / r["perf/tokens_per_s"] for a, b, r in zip(steps, steps[1:], rows))
        held_out = held_out_gain(f"{out}/final", device, seconds)
    gain = gold_gain([r["reward/gold"] for r in rows])
    return {"updates_per_s": len(rows) / seconds, "tokens_per_s": steps[-1] / seconds, "gold_gain_per_min": gain / (seconds / 60),
            "gold_gain_per_1k_tokens": gain / (steps[-1] / 1000), "final_kl": rows[-1].get("kl/ref"),
            "epochs_per_update": float(np.mean([r["policy/epochs"] for r in rows])) if "policy/epochs" in rows[0] else None,
            **held_out}


def sb3_ppo(updates, batch, max_new_tokens, lr, device, epochs=4, minibatches=4, kl_coef=0.05, seed: int = 0) -> dict:
    with tempfile.TemporaryDirectory() as out:
        env = make_sb3_vec_env("TextGen-v0", batch, seed=seed, device=device, max_new_tokens=max_new_tokens, kl_coef=kl_coef)
        agent = make_sb3_agent("ppo", env, n_steps=max_new_tokens, batch_size=batch * max_new_tokens // minibatches,
                               n_epochs=epochs, learning_rate=lr, gamma=1.0, vf_coef=0.1, target_kl=0.05, seed=seed,
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


DQN_TD_SETTINGS = dict(objective="td", exploration="boltzmann", soft_q=True, soft_q_beta=0.1, env_ref_logprob_coef=0.1,
                       gradient_steps=16, learning_starts=512, max_grad_norm=10.0)
METHODS = ("naive_reinforce", "naive_ppo", "ppo", "reinforce_rloo", "trl_rloo", "grpo", "trl_grpo", "grpo_mu1", "trl_grpo_mu1", "trpo",
           "pcl", "dqn_td", "sb3_ppo")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--updates", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="runs of every method, seeds --seed, --seed + 1, ... "
                                                                      "(figures: medians; ratios: medians and spread)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                        help="what to run (default: all; the trl_* ones need trl installed)")
    parser.add_argument("--no-sb3", action="store_true", help="skip SB3 PPO (its updates take minutes on a CPU)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    common = (args.updates, args.batch, args.max_new_tokens, args.lr, device)
    methods = [m for m in args.methods if not (m == "sb3_ppo" and args.no_sb3)]
    if importlib.util.find_spec("trl") is None:
        methods = [m for m in methods if not m.startswith("trl_")]
    runs = {
        "naive_reinforce": lambda seed: naive_reinforce(*common, seed=seed),
        "naive_ppo": lambda seed: naive_ppo(*common, seed=seed),
        "ppo": lambda seed: ours(ppo, ppo.PPOConfig, *common, seed=seed),
        "reinforce_rloo": lambda seed: ours(reinforce, reinforce.ReinforceConfig, *common, seed=seed),
        "trl_rloo": lambda seed: trl_rloo(*common, seed=seed),
        "grpo": lambda seed: ours(grpo, grpo.GRPOConfig, *common, seed=seed, **GRPO_SETTINGS),
        "trl_grpo": lambda seed: trl_grpo(*common, seed=seed),
        "grpo_mu1": lambda seed: ours(grpo, grpo.GRPOConfig, *common, seed=seed, **GRPO_MU1),
        "trl_grpo_mu1": lambda seed: trl_grpo(*common, seed=seed, num_iterations=1, minibatches=1),
        "trpo": lambda seed: ours(trpo, trpo.TRPOConfig, *common, seed=seed),
        "pcl": lambda seed: ours(dqn, dqn.DQNConfig, *common, seed=seed),
        "dqn_td": lambda seed: ours(dqn, dqn.DQNConfig, *common, seed=seed, **DQN_TD_SETTINGS),
        "sb3_ppo": lambda seed: sb3_ppo(*common, seed=seed),
    }
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
              "batch": args.batch, "max_new_tokens": args.max_new_tokens, "updates": args.updates, "seed": args.seed,
              "repeats": args.repeats}
    repeats = []  # one {method: figures} per repeat, the methods in turn within each
    for repeat in range(args.repeats):
        repeats.append({name: runs[name](args.seed + repeat) for name in methods})
    for name in methods:  # the median of each figure over the repeats
        result[name] = {metric: statistics.median(r[name][metric] for r in repeats) if repeats[0][name][metric] is not None else None
                        for metric in repeats[0][name]}
    if "sb3_ppo" in methods:
        result["sb3_acting"] = sb3_acting(args.batch, args.max_new_tokens, device)
    spread = {}
    for ours_name, theirs in (("reinforce_rloo", "trl_rloo"), ("grpo", "trl_grpo"), ("grpo_mu1", "trl_grpo_mu1"), ("ppo", "naive_ppo"), ("ppo", "sb3_ppo"),
                              ("trpo", "ppo"), ("ppo", "naive_reinforce"), ("reinforce_rloo", "naive_reinforce"),
                              ("sb3_ppo", "naive_reinforce"), ("pcl", "reinforce_rloo"), ("pcl", "dqn_td")):
        if ours_name in result and theirs in result:
            for metric in ("tokens_per_s", "gold_gain_per_min", "gold_gain_per_1k_tokens", "held_out_gold_gain_per_min"):
                ratios = [r[ours_name][metric] / r[theirs][metric] for r in repeats
                          if metric in r[ours_name] and r[theirs].get(metric, 0) > 0]
                if len(ratios) == len(repeats):
                    key = f"{ours_name}_{metric}_ratio_vs_{theirs}"
                    result[key] = round(statistics.median(ratios), 3)
                    spread[key] = [round(min(ratios), 3), round(max(ratios), 3)]
    if args.repeats > 1:
        result["spread"] = spread
    print(json.dumps(result))


if __name__ == "__main__":
    main()
