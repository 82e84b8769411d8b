"""GRPO: group-relative advantages, the three loss aggregations, clip-higher and the k3 KL term
against hand computations; GRPO learns the toy env."""

import json
import math

import numpy as np
import pytest
import torch

from agents import grpo
from agents.grpo import GRPOConfig, aggregate, group_advantages, grpo_loss

TOY = dict(env="TextGenToy-v0", max_new_tokens=4, device="cpu")


def test_group_advantages_match_hand_computation_with_a_zero_std_group():
    returns = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    adv, zero_std = group_advantages(returns, group_size=4, scale_rewards="group")
    std = math.sqrt((1.5**2 + 0.5**2 + 0.5**2 + 1.5**2) / 3)  # the sample std of 1, 2, 3, 4
    expected = [x / (std + 1e-4) for x in (-1.5, -0.5, 0.5, 1.5)] + [0.0] * 4  # equal rewards: A = 0, not 0/0
    torch.testing.assert_close(adv, torch.tensor(expected))
    assert zero_std.tolist() == [False, True]

    none, _ = group_advantages(returns, 4, "none")  # Dr. GRPO: centred only
    torch.testing.assert_close(none, torch.tensor([-1.5, -0.5, 0.5, 1.5, 0.0, 0.0, 0.0, 0.0]))
    batch, _ = group_advantages(returns, 4, "batch")  # the std of all 8 returns
    torch.testing.assert_close(batch, none / (float(returns.std()) + 1e-4))
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(returns, 4, "groups")


def test_each_loss_aggregation_matches_hand_computation():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])  # the third sequence is masked out
    # grpo: the mean of each sequence's token mean: ((1 + 2) / 2 + (4 + 5 + 6) / 3) / 2
    assert aggregate(per_token, mask, "grpo", max_length=4).item() == pytest.approx(3.25)
    # dr_grpo: the token sum over (sequences x L_max): (3 + 15) / (2 * 4)
    assert aggregate(per_token, mask, "dr_grpo", max_length=4).item() == pytest.approx(2.25)
    # dapo: the token sum over the token count: 18 / 5
    assert aggregate(per_token, mask, "dapo", max_length=4).item() == pytest.approx(3.6)


def test_the_short_sequence_weighs_more_per_token_in_grpo_than_in_dapo():
    """The length bias Dr. GRPO names: with 'grpo' each token of a 1-token answer weighs 1/1, each of a
    3-token answer 1/3; with 'dapo' and 'dr_grpo' every token weighs the same."""
    logprobs = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    grads = {}
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        cfg = GRPOConfig(**TOY, loss_type=loss_type, kl_coef=0.0, num_envs=4, group_size=2)
        loss, _ = grpo_loss(logprobs, logprobs.detach(), torch.tensor([1.0, 1.0]), mask, cfg)
        grads[loss_type] = torch.autograd.grad(loss, logprobs)[0]
    assert grads["grpo"][0, 0] == pytest.approx(3 * grads["grpo"][1, 0])
    assert grads["dapo"][0, 0] == pytest.approx(grads["dapo"][1, 0])
    assert grads["dr_grpo"][0, 0] == pytest.approx(grads["dr_grpo"][1, 2])


def test_clip_higher_bounds_the_ratio_asymmetrically():
    """With eps_low 0.2 and eps_high 0.28: a positive-advantage token keeps its gradient up to ratio
    1.28 and loses it beyond; a negative-advantage token loses it below 0.8."""
    cfg = GRPOConfig(**TOY, epsilon_low=0.2, epsilon_high=0.28, loss_type="dapo", kl_coef=0.0, num_envs=4, group_size=2)
    ratios = torch.tensor([[1.25, 1.30], [0.85, 0.75]])
    logprobs = ratios.log().requires_grad_()
    advantages = torch.tensor([1.0, -1.0])
    loss, stats = grpo_loss(logprobs, torch.zeros(2, 2), advantages, torch.ones(2, 2), cfg)
    # -min(rho A, clip(rho) A) per token: -1.25, -1.28 (clipped), +0.85, +0.8 (clipped); token mean
    assert loss.item() == pytest.approx((-1.25 - 1.28 + 0.85 + 0.8) / 4)
    grad = torch.autograd.grad(loss, logprobs)[0]
    assert grad[0, 0] != 0 and grad[0, 1] == 0 and grad[1, 0] != 0 and grad[1, 1] == 0
    assert stats["clip_ratio_high"] == pytest.approx(0.25) and stats["clip_ratio_low"] == pytest.approx(0.25)
    symmetric = GRPOConfig(**TOY, epsilon_low=0.2, epsilon_high=0.2, loss_type="dapo", kl_coef=0.0, num_envs=4, group_size=2)
    grad = torch.autograd.grad(grpo_loss(logprobs, torch.zeros(2, 2), advantages, torch.ones(2, 2), symmetric)[0], logprobs)[0]
    assert grad[0, 0] == 0  # 1.25 > 1.2: clipped without clip-higher


def test_the_k3_kl_term_matches_hand_computation():
    cfg = GRPOConfig(**TOY, kl_coef=0.1, kl_penalty="loss", loss_type="dapo", num_envs=4, group_size=2)
    logprobs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]])
    loss, stats = grpo_loss(logprobs, logprobs.detach(), torch.zeros(1), torch.ones(1, 2), cfg, ref_logprobs=ref)
    d = ref - logprobs.detach()  # log(pi_ref / pi)
    k3 = torch.exp(d) - d - 1
    assert loss.item() == pytest.approx(0.1 * k3.mean().item())  # A = 0: only the KL term is left
    assert stats["kl"] == pytest.approx(k3.mean().item())
    # its gradient in log pi is beta (1 - pi_ref / pi) / n_tokens: it pulls pi toward pi_ref
    grad = torch.autograd.grad(loss, logprobs)[0]
    torch.testing.assert_close(grad, 0.1 * (1 - torch.exp(d)) / 2)


def test_invalid_settings_are_errors_naming_them():
    with pytest.raises(ValueError, match="group_size"):
        GRPOConfig(**TOY, num_envs=6, group_size=4)
    with pytest.raises(ValueError, match="loss_type"):
        GRPOConfig(**TOY, loss_type="bnpo")
    with pytest.raises(ValueError, match="epsilon_low"):
        GRPOConfig(**TOY, epsilon_low=1.0)


def test_an_on_policy_step_without_the_scoring_pass_is_the_same_update(tmp_path, monkeypatch):
    """One step per batch with the KL in the loss: pi_old is the step's own forward, detached."""
    cfg = dict(**TOY, num_envs=8, group_size=4, total_steps=8 * 4 * 3, lr=1e-2, kl_coef=0.1, kl_penalty="loss",
               num_iterations=1, num_minibatches=1)
    assert grpo.scores_in_the_step(GRPOConfig(**cfg))
    grpo.train(GRPOConfig(**cfg, out=str(tmp_path / "skip")))
    monkeypatch.setattr(grpo, "scores_in_the_step", lambda cfg: False)  # score pi_old in its own pass
    grpo.train(GRPOConfig(**cfg, out=str(tmp_path / "pass")))

    def rows(out):
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("perf/")}
                for line in (out / "metrics.jsonl").read_text().splitlines()]

    skip, scored = rows(tmp_path / "skip"), rows(tmp_path / "pass")
    assert len(skip) == 3 and skip[-1]["grpo/kl_k3"] > 0  # the policy moved away from the reference
    for a, b in zip(skip, scored):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key


def test_grpo_learns_the_toy_env(tmp_path):
    from tests.test_agents_train import greedy_return

    out = tmp_path / "grpo"
    result = grpo.train(grpo.GRPOConfig(**TOY, num_envs=16, total_steps=16 * 4 * 20, lr=5e-3, kl_coef=0.0, out=str(out)))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward/rm"] for r in rows]
    assert rewards[0] < 0.3 and np.mean(rewards[-3:]) > 0.9
    assert greedy_return(result["final"]) == 1.0
    # once every completion of a prompt is optimal its group has no signal: the fraction rises to 1
    assert rows[0]["grpo/frac_zero_std_groups"] < 0.5 and rows[-1]["grpo/frac_zero_std_groups"] > 0.5
