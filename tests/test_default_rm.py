"""The shipped reward model: loadable by plain transformers, intact, and as good as its manifest says."""

import json

import pytest
from scipy.stats import spearmanr
from transformers import AutoModelForSequenceClassification

from pretrain import load_lm
from pretrain.model import sha256_file
from rlhf import RewardModel, default_reward_model_dir
from rlhf.gold import VaderGold, review_texts
from rlhf.preferences import build_preferences, prompt_texts
from rlhf.reward_model import pairwise_accuracy

MANIFEST = json.loads((default_reward_model_dir() / "manifest.json").read_text())


def test_plain_transformers_loads_the_reward_model():
    model = AutoModelForSequenceClassification.from_pretrained(default_reward_model_dir())
    assert model.config.num_labels == 1
    assert model.config.reward_std == pytest.approx(MANIFEST["reward_std"])
    assert sha256_file(default_reward_model_dir() / "model.safetensors") == MANIFEST["sha256"]
    assert sum(f.stat().st_size for f in default_reward_model_dir().iterdir()) <= 10 * 2**20


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
