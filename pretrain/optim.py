"""One optimizer step, and non-finite values stopped where they arise.

Every training loop of the library (pretraining, SFT, reward model, DPO, the RL agents) takes its
gradient steps through :func:`optimizer_step`:

    check the loss is finite  ->  backward  ->  clip the global gradient norm  ->  check the norm
    is finite  ->  step  ->  advance the learning-rate schedule

so a non-finite loss or gradient is reported as such (``NonFiniteError`` naming the quantity and
the step) *before* it reaches the weights. Weights that stay finite can still make non-finite
logits (a learning rate of 100 grows them to ~1e10); loops that write checkpoints check the model's
outputs before writing one (``agents.policy.LMPolicy.check_finite``), so no checkpoint is ever
written from a non-finite state.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def make_adam(params, lr: float, *, eps: float = 1e-8, betas: tuple[float, float] = (0.9, 0.999),
              weight_decay: float = 0.0, decoupled: bool = False) -> torch.optim.Optimizer:
    """Adam (Kingma & Ba 2015), or AdamW's decoupled weight decay (Loshchilov & Hutter 2019) with
    ``decoupled``, as every trainer of the library builds it: torch's fused implementation (one kernel
    for all tensors) wherever it runs, CPU included (4x faster a step than the default per-tensor loop
    on the shipped LM's 4.3M weights), else the default. ``params``: tensors or param groups."""
    params = list(params)
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    fused = bool(tensors) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in tensors)
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    return cls(params, lr=lr, eps=eps, betas=betas, weight_decay=weight_decay, fused=fused or None)


class NonFiniteError(FloatingPointError):
    """A loss, gradient, logit, weight or reward became NaN or infinite."""


def check_finite(name: str, value: torch.Tensor | float, where: str = "") -> None:
    """Raise :class:`NonFiniteError` ``"<name> became non-finite <where>"`` unless every entry is finite."""
    finite = torch.isfinite(value).all() if torch.is_tensor(value) else torch.isfinite(torch.tensor(float(value)))
    if not bool(finite):
        shown = value[~torch.isfinite(value)][:3].tolist() if torch.is_tensor(value) and value.dim() else float(value)
        raise NonFiniteError(f"{name} became non-finite ({shown}){' ' + where if where else ''}")


def _can_fold_the_scale(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> bool:
    """Whether ``optimizer`` can divide the gradients by a scale inside its step (torch's fused
    Adam/AdamW: ``_step_supports_amp_scaling``; no scale already set) and ``params`` are exactly
    the optimizer's weights with a gradient, so that scaling all of them is the clip."""
    if not getattr(optimizer, "_step_supports_amp_scaling", False) or getattr(optimizer, "grad_scale", None) is not None:
        return False
    held = {id(p) for group in optimizer.param_groups for p in group["params"] if p.grad is not None}
    return held == {id(p) for p in params}


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    parameters: Iterable[torch.nn.Parameter],
    max_grad_norm: float = 0.0,
    scheduler=None,
    where: str = "",
    zero_grad: bool = True,
) -> float:
    """Backpropagate ``loss`` and take one step; returns the global gradient norm (before clipping).

    ``zero_grad=False`` keeps the gradients already accumulated (earlier micro-batches' backward
    passes) and adds this loss's to them.

    ``max_grad_norm`` > 0 clips the global L2 norm of the gradients to it (0 = no clipping; the norm
    is still measured and checked). Raises :class:`NonFiniteError` naming the loss or the gradient
    (and ``where``, e.g. "at update 3") if either is non-finite; the weights are then untouched.
    """
    check_finite("the loss", loss.detach(), where)
    if zero_grad:
        optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in parameters if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    check_finite("the gradient norm", grad_norm, where)
    # clip_grad_norm_ would scale every gradient by min(1, max_norm / norm) (one pass over all the
    # weights' gradients, ~5% of a PPO minibatch step here); a scale of 1 changes nothing, so scale
    # only when the norm is over the limit (the check above has already synced the norm to the host).
    # A fused optimizer takes the scale inside its one kernel: it divides every gradient by its
    # ``grad_scale`` (the attribute torch.amp.GradScaler sets for the same purpose), so the clip
    # costs no pass of its own (PPO clips ~90% of its steps on the embedded default).
    if max_grad_norm > 0 and float(grad_norm) > max_grad_norm:
        if _can_fold_the_scale(optimizer, params):
            optimizer.grad_scale = (grad_norm.float() + 1e-6) / max_grad_norm  # as clip_grads_with_norm_: max / (norm + 1e-6)
            try:
                optimizer.step()
            finally:
                del optimizer.grad_scale
        else:
            torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, grad_norm)
            optimizer.step()
    else:
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return float(grad_norm)


@torch.no_grad()
def check_model_finite(model: torch.nn.Module, input_ids: torch.Tensor | None = None,
                       attention_mask: torch.Tensor | None = None, where: str = "") -> None:
    """Raise :class:`NonFiniteError` if a weight of ``model`` is non-finite, or (given ``input_ids``
    (B, S) and their ``attention_mask``) if the model's last-position outputs are. Run before saving
    a model: finite weights can still give non-finite logits."""
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise NonFiniteError(f"the weights became non-finite ({name}){' ' + where if where else ''}")
    if input_ids is not None:
        from pretrain.padding import position_ids_from_mask

        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        # In eval mode: a training-mode forward would draw dropout masks from the RNG the run
        # checkpoints, so a resumed run would not continue bit-identically.
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits[:, -1]
        finally:
            model.train(training)
        check_finite("the model's logits", logits.float(), where)
