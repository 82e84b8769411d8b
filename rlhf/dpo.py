"""Direct Preference Optimization (Rafailov et al. 2023) and its variants, as a loss and a trainer.

RLHF's KL-regularised objective max E[r] - beta KL(pi || pi_ref) has the closed-form optimum
pi*(y|x) = pi_ref(y|x) exp(r(x,y) / beta) / Z(x), so r(x,y) = beta log(pi(y|x) / pi_ref(y|x)) + beta
log Z(x). Substituting into the Bradley-Terry likelihood, the partition function Z(x) cancels and
the policy is fitted to preferences directly, with no reward model and no sampling:

    h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))
    sigmoid: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (DPO; eps > 0 = conservative DPO)
    ipo:     (h - 1 / (2 beta))^2                                      (Azar et al. 2023)
    hinge:   max(0, 1 - beta h)                                        (SLiC, Zhao et al. 2023)

and beta (log pi - log pi_ref) is the *implicit reward* of a completion.

Policy and reference run with dropout off (``pretrain.model.disable_dropout``): log pi and
log pi_ref of the same weights are then equal, so the implicit rewards and margins are exactly 0
at step 0, as the derivation assumes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import get_linear_schedule_with_warmup

from pretrain import load_lm, save_lm
from pretrain.checkpoint import StepRun
from pretrain.config import hparam, require_non_negative, require_positive, validate_fields
from pretrain.model import disable_dropout, resolve_device
from pretrain.optim import check_model_finite, optimizer_step
from pretrain.progress import progress_bar
from rlhf.logprobs import encode, sequence_logprobs
from rlhf.preferences import PreferencePair, build_preferences, load_jsonl, prompt_texts, save_jsonl

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example DPO losses and implicit rewards beta (log pi - log pi_ref) of chosen and rejected."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1 - beta * h)
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


@dataclass
class DPOConfig:
    """Fine-tune a policy on preference pairs with DPO against a frozen copy of itself."""

    model: str = hparam("default", "policy (and reference) init: 'default' or an HF causal-LM dir")
    data: str = hparam("", "preference JSONL {prompt, chosen, rejected}; empty = build it with the gold labeller")
    out: str = hparam("", "run dir: TensorBoard events, checkpoint-<step>/, final/ (default: runs/dpo; with --resume: the resumed run's dir)")
    beta: float = hparam(0.1, "KL strength beta of the implicit reward")
    loss_type: str = hparam("sigmoid", f"one of {LOSS_TYPES}")
    label_smoothing: float = hparam(0.0, "conservative DPO: assumed label-flip probability (sigmoid loss)")
    num_prompts: int = hparam(3000, "train prompts when building data")
    k: int = hparam(4, "completions per prompt when building data")
    tau: float = hparam(0.0, "labeller noise when building data")
    max_new_tokens: int = hparam(32, "completion length (data building and evaluation)")
    epochs: int = hparam(1, "passes over the pairs")
    batch_size: int = hparam(32, "pairs per step")
    lr: float = hparam(5e-5, "peak AdamW learning rate (linear warmup and decay)")
    warmup_ratio: float = hparam(0.1, "fraction of steps spent warming up")
    max_grad_norm: float = hparam(1.0, "clip the global gradient norm (0 = off)")
    weight_decay: float = hparam(0.0, "AdamW weight decay")
    seed: int = hparam(0, "seed")
    device: str = hparam("auto", "'auto', 'cpu' or 'cuda'")
    resume: str = hparam("", "continue the run in this dir from its newest complete checkpoint, with its settings")
    overwrite: bool = hparam(False, "start a new run in --out even if it holds another run or other files")
    checkpoint_every: int = hparam(200, "optimizer steps between checkpoints (0 = only on Ctrl-C)")
    keep_checkpoints: int = hparam(2, "complete checkpoints kept (older ones are deleted once a newer one is complete)")

    def __post_init__(self):
        validate_fields(self)
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; expected one of {LOSS_TYPES}")
        require_positive(self, "beta", "lr", "epochs", "batch_size", "num_prompts", "max_new_tokens")
        require_non_negative(self, "tau", "max_grad_norm", "weight_decay", "checkpoint_every")
        require_positive(self, "keep_checkpoints")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.k < 2:
            raise ValueError(f"k must be >= 2 to form pairs, got {self.k}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


def pair_logps(model, tokenizer, pairs: list[PreferencePair], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs of the chosen and of the rejected completions (each batch padded to its own width)."""
    max_length = getattr(model.config, "n_positions", None)
    prompts = [p.prompt for p in pairs]
    logps = []
    for completions in ([p.chosen for p in pairs], [p.rejected for p in pairs]):
        enc = encode(tokenizer, prompts, completions, max_length, device)
        logps.append(sequence_logprobs(model, enc["input_ids"], enc["attention_mask"], enc["completion_mask"]))
    return logps[0], logps[1]


def train_dpo(cfg: DPOConfig) -> dict:
    """``textgym dpo``: DPO training; ``final/`` is an HF dir that ``textgym eval --runs OUT`` evaluates
    against the initial model (held-out gold, RM, KL), as every other method's run.

    Checkpoints every ``checkpoint_every`` steps and on Ctrl-C (``pretrain.checkpoint.StepRun``);
    ``--resume OUT`` continues exactly (built preference data is kept in ``OUT/train_pairs.jsonl``).
    """
    steps = StepRun(cfg, "dpo")
    if (finished := steps.finished) is not None:
        return finished
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    out = steps.out
    reference, tokenizer = load_lm(cfg.model, device=device)
    policy, _ = load_lm(steps.checkpoint or cfg.model, device=device)
    disable_dropout(policy)
    disable_dropout(reference).requires_grad_(False)

    if cfg.data:
        pairs = load_jsonl(cfg.data)
    elif (out / "train_pairs.jsonl").is_file() and cfg.resume:  # built by the run being resumed
        pairs = load_jsonl(out / "train_pairs.jsonl")
    else:
        prompts = prompt_texts("train", cfg.num_prompts, cfg.seed)
        pairs = build_preferences(reference, tokenizer, prompts, cfg.k, cfg.tau, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
        save_jsonl(pairs, out / "train_pairs.jsonl")

    # Every epoch's batches up front (the same rng draws as per epoch): a resumed run skips exactly those taken.
    batches = []
    for _ in range(cfg.epochs):
        order = rng.permutation(len(pairs))
        batches += [order[start : start + cfg.batch_size] for start in range(0, len(pairs), cfg.batch_size)]
    n_steps = len(batches)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * n_steps), n_steps)
    steps.restore(optimizer=optimizer, np_rng=rng, scheduler=scheduler)
    writer = steps.writer()
    probe = encode(tokenizer, [pairs[0].prompt], [pairs[0].chosen], None, device)  # checked finite before each save
    policy.train()
    last = {}
    with steps, progress_bar("dpo") as bar:
        task = bar.add_task("dpo", total=n_steps, completed=steps.step, status="")
        for step in range(steps.step + 1, n_steps + 1):
            batch = [pairs[i] for i in batches[step - 1]]
            chosen_logps, rejected_logps = pair_logps(policy, tokenizer, batch, device)
            with torch.no_grad():
                ref_chosen_logps, ref_rejected_logps = pair_logps(reference, tokenizer, batch, device)
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                cfg.beta, cfg.loss_type, cfg.label_smoothing,
            )
            loss = losses.mean()
            optimizer_step(loss, optimizer, policy.parameters(), cfg.max_grad_norm, scheduler, f"at DPO step {step}")
            accuracy = (chosen_rewards > rejected_rewards).float().mean().item()
            writer.add_scalar("loss/dpo", loss.item(), step)
            writer.add_scalar("rewards/chosen", chosen_rewards.mean().item(), step)
            writer.add_scalar("rewards/rejected", rejected_rewards.mean().item(), step)
            writer.add_scalar("rewards/accuracies", accuracy, step)
            writer.add_scalar("rewards/margins", (chosen_rewards - rejected_rewards).mean().item(), step)
            writer.add_scalar("logps/chosen", chosen_logps.mean().item(), step)
            writer.add_scalar("logps/rejected", rejected_logps.mean().item(), step)
            writer.add_scalar("lr", scheduler.get_last_lr()[0], step)
            bar.update(task, advance=1, status=f"loss {loss.item():.3f} acc {accuracy:.2f}")
            last = {"loss": loss.item(), "accuracy": accuracy, "margin": (chosen_rewards - rejected_rewards).mean().item()}
            steps.after_step(step, lambda d: save_lm(policy, tokenizer, d), optimizer=optimizer, np_rng=rng, scheduler=scheduler,
                             check=lambda s: check_model_finite(policy, probe["input_ids"], probe["attention_mask"], f"after DPO step {s}"))
    check_model_finite(policy, probe["input_ids"], probe["attention_mask"], "after DPO")

    metrics = {"steps": n_steps, "train_pairs": len(pairs), **last}
    writer.close()

    def write_final(directory: Path) -> None:
        save_lm(policy, tokenizer, directory)
        (directory / "metrics.json").write_text(json.dumps(metrics, indent=1))

    steps.save_final(write_final)
    print(json.dumps(metrics))
    return metrics
