"""KL control: per-token KL estimators, the KL coefficient controllers, and the shaped reward.

With the log-ratio ``log r = log pi_ref(a|s) - log pi(a|s)`` of a token sampled from ``pi``
(Schulman, "Approximating KL divergence", 2020):

    k1 = -log r                 unbiased for KL(pi || pi_ref), high variance, can be negative
    k2 = 1/2 (log r)^2          biased, low variance, always >= 0
    k3 = (r - 1) - log r        unbiased, low variance, always >= 0

RLHF (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022) maximises
E[R(x, y)] - beta * KL(pi || pi_ref), implemented as a per-token shaped reward (``agents.ppo``,
``agents.reinforce``)

    r_t = -beta * (log pi(y_t|.) - log pi_ref(y_t|.)) + [t = T] * R(x, y)

and beta is either fixed or adapted by a proportional controller toward a target KL.

A correct estimate of a sequence KL can be negative for one sample (k1), but its batch mean cannot
be far below zero: :func:`warn_if_negative_kl` warns (once per process) when it is, which is how a
mismatch between the networks that produced ``logprobs`` and ``ref_logprobs`` (dropout on in one
pass, another tokenisation) shows up.
"""

from __future__ import annotations

import math
import warnings

import torch


class NegativeKLWarning(RuntimeWarning):
    """A batch-mean KL estimate is negative beyond its sampling error: the log-probs disagree."""


warnings.filterwarnings("once", category=NegativeKLWarning)


def warn_if_negative_kl(sequence_kl: torch.Tensor, what: str = "KL(pi || pi_ref)", atol: float = 1e-3,
                        min_sequences: int = 8) -> bool:
    """Warn (once) if the mean of per-sequence KL estimates (B,) lies below 0 by more than
    ``atol`` + 4 standard errors; returns whether it did. Needs ``min_sequences`` estimates (with
    fewer, the standard error itself is too noisy to judge by). At identical weights every per-token
    k1 term is exactly 0, so anything beyond float noise means the two log-probs came from different
    networks (e.g. dropout active in one pass)."""
    values = sequence_kl.detach().double().flatten()
    if values.numel() < max(min_sequences, 2):
        return False
    mean = float(values.mean())
    stderr = float(values.std() / math.sqrt(values.numel()))
    if mean < -(atol + 4 * stderr):
        warnings.warn(
            f"the estimated {what} is negative: mean {mean:.4f} nats per sequence (standard error {stderr:.4f}) over "
            f"{values.numel()} sequences. A correct estimator cannot be that far below 0: the policy's and the "
            "reference's log-probs come from different networks (dropout on in one pass?) or different tokenisations.",
            NegativeKLWarning,
            stacklevel=2,
        )
        return True
    return False


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from log-probs of tokens sampled from pi."""
    log_ratio = ref_logprobs - logprobs  # log r, r = pi_ref / pi
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.expm1(log_ratio) - log_ratio  # (r - 1) - log r, expm1 for precision near r = 1
    raise ValueError(f"unknown KL estimator {kind!r}; expected 'k1', 'k2' or 'k3'")


def _check_kl_reading(current_kl: float) -> None:
    if not math.isfinite(current_kl):
        raise ValueError(f"the KL controller got a non-finite KL estimate {current_kl}")


class FixedKLController:
    """A constant beta."""

    def __init__(self, kl_coef: float):
        if not (math.isfinite(kl_coef) and kl_coef >= 0):
            raise ValueError(f"kl_coef must be a finite number >= 0, got {kl_coef}")
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> float:
        _check_kl_reading(current_kl)
        return self.value


class AdaptiveKLController:
    """Proportional control of beta toward a target KL (Ziegler et al. 2019, eq. 2):

        e_t = clip((KL_t - KL_target) / KL_target, -0.2, 0.2)
        beta_{t+1} = beta_t * (1 + K_beta * e_t),   K_beta = n_steps / horizon

    A negative KL estimate is no evidence that the policy is "below target" (the true KL is >= 0;
    a negative batch mean is sampling noise or a fault, see :func:`warn_if_negative_kl`), so it
    leaves beta unchanged; a non-finite one is a ``ValueError``.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        values = (init_kl_coef, target, horizon)
        if not all(math.isfinite(v) and v > 0 for v in values):
            raise ValueError(f"need finite init_kl_coef, target, horizon > 0, got {init_kl_coef}, {target}, {horizon}")
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        _check_kl_reading(current_kl)
        if current_kl < 0:
            return self.value
        error = min(max((current_kl - self.target) / self.target, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


def kl_controller(kl_coef: float, adaptive: bool = False, target: float = 6.0, horizon: int = 10_000):
    """The agents' beta: a :class:`FixedKLController` at ``kl_coef``, or with ``adaptive`` an
    :class:`AdaptiveKLController` starting there and steering toward ``target`` over ``horizon`` steps."""
    return AdaptiveKLController(kl_coef, target, horizon) if adaptive else FixedKLController(kl_coef)
