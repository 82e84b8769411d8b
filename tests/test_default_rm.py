"""The shipped reward model: loadable by plain transformers, intact, and as good as its manifest says."""

import json

import pytest
import torch
from scipy.stats import spearmanr
from transformers import AutoModelForSequenceClassification

from pretrain import load_lm
from pretrain.model import sha256_file
from rlhf import RewardModel, default_reward_model_dir
from rlhf.gold import VaderGold, review_texts
from rlhf.preferences import build_preferences, prompt_texts
from rlhf.reward_training import pairwise_accuracy

MANIFEST = json.loads((default_reward_model_dir() / "manifest.json").read_text())


def test_plain_transformers_loads_the_reward_model():
    model = AutoModelForSequenceClassification.from_pretrained(default_reward_model_dir())
    assert model.config.num_labels == 1
    assert model.config.reward_std == pytest.approx(MANIFEST["reward_std"])
    assert sha256_file(default_reward_model_dir() / "model.safetensors") == MANIFEST["sha256"]
    assert sum(f.stat().st_size for f in default_reward_model_dir().iterdir()) <= 10 * 2**20


def test_plain_transformers_batch_scores_equal_ours():
    """Loaded "with one call" (AutoModelForSequenceClassification + AutoTokenizer) and scored as a padded
    batch with the tokenizer's default padding, the shipped RM gives our scores (it was off by up to 2.8
    std when the shipped tokenizer padded on the left: plain GPT-2 derives positions from the start)."""
    from transformers import AutoTokenizer

    texts = ["This movie was", "This movie was wonderful, I loved every minute of it and will watch it again",
             "Bad.", "The plot was thin but the acting was excellent throughout"]
    tokenizer = AutoTokenizer.from_pretrained(default_reward_model_dir())
    ours = RewardModel.load("default").rewards(texts, [""] * len(texts))
    for kwargs, atol in (({}, 5e-3), ({"dtype": torch.float32}, 1e-5)):  # the default dtype (as stored, fp16), and fp32
        hf = AutoModelForSequenceClassification.from_pretrained(default_reward_model_dir(), **kwargs).eval()
        with torch.no_grad():
            raw = hf(**tokenizer(texts, return_tensors="pt", padding=True)).logits[:, 0].float()
        plain = (raw - hf.config.reward_mean) / hf.config.reward_std
        torch.testing.assert_close(plain, ours, atol=atol, rtol=0)


def test_reward_model_meets_its_manifest_on_a_fresh_held_out_sample():
    policy, tokenizer = load_lm("default")
    prompts = prompt_texts("test", 120, seed=7)  # a different sample than the manifest's
    pairs = build_preferences(policy, tokenizer, prompts, k=4, tau=0.0, max_new_tokens=32, seed=99)
    rm = RewardModel.load("default")
    accuracy = pairwise_accuracy(rm, pairs)
    texts = sorted({(p.prompt, c) for p in pairs for c in (p.chosen, p.rejected)})
    gold = VaderGold()(review_texts([p for p, _ in texts], [c for _, c in texts]))
    rho = spearmanr(rm.score([p for p, _ in texts], [c for _, c in texts]), gold).statistic
    assert accuracy >= MANIFEST["pairwise_accuracy"] - 0.06
    assert rho >= MANIFEST["spearman_gold"] - 0.08


def test_positive_text_outscores_negative_text():
    rm = RewardModel.load("default")
    good, bad = rm.score(["This movie was"] * 2, [" wonderful, I loved every minute of it.", " awful, boring and a waste of time."])
    assert good > bad + 1.0
