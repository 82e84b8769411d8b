"""Non-finite values stop where they arise, in every trainer, and never reach a saved model.

A learning rate of 100 grows the weights to ~1e10: they stay finite while the logits do not. Such
blow-ups are chaotic (the update at which they happen depends on the CPU's float rounding), so
these tests force one deterministically: the optimizer step of a chosen update scales every weight
by 1e30.
"""

import json

import pytest
import torch

from agents import dqn, pcl, ppo, reinforce
from agents.policy import LMPolicy, sample_categorical
from pretrain.optim import NonFiniteError, check_finite, optimizer_step
from rlhf import dpo, reward_training, sft

TOY = dict(env="TextGenToy-v0", max_new_tokens=4, device="cpu")


def blow_up_at(module, monkeypatch, step: int):
    """Scale every weight by 1e30 after the ``step``-th optimizer step taken through ``module.optimizer_step``."""
    original, calls = module.optimizer_step, {"n": 0}

    def step_then_blow_up(loss, optimizer, parameters, *args, **kwargs):
        parameters = list(parameters)
        norm = original(loss, optimizer, parameters, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == step:
            with torch.no_grad():
                for p in parameters:
                    p.mul_(1e30)
        return norm

    monkeypatch.setattr(module, "optimizer_step", step_then_blow_up)


def test_sampler_refuses_a_distribution_that_is_not_one():
    """It used to turn NaN probabilities into index V (``action 8192 is out of range`` from the env)."""
    probs = torch.tensor([[0.5, 0.5, 0.0], [float("nan"), 0.5, 0.5]])
    with pytest.raises(NonFiniteError, match=r"distribution of row 1 is not a distribution \(probabilities sum to nan\)"):
        sample_categorical(probs)
    with pytest.raises(NonFiniteError, match="row 0 .* sum to 0.0"):
        sample_categorical(torch.zeros(1, 3))
    with pytest.raises(NonFiniteError, match="sum to inf"):
        sample_categorical(torch.tensor([[float("inf"), 1.0]]))


def test_optimizer_step_names_the_loss_or_the_gradient_and_leaves_the_weights_alone():
    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    with pytest.raises(NonFiniteError, match=r"the loss became non-finite \(nan\) at step 7"):
        optimizer_step((weight * float("nan")).sum(), optimizer, [weight], 1.0, where="at step 7")
    with pytest.raises(NonFiniteError, match=r"the gradient norm became non-finite \(inf\)"):
        optimizer_step(torch.sqrt(weight - 1.0).sum(), optimizer, [weight], 1.0)  # finite loss, d sqrt(x)/dx = inf at 0
    assert weight.tolist() == [1.0, 2.0]
    with pytest.raises(NonFiniteError, match=r"x became non-finite \(\[nan, inf\]\)"):
        check_finite("x", torch.tensor([1.0, float("nan"), float("inf")]))


def test_non_finite_logits_are_never_checkpointed(tmp_path, monkeypatch):
    """The update that blows the logits up is refused at its checkpoint; the previous one stays, loads
    and is finite; the message names it."""
    blow_up_at(reinforce, monkeypatch, step=3)
    out = tmp_path / "blown"
    cfg = reinforce.ReinforceConfig(**TOY, num_envs=8, total_steps=8 * 4 * 6, rloo_k=2, checkpoint_every=1, out=str(out))
    with pytest.raises(NonFiniteError, match=r"next-token log-probs became non-finite after update 3, so it was not saved; "
                                              r"stopping. The last good checkpoint is .*checkpoint-2 \(update 2;"):
        reinforce.train(cfg)
    assert not (out / "final").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    saved = LMPolicy.load(out / "checkpoint-2", "cpu", value_head=False)
    ids = torch.tensor([[3, 4, 6]])
    saved.check_finite(ids, torch.ones_like(ids))


def test_a_non_finite_policy_stops_the_next_rollout_and_says_there_is_no_checkpoint(tmp_path, monkeypatch):
    blow_up_at(ppo, monkeypatch, step=1)
    cfg = ppo.PPOConfig(**TOY, num_envs=8, total_steps=8 * 4 * 6, num_minibatches=1, update_epochs=1, target_kl=0.0,
                        checkpoint_every=10, out=str(tmp_path / "ppo"))
    with pytest.raises(NonFiniteError, match=r"next-token distribution of row \d+ is not a distribution .* in update 2; "
                                              r"stopping. No checkpoint has been written yet"):
        ppo.train(cfg)


def test_dqn_stops_at_non_finite_q_values(tmp_path, monkeypatch):
    blow_up_at(dqn, monkeypatch, step=1)
    cfg = dqn.DQNConfig(**TOY, objective="td", num_envs=8, total_steps=8 * 4 * 6, learning_starts=8, gradient_steps=1, checkpoint_every=10,
                        exploration="boltzmann", out=str(tmp_path / "dqn"))
    with pytest.raises(NonFiniteError, match=r"the Q-values of the valid actions became non-finite .* in update 2"):
        dqn.train(cfg)


def test_path_consistency_stops_at_a_non_finite_policy(tmp_path, monkeypatch):
    blow_up_at(pcl, monkeypatch, step=1)  # the second gradient step of update 1 reads the blown-up weights
    cfg = dqn.DQNConfig(**TOY, num_envs=8, total_steps=8 * 4 * 6, lr=1e-3, replay_batch_size=8, checkpoint_every=10,
                        out=str(tmp_path / "pcl"))
    with pytest.raises(NonFiniteError, match=r"the path consistency became non-finite .* in update 1; stopping"):
        dqn.train(cfg)


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


@pytest.mark.parametrize("trainer", ["dpo", "sft", "reward"])
def test_rlhf_trainers_never_save_a_blown_up_model(tmp_path, monkeypatch, tiny_gpt2_dir, trainer):
    pairs = [{"prompt": f"Review {i}:", "chosen": " wonderful film", "rejected": " boring film"} for i in range(8)]
    out = tmp_path / trainer
    if trainer == "dpo":
        blow_up_at(dpo, monkeypatch, step=1)
        cfg = dpo.DPOConfig(model=str(tiny_gpt2_dir), data=write_jsonl(tmp_path / "p.jsonl", pairs), out=str(out),
                            batch_size=8, max_new_tokens=4, device="cpu")
        run = dpo.train_dpo
    elif trainer == "sft":
        blow_up_at(sft, monkeypatch, step=1)
        demos = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs * 3]
        cfg = sft.SFTConfig(model=str(tiny_gpt2_dir), data=write_jsonl(tmp_path / "d.jsonl", demos), out=str(out),
                            batch_size=8, device="cpu")
        run = sft.train_sft
    else:
        blow_up_at(reward_training, monkeypatch, step=1)
        cfg = reward_training.RewardConfig(model=str(tiny_gpt2_dir), data=write_jsonl(tmp_path / "p.jsonl", pairs), out=str(out),
                                        batch_size=8, epochs=1, eval_prompts=2, max_new_tokens=4, device="cpu")
        run = reward_training.train_reward_model
    with pytest.raises(NonFiniteError, match="non-finite"):
        run(cfg)
    assert not (out / "final").exists()


def test_pretraining_never_checkpoints_a_blown_up_model(tmp_path, monkeypatch, tiny_tokenizer):
    from pretrain import train as pretraining

    tok_dir = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(tok_dir)
    blow_up_at(pretraining, monkeypatch, step=4)
    cfg = pretraining.PretrainConfig(out=str(tmp_path / "run"), tokenizer=str(tok_dir), steps=6, batch_size=2, block_size=16,
                                     warmup_steps=1, n_layer=1, n_embd=16, n_head=2, max_train_reviews=100,
                                     eval_interval=2, eval_tokens=512, threads=2)
    with pytest.raises(NonFiniteError, match="the model's logits became non-finite .* after step 4, so it was not saved"):
        pretraining.train(cfg)
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2"], "the checkpoint of step 2 is kept"


@pytest.mark.parametrize("trainer", ["dpo", "sft"])
def test_step_trainers_never_checkpoint_a_blown_up_model(tmp_path, monkeypatch, tiny_gpt2_dir, trainer):
    pairs = [{"prompt": f"Review {i}:", "chosen": " wonderful film", "rejected": " boring film"} for i in range(16)]
    module = {"dpo": dpo, "sft": sft}[trainer]
    blow_up_at(module, monkeypatch, step=3)
    out = tmp_path / trainer
    if trainer == "dpo":
        cfg = dpo.DPOConfig(model=str(tiny_gpt2_dir), data=write_jsonl(tmp_path / "p.jsonl", pairs), out=str(out), batch_size=4,
                            checkpoint_every=1, max_new_tokens=4, device="cpu")
    else:
        demos = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs]
        cfg = sft.SFTConfig(model=str(tiny_gpt2_dir), data=write_jsonl(tmp_path / "d.jsonl", demos), out=str(out), batch_size=4,
                            checkpoint_every=1, device="cpu")
    with pytest.raises(NonFiniteError, match=f"non-finite .*after {trainer.upper()} step 3"):
        module.train_dpo(cfg) if trainer == "dpo" else module.train_sft(cfg)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


@pytest.mark.parametrize("optimizer_kind", ["sgd", "fused_adam", "fused_adam_on_a_subset"])
@pytest.mark.parametrize("max_grad_norm", [0.0, 0.1, 1e6])
def test_optimizer_step_clips_exactly_as_torchs_clip_grad_norm(max_grad_norm, optimizer_kind):
    """Gradients over the limit are scaled to it, those under it are left as they are (bit for bit),
    and the returned norm is the norm before clipping: what ``clip_grad_norm_`` + ``step`` give. A
    fused Adam takes the scale inside its step (``grad_scale``); clipping a subset of its weights
    (the norm of those alone) must still scale that subset alone."""
    results = []
    for ours in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 4)
        if optimizer_kind == "sgd":
            optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        else:
            optimizer = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)
        clipped = [model.weight] if optimizer_kind == "fused_adam_on_a_subset" else list(model.parameters())
        loss = model(torch.randn(16, 8)).square().mean()
        if ours:
            norm = optimizer_step(loss, optimizer, clipped, max_grad_norm)
            assert getattr(optimizer, "grad_scale", None) is None, "the scale is removed after the step"
        else:
            loss.backward()
            norm = float(torch.nn.utils.clip_grad_norm_(clipped, max_grad_norm or float("inf")))
            optimizer.step()
        # Adam's first step is nearly scale-free, so the (clipped) gradients are compared as well
        results.append((norm, [p.detach().clone() for p in model.parameters()] + [p.grad.clone() for p in model.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6) and results[0][0] > 0.1
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
