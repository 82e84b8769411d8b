import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from pretrain.optim import NonFiniteError
from rlhf.preferences import PreferencePair
from rlhf.reward_model import RewardModel, bradley_terry_loss
from rlhf.reward_training import RewardConfig, fit, normalise, pair_rewards, pairwise_accuracy


def random_head_rm(model_dir, seed: int = 0) -> RewardModel:
    """A reward model on ``model_dir`` whose score head is random (a fresh one scores everything 0)."""
    torch.manual_seed(seed)
    rm = RewardModel.from_lm(model_dir)
    torch.nn.init.normal_(rm.model.score.weight)
    return rm


def test_bradley_terry_loss_value_and_gradient_sign():
    chosen = torch.tensor([1.0, -0.5], requires_grad=True)
    rejected = torch.tensor([0.0, 0.5], requires_grad=True)
    loss = bradley_terry_loss(chosen, rejected)
    expected = torch.log1p(torch.exp(-(chosen - rejected)))
    torch.testing.assert_close(loss, expected)
    loss.sum().backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()
    with_margin = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]), margin=1.0)
    assert with_margin.item() == pytest.approx(np.log(2))


def synthetic_pairs(seed: int, n_prompts: int) -> list[PreferencePair]:
    """Chosen completions use words of one set, rejected of another: a learnable preference."""
    rng = np.random.default_rng(seed)
    good, bad = ["great", "superb", "lovely", "brilliant"], ["awful", "dull", "boring", "terrible"]
    pairs = []
    for _ in range(n_prompts):
        prompt = f"Review {rng.integers(1000)}: the film was"
        for _ in range(2):
            pairs.append(PreferencePair(prompt, f" {rng.choice(good)} and {rng.choice(good)}", f" {rng.choice(bad)} and {rng.choice(bad)}"))
    return pairs


def test_reward_model_learns_synthetic_preferences(tiny_model_dir):
    torch.manual_seed(0)
    rm = RewardModel.from_lm(tiny_model_dir)
    train, held_out = synthetic_pairs(0, 60), synthetic_pairs(1, 30)
    assert pairwise_accuracy(rm, held_out) < 0.6, "an untrained head scores everything 0"
    cfg = RewardConfig(epochs=4, batch_size=16, lr=3e-3)
    fit(rm, train, cfg, np.random.default_rng(0))
    assert pairwise_accuracy(rm, held_out) >= 0.9


def test_scores_do_not_depend_on_padding(tiny_model_dir):
    rm = random_head_rm(tiny_model_dir)
    alone = rm.score(["Short"], [" one"])
    batched = rm.score(["Short", "A much longer prompt than the other"], [" one", " and its completion"])
    assert batched[0] == pytest.approx(alone[0], abs=1e-4)


def test_save_load_round_trip_with_normalisation(tmp_path, tiny_gpt2_dir):
    rm = random_head_rm(tiny_gpt2_dir)
    pairs = synthetic_pairs(0, 10)
    normalise(rm, pairs)
    texts = sorted({(p.prompt, c) for p in pairs for c in (p.chosen, p.rejected)})
    scores = np.array(rm.score([p for p, _ in texts], [c for _, c in texts]))
    assert scores.mean() == pytest.approx(0, abs=1e-4) and scores.std(ddof=1) == pytest.approx(1, abs=1e-3)
    rm.save(tmp_path / "rm")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert hf.config.num_labels == 1 and hf.config.reward_std == pytest.approx(rm.std)
    again = RewardModel.load(tmp_path / "rm")
    assert again.score(["Review 1: the film was"], [" great"]) == pytest.approx(rm.score(["Review 1: the film was"], [" great"]), abs=1e-5)


def test_loading_something_that_is_not_a_reward_model(tmp_path, tiny_gpt2_dir):
    with pytest.raises(ValueError, match="is not a reward model dir"):
        RewardModel.load(tiny_gpt2_dir)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RewardModel.load(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        RewardModel.load(tmp_path)


def test_non_finite_scores_stop_with_a_clear_error(tiny_gpt2_dir):
    rm = RewardModel.from_lm(tiny_gpt2_dir)
    rm.model.config.reward_std = 0.0
    with pytest.raises(NonFiniteError, match="non-finite"):
        rm.score(["x"], [" y"])


def test_rewards_in_length_buckets_equal_scoring_each_alone(tiny_model_dir):
    rm = random_head_rm(tiny_model_dir)
    prompts = ["A", "This movie was", "I watched it", "Terrible acting and a plot that", "", "So", "The", "Well"]
    completions = [" fine", " a long and winding story about nothing", "", " never", "", " good good", " end", " x y z w"]
    together = rm.rewards(prompts, completions, max_buckets=3)
    alone = torch.cat([rm.rewards([p], [c]) for p, c in zip(prompts, completions)])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)
    assert rm.score(prompts, completions, batch_size=3) == pytest.approx(together.tolist(), abs=1e-5)


def test_the_empty_text_has_one_score_everywhere(tiny_gpt2_dir):
    """An empty prompt with an immediate EOS is the text "": scored as [EOS], alone or in a batch."""
    rm = random_head_rm(tiny_gpt2_dir)
    alone = rm.score([""], [""])
    in_batch = rm.score(["A much longer prompt than nothing", ""], [" and more", ""])
    eos = rm.tokenizer.eos_token_id
    with torch.no_grad():
        by_hand = rm(torch.tensor([[eos]]), torch.tensor([[1]])).item()
    assert alone[0] == pytest.approx(in_batch[1], abs=1e-5) == pytest.approx(by_hand, abs=1e-5)
    assert rm.tokenize(["", "x"], ["", ""]) == [[eos], rm.tokenizer("x", add_special_tokens=False)["input_ids"]]


def test_plain_transformers_scores_a_padded_batch_like_the_reward_model(tmp_path, tiny_model_dir):
    """A saved RM dir, loaded with AutoModelForSequenceClassification + AutoTokenizer and scored with
    the tokenizer's default padding, gives our (normalised) scores."""
    from transformers import AutoTokenizer

    rm = random_head_rm(tiny_model_dir)
    rm.model.config.reward_mean, rm.model.config.reward_std = 0.3, 2.0
    rm.save(tmp_path / "rm")
    texts = ["Short", "A much longer review of the film, with words", "Mid length text here"]
    hf, tokenizer = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm"), AutoTokenizer.from_pretrained(tmp_path / "rm")
    with torch.no_grad():
        raw = hf(**tokenizer(texts, return_tensors="pt", padding=True)).logits[:, 0]
    plain = (raw - hf.config.reward_mean) / hf.config.reward_std
    torch.testing.assert_close(plain, rm.rewards(texts, [""] * 3), atol=1e-4, rtol=1e-4)
    assert rm.tokenizer.padding_side == "left", "saving does not change the live tokenizer"


def test_training_rewards_and_scores_agree_for_a_dropout_backbone(tiny_dropout_dir):
    """Dropout is off in the reward model: a pair's training-time rewards are the scores it is evaluated with."""
    torch.manual_seed(0)
    rm = RewardModel.from_lm(tiny_dropout_dir).train()
    torch.nn.init.normal_(rm.model.score.weight)
    pairs = synthetic_pairs(0, 3)
    chosen, rejected = pair_rewards(rm, pairs)
    again, _ = pair_rewards(rm, pairs)
    torch.testing.assert_close(chosen, again, rtol=0, atol=0)
    scores = rm.score([p.prompt for p in pairs], [p.chosen for p in pairs])
    assert chosen.tolist() == pytest.approx(scores, abs=1e-5)
