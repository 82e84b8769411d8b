"""DPO training throughput vs the naive loop and TRL's DPOTrainer, same model, data, batch and settings.

    python benchmarks/dpo_throughput.py [--device cpu|cuda] [--batch 32] [--steps 8] [--repeats 3]

The data is ``--steps`` batches of ``--batch`` pairs (one epoch). Every figure is measured
``--repeats`` times in this process; each ratio is taken within a repeat and reported as its median
with the min and max over the repeats. Prints one JSON object:

* ``dpo``: pairs per second of a training step:
  - ``ours``: ``rlhf.dpo``'s step as ``textgym dpo`` runs it: the policy's packed forwards and
    backwards (``pair_logps``: chosen and rejected in one right-padded pass, the LM head on completion
    tokens only) over micro-batches of ``--micro-batch`` pairs, their gradients summed, pi_ref's log-probs read from the table that ``reference_logps`` computed once
    before training (its cost is in ``precompute_s_per_pair`` and in the epoch figures);
  - ``ours_reference_forward``: the same step with a reference forward in the step
    (``--no-precompute-ref-logps``);
  - ``naive``: what a user writes: four separate forwards (chosen/rejected x policy/reference), each
    with a full ``log_softmax`` and a gather, and ``torch.optim.AdamW`` (ours: ``textgym dpo``'s
    fused AdamW, ``pretrain.optim.make_adam``; TRL's default is fused AdamW as well);
  - ``epoch_1`` / ``epoch_3``: pairs per second of whole training runs of 1 and 3 epochs, the
    reference precomputation included, ours vs naive;
* ``trl`` (only when ``trl`` is installed; it is not a dependency): TRL's ``DPOTrainer`` on the same
  model, reference, pairs, batch, beta and learning rate (sigmoid loss, AdamW), with its defaults
  and with each of its speed options that runs here (``precompute_ref_log_probs``, ``padding_free``),
  timed per training step after its first one, plus its precomputation, and our ratios to each;
* ``rm``: (prompt, completion) pairs scored per second by ``RewardModel.score`` (batched) and by a
  plain loop over examples, and the ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import io
import json
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from pretrain import load_lm
from pretrain.model import resolve_device
from pretrain.optim import make_adam
from rlhf.dpo import dpo_loss, pair_logps, reference_logps
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


def spread(values: list[float], digits: int = 3) -> dict:
    """Median, min and max of repeated measurements."""
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits), "max": round(max(values), digits)}


def timed(fn, device) -> float:
    """Seconds one call of ``fn`` takes."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def trl_run(policy, reference, tokenizer, pairs, batch: int, device, **options) -> dict | None:
    """TRL's DPOTrainer for one epoch over ``pairs`` (plus a first warm-up batch), on the same model,
    reference, batch, beta and lr: seconds per step after the first and seconds of its start-up work
    (tokenising the data set, and the reference precomputation when asked); None when trl is not installed, the reason when an
    option does not run here."""
    try:
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import DPOConfig, DPOTrainer
    except ImportError:
        return None

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin, self.times = 0.0, []

        def on_step_end(self, args, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs[:batch] + pairs]
    data = Dataset.from_list(rows)
    policy = copy.deepcopy(policy)  # TRL trains its own copy: every repeat starts from the same weights
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(
            output_dir=out, per_device_train_batch_size=batch, num_train_epochs=1, learning_rate=1e-6, beta=0.1,
            loss_type=["sigmoid"], report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
            use_cpu=device.type == "cpu", dataloader_drop_last=True, gradient_checkpointing=False,  # as ours: no recompute
            **options,
        )
        timer = StepTimer()
        timer.begin = time.perf_counter()  # its start-up: tokenising the data, and precomputing the reference when asked
        try:
            trainer = DPOTrainer(model=policy, ref_model=reference, args=config, train_dataset=data,
                                 processing_class=tokenizer, callbacks=[timer])
            with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints its own summary; we print JSON only
                trainer.train()
        except (ValueError, RuntimeError, NotImplementedError) as err:
            return {"error": f"{type(err).__name__}: {str(err)[:200]}"}
    steps = np.diff(timer.times)
    step_s = float(np.mean(steps))
    return {"step_s": step_s, "startup_s": max(0.0, timer.times[0] - timer.begin - step_s)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="batches in the data set (one epoch)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--micro-batch", type=int, default=16, help="our pairs per pass (textgym dpo's --micro-batch-size)")
    parser.add_argument("--no-trl", action="store_true")
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    initial, tokenizer = load_lm("default", device=device)
    reference, _ = load_lm("default", device=device)
    reference.requires_grad_(False)
    pairs = make_pairs(args.batch * args.steps)
    batches = [pairs[i : i + args.batch] for i in range(0, len(pairs), args.batch)]
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
              "batch": args.batch, "pairs": len(pairs), "repeats": args.repeats}

    def runner(step, fused: bool):
        """Fresh policy and optimizer (every method starts from the same weights), one warm-up step on
        the first batch, then the epoch: seconds per step. ``fused``: AdamW as ``textgym dpo`` builds
        it (``make_adam``, torch's fused kernel; TRL's default ``adamw_torch_fused`` too), else the
        ``torch.optim.AdamW(model.parameters())`` a user writes."""
        policy = copy.deepcopy(initial)
        optimizer = make_adam(policy.parameters(), lr=1e-6, weight_decay=0.01, decoupled=True) if fused else \
            torch.optim.AdamW(policy.parameters(), lr=1e-6)
        step(policy, optimizer, 0)
        return timed(lambda: [step(policy, optimizer, i) for i in range(len(batches))], device) / len(batches)

    def dpo_step(policy, optimizer, chosen, rejected, ref_chosen, ref_rejected):
        loss = dpo_loss(chosen, rejected, ref_chosen, ref_rejected)[0].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    table = {}

    def ours(policy, optimizer, i, precomputed=True):
        """As ``train_dpo`` steps: micro-batches of ``--micro-batch`` pairs, their gradients summed."""
        optimizer.zero_grad()
        for start in range(0, args.batch, args.micro_batch):
            part = batches[i][start : start + args.micro_batch]
            chosen, rejected = pair_logps(policy, tokenizer, part, device)
            if precomputed:
                ref = table["ref"][i * args.batch + start : i * args.batch + start + len(part)].to(device)
                ref_chosen, ref_rejected = ref[:, 0], ref[:, 1]
            else:
                with torch.no_grad():
                    ref_chosen, ref_rejected = pair_logps(reference, tokenizer, part, device)
            (dpo_loss(chosen, rejected, ref_chosen, ref_rejected)[0].sum() / args.batch).backward()
        optimizer.step()

    def ours_reference_forward(policy, optimizer, i):
        ours(policy, optimizer, i, precomputed=False)

    def naive(policy, optimizer, i):
        prompts = [p.prompt for p in batches[i]]
        chosen = naive_logps(policy, tokenizer, prompts, [p.chosen for p in batches[i]], device)
        rejected = naive_logps(policy, tokenizer, prompts, [p.rejected for p in batches[i]], device)
        with torch.no_grad():
            ref_chosen = naive_logps(reference, tokenizer, prompts, [p.chosen for p in batches[i]], device)
            ref_rejected = naive_logps(reference, tokenizer, prompts, [p.rejected for p in batches[i]], device)
        dpo_step(policy, optimizer, chosen, rejected, ref_chosen, ref_rejected)

    def precompute():
        table["ref"] = reference_logps(reference, tokenizer, pairs, device, batch_size=args.micro_batch)

    use_trl = not args.no_trl and importlib.util.find_spec("trl") is not None
    trl_options = {"defaults": {}, "precompute_ref_log_probs": {"precompute_ref_log_probs": True},
                   "padding_free": {"padding_free": True}}
    per_pair = {}  # name -> seconds per pair, per repeat
    trl_runs: dict[str, list] = {name: [] for name in trl_options} if use_trl else {}
    for _ in range(args.repeats):
        precompute()  # warm-up
        per_pair.setdefault("precompute", []).append(timed(precompute, device) / len(pairs))
        for name, step in (("ours", ours), ("ours_reference_forward", ours_reference_forward), ("naive", naive)):
            per_pair.setdefault(name, []).append(runner(step, fused=name != "naive") / args.batch)
        for name, options in trl_options.items() if use_trl else ():
            trl_runs[name].append(trl_run(initial, reference, tokenizer, pairs, args.batch, device, **options))

    def rate(name):
        return spread([1 / s for s in per_pair[name]], 1)

    def ratio(ours_s, theirs_s):
        return spread([t / o for o, t in zip(ours_s, theirs_s)])

    ours_s, naive_s, pre_s = per_pair["ours"], per_pair["naive"], per_pair["precompute"]
    result["dpo"] = {
        "ours_pairs_per_s": rate("ours"), "ours_reference_forward_pairs_per_s": rate("ours_reference_forward"),
        "naive_pairs_per_s": rate("naive"), "precompute_s_per_pair": spread(pre_s, 5),
        "ratio_vs_naive": ratio(ours_s, naive_s),
        "reference_forward_ratio_vs_naive": ratio(per_pair["ours_reference_forward"], naive_s),
    }
    for epochs in (1, 3):  # whole runs: our precomputation once, then the epochs' steps
        result["dpo"][f"epoch_{epochs}_ratio_vs_naive"] = ratio([pre + epochs * o for pre, o in zip(pre_s, ours_s)],
                                                               [epochs * n for n in naive_s])
    if use_trl:
        result["trl"] = {}
        for name, runs in trl_runs.items():
            if any(r is None or "error" in r for r in runs):
                result["trl"][name] = next(r for r in runs if r is None or "error" in r)
                continue
            trl_s = [r["step_s"] / args.batch for r in runs]
            entry = {"pairs_per_s": spread([1 / s for s in trl_s], 1), "ours_ratio": ratio(ours_s, trl_s)}
            if name == "precompute_ref_log_probs":
                entry["startup_s_per_pair"] = spread([r["startup_s"] / len(pairs) for r in runs], 5)
                entry["ours_epoch_1_ratio"] = ratio([pre + o for pre, o in zip(pre_s, ours_s)],
                                                    [r["startup_s"] / len(pairs) + t for r, t in zip(runs, trl_s)])
            result["trl"][name] = entry

    rm = RewardModel.load("default", device=device)
    prompts, completions = [p.prompt for p in pairs[:128]], [p.chosen for p in pairs[:128]]
    rm.score(prompts, completions)
    t_batched = timed(lambda: rm.score(prompts, completions), device)
    t_loop = timed(lambda: [rm.score([p], [c]) for p, c in zip(prompts, completions)], device)
    result["rm"] = {"batched_per_s": round(len(prompts) / t_batched, 1), "loop_per_s": round(len(prompts) / t_loop, 1),
                    "ratio": round(t_loop / t_batched, 3)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
