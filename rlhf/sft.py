"""Supervised fine-tuning on demonstrations (the first step of RLHF).

    loss = - (1 / |completion tokens|) * sum_t log pi(y_t | x, y_<t)     over completion tokens only

The prompt conditions the model but is not learned. AdamW with linear warmup then linear decay
(the recipe of the InstructGPT/TRL seeds); the held-out loss is evaluated each epoch. Default
demonstrations for the embedded task: openings of *positive* train reviews (2-8 words, like the
prompts) continued by the review's next words, so SFT moves the LM toward positive reviews. Any
JSONL of ``{"prompt": ..., "completion": ...}`` works as well.

``--peft lora|qlora|prompt-tuning`` trains an adapter instead of every weight (``pretrain.adapters``);
the model keeps its dropout (SFT compares no two passes). Under ``accelerate launch --num_processes
N`` each process takes its part of every global batch of N x ``batch_size`` demonstrations, and the
loss is the mean over all N parts' completion tokens, so N processes take the steps of one process
with N times the batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import get_linear_schedule_with_warmup

from pretrain import corpus
from pretrain.adapters import ModelOptions, autocast, load_trainable_lm, model_options, trainable_parameters
from pretrain.checkpoint import StepRun, save_trained_lm
from pretrain.config import hparam, require_non_negative, require_positive, validate_fields
from pretrain.distributed import Distributed, process_group
from pretrain.optim import check_finite, check_model_finite, make_adam, optimizer_step
from pretrain.progress import progress_bar
from rlhf.jsonl import read_records
from rlhf.logprobs import completion_logprobs, encode, text_token_limit


@dataclass
class SFTConfig(ModelOptions):
    """Supervised fine-tuning on (prompt, completion) demonstrations."""

    model: str = hparam("default", "'default' or an HF causal-LM dir")
    data: str = hparam("", "JSONL {prompt, completion}; empty = positive train reviews of the corpus")
    out: str = hparam("", "run dir: TensorBoard events, checkpoint-<step>/, final/ (default: runs/sft; with --resume: the resumed run's dir)")
    num_examples: int = hparam(4000, "demonstrations drawn when building the default data")
    completion_words: int = hparam(24, "words per completion when building the default data")
    epochs: int = hparam(1, "passes over the demonstrations")
    batch_size: int = hparam(32, "demonstrations per step (per process: N processes take N x batch_size)")
    lr: float = hparam(1e-4, "peak AdamW learning rate (linear warmup and decay)")
    warmup_ratio: float = hparam(0.1, "fraction of steps spent warming up")
    weight_decay: float = hparam(0.0, "AdamW weight decay")
    max_grad_norm: float = hparam(1.0, "clip the global gradient norm (0 = off)")
    seed: int = hparam(0, "seed")
    device: str = hparam("auto", "'auto', 'cpu' or 'cuda'")
    resume: str = hparam("", "continue the run in this dir from its newest complete checkpoint, with its settings")
    overwrite: bool = hparam(False, "start a new run in --out even if it holds another run or other files")
    checkpoint_every: int = hparam(200, "optimizer steps between checkpoints (0 = only on Ctrl-C)")
    keep_checkpoints: int = hparam(2, "complete checkpoints kept (older ones are deleted once a newer one is complete)")

    def __post_init__(self):
        validate_fields(self)
        self.validate_model_options()
        require_positive(self, "epochs", "batch_size", "lr", "num_examples", "completion_words")
        require_non_negative(self, "weight_decay", "max_grad_norm", "checkpoint_every")
        require_positive(self, "keep_checkpoints")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


def review_demonstrations(split: str, n: int, completion_words: int, seed: int) -> list[dict[str, str]]:
    """Positive reviews of a split cut into (opening of 2-8 words, next ``completion_words`` words)."""
    rng = np.random.default_rng(seed)
    positive = [r.text.split(" ") for r in corpus.reviews(split, seed) if r.label == 1]
    positive = [w for w in positive if len(w) > 8 + 1]
    chosen = rng.choice(len(positive), size=min(n, len(positive)), replace=False)
    demos = []
    for i in chosen:
        words = positive[i]
        k = int(rng.integers(2, 9))
        demos.append({"prompt": " ".join(words[:k]), "completion": " " + " ".join(words[k : k + completion_words])})
    return demos


def sft_loss(model, tokenizer, batch: list[dict[str, str]], device, dist: Distributed | None = None,
             max_length: int | None = None) -> torch.Tensor:
    """Mean NLL over the completion tokens of a batch (prompt tokens masked out).

    ``model`` is called as the HF model is (a data-parallel wrapper, an adapter); ``max_length``
    defaults to its context. With ``dist``, the sum is divided by the mean number of completion tokens
    per process, so the gradient all-reduce (a mean over processes) gives the mean over every
    process's tokens. Raises ``ValueError`` for a batch with no completion token."""
    enc = encode(tokenizer, [d["prompt"] for d in batch], [d["completion"] for d in batch],
                 text_token_limit(model) if max_length is None else max_length, device)
    logps = completion_logprobs(model, enc["input_ids"], enc["attention_mask"], enc["completion_mask"])
    mask = enc["completion_mask"][:, 1:].float()  # float: the mean count over processes need not be whole
    if mask.sum() == 0:
        raise ValueError("a batch of demonstrations has no completion tokens")
    return -logps.sum() / (mask.sum() if dist is None else dist.global_count(mask))


@torch.no_grad()
def eval_loss(model, tokenizer, demos: list[dict[str, str]], device, batch_size: int = 64, steps: StepRun | None = None,
              dtype: str = "float32") -> float:
    """Held-out NLL per completion token; with ``steps`` of a data-parallel run each process scores
    its part of ``demos`` and the sums are added up."""
    was_training = model.training
    model.eval()
    if steps is not None:
        demos = steps.shard(demos)
    total, count = 0.0, 0
    with autocast(dtype, device):
        for start in range(0, len(demos), batch_size):
            batch = demos[start : start + batch_size]
            enc = encode(tokenizer, [d["prompt"] for d in batch], [d["completion"] for d in batch], text_token_limit(model), device)
            total -= completion_logprobs(model, enc["input_ids"], enc["attention_mask"], enc["completion_mask"]).sum().item()
            count += int(enc["completion_mask"][:, 1:].sum())
    model.train(was_training)
    if steps is not None:
        total, count = float(steps.dist.sum(total)), float(steps.dist.sum(count))
    return total / count


def train_sft(cfg: SFTConfig) -> dict:
    """``textgym sft``: fine-tune, report held-out completion loss before and after.

    ``final/`` is an HF dir (with ``--peft lora``: the merged model, and the adapter in
    ``final/adapter/``; with prompt tuning: the adapter alone, which ``pretrain.load_lm`` loads).
    Checkpoints every ``checkpoint_every`` steps and on Ctrl-C (``pretrain.checkpoint.StepRun``);
    ``--resume OUT`` continues exactly (the batches are a function of the seed). Data-parallel under
    ``accelerate launch`` (see the module docstring).
    """
    dist = process_group(cfg.device)
    steps = StepRun(cfg, "sft", dist)
    if (finished := steps.finished) is not None:
        return finished
    device = dist.device
    torch.manual_seed(cfg.seed)  # the same initial adapter in every process
    rng = np.random.default_rng(cfg.seed)  # the data and batch order: the same in every process
    model, tokenizer = load_trainable_lm(cfg.model, model_options(cfg), device, resume_from=steps.checkpoint)
    if cfg.data:
        demos = read_records(cfg.data, ("prompt", "completion"), non_empty=("prompt", "completion"))
        rng.shuffle(demos)
        n_eval = max(1, len(demos) // 20)
        eval_demos, demos = demos[:n_eval], demos[n_eval:]
    else:
        demos = review_demonstrations("train", cfg.num_examples, cfg.completion_words, cfg.seed)
        eval_demos = review_demonstrations("test", 500, cfg.completion_words, cfg.seed)
    if not demos:
        raise ValueError("no demonstrations left to train on")

    # Every epoch's global batches up front (the same rng draws as drawing them per epoch): a resumed
    # run skips exactly the batches it already took. A global batch is batch_size demonstrations per
    # process, each process trains on its part (steps.shard); a last batch smaller than the number of
    # processes is dropped.
    global_batch = cfg.batch_size * dist.world_size
    batches = []
    for epoch in range(cfg.epochs):
        order = rng.permutation(len(demos))
        batches += [(epoch, order[start : start + global_batch]) for start in range(0, len(demos), global_batch)]
    batches = [(epoch, index) for epoch, index in batches if len(index) >= dist.world_size]
    n_steps = len(batches)
    params = trainable_parameters(model)  # all weights, or the adapter's
    optimizer = make_adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, decoupled=True)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * n_steps), n_steps)
    torch.manual_seed(cfg.seed + dist.rank)  # each process's own dropout masks
    state = steps.restore(optimizer=optimizer, np_rng=rng, scheduler=scheduler)
    writer = steps.writer()
    before = state.get("eval_loss_before")
    if before is None:
        before = eval_loss(model, tokenizer, eval_demos, device, steps=steps, dtype=cfg.dtype)
        writer.add_scalar("eval/loss", before, 0)
    probe = encode(tokenizer, [demos[0]["prompt"]], [demos[0]["completion"]], None, device)  # checked finite before each save
    wrapped = dist.prepare(model)  # gradients all-reduced across processes (the model itself in one process)
    max_length = text_token_limit(model)
    model.train()
    with steps, progress_bar("sft") as bar:
        task = bar.add_task("sft", total=n_steps, completed=steps.step, status="", visible=dist.is_main)
        for step in range(steps.step + 1, n_steps + 1):
            epoch, index = batches[step - 1]
            with autocast(cfg.dtype, device):  # bf16 matmuls when asked; weights stay fp32
                loss = sft_loss(wrapped, tokenizer, [demos[i] for i in steps.shard(index)], device, dist, max_length)
            optimizer_step(loss, optimizer, params, cfg.max_grad_norm, scheduler, f"at SFT step {step}")
            loss_value = float(dist.mean(loss.item()))  # the global batch's mean NLL per completion token
            writer.add_scalar("loss/sft", loss_value, step)
            writer.add_scalar("lr", scheduler.get_last_lr()[0], step)
            bar.update(task, advance=1, status=f"epoch {epoch} loss {loss_value:.3f}")
            if step == n_steps or batches[step][0] != epoch:  # the end of an epoch
                writer.add_scalar("eval/loss", eval_loss(model, tokenizer, eval_demos, device, steps=steps, dtype=cfg.dtype), step)
            steps.after_step(step, lambda d: save_trained_lm(model, tokenizer, d), optimizer=optimizer, np_rng=rng,
                             scheduler=scheduler, state={"eval_loss_before": before},
                             check=lambda s: check_model_finite(model, probe["input_ids"], probe["attention_mask"], f"after SFT step {s}"))
    after = eval_loss(model, tokenizer, eval_demos, device, steps=steps, dtype=cfg.dtype)
    check_model_finite(model, where="after SFT")
    check_finite("the held-out loss after SFT", torch.tensor(after))
    writer.close()
    metrics = {"steps": n_steps, "train_examples": len(demos), "eval_loss_before": before, "eval_loss_after": after}

    def write_final(directory: Path) -> None:
        save_trained_lm(model, tokenizer, directory, final=True)
        (directory / "metrics.json").write_text(json.dumps(metrics, indent=1))

    steps.save_final(write_final)
    if dist.is_main:
        print(json.dumps(metrics))
    return metrics
