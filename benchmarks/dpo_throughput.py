"""DPO step and reward-model scoring throughput vs the naive versions, same model, data and batch.

    python benchmarks/dpo_throughput.py [--device cpu|cuda] [--batch 32] [--steps 5]

Prints one JSON object:

* ``dpo``: samples (pairs) per second of ``rlhf.dpo``'s step (chosen and rejected batches, each padded to
  its own width; log-probs via logsumexp and gather, no full log-softmax tensor) and of the
  naive step (four separate forwards, full ``log_softmax`` then gather), and the ratio;
* ``rm``: (prompt, completion) pairs scored per second by ``RewardModel.score`` (batched) and by a
  plain loop over examples, and the ratio.

* ``trl`` (only when ``trl`` is installed; it is not a dependency): pairs per second of TRL's
  ``DPOTrainer`` on the same model, reference, pairs, batch, beta and learning rate (sigmoid loss,
  AdamW), timed over its training steps after a warm-up step, and our step's ratio to it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time

import torch
import torch.nn.functional as F

from pretrain import load_lm
from pretrain.model import resolve_device
from rlhf.dpo import dpo_loss, pair_logps
from rlhf.logprobs import encode
from rlhf.preferences import PreferencePair
from rlhf.reward_model import RewardModel


def make_pairs(n: int) -> list[PreferencePair]:
    words = "the film was a wonderful moving story with great acting and a dull boring plot".split()
    g = torch.Generator().manual_seed(0)
    pick = lambda k: " " + " ".join(words[i] for i in torch.randint(len(words), (k,), generator=g).tolist())  # noqa: E731
    return [PreferencePair("This movie" + pick(4), pick(24), pick(24)) for _ in range(n)]


def naive_logps(model, tokenizer, prompts, completions, device):
    enc = encode(tokenizer, prompts, completions, device=device)
    logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    logp = F.log_softmax(logits[:, :-1], -1).gather(-1, enc["input_ids"][:, 1:, None]).squeeze(-1)
    return (logp * enc["completion_mask"][:, 1:]).sum(-1)


def time_it(fn, steps, device) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def trl_pairs_per_s(policy, reference, tokenizer, pairs, steps: int, device) -> float | None:
    """TRL's DPOTrainer on the same model/reference/pairs/batch; None when trl is not installed."""
    try:
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import DPOConfig, DPOTrainer
    except ImportError:
        return None

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    data = Dataset.from_list([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs])
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(
            output_dir=out, per_device_train_batch_size=len(pairs), max_steps=steps + 1, learning_rate=1e-6, beta=0.1,
            loss_type=["sigmoid"], report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
            use_cpu=device.type == "cpu", dataloader_drop_last=True, gradient_checkpointing=False,  # as ours: no recompute
        )
        timer = StepTimer()
        trainer = DPOTrainer(model=policy, ref_model=reference, args=config, train_dataset=data.repeat(steps + 1),
                             processing_class=tokenizer, callbacks=[timer])
        with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints its own summary; we print JSON only
            trainer.train()
    return len(pairs) * steps / (timer.times[-1] - timer.times[0])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    device = resolve_device(args.device)
    policy, tokenizer = load_lm("default", device=device)
    reference, _ = load_lm("default", device=device)
    reference.requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    pairs = make_pairs(args.batch)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
              "batch": args.batch}

    def ours():
        chosen, rejected = pair_logps(policy, tokenizer, pairs, device)
        with torch.no_grad():
            ref_c, ref_r = pair_logps(reference, tokenizer, pairs, device)
        loss = dpo_loss(chosen, rejected, ref_c, ref_r)[0].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def naive():
        prompts = [p.prompt for p in pairs]
        chosen = naive_logps(policy, tokenizer, prompts, [p.chosen for p in pairs], device)
        rejected = naive_logps(policy, tokenizer, prompts, [p.rejected for p in pairs], device)
        with torch.no_grad():
            ref_c = naive_logps(reference, tokenizer, prompts, [p.chosen for p in pairs], device)
            ref_r = naive_logps(reference, tokenizer, prompts, [p.rejected for p in pairs], device)
        loss = -F.logsigmoid(0.1 * ((chosen - ref_c) - (rejected - ref_r))).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    t_ours, t_naive = time_it(ours, args.steps, device), time_it(naive, args.steps, device)
    result["dpo"] = {"ours_pairs_per_s": round(args.batch / t_ours, 1), "naive_pairs_per_s": round(args.batch / t_naive, 1),
                     "ratio": round(t_naive / t_ours, 3)}

    trl = trl_pairs_per_s(policy, reference, tokenizer, pairs, args.steps, device)
    if trl is not None:
        result["trl"] = {"trl_dpo_trainer_pairs_per_s": round(trl, 1), "ours_ratio_vs_trl": round(args.batch / t_ours / trl, 3)}

    rm = RewardModel.load("default", device=device)
    prompts, completions = [p.prompt for p in pairs] * 4, [p.chosen for p in pairs] * 4
    t_batched = time_it(lambda: rm.score(prompts, completions), args.steps, device)
    t_loop = time_it(lambda: [rm.score([p], [c]) for p, c in zip(prompts, completions)], 1, device)
    result["rm"] = {"batched_per_s": round(len(prompts) / t_batched, 1), "loop_per_s": round(len(prompts) / t_loop, 1),
                    "ratio": round(t_loop / t_batched, 3)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
