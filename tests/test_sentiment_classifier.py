"""The sentiment classifier: the shipped one loads with plain transformers and is as accurate as its
manifest says; a tiny one learns an easy subset and resumes bit-identically; bad settings are refused."""

import json
import os
import re
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from agents.cli import main
from pretrain import corpus
from pretrain.model import verify_manifest
from pretrain.run_dir import RunDir
from rlhf import sentiment_classifier as sc

SHIPPED = sc.default_classifier_dir()


# -- the shipped classifier -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shipped():
    model = AutoModelForSequenceClassification.from_pretrained(SHIPPED, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(SHIPPED), json.loads((SHIPPED / "manifest.json").read_text())


def test_plain_transformers_loads_the_shipped_classifier(shipped):
    model, tokenizer, manifest = shipped
    assert verify_manifest(SHIPPED)["sha256"] == manifest["sha256"]
    assert model.config.num_labels == 2
    assert model.config.id2label == {0: "NEGATIVE", 1: "POSITIVE"}
    assert model.config.label2id == {"NEGATIVE": 0, "POSITIVE": 1}
    assert type(tokenizer).__name__.startswith("BertTokenizer") and tokenizer.padding_side == "right"
    assert tokenizer.model_max_length == model.config.max_position_embeddings == manifest["config"]["max_length"]
    assert tokenizer.convert_ids_to_tokens(tokenizer("A GREAT film")["input_ids"]) == ["[CLS]", "a", "great", "film", "[SEP]"]
    assert manifest["dtype"] == "float16" and load_file(str(SHIPPED / "model.safetensors"))["classifier.weight"].dtype == torch.float16
    assert sum(f.stat().st_size for f in SHIPPED.iterdir()) <= 8 * 2**20


def test_shipped_accuracy_on_the_test_split_equals_the_manifest(shipped):
    """Computed here with plain transformers (batched, right-padded, fp32), full reviews truncated at
    max_length tokens as the manifest says."""
    model, tokenizer, manifest = shipped
    reviews = corpus.reviews("test")
    assert manifest["eval_reviews"] == len(reviews) == 1671
    correct = 0
    with torch.no_grad():
        for start in range(0, len(reviews), 128):
            batch = reviews[start : start + 128]
            logits = model(**tokenizer([r.text for r in batch], truncation=True, padding=True, return_tensors="pt")).logits
            correct += (logits.argmax(-1) == torch.tensor([r.label for r in batch])).sum().item()
    assert correct / len(reviews) == pytest.approx(manifest["accuracy"], abs=0.005)
    assert manifest["accuracy"] >= 0.75 and manifest["accuracy_prefix24"] >= 0.7


def test_a_padded_batch_scores_like_single_texts_and_sentiment_is_read(shipped):
    model, tokenizer, _ = shipped
    texts = ["This movie was wonderful, I loved every minute of it and will watch it again.",
             "Awful.", "This movie was boring, a waste of time and the acting was terrible throughout."]
    with torch.no_grad():
        batch = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
        single = torch.cat([model(**tokenizer([t], return_tensors="pt")).logits for t in texts])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=0)
    assert batch.argmax(-1).tolist() == [1, 0, 0]


def test_long_texts_are_refused_unless_truncation_is_asked_for(shipped):
    model, tokenizer, _ = shipped
    long_text = " ".join(["good"] * 400)
    with pytest.raises(ValueError, match=r"1 text\(s\) are longer than the classifier's 128 tokens \(up to 402\); pass truncate=True"):
        sc.positive_probabilities(model, tokenizer, [long_text])
    assert sc.positive_probabilities(model, tokenizer, [long_text], truncate=True).shape == (1,)


# -- a tiny classifier on an easy subset ------------------------------------------------------------------------
POSITIVE_CUES, NEGATIVE_CUES = {"great", "excellent", "wonderful", "best", "beautiful", "brilliant"}, \
    {"worst", "awful", "boring", "bad", "waste", "terrible", "dull"}


def easy(reviews):
    """Short reviews (<= 40 words) whose cue words all agree with the human label."""
    def cues(text):
        words = set(re.findall(r"[a-z]+", text.lower()))
        return bool(words & POSITIVE_CUES), bool(words & NEGATIVE_CUES)

    return [r for r in reviews if len(r.text.split()) <= 40 and cues(r.text) == ((True, False) if r.label else (False, True))]


EASY_TRAIN = easy(corpus.reviews("train"))  # 640 reviews, half positive (grouped by label in corpus order)
ORDER = np.random.default_rng(0).permutation(len(EASY_TRAIN))
EASY = {"train": [EASY_TRAIN[i] for i in ORDER[:256]], "validation": easy(corpus.reviews("validation")),
        "test": [EASY_TRAIN[i] for i in ORDER[256:]] + easy(corpus.reviews("test"))}  # 421 held-out reviews
# Tiny settings: 256 reviews + 64 openings = 40 batches of 8 per epoch, 240 steps that learn the easy
# subset for every seed tried (0-7: 0.86-0.90; with dropout, or at lr 3e-3, this tiny BERT stays at
# chance for some seeds); and 40 steps with dropout on for the resume tests (dropout draws from
# torch's RNG, which a resumed run must restore).
TINY = dict(vocab_size=400, max_length=48, n_layer=1, hidden=32, heads=2, intermediate=64, dropout=0.0, prefix_fraction=0.25,
            epochs=6, batch_size=8, lr=1e-3, checkpoint_every=0, device="cpu")
RESUMABLE = {**TINY, "dropout": 0.1, "epochs": 2, "batch_size": 16, "checkpoint_every": 8}


@pytest.fixture
def easy_subset(monkeypatch):
    monkeypatch.setattr(sc, "split_reviews", lambda split, limit=0: EASY[split])


def assert_same_weights(a_dir, b_dir):
    a, b = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_a_tiny_classifier_learns_an_easy_subset(tmp_path, easy_subset):
    torch.manual_seed(0)
    tokenizer = sc.train_wordpiece([r.text for r in EASY["train"]], 400, 48)
    before = sc.evaluate_classifier(sc.build_classifier(sc.ClassifierConfig(**TINY), len(tokenizer)), tokenizer, EASY["test"])
    metrics = sc.train_classifier(sc.ClassifierConfig(**TINY, out=str(tmp_path / "run")))
    assert metrics["steps"] == 240 and metrics["eval_reviews"] == 421 and metrics["train_reviews"] == 256
    assert abs(before["accuracy"] - 0.5) < 0.05, "untrained: chance"
    assert metrics["accuracy"] >= 0.8
    assert json.loads((tmp_path / "run" / "final" / "metrics.json").read_text()) == metrics
    events = EventAccumulator(str(tmp_path / "run"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/accuracy")] == [40, 80, 120, 160, 200, 240]
    assert [e.step for e in events.Scalars("loss/train")] == list(range(1, 241))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run with dropout on that the interrupted ones must reproduce (40 steps)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sc, "split_reviews", lambda split, limit=0: EASY[split])
        metrics = sc.train_classifier(sc.ClassifierConfig(**RESUMABLE, out=str(out)))
    return out, metrics


class SimulatedKill(BaseException):
    """A kill -9 at a chosen point: nothing after it runs."""


def test_ctrl_c_then_a_kill_inside_a_checkpoint_write_resume_bit_identically(tmp_path, monkeypatch, capsys, easy_subset, straight):
    """Through the CLI: Ctrl-C at step 11 (checkpoint-11), resumed; killed while writing checkpoint-24
    (checkpoint-16 is the newest complete one), resumed: the same weights and metrics as never stopped."""
    out = tmp_path / "run"
    original, calls = sc.optimizer_step, {"n": 0}

    def ctrl_c_at_step_11(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 11:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(sc, "optimizer_step", ctrl_c_at_step_11)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in RESUMABLE.items()]
    assert main(["classifier", *flags, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert f"interrupted at step 11; checkpoint: {out / 'checkpoint-11'}" in err
    assert f"resume with: textgym classifier --resume {out}" in err

    def kill(self, at_stage, path):
        if at_stage == "written" and path.name == "checkpoint-24":
            raise SimulatedKill

    monkeypatch.setattr(RunDir, "fault", kill)
    with pytest.raises(SimulatedKill):
        main(["classifier", "--resume", str(out)])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-11", "checkpoint-16"]
    monkeypatch.setattr(RunDir, "fault", lambda self, at_stage, path: None)
    assert main(["classifier", "--resume", str(out)]) == 0
    assert_same_weights(out / "final", straight[0] / "final")
    assert json.loads((out / "final" / "metrics.json").read_text()) == straight[1]
    events = EventAccumulator(str(out))
    events.Reload()
    assert [e.step for e in events.Scalars("loss/train")] == list(range(1, 41)), "each step once"
    capsys.readouterr()
    assert main(["classifier", "--resume", str(out)]) == 0  # finished: a no-op
    assert "already finished (step 40)" in capsys.readouterr().err


def test_the_tokenizer_is_deterministic_and_bert_style(tmp_path):
    texts = [r.text for r in EASY["train"]]
    a, b = sc.train_wordpiece(texts, 400, 48), sc.train_wordpiece(list(texts), 400, 48)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    a.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.convert_ids_to_tokens(range(5)) == sc.SPECIAL_TOKENS
    assert loaded.padding_side == "right" and loaded.model_max_length == 48
    assert loaded(texts[:20])["input_ids"] == a(texts[:20])["input_ids"]
    assert loaded("GREAT Film")["input_ids"] == loaded("great film")["input_ids"]


# -- settings -------------------------------------------------------------------------------------------------------
BAD = [("vocab_size", 0), ("vocab_size", 5), ("max_length", 2), ("n_layer", 0), ("heads", 3), ("intermediate", 0),
       ("dropout", 1.0), ("prefix_fraction", 1.5), ("min_prefix_words", 0), ("max_prefix_words", 3), ("train_reviews", -1),
       ("eval_reviews", -1), ("epochs", 0), ("batch_size", 0), ("lr", 0.0), ("lr", float("nan")), ("warmup_ratio", 1.0),
       ("weight_decay", -0.1), ("max_grad_norm", float("inf")), ("checkpoint_every", -1), ("keep_checkpoints", 0)]


@pytest.mark.parametrize("name, value", BAD, ids=[f"{n}={v}" for n, v in BAD])
def test_bad_settings_raise_naming_the_field(name, value):
    with pytest.raises(ValueError, match=rf"^{name} must "):
        sc.ClassifierConfig(**{name: value})


def test_the_default_settings_build_the_shipped_classifier():
    manifest = json.loads((SHIPPED / "manifest.json").read_text())
    config = {k: v for k, v in manifest["config"].items() if k not in ("out", "ship", "resume", "overwrite", "device")}
    defaults = sc.ClassifierConfig()
    assert config == {k: getattr(defaults, k) for k in config}
    assert manifest["command"] == "textgym classifier --out runs/classifier --ship"
    assert np.isfinite(manifest["vader_spearman_prefix24"]) and manifest["vader_spearman_prefix24"] > 0.2
