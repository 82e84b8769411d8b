"""Supervised fine-tuning on demonstrations (the first step of RLHF).

    loss = - (1 / |completion tokens|) * sum_t log pi(y_t | x, y_<t)     over completion tokens only

The prompt conditions the model but is not learned. AdamW with linear warmup then linear decay
(the recipe of the InstructGPT/TRL seeds); the held-out loss is evaluated each epoch. Default
demonstrations for the embedded task: openings of *positive* train reviews (2-8 words, like the
prompts) continued by the review's next words, so SFT moves the LM toward positive reviews. Any
JSONL of ``{"prompt": ..., "completion": ...}`` works as well.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import get_linear_schedule_with_warmup

from pretrain import corpus, load_lm, save_lm
from pretrain.checkpoint import StepRun
from pretrain.config import hparam, require_non_negative, require_positive, validate_fields
from pretrain.model import resolve_device
from pretrain.optim import check_finite, check_model_finite, optimizer_step
from pretrain.progress import progress_bar
from rlhf.jsonl import read_records
from rlhf.logprobs import completion_logprobs, encode


@dataclass
class SFTConfig:
    """Supervised fine-tuning on (prompt, completion) demonstrations."""

    model: str = hparam("default", "'default' or an HF causal-LM dir")
    data: str = hparam("", "JSONL {prompt, completion}; empty = positive train reviews of the corpus")
    out: str = hparam("", "run dir: TensorBoard events, checkpoint-<step>/, final/ (default: runs/sft; with --resume: the resumed run's dir)")
    num_examples: int = hparam(4000, "demonstrations drawn when building the default data")
    completion_words: int = hparam(24, "words per completion when building the default data")
    epochs: int = hparam(1, "passes over the demonstrations")
    batch_size: int = hparam(32, "demonstrations per step")
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


def sft_loss(model, tokenizer, batch: list[dict[str, str]], device) -> torch.Tensor:
    """Mean NLL over the completion tokens of a batch (prompt tokens masked out)."""
    enc = encode(tokenizer, [d["prompt"] for d in batch], [d["completion"] for d in batch],
                 getattr(model.config, "n_positions", None), device)
    logps = completion_logprobs(model, enc["input_ids"], enc["attention_mask"], enc["completion_mask"])
    n_tokens = enc["completion_mask"][:, 1:].sum()
    if n_tokens == 0:
        raise ValueError("a batch of demonstrations has no completion tokens")
    return -logps.sum() / n_tokens


@torch.no_grad()
def eval_loss(model, tokenizer, demos: list[dict[str, str]], device, batch_size: int = 64) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(demos), batch_size):
        batch = demos[start : start + batch_size]
        enc = encode(tokenizer, [d["prompt"] for d in batch], [d["completion"] for d in batch],
                     getattr(model.config, "n_positions", None), device)
        total -= completion_logprobs(model, enc["input_ids"], enc["attention_mask"], enc["completion_mask"]).sum().item()
        count += int(enc["completion_mask"][:, 1:].sum())
    model.train(was_training)
    return total / count


def train_sft(cfg: SFTConfig) -> dict:
    """``textgym sft``: fine-tune, report held-out completion loss before and after.

    Checkpoints every ``checkpoint_every`` steps and on Ctrl-C (``pretrain.checkpoint.StepRun``);
    ``--resume OUT`` continues exactly (the batches are a function of the seed).
    """
    steps = StepRun(cfg, "sft")
    if (finished := steps.finished) is not None:
        return finished
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model, tokenizer = load_lm(steps.checkpoint or cfg.model, device=device)
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

    # Every epoch's batches up front (the same rng draws as drawing them per epoch): a resumed run
    # skips exactly the batches it already took.
    batches = []
    for epoch in range(cfg.epochs):
        order = rng.permutation(len(demos))
        batches += [(epoch, order[start : start + cfg.batch_size]) for start in range(0, len(demos), cfg.batch_size)]
    n_steps = len(batches)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * n_steps), n_steps)
    state = steps.restore(optimizer=optimizer, np_rng=rng, scheduler=scheduler)
    writer = steps.writer()
    before = state.get("eval_loss_before")
    if before is None:
        before = eval_loss(model, tokenizer, eval_demos, device)
        writer.add_scalar("eval/loss", before, 0)
    probe = encode(tokenizer, [demos[0]["prompt"]], [demos[0]["completion"]], None, device)  # checked finite before each save
    model.train()
    with steps, progress_bar("sft") as bar:
        task = bar.add_task("sft", total=n_steps, completed=steps.step, status="")
        for step in range(steps.step + 1, n_steps + 1):
            epoch, index = batches[step - 1]
            loss = sft_loss(model, tokenizer, [demos[i] for i in index], device)
            optimizer_step(loss, optimizer, model.parameters(), cfg.max_grad_norm, scheduler, f"at SFT step {step}")
            writer.add_scalar("loss/sft", loss.item(), step)
            writer.add_scalar("lr", scheduler.get_last_lr()[0], step)
            bar.update(task, advance=1, status=f"epoch {epoch} loss {loss.item():.3f}")
            if step == n_steps or batches[step][0] != epoch:  # the end of an epoch
                writer.add_scalar("eval/loss", eval_loss(model, tokenizer, eval_demos, device), step)
            steps.after_step(step, lambda d: save_lm(model, tokenizer, d), optimizer=optimizer, np_rng=rng,
                             scheduler=scheduler, state={"eval_loss_before": before},
                             check=lambda s: check_model_finite(model, probe["input_ids"], probe["attention_mask"], f"after SFT step {s}"))
    after = eval_loss(model, tokenizer, eval_demos, device)
    check_model_finite(model, where="after SFT")
    check_finite("the held-out loss after SFT", torch.tensor(after))
    writer.close()
    metrics = {"steps": n_steps, "train_examples": len(demos), "eval_loss_before": before, "eval_loss_after": after}

    def write_final(directory: Path) -> None:
        save_lm(model, tokenizer, directory)
        (directory / "metrics.json").write_text(json.dumps(metrics, indent=1))

    steps.save_final(write_final)
    print(json.dumps(metrics))
    return metrics
