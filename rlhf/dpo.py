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

With an adapter (``--peft lora|qlora|prompt-tuning``, ``pretrain.adapters``) only the adapter is
trained and pi_ref is the policy with its adapter disabled: the base weights are held once. Under
a data-parallel launch (``accelerate launch --num_processes N``) each of the N processes takes its
part of every global batch of N x ``batch_size`` pairs, so N processes take exactly the steps of
one process with N times the batch.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import get_linear_schedule_with_warmup

from pretrain import load_lm
from pretrain.adapters import AdaptedLM, ModelOptions, autocast, load_trainable_lm, model_options, trainable_parameters
from pretrain.checkpoint import StepRun, save_trained_lm
from pretrain.config import hparam, require_non_negative, require_positive, validate_fields
from pretrain.distributed import process_group
from pretrain.model import disable_dropout
from pretrain.optim import check_finite, check_model_finite, make_adam, optimizer_step
from pretrain.progress import progress_bar
from rlhf.logprobs import encode, packed_sequence_logprobs, text_token_limit, tokenize_pairs
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
class DPOConfig(ModelOptions):
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
    batch_size: int = hparam(32, "pairs per step (per process: N processes take N x batch_size)")
    micro_batch_size: int = hparam(16, "pairs per forward/backward pass; a step sums the gradients of its passes (the same step)")
    precompute_ref_logps: bool = hparam(True, "score every pair under pi_ref once before training, then free the reference "
                                              "copy (False: a reference forward in every step)")
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
        self.validate_model_options()
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; expected one of {LOSS_TYPES}")
        require_positive(self, "beta", "lr", "epochs", "batch_size", "micro_batch_size", "num_prompts", "max_new_tokens")
        require_non_negative(self, "tau", "max_grad_norm", "weight_decay", "checkpoint_every")
        require_positive(self, "keep_checkpoints")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.k < 2:
            raise ValueError(f"k must be >= 2 to form pairs, got {self.k}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


def pair_logps(model, tokenizer, pairs: list[PreferencePair], device, max_length: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs log pi(y_w | x) and log pi(y_l | x), each (B,) float32, of the chosen and
    rejected completions of ``pairs``, in one forward pass over the 2B rows (TRL's concatenated
    forward: one call of a data-parallel wrapper per backward pass), right-padded, with the LM head on
    the completion tokens only (``rlhf.logprobs.packed_sequence_logprobs``). ``model`` is called as the
    HF model is (a ``DistributedDataParallel`` wrapper, an adapter, a frozen reference); ``max_length``
    defaults to its context (``rlhf.logprobs.text_token_limit``), and a longer pair is a ``ValueError``."""
    max_length = text_token_limit(model) if max_length is None else max_length
    prompts = [p.prompt for p in pairs]
    prompt_ids, completion_ids = tokenize_pairs(tokenizer, prompts + prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs],
                                                max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    logps = packed_sequence_logprobs(model, prompt_ids, completion_ids, pad, device)  # (2B,)
    return logps[: len(pairs)], logps[len(pairs) :]


@torch.no_grad()
def reference_logps(reference, tokenizer, pairs: list[PreferencePair], device, max_length: int | None = None,
                    batch_size: int = 16, dtype: str = "float32") -> torch.Tensor:
    """log pi_ref(y_w | x) and log pi_ref(y_l | x) of every pair, (P, 2) float32 on the CPU, in
    no-grad passes over ``batch_size`` pairs of similar length (sorted, so little padding): what DPO's
    loss needs of the frozen reference, computed once per dataset instead of once per step (TRL's
    ``precompute_ref_log_probs``)."""
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].prompt) + max(len(pairs[i].chosen), len(pairs[i].rejected)))
    out = torch.empty((len(pairs), 2))
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        with autocast(dtype, device):
            chosen, rejected = pair_logps(reference, tokenizer, [pairs[i] for i in index], device, max_length)
        out[index] = torch.stack([chosen, rejected], 1).float().cpu()
    return out


@contextlib.contextmanager
def initial_lm(policy, reference):
    """The initial policy as a plain HF model, to sample preference data from: the frozen reference
    copy, or an adapter policy's base model with its adapter disabled (no copy)."""
    if isinstance(policy, AdaptedLM):
        with policy.adapter_disabled():
            yield policy.base_model
    else:
        yield reference


def load_policy_and_reference(cfg: DPOConfig, device, resume_from: Path | None):
    """``(policy, reference, tokenizer)``, dropout off in both: the policy to train (all weights,
    or an adapter on the base model; ``resume_from`` a checkpoint of this run), and pi_ref frozen:
    the policy with its adapter disabled (sharing every base weight), or a second copy of ``cfg.model``."""
    policy, tokenizer = load_trainable_lm(cfg.model, model_options(cfg), device, resume_from=resume_from)
    disable_dropout(policy)
    if isinstance(policy, AdaptedLM):
        reference = policy.reference()
    else:
        reference, _ = load_lm(cfg.model, device=device)
        disable_dropout(reference).requires_grad_(False)
    return policy, reference, tokenizer


def train_dpo(cfg: DPOConfig) -> dict:
    """``textgym dpo``: DPO training; ``final/`` is an HF dir that ``textgym eval --runs OUT`` evaluates
    against the initial model (held-out gold, RM, KL), as every other method's run. With ``--peft
    lora`` it holds the merged model and the adapter (``final/adapter/``); with prompt tuning the
    adapter alone (``pretrain.load_lm`` loads it on its base).

    Checkpoints every ``checkpoint_every`` steps and on Ctrl-C (``pretrain.checkpoint.StepRun``);
    ``--resume OUT`` continues exactly (built preference data is kept in ``OUT/train_pairs.jsonl``).
    Data-parallel under ``accelerate launch`` (see the module docstring).
    """
    dist = process_group(cfg.device)
    steps = StepRun(cfg, "dpo", dist)
    if (finished := steps.finished) is not None:
        return finished
    device = dist.device
    torch.manual_seed(cfg.seed)  # the same initial adapter in every process
    rng = np.random.default_rng(cfg.seed)  # the batch order: the same in every process
    out = steps.out
    policy, reference, tokenizer = load_policy_and_reference(cfg, device, steps.checkpoint)

    if cfg.data:
        pairs = load_jsonl(cfg.data)
    else:
        built = out / "train_pairs.jsonl"
        if not (cfg.resume and built.is_file()):  # else: built by the run being resumed
            def build() -> None:  # by the main process alone; the others read its file
                prompts = prompt_texts("train", cfg.num_prompts, cfg.seed)
                with initial_lm(policy, reference) as lm:
                    pairs = build_preferences(lm, tokenizer, prompts, cfg.k, cfg.tau, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
                save_jsonl(pairs, built)

            steps.on_main(build)
        pairs = load_jsonl(built)

    # Every epoch's global batches up front (the same rng draws as per epoch): a resumed run skips
    # exactly those taken. A global batch is batch_size pairs per process; each process trains on its
    # own part of it (steps.shard), and a last batch with fewer pairs than processes is dropped.
    global_batch = cfg.batch_size * dist.world_size
    batches = []
    for _ in range(cfg.epochs):
        order = rng.permutation(len(pairs))
        batches += [order[start : start + global_batch] for start in range(0, len(pairs), global_batch)]
    batches = [batch for batch in batches if len(batch) >= dist.world_size]
    n_steps = len(batches)
    params = trainable_parameters(policy)  # all weights, or the adapter's
    optimizer = make_adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, decoupled=True)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * n_steps), n_steps)
    torch.manual_seed(cfg.seed + dist.rank)  # each process's own stream (DPO draws none itself: dropout is off)
    steps.restore(optimizer=optimizer, np_rng=rng, scheduler=scheduler)
    writer = steps.writer()
    probe = encode(tokenizer, [pairs[0].prompt], [pairs[0].chosen], None, device)  # checked finite before each save
    model = dist.prepare(policy)  # gradients all-reduced across processes (the policy itself in one process)
    max_length = text_token_limit(policy)
    ref_table = None
    if cfg.precompute_ref_logps:
        # pi_ref's log-probs of the pairs this process still trains on, once, then the reference copy is
        # freed (an adapter's reference is the policy itself: nothing to free).
        mine = sorted({int(i) for batch in batches[steps.step :] for i in steps.shard(batch)})
        ref_table = torch.full((len(pairs), 2), float("nan"))
        if mine:
            ref_table[mine] = reference_logps(reference, tokenizer, [pairs[i] for i in mine], device, max_length,
                                              cfg.micro_batch_size, cfg.dtype)
        reference = None
    policy.train()
    last = {}
    with steps, progress_bar("dpo") as bar:
        task = bar.add_task("dpo", total=n_steps, completed=steps.step, status="", visible=dist.is_main)
        for step in range(steps.step + 1, n_steps + 1):
            index = steps.shard(batches[step - 1])
            # The mean over the global batch: the gradient all-reduce averages the processes' gradients,
            # so each divides its sum by the mean number of pairs per process.
            count = dist.global_count(torch.ones(len(index), device=device))
            # Micro-batches of micro_batch_size pairs, their gradients summed: the step of the whole
            # batch, in passes small enough for the CPU's caches (and for memory).
            optimizer.zero_grad(set_to_none=True)
            parts = [index[start : start + cfg.micro_batch_size] for start in range(0, len(index), cfg.micro_batch_size)]
            outputs = []
            for j, part in enumerate(parts):
                final_part = j == len(parts) - 1
                sync = contextlib.nullcontext() if final_part or not hasattr(model, "no_sync") else model.no_sync()
                with sync:
                    with autocast(cfg.dtype, device):  # bf16 matmuls for policy and reference when asked; weights stay fp32
                        chosen_logps, rejected_logps = pair_logps(model, tokenizer, [pairs[i] for i in part], device, max_length)
                        if ref_table is not None:
                            ref_chosen_logps, ref_rejected_logps = ref_table[part].to(device).unbind(1)
                        else:
                            with torch.no_grad():
                                ref_chosen_logps, ref_rejected_logps = pair_logps(reference, tokenizer, [pairs[i] for i in part],
                                                                                  device, max_length)
                    losses, chosen_rewards, rejected_rewards = dpo_loss(
                        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                        cfg.beta, cfg.loss_type, cfg.label_smoothing,
                    )
                    loss = losses.sum() / count
                    if final_part:
                        optimizer_step(loss, optimizer, params, cfg.max_grad_norm, scheduler, f"at DPO step {step}", zero_grad=False)
                    else:
                        check_finite("the loss", loss.detach(), f"at DPO step {step}")
                        loss.backward()
                outputs.append(torch.stack([t.detach().float() for t in (losses, chosen_rewards, rejected_rewards, chosen_logps,
                                                                          rejected_logps)], 1))
            losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps = torch.cat(outputs).unbind(1)
            metrics = dist.mean_metrics({
                "loss/dpo": losses.mean().item(),
                "rewards/chosen": chosen_rewards.mean().item(),
                "rewards/rejected": rejected_rewards.mean().item(),
                "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
                "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
                "logps/chosen": chosen_logps.mean().item(),
                "logps/rejected": rejected_logps.mean().item(),
            })
            for name, value in metrics.items():
                writer.add_scalar(name, value, step)
            writer.add_scalar("lr", scheduler.get_last_lr()[0], step)
            bar.update(task, advance=1, status=f"loss {metrics['loss/dpo']:.3f} acc {metrics['rewards/accuracies']:.2f}")
            last = {"loss": metrics["loss/dpo"], "accuracy": metrics["rewards/accuracies"], "margin": metrics["rewards/margins"]}
            steps.after_step(step, lambda d: save_trained_lm(policy, tokenizer, d), optimizer=optimizer, np_rng=rng,
                             scheduler=scheduler,
                             check=lambda s: check_model_finite(policy, probe["input_ids"], probe["attention_mask"], f"after DPO step {s}"))
    check_model_finite(policy, probe["input_ids"], probe["attention_mask"], "after DPO")

    metrics = {"steps": n_steps, "train_pairs": len(pairs), **last}
    writer.close()

    def write_final(directory: Path) -> None:
        save_trained_lm(policy, tokenizer, directory, final=True)
        (directory / "metrics.json").write_text(json.dumps(metrics, indent=1))

    steps.save_final(write_final)
    if dist.is_main:
        print(json.dumps(metrics))
    return metrics
