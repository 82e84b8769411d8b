import json

import pytest
import torch
import torch.nn.functional as F

from pretrain import load_lm
from rlhf.sft import SFTConfig, review_demonstrations, sft_loss, train_sft


def test_sft_loss_counts_completion_tokens_only(tiny_gpt2_dir):
    model, tokenizer = load_lm(tiny_gpt2_dir)
    batch = [{"prompt": "This movie", "completion": " was great"}, {"prompt": "A", "completion": " bad one"}]
    loss = sft_loss(model, tokenizer, batch, "cpu")
    nll, n = 0.0, 0
    for d in batch:
        p = tokenizer(d["prompt"], add_special_tokens=False)["input_ids"]
        c = tokenizer(d["completion"], add_special_tokens=False)["input_ids"]
        logp = F.log_softmax(model(torch.tensor([p + c])).logits[0], -1)
        nll -= sum(logp[len(p) + j - 1, t].item() for j, t in enumerate(c))
        n += len(c)
    assert loss.item() == pytest.approx(nll / n, rel=1e-5)


def test_default_demonstrations_are_positive_review_openings():
    """Each demonstration is the opening of a review labelled positive (and of none labelled negative)."""
    from pretrain import corpus

    demos = review_demonstrations("train", 20, 10, seed=0)
    assert len(demos) == 20
    assert all(2 <= len(d["prompt"].split()) <= 8 and d["completion"].startswith(" ") for d in demos)
    reviews = corpus.reviews("train", 0)
    positive = [r.text for r in reviews if r.label == 1]
    negative = [r.text for r in reviews if r.label == 0]
    for d in demos:
        text = d["prompt"] + d["completion"]
        assert any(r.startswith(text) for r in positive), text
        assert not any(r.startswith(text) for r in negative), text
    assert demos == review_demonstrations("train", 20, 10, seed=0)


def test_sft_lowers_held_out_loss(tmp_path, tiny_gpt2_dir):
    demos = [{"prompt": f"Review {i % 7}:", "completion": " a truly wonderful and moving film"} for i in range(80)]
    data = tmp_path / "demos.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in demos))
    cfg = SFTConfig(model=str(tiny_gpt2_dir), data=str(data), out=str(tmp_path / "sft"), epochs=6, batch_size=16, lr=5e-3, device="cpu")
    metrics = train_sft(cfg)
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"] - 2.0
    assert (tmp_path / "sft" / "final" / "model.safetensors").is_file()
