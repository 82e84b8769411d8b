import math
import warnings

import pytest
import torch

from rlhf.kl import AdaptiveKLController, FixedKLController, kl_estimate


def test_k1_and_k3_are_unbiased_on_a_toy_categorical():
    torch.manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])  # the policy pi
    q = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2])  # the reference pi_ref
    exact = (p * (p / q).log()).sum().item()
    samples = torch.multinomial(p, 400_000, replacement=True)
    logp, logq = p.log()[samples], q.log()[samples]
    for kind in ("k1", "k3"):
        est = kl_estimate(logp, logq, kind).mean().item()
        assert est == pytest.approx(exact, abs=0.005), kind
    assert (kl_estimate(logp, logq, "k3") >= 0).all()
    assert (kl_estimate(logp, logq, "k2") >= 0).all()
    assert (kl_estimate(logp, logq, "k1") < 0).any(), "k1 is unbiased but not pointwise non-negative"


def test_estimators_match_their_formulas():
    logp, logq = torch.tensor([-1.0]), torch.tensor([-2.0])
    log_r = -1.0
    assert kl_estimate(logp, logq, "k1").item() == pytest.approx(-log_r)
    assert kl_estimate(logp, logq, "k2").item() == pytest.approx(0.5 * log_r**2)
    assert kl_estimate(logp, logq, "k3").item() == pytest.approx(math.exp(log_r) - 1 - log_r)
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_estimate(logp, logq, "k4")


def test_controllers_move_beta_the_right_way():
    fixed = FixedKLController(0.2)
    assert fixed.update(100.0, 10) == 0.2
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    up = ctl.update(current_kl=12.0, n_steps=100)  # KL too high -> stronger penalty
    assert up == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # error clipped at +0.2
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    down = ctl.update(current_kl=5.4, n_steps=100)  # KL too low -> weaker penalty
    assert down == pytest.approx(0.1 * (1 - 0.1 * 0.1))
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
    with pytest.raises(ValueError, match="kl_coef must be a finite number >= 0"):
        FixedKLController(-1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.1])
def test_controllers_refuse_non_finite_or_negative_coefficients(bad):
    with pytest.raises(ValueError, match="kl_coef must be a finite number >= 0"):
        FixedKLController(bad)
    with pytest.raises(ValueError, match="need finite init_kl_coef, target, horizon > 0"):
        AdaptiveKLController(bad, target=6.0, horizon=10)
    with pytest.raises(ValueError, match="need finite init_kl_coef, target, horizon > 0"):
        AdaptiveKLController(0.1, target=bad, horizon=10)


def test_a_negative_kl_estimate_never_lowers_the_adaptive_beta():
    """The true KL is >= 0: a negative estimate (noise, or a dropout/tokenisation fault) is no evidence
    of being below target; NaN is an error."""
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    assert ctl.update(current_kl=-2.85, n_steps=100) == 0.1
    assert ctl.update(current_kl=0.0, n_steps=100) < 0.1, "a zero KL is below target"
    for controller in (ctl, FixedKLController(0.1)):
        with pytest.raises(ValueError, match="non-finite KL estimate nan"):
            controller.update(float("nan"), 10)


def test_negative_kl_warning_fires_beyond_sampling_error_only():
    from rlhf.kl import NegativeKLWarning, warn_if_negative_kl

    noisy = torch.tensor([0.3, -0.2, 0.1, -0.25, 0.05, -0.1, 0.2, -0.3])  # mean -0.025, within 4 standard errors
    zero = torch.zeros(8)
    broken = torch.tensor([-2.9, -3.1, -2.7, -2.8] * 2)  # REINFORCE with dropout on at identical weights
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_if_negative_kl(noisy) and not warn_if_negative_kl(zero)
        assert not warn_if_negative_kl(broken[:4]), "4 sequences are too few to judge a standard error by"
    with pytest.warns(NegativeKLWarning, match="mean -2.8750 nats per sequence"):
        assert warn_if_negative_kl(broken)
