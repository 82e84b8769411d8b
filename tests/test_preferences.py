import json
import math

import numpy as np
import pytest

from pretrain import load_lm
from rlhf.gold import VaderGold, review_texts
from rlhf.preferences import (
    PreferencePair,
    build_preferences,
    load_jsonl,
    preference_probability,
    ranking_to_pairs,
    sample_ranking,
    save_jsonl,
)


def test_gold_scorer_orders_sentiment():
    gold = VaderGold()
    good, bad, neutral = gold(["A wonderful, moving film. I loved it.", "Awful, boring and stupid.", "The film."])
    assert good > 0.5 and bad < -0.5 and neutral == 0.0
    with pytest.raises(TypeError, match="single str"):
        gold("not a list")
    assert review_texts(["This movie"], [" rocks"]) == ["This movie rocks"]


def test_bradley_terry_probability():
    assert preference_probability(0.5, 0.0, tau=0.5) == pytest.approx(1 / (1 + math.exp(-1)))
    assert preference_probability(0.1, 0.2, tau=0.0) == 0.0
    assert preference_probability(0.3, 0.3, tau=0.0) == 0.5
    with pytest.raises(ValueError, match="tau must be >= 0"):
        preference_probability(0, 0, -1)


def test_sampled_rankings_follow_bradley_terry_pairwise():
    gold, tau = [0.6, 0.1, -0.3], 0.4
    rng = np.random.default_rng(0)
    n = 20_000
    wins = np.zeros((3, 3))
    for _ in range(n):
        ranking = sample_ranking(gold, tau, rng)
        for i, a in enumerate(ranking):
            for b in ranking[i + 1 :]:
                wins[a, b] += 1
    for a in range(3):
        for b in range(3):
            if a != b:
                expected = preference_probability(gold[a], gold[b], tau)
                assert wins[a, b] / n == pytest.approx(expected, abs=0.015)


def test_noiseless_ranking_expands_to_all_pairs_and_drops_ties():
    completions = ["a", "b", "c", "d"]
    gold = [0.1, 0.9, -0.5, 0.4]
    ranking = sample_ranking(gold, 0.0, np.random.default_rng(0))
    assert ranking == [1, 3, 0, 2]
    pairs = ranking_to_pairs("p", completions, gold, ranking, 0.0)
    assert len(pairs) == 6 == 4 * 3 // 2
    assert all(gold[completions.index(p.chosen)] > gold[completions.index(p.rejected)] for p in pairs)
    tied = ranking_to_pairs("p", completions, [0.0, 0.0, 0.5, 0.1], [2, 3, 0, 1], 0.0)
    assert len(tied) == 5


def test_preference_building_is_deterministic_per_seed(tiny_gpt2_dir):
    model, tokenizer = load_lm(tiny_gpt2_dir)
    prompts = ["This movie was", "I hated", "A great"]
    kw = dict(k=3, tau=0.1, max_new_tokens=6, batch_size=4)
    a = build_preferences(model, tokenizer, prompts, seed=1, **kw)
    b = build_preferences(model, tokenizer, prompts, seed=1, **kw)
    c = build_preferences(model, tokenizer, prompts, seed=2, **kw)
    assert a == b and a != c
    assert {p.prompt for p in a} <= set(prompts)


def test_jsonl_round_trip_and_errors(tmp_path):
    pairs = [PreferencePair("p", "good", "bad"), PreferencePair("q", "yes ✓", "no")]
    path = save_jsonl(pairs, tmp_path / "x.jsonl")
    assert load_jsonl(path) == pairs
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n" + json.dumps({"prompt": "p", "chosen": "c"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing field\(s\) \['rejected'\]"):
        load_jsonl(bad)
    bad.write_text("{not json}\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: not valid JSON"):
        load_jsonl(bad)
    bad.write_text("\n")
    with pytest.raises(ValueError, match="holds no records"):
        load_jsonl(bad)
    with pytest.raises(FileNotFoundError):
        load_jsonl(tmp_path / "missing.jsonl")


def test_built_pairs_with_a_blank_side_are_left_out_with_a_warning_and_read_back(tmp_path, monkeypatch):
    """An LM that ends with EOS at once writes an empty completion (seen on a GPU): the built data
    must still load (load_jsonl refuses a blank side), so such pairs are left out, and counted."""
    from rlhf import preferences

    monkeypatch.setattr(preferences, "sample_completions",
                        lambda *args, **kwargs: [["", " a great film", " a bad film", "  "]])
    with pytest.warns(UserWarning, match="left out 5 of 6 preference pairs"):
        pairs = preferences.build_preferences(None, None, ["The movie was"], k=4, tau=1.0, seed=0)
    assert [(p.chosen, p.rejected) for p in pairs] in ([(" a great film", " a bad film")], [(" a bad film", " a great film")])
    preferences.save_jsonl(pairs, tmp_path / "pairs.jsonl")
    assert preferences.load_jsonl(tmp_path / "pairs.jsonl") == pairs
