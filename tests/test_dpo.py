import json
import math

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from pretrain import load_lm
from rlhf.dpo import DPOConfig, dpo_loss, pair_logps, reference_logps, train_dpo
from rlhf.logprobs import encode, output_head, sequence_logprobs
from rlhf.preferences import PreferencePair

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


PAIRS = [PreferencePair("A fine", " film indeed, and", " bad"), PreferencePair("This movie was really", " good", " the worst of all"),
         PreferencePair("Oh", " no", " yes it was a film")]


def left_padded_logps(model, tokenizer, pairs):
    """The reference computation, written out: left-padded rows with positions from the mask, the
    full logits, log-softmax, the completion tokens' entries summed."""
    prompts = [p.prompt for p in pairs]
    batch = encode(tokenizer, prompts + prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs])
    ids, attn, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    logits = model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(1) - 1).clamp(min=0)).logits.float()
    picked = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    logps = (picked * completion[:, 1:]).sum(1)
    return logps[: len(pairs)], logps[len(pairs) :]


def softcapped_lm_dir(path, tokenizer):
    """A tiny Gemma-2: its logits are tanh-soft-capped, so they are *not* the plain head of the last hidden state."""
    from transformers import Gemma2Config

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, max_position_embeddings=128, final_logit_softcapping=0.5,
                          eos_token_id=0, bos_token_id=0, pad_token_id=1)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_pair_logps_equal_the_left_padded_full_logits_computation(tiny_model_dir):
    """DPO's packed pass (right-padded, causal mask only, LM head on completion tokens) gives every
    architecture's log-probs and gradients exactly as the left-padded full-logits pass."""
    check_pair_logps(tiny_model_dir)


def test_pair_logps_of_a_soft_capped_head_read_the_models_logits_in_one_pass(tmp_path, tiny_tokenizer):
    """A head whose logits its config transforms (Gemma-2's soft cap) is known from the config: the
    pass reads the model's own logits, in one forward."""
    model, tokenizer = load_lm(softcapped_lm_dir(tmp_path / "gemma2", tiny_tokenizer))
    assert output_head(model) is None
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    pair_logps(model, tokenizer, PAIRS, "cpu")
    assert len(calls) == 1
    check_pair_logps(model, tokenizer)


def test_pair_logps_catch_a_head_transform_the_config_does_not_name(tiny_gpt2_dir):
    """Logits that are not the head's output with no config field saying so (here a hook halves
    them) are caught at the one position the model computes itself, and read from the model."""
    model, tokenizer = load_lm(tiny_gpt2_dir)

    def halve(module, args, output):
        output.logits = output.logits / 2
        return output

    model.register_forward_hook(halve)
    assert output_head(model) is not None, "a plain Linear head, by its type and config"
    check_pair_logps(model, tokenizer)


def check_pair_logps(model, tokenizer=None):
    if tokenizer is None:
        model, tokenizer = load_lm(model)
    grads = []
    for compute in (left_padded_logps, lambda m, t, p: pair_logps(m, t, p, "cpu")):
        model.zero_grad()
        chosen, rejected = compute(model, tokenizer, PAIRS)
        (chosen.sum() - 2 * rejected.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        if len(grads) == 1:
            expected = chosen.detach(), rejected.detach()
    torch.testing.assert_close(chosen.detach(), expected[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(rejected.detach(), expected[1], rtol=0, atol=1e-4)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5, msg=name)
    table = reference_logps(model, tokenizer, PAIRS, "cpu", batch_size=2)  # batches of sorted pairs, no grad
    torch.testing.assert_close(table, torch.stack(expected, 1), rtol=0, atol=1e-4)


def test_a_precomputed_reference_and_micro_batches_train_exactly_as_one_pass_with_a_reference_forward(tmp_path, tiny_gpt2_dir):
    pairs = [{"prompt": f"Review {i}:", "chosen": " wonderful film" + " indeed" * (i % 3), "rejected": " boring"} for i in range(12)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(p) for p in pairs))
    losses = {}
    for precompute, micro in ((True, 16), (False, 16), (True, 3)):
        out = tmp_path / f"dpo-{precompute}-{micro}"
        train_dpo(DPOConfig(model=str(tiny_gpt2_dir), data=str(data), out=str(out), epochs=2, batch_size=4, lr=3e-3,
                            device="cpu", precompute_ref_logps=precompute, micro_batch_size=micro))
        ea = EventAccumulator(str(out))
        ea.Reload()
        losses[precompute, micro] = [e.value for e in ea.Scalars("loss/dpo")]
    assert len(losses[True, 16]) == 6
    assert losses[True, 16] == pytest.approx(losses[False, 16], abs=1e-5)
    assert losses[True, 3] == pytest.approx(losses[True, 16], abs=1e-5), "passes of 3 + 1 pairs: the same steps"
    assert losses[True, 16][-1] < losses[True, 16][0] - 0.05, "and it learns"


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
