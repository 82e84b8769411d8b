"""Training a Bradley-Terry reward model on preference pairs (``textgym reward``), its held-out
evaluation, and shipping it as the package's default.

    loss = -log sigmoid(r(x, y_w) - r(x, y_l) - m)        (``rlhf.reward_model.bradley_terry_loss``)

Pairs are grouped by prompt and every distinct completion in a batch goes through the network once,
however many pairs it is in (InstructGPT's trick: a ranking of K costs K forward passes, not
K(K-1)). After training the scores are normalised on the training completions (mean 0, std 1).

``--peft lora`` trains a LoRA adapter on the backbone and the score head (``rlhf.reward_model``);
``final/`` is then the merged reward model, with the adapter in ``final/adapter/``. Under
``accelerate launch --num_processes N`` each process takes its part of every global batch of about
N x ``batch_size`` pairs, and the loss is the mean over all of them, so N processes take the steps
of one process with N times the batch.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from torch.utils.tensorboard import SummaryWriter
from transformers import get_linear_schedule_with_warmup

from pretrain import load_lm
from pretrain.adapters import ADAPTER_DIR, ModelOptions, autocast, enable_gradient_checkpointing, model_options, trainable_parameters
from pretrain.checkpoint import StepRun
from pretrain.config import hparam, require_non_negative, require_positive, validate_fields
from pretrain.distributed import Distributed, process_group
from pretrain.model import sha256_file
from pretrain.optim import check_finite, check_model_finite, optimizer_step
from pretrain.progress import progress_bar
from rlhf.gold import VaderGold, review_texts
from rlhf.preferences import PreferencePair, build_preferences, load_jsonl, prompt_texts, save_jsonl
from rlhf.reward_model import RewardModel, bradley_terry_loss, default_reward_model_dir


@dataclass
class RewardConfig(ModelOptions):
    """Train a Bradley-Terry reward model on preference pairs; defaults build the shipped one."""

    model: str = hparam("default", "backbone initialisation: 'default' or an HF causal-LM dir")
    data: str = hparam("", "preference JSONL {prompt, chosen, rejected}; empty = build it with the gold labeller")
    out: str = hparam("", "run dir: TensorBoard events, checkpoint-<step>/, final/ (the reward model) (default: runs/reward; "
                          "with --resume: the resumed run's dir)")
    num_prompts: int = hparam(8000, "train prompts when building data")
    k: int = hparam(6, "completions per prompt when building data (k(k-1)/2 pairs each)")
    tau: float = hparam(0.0, "labeller noise when building data (0 = noiseless)")
    max_new_tokens: int = hparam(32, "completion length when building data")
    eval_prompts: int = hparam(500, "held-out (test split) prompts for accuracy and Spearman")
    epochs: int = hparam(2, "passes over the pairs")
    batch_size: int = hparam(64, "pairs per step (grouped by prompt; per process: N processes take N x batch_size)")
    lr: float = hparam(3e-4, "peak AdamW learning rate (linear warmup and decay)")
    warmup_ratio: float = hparam(0.05, "fraction of steps spent warming up")
    weight_decay: float = hparam(0.0, "AdamW weight decay")
    margin: float = hparam(0.0, "Bradley-Terry margin m in -log sigmoid(r_w - r_l - m)")
    max_grad_norm: float = hparam(1.0, "clip the global gradient norm (0 = off)")
    seed: int = hparam(0, "seed")
    device: str = hparam("auto", "'auto', 'cpu' or 'cuda'")
    ship: bool = hparam(False, "write the result (fp16) + manifest into the package's default_rm dir")
    resume: str = hparam("", "continue the run in this dir from its newest complete checkpoint, with its settings")
    overwrite: bool = hparam(False, "start a new run in --out even if it holds another run or other files")
    checkpoint_every: int = hparam(200, "optimizer steps between checkpoints (0 = only on Ctrl-C)")
    keep_checkpoints: int = hparam(2, "complete checkpoints kept (older ones are deleted once a newer one is complete)")

    def __post_init__(self):
        validate_fields(self)
        if self.peft in ("qlora", "prompt-tuning"):
            raise ValueError(f"a reward model trains all weights or a LoRA adapter (--peft lora), not --peft {self.peft}")
        self.validate_model_options()
        require_positive(self, "epochs", "batch_size", "lr", "num_prompts", "max_new_tokens", "eval_prompts")
        require_non_negative(self, "tau", "weight_decay", "max_grad_norm", "checkpoint_every")
        require_positive(self, "keep_checkpoints")
        if self.k < 2:
            raise ValueError(f"k must be >= 2 to form pairs, got {self.k}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


def group_by_prompt(pairs: Sequence[PreferencePair]) -> list[list[PreferencePair]]:
    groups: dict[str, list[PreferencePair]] = defaultdict(list)
    for pair in pairs:
        groups[pair.prompt].append(pair)
    return list(groups.values())


def pair_rewards(rm: RewardModel, pairs: Sequence[PreferencePair], model: torch.nn.Module | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw rewards (B,) of chosen and rejected, each distinct (prompt, completion) computed once, by
    ``model`` (``rm`` in a data-parallel wrapper, for the pass that needs gradients) or ``rm``."""
    texts: dict[tuple[str, str], int] = {}
    for pair in pairs:
        for completion in (pair.chosen, pair.rejected):
            texts.setdefault((pair.prompt, completion), len(texts))
    keys = list(texts)
    rewards = rm.sequence_rewards(rm.tokenize([p for p, _ in keys], [c for _, c in keys]), model)
    chosen = torch.stack([rewards[texts[(p.prompt, p.chosen)]] for p in pairs])
    rejected = torch.stack([rewards[texts[(p.prompt, p.rejected)]] for p in pairs])
    return chosen, rejected


def check_finite_rm(rm: RewardModel, pairs: Sequence[PreferencePair], step: int) -> None:
    """Weights and the rewards of a few pairs finite: a reward model fit to save."""
    check_model_finite(rm, where=f"after reward-model step {step}")
    with torch.no_grad():
        check_finite("the reward model's scores", torch.stack(pair_rewards(rm, pairs[:2])), f"after reward-model step {step}")


def batches_by_prompt(pairs: Sequence[PreferencePair], batch_size: int, rng: np.random.Generator):
    """Shuffled batches of whole prompt groups, each holding about ``batch_size`` pairs."""
    groups = group_by_prompt(pairs)
    batch: list[PreferencePair] = []
    for i in rng.permutation(len(groups)):
        batch += groups[i]
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def pairwise_accuracy(rm: RewardModel, pairs: Sequence[PreferencePair], batch_size: int = 64) -> float:
    """Fraction of pairs whose chosen completion the RM scores higher; ``ValueError`` for no pairs."""
    if not pairs:
        raise ValueError("no preference pairs to measure the accuracy on")
    was_training = rm.training
    rm.eval()
    correct = 0
    for start in range(0, len(pairs), batch_size):
        chosen, rejected = pair_rewards(rm, pairs[start : start + batch_size])
        correct += (chosen > rejected).sum().item()
    rm.train(was_training)
    return correct / len(pairs)


def evaluate_reward_model(
    rm: RewardModel, prompts: Sequence[str], completions: Sequence[str], gold_scores: Sequence[float],
    pairs: Sequence[PreferencePair],
) -> dict[str, float]:
    """Held-out pairwise accuracy (NaN without pairs: every completion tied on gold) and Spearman
    rank correlation of RM scores with gold scores."""
    scores = rm.score(prompts, completions)
    return {
        "pairwise_accuracy": pairwise_accuracy(rm, pairs) if pairs else float("nan"),
        "spearman_gold": float(spearmanr(scores, gold_scores).statistic),
        "eval_pairs": len(pairs),
        "eval_samples": len(scores),
    }


def fit(
    rm: RewardModel,
    pairs: Sequence[PreferencePair],
    cfg: RewardConfig,
    rng: np.random.Generator,
    writer: SummaryWriter | None = None,
    eval_pairs: Sequence[PreferencePair] = (),
    steps: StepRun | None = None,
) -> int:
    """Minimise the Bradley-Terry loss over ``pairs`` (AdamW, linear warmup/decay); returns steps.

    With ``steps`` (``textgym reward``), it checkpoints and resumes (``pretrain.checkpoint.StepRun``),
    and in a data-parallel run each process trains on its part of every global batch.
    """
    if not pairs:
        raise ValueError("no preference pairs to train on")
    dist: Distributed | None = steps.dist if steps is not None else None
    world = dist.world_size if dist is not None else 1
    # Draw every epoch's global batches up front (the same rng draws as drawing them per epoch) so the
    # schedule's length is exact (batch counts vary with the shuffle, as groups differ in size) and
    # a resumed run skips exactly the batches it already took. A global batch holds about batch_size
    # pairs per process; one with fewer pairs than processes is dropped.
    batches = [(epoch, batch) for epoch in range(cfg.epochs) for batch in list(batches_by_prompt(pairs, cfg.batch_size * world, rng))]
    batches = [(epoch, batch) for epoch, batch in batches if len(batch) >= world]
    n_steps = len(batches)
    params = trainable_parameters(rm)  # all weights, or the adapter's and the score head
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * n_steps), n_steps)
    start = steps.restore(optimizer=optimizer, np_rng=rng, scheduler=scheduler)["step"] if steps is not None else 0
    model = dist.prepare(rm) if dist is not None else rm  # gradients all-reduced across processes
    rm.train()
    with progress_bar("reward") as bar:
        task = bar.add_task("reward", total=n_steps, completed=start, status="", visible=dist is None or dist.is_main)
        for step in range(start + 1, n_steps + 1):
            epoch, batch = batches[step - 1]
            batch = steps.shard(batch) if steps is not None else batch
            with autocast(cfg.dtype, rm.device):  # bf16 matmuls when asked; weights stay fp32
                chosen, rejected = pair_rewards(rm, batch, model)
            losses = bradley_terry_loss(chosen, rejected, cfg.margin)
            # The mean over the global batch: each process divides its sum by the mean number of pairs
            # per process, and the gradient all-reduce averages over processes.
            loss = losses.sum() / (dist.global_count(losses.new_ones(len(batch))) if dist is not None else len(batch))
            optimizer_step(loss, optimizer, params, cfg.max_grad_norm, scheduler, f"at reward-model step {step}")
            metrics = {"loss/bradley_terry": losses.mean().item(), "train/accuracy": (chosen > rejected).float().mean().item(),
                       "train/margin": (chosen - rejected).mean().item()}
            metrics = dist.mean_metrics(metrics) if dist is not None else metrics
            if writer is not None:
                for name, value in metrics.items():
                    writer.add_scalar(name, value, step)
                writer.add_scalar("lr", scheduler.get_last_lr()[0], step)
            bar.update(task, advance=1, status=f"epoch {epoch} loss {metrics['loss/bradley_terry']:.3f} "
                                                f"acc {metrics['train/accuracy']:.2f}")
            if (writer is not None and eval_pairs and (step == n_steps or batches[step][0] != epoch)
                    and (dist is None or dist.is_main)):
                writer.add_scalar("eval/pairwise_accuracy", pairwise_accuracy(rm, eval_pairs), step)
            if steps is not None:
                steps.after_step(step, lambda d: save_reward_model(rm, d), optimizer=optimizer, np_rng=rng, scheduler=scheduler,
                                 check=lambda s: check_finite_rm(rm, pairs[:2], s))
    rm.eval()
    return n_steps


def save_reward_model(rm: RewardModel, path: Path, final: bool = False) -> None:
    """A checkpoint (all weights: an RM dir; LoRA: the adapter and head in ``adapter/``), or with
    ``final`` the reward model dir (merged), plus the adapter in ``adapter/`` for a LoRA one."""
    if rm.peft is None:
        rm.save(path)
        return
    rm.save_adapter(path / ADAPTER_DIR)
    if final:
        rm.save(path)


def normalise(rm: RewardModel, pairs: Sequence[PreferencePair]) -> None:
    """Set ``reward_mean``/``reward_std`` so scores have mean 0, std 1 over the pairs' completions."""
    texts = sorted({(p.prompt, c) for p in pairs for c in (p.chosen, p.rejected)})
    rm.model.config.reward_mean, rm.model.config.reward_std = 0.0, 1.0
    raw = torch.tensor(rm.score([p for p, _ in texts], [c for _, c in texts]))
    check_finite("the reward model's scores of its training completions", raw)
    rm.model.config.reward_mean = float(raw.mean())
    rm.model.config.reward_std = float(raw.std().clamp(min=1e-6)) if len(raw) > 1 else 1.0


def train_reward_model(cfg: RewardConfig) -> dict:
    """``textgym reward``: train, evaluate on held-out prompts, save ``OUT/final`` (and ship).

    Checkpoints every ``checkpoint_every`` steps and on Ctrl-C; ``--resume OUT`` continues exactly
    (built train and held-out pairs are kept in ``OUT/train_pairs.jsonl`` and ``OUT/eval_pairs.jsonl``).
    Data-parallel under ``accelerate launch`` (see the module docstring): the main process alone
    builds the data, evaluates and writes.
    """
    dist = process_group(cfg.device)
    steps = StepRun(cfg, "reward", dist)
    if (finished := steps.finished) is not None:
        return finished
    device = dist.device
    torch.manual_seed(cfg.seed)  # the same initial adapter in every process
    rng = np.random.default_rng(cfg.seed)  # the batch order: the same in every process
    out = steps.out
    if steps.checkpoint is not None and not cfg.peft:
        rm = RewardModel.load(steps.checkpoint, device)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(rm.model)
    else:
        rm = RewardModel.from_lm(cfg.model, device, model_options(cfg), resume_from=steps.checkpoint)

    def kept(name: str) -> bool:  # data built by the run being resumed
        return bool(cfg.resume) and (out / name).is_file()

    gold = VaderGold()
    if not (kept("eval_pairs.jsonl") and (cfg.data or kept("train_pairs.jsonl"))):
        def build() -> None:  # by the main process alone; the others read its files
            policy, tokenizer = load_lm(cfg.model, device=device)
            if not cfg.data and not kept("train_pairs.jsonl"):
                prompts = prompt_texts("train", cfg.num_prompts, cfg.seed)
                save_jsonl(build_preferences(policy, tokenizer, prompts, cfg.k, cfg.tau, max_new_tokens=cfg.max_new_tokens,
                                             seed=cfg.seed), out / "train_pairs.jsonl")
            # Held-out evaluation data: fresh samples for test-split prompts, labelled without noise.
            if not kept("eval_pairs.jsonl"):
                eval_prompts = prompt_texts("test", cfg.eval_prompts, cfg.seed)
                save_jsonl(build_preferences(policy, tokenizer, eval_prompts, 4, 0.0, gold, cfg.max_new_tokens,
                                             seed=cfg.seed + 1_000_003), out / "eval_pairs.jsonl")

        steps.on_main(build)
    pairs = load_jsonl(cfg.data) if cfg.data else load_jsonl(out / "train_pairs.jsonl", allow_empty=True)
    eval_pairs = load_jsonl(out / "eval_pairs.jsonl", allow_empty=True)

    torch.manual_seed(cfg.seed + dist.rank)  # each process's own stream (the reward model draws none: dropout is off)
    with steps:
        writer = steps.writer()
        step = fit(rm, pairs, cfg, rng, writer, eval_pairs, steps)
    check_model_finite(rm, where="after reward-model training")

    def evaluate() -> dict:  # by the main process
        normalise(rm, pairs)
        eval_texts = sorted({(p.prompt, c) for p in eval_pairs for c in (p.chosen, p.rejected)})
        eval_gold = gold(review_texts([p for p, _ in eval_texts], [c for _, c in eval_texts]))
        metrics = evaluate_reward_model(rm, [p for p, _ in eval_texts], [c for _, c in eval_texts], eval_gold, eval_pairs)
        metrics.update(train_pairs=len(pairs), steps=step)
        for key in ("pairwise_accuracy", "spearman_gold"):
            writer.add_scalar(f"eval/{key}", metrics[key], step)
        return metrics

    metrics = dist.gather_objects(steps.on_main(evaluate))[0]  # the main process's, on every process
    writer.close()

    def write_final(directory: Path) -> None:
        save_reward_model(rm, directory, final=True)
        (directory / "metrics.json").write_text(json.dumps(metrics, indent=1))

    steps.save_final(write_final)
    if dist.is_main:
        print(json.dumps(metrics))
    if cfg.ship:
        steps.on_main(lambda: ship(rm, cfg, metrics))
    return metrics


def ship(rm: RewardModel, cfg: RewardConfig, metrics: dict) -> Path:
    target = default_reward_model_dir()
    target.mkdir(exist_ok=True)
    for stale in target.glob("*"):
        stale.unlink()
    rm.save(target, dtype=torch.float16)
    manifest = {
        "command": "textgym reward --out runs/default-rm --ship",
        "backbone": cfg.model,
        "gold": VaderGold.name,
        "config": asdict(cfg),
        **{k: round(v, 4) if isinstance(v, float) and math.isfinite(v) else v for k, v in metrics.items()},
        "reward_mean": rm.mean,
        "reward_std": rm.std,
        "dtype": "float16",
        "sha256": sha256_file(target / "model.safetensors"),
    }
    (target / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"shipped to {target}")
    return target
