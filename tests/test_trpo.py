"""TRPO: conjugate gradient, the Fisher-vector product against an explicit Hessian and the Fisher's
definition, the trust-region line search; TRPO learns the toy env."""

import json

import numpy as np
import pytest
import torch
from torch.func import functional_call, jacrev

from agents import trpo
from agents.policy import LMPolicy
from agents.ppo import masked_mean
from agents.trpo import (
    TRPOConfig,
    conjugate_gradient,
    double_backward_attention,
    fisher_vector_product,
    flat,
    line_search,
    mean_kl,
    policy_parameters,
)
from pretrain.adapters import ModelOptions
from pretrain.distributed import SingleProcess
from pretrain.padding import position_ids_from_mask
from rlhf.logprobs import gather_logprobs, masked_log_softmax

TOY = dict(env="TextGenToy-v0", max_new_tokens=4, device="cpu")


def test_conjugate_gradient_solves_a_small_spd_system():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(20, 20, generator=g, dtype=torch.float64)
    a = m @ m.T + 0.5 * torch.eye(20, dtype=torch.float64)  # symmetric positive definite
    b = torch.randn(20, generator=g, dtype=torch.float64)
    x, used = conjugate_gradient(lambda v: a @ v, b, iters=100, tol=1e-24)
    torch.testing.assert_close(a @ x, b, rtol=0, atol=1e-8)
    assert used <= 40  # n steps in exact arithmetic; a few more in floating point
    _, used = conjugate_gradient(lambda v: a @ v, b, iters=3)
    assert used == 3


@pytest.fixture
def batch(tiny_gpt2_dir):
    """A tiny GPT-2 policy and 4 sequences: a 3-token context, completions of 4, 2, 3 and 1 tokens."""
    torch.manual_seed(0)
    policy = LMPolicy.load(tiny_gpt2_dir, "cpu", value_head=False)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 200, (4, 7), generator=g)
    mask = torch.zeros(4, 4)
    for i, length in enumerate([4, 2, 3, 1]):
        mask[i, :length] = 1
    attn = torch.cat([torch.ones(4, 3, dtype=torch.long), mask.long()], 1)
    return policy, (ids, attn, 3, mask)


def test_fisher_vector_product_equals_the_explicit_hessian_of_the_kl_and_the_fisher(batch):
    policy, (ids, attn, start, mask) = batch
    ln_f = policy.model.transformer.ln_f
    params = [ln_f.weight, ln_f.bias]  # 64 parameters: small enough for explicit matrices
    theta = flat([p.detach() for p in params]).clone()
    n = ln_f.weight.numel()

    def log_probs_at(vector):  # log pi_theta(. | s_t), (B, T, V), with ln_f's parameters replaced
        out = functional_call(policy.model, {"transformer.ln_f.weight": vector[:n], "transformer.ln_f.bias": vector[n:]}, (),
                              {"input_ids": ids, "attention_mask": attn, "position_ids": position_ids_from_mask(attn)})
        return masked_log_softmax(out.logits[:, start - 1 : -1], policy.valid_actions)

    old = log_probs_at(theta).detach()
    with double_backward_attention():
        hessian = torch.autograd.functional.hessian(lambda v: mean_kl(old, log_probs_at(v), mask, policy.valid_actions), theta)
    # F = E_s[sum_a pi(a|s) grad log pi(a|s) grad log pi(a|s)^T], from first derivatives only
    jac = jacrev(log_probs_at)(theta)  # (B, T, V, P)
    probs = old.exp()
    fisher = torch.einsum("btv,btvp,btvq->btpq", probs, jac, jac)
    fisher = (fisher * mask[..., None, None]).sum((0, 1)) / mask.sum()

    fvp = fisher_vector_product(policy, params, (ids, attn, start, mask), damping=0.0, dist=SingleProcess())
    v = torch.randn(theta.shape, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(fvp(v), hessian @ v, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fvp(v), fisher @ v, rtol=1e-4, atol=1e-6)
    damped = fisher_vector_product(policy, params, (ids, attn, start, mask), damping=0.1, dist=SingleProcess())
    torch.testing.assert_close(damped(v), fisher @ v + 0.1 * v, rtol=1e-4, atol=1e-6)


def search_setup(policy, rows):
    ids, attn, start, mask = rows
    params = [p for p in policy.model.parameters() if p.requires_grad]
    log_probs, _ = policy.next_token_log_probs(ids, attn, start)
    logprobs = gather_logprobs(log_probs, ids[:, start:], mask.bool())
    advantages = torch.tensor([[1.0], [-1.0], [0.5], [-0.5]]).expand(4, 4) * mask
    g = flat(torch.autograd.grad(masked_mean(torch.exp(logprobs - logprobs.detach()) * advantages, mask), params))
    return params, flat([p.detach() for p in params]).clone(), g, logprobs.detach(), log_probs.detach(), advantages


def kl_and_gain_at(policy, rows, old_log_probs, old_logprobs, advantages):
    ids, attn, start, mask = rows
    with torch.no_grad():
        log_probs, _ = policy.next_token_log_probs(ids, attn, start)
        logprobs = gather_logprobs(log_probs, ids[:, start:], mask.bool())
        gain = masked_mean(torch.exp(logprobs - old_logprobs) * advantages, mask) - masked_mean(advantages, mask)
        return float(mean_kl(old_log_probs, log_probs, mask, policy.valid_actions)), float(gain)


def test_line_search_backtracks_into_the_trust_region(batch):
    policy, rows = batch
    params, old, g, old_logprobs, old_log_probs, advantages = search_setup(policy, rows)
    cfg = TRPOConfig(**TOY, max_kl=0.01, line_search_steps=20)
    full_step = g / g.norm() * 50  # far outside the trust region
    record = line_search(policy, params, old, full_step, rows, old_logprobs, old_log_probs, advantages, cfg, SingleProcess())
    assert record["accepted"] and record["steps"] > 0  # the full step was refused
    kl, gain = kl_and_gain_at(policy, rows, old_log_probs, old_logprobs, advantages)
    assert 0 < kl <= cfg.max_kl and record["kl"] == pytest.approx(kl)
    assert gain > 0 and record["improvement"] == pytest.approx(gain)
    torch.testing.assert_close(flat([p.detach() for p in params]), old + 0.5 ** record["steps"] * full_step)


def test_line_search_takes_no_step_when_nothing_improves(batch):
    policy, rows = batch
    params, old, g, old_logprobs, old_log_probs, advantages = search_setup(policy, rows)
    cfg = TRPOConfig(**TOY, max_kl=0.01, line_search_steps=5)
    record = line_search(policy, params, old, -1e-3 * g / g.norm(), rows, old_logprobs, old_log_probs, advantages, cfg,
                         SingleProcess())  # downhill: every try lowers the surrogate
    assert not record["accepted"] and record["steps"] == 5 and record["kl"] == 0.0
    assert torch.equal(flat([p.detach() for p in params]), old)  # theta_old, exactly


def test_with_lora_only_the_adapter_takes_the_trust_region_step(tiny_gpt2_dir, batch):
    _, (ids, attn, start, mask) = batch
    torch.manual_seed(0)
    policy = LMPolicy.load(tiny_gpt2_dir, "cpu", options=ModelOptions(peft="lora"))
    params = policy_parameters(policy)
    names = {id(p): n for n, p in policy.named_parameters()}
    assert params and all("lora_" in names[id(p)] for p in params)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    log_probs, _ = policy.next_token_log_probs(ids, attn, start)
    logprobs = gather_logprobs(log_probs, ids[:, start:], mask.bool())
    advantages = torch.tensor([[1.0], [-1.0], [0.5], [-0.5]]).expand(4, 4) * mask
    cfg = TRPOConfig(**TOY, max_kl=0.01, fvp_fraction=1.0)
    record = trpo.trpo_step(policy, params, (ids, attn, start, mask), log_probs.detach(), logprobs, advantages, cfg,
                            np.random.default_rng(0))
    assert record["accepted"] and 0 < record["kl"] <= cfg.max_kl
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in policy.named_parameters()}
    assert all(v == 0 for n, v in moved.items() if "lora_" not in n)  # the base weights stay
    # B moves first: while B = 0, A's gradient and its Fisher block are 0 (up to float round-off)
    assert max(v for n, v in moved.items() if "lora_B" in n) > 1e3 * max(v for n, v in moved.items() if "lora_A" in n)


def test_invalid_settings_are_errors_naming_them():
    with pytest.raises(ValueError, match="max_kl"):
        TRPOConfig(**TOY, max_kl=0.0)
    with pytest.raises(ValueError, match="backtrack_coef"):
        TRPOConfig(**TOY, backtrack_coef=1.0)
    with pytest.raises(ValueError, match="fvp_fraction"):
        TRPOConfig(**TOY, fvp_fraction=1.5)


def test_trpo_learns_the_toy_env_inside_its_trust_region(tmp_path):
    from tests.test_agents_train import greedy_return

    out = tmp_path / "trpo"
    cfg = TRPOConfig(**TOY, num_envs=16, total_steps=16 * 4 * 25, kl_coef=0.0, max_kl=0.05, out=str(out))
    result = trpo.train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward/rm"] for r in rows]
    assert rewards[0] < 0.3 and np.mean(rewards[-3:]) > 0.8
    assert greedy_return(result["final"]) == 1.0
    assert all(r["trpo/kl"] <= cfg.max_kl for r in rows) and sum(r["trpo/step_accepted"] for r in rows) > len(rows) / 2
    assert all(0 < r["trpo/cg_iters"] <= cfg.cg_iters for r in rows)


def test_an_update_without_a_step_warns_and_logs_the_full_steps_kl(tmp_path):
    """One try only: the full step, whose KL the quarter-batch Fisher underestimates, is refused."""
    cfg = TRPOConfig(**TOY, num_envs=8, total_steps=8 * 4 * 2, line_search_steps=1, out=str(tmp_path / "run"))
    with pytest.warns(trpo.NoStepWarning, match="took no step"):
        trpo.train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    refused = [r for r in rows if not r["trpo/step_accepted"]]
    assert refused and all(r["trpo/kl"] == 0 and r["trpo/line_search_steps"] == 1 for r in refused)
    assert all(r["trpo/full_step_kl"] > cfg.max_kl for r in refused)  # why: the full step left the trust region
