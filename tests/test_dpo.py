import json
import math

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from pretrain import load_lm
from rlhf.dpo import DPOConfig, dpo_loss, train_dpo
from rlhf.logprobs import encode, sequence_logprobs

PC, PR, RC, RR = torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.8])
BETA = 0.5
H = (-1.0 + 1.5) - (-2.0 + 1.8)  # 0.7


def softplus(x):
    return math.log1p(math.exp(x))


@pytest.mark.parametrize(
    "loss_type, smoothing, expected",
    [
        ("sigmoid", 0.0, softplus(-BETA * H)),
        ("sigmoid", 0.1, 0.9 * softplus(-BETA * H) + 0.1 * softplus(BETA * H)),
        ("ipo", 0.0, (H - 1 / (2 * BETA)) ** 2),
        ("hinge", 0.0, max(0.0, 1 - BETA * H)),
    ],
)
def test_dpo_loss_matches_hand_computation(loss_type, smoothing, expected):
    losses, chosen, rejected = dpo_loss(PC, PR, RC, RR, beta=BETA, loss_type=loss_type, label_smoothing=smoothing)
    assert losses.item() == pytest.approx(expected, rel=1e-6)
    assert chosen.item() == pytest.approx(BETA * 0.5)
    assert rejected.item() == pytest.approx(BETA * -0.2)


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    losses, _, _ = dpo_loss(pc, pr, RC, RR, beta=0.1)
    losses.sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()


def test_dpo_loss_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown loss_type 'kto'"):
        dpo_loss(PC, PR, RC, RR, loss_type="kto")
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(PC, PR, RC, RR, beta=0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(PC, PR, RC, RR, label_smoothing=0.7)


def test_sequence_logprobs_sum_completion_tokens_and_mask_padding(tiny_model_dir):
    model, tokenizer = load_lm(tiny_model_dir)
    prompts, completions = ["A fine", "This movie was really"], [" film indeed", " bad"]
    batch = encode(tokenizer, prompts, completions)
    lengths = batch["attention_mask"].sum(1)
    short = int(lengths.argmin())
    assert lengths[0] != lengths[1] and batch["attention_mask"][short, 0] == 0, "the shorter row is left-padded"
    assert (batch["attention_mask"][1 - short] == 1).all()
    with torch.no_grad():
        padded = sequence_logprobs(model, **batch)
        for i in range(2):
            p = tokenizer(prompts[i], add_special_tokens=False)["input_ids"]
            c = tokenizer(completions[i], add_special_tokens=False)["input_ids"]
            ids = torch.tensor([p + c])
            logp = F.log_softmax(model(ids).logits[0].float(), -1)
            by_hand = sum(logp[len(p) + j - 1, tok].item() for j, tok in enumerate(c))
            assert padded[i].item() == pytest.approx(by_hand, abs=1e-4)


def test_encode_refuses_to_truncate(tiny_tokenizer):
    with pytest.raises(ValueError, match="more than max_length=4"):
        encode(tiny_tokenizer, ["a long prompt here"], [" and a long completion"], max_length=4)


def test_dpo_trainer_learns_preferences(tmp_path, tiny_gpt2_dir):
    pairs = [
        {"prompt": f"Review {i}:", "chosen": " wonderful wonderful film", "rejected": " terrible boring film"}
        for i in range(24)
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(p) for p in pairs))
    cfg = DPOConfig(
        model=str(tiny_gpt2_dir), data=str(data), out=str(tmp_path / "dpo"), epochs=3, batch_size=8,
        lr=3e-3, beta=0.5, device="cpu",
    )
    metrics = train_dpo(cfg)
    ea = EventAccumulator(str(tmp_path / "dpo"))
    ea.Reload()
    for tag in ("loss/dpo", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert tag in ea.Tags()["scalars"]
    margins = [e.value for e in ea.Scalars("rewards/margins")]
    assert margins[-1] > margins[0] + 0.5
    assert ea.Scalars("rewards/accuracies")[-1].value == 1.0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "dpo" / "final") is not None
    assert metrics["accuracy"] == 1.0 and metrics["steps"] == 9
    # The one evaluator every method shares: the DPO run against its initial model, on the run's own LM.
    from agents.evaluate import EvalConfig, evaluate

    results = evaluate(EvalConfig(runs=[str(tmp_path / "dpo")], episodes=8, num_envs=8, max_new_tokens=4, device="cpu",
                                  out=str(tmp_path / "eval")))
    initial, final = results["dpo"][0], results["dpo"][-1]
    assert initial["label"] == "initial" and initial["kl_ref"] == pytest.approx(0.0, abs=1e-5), "the base model is its own reference"
    assert final["label"] == "final" and final["kl_ref"] > 0.01 and {"gold", "rm", "distinct_2"} <= set(final)


def test_implicit_rewards_are_zero_at_step_zero_for_a_dropout_model(tmp_path, tiny_dropout_dir):
    """Policy and reference are the same weights at step 0: beta (log pi - log pi_ref) must be exactly 0,
    even for a model configured with dropout 0.1 (it used to be noise of the size of the margin)."""
    pairs = [{"prompt": f"Review {i}:", "chosen": " wonderful film", "rejected": " boring film"} for i in range(8)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(p) for p in pairs))
    cfg = DPOConfig(model=str(tiny_dropout_dir), data=str(data), out=str(tmp_path / "dpo"), epochs=1, batch_size=8,
                    lr=1e-3, device="cpu")
    train_dpo(cfg)
    ea = EventAccumulator(str(tmp_path / "dpo"))
    ea.Reload()
    for tag in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert ea.Scalars(tag)[0].value == 0.0
