"""Pretraining: learning happens, resume is exact, the schedule is what it says."""

import json
import os
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pretrain import corpus
from pretrain.model import build_gpt2
from pretrain.train import PretrainConfig, TokenStream, evaluate, get_lr, train

TINY = dict(
    steps=40,
    batch_size=8,
    block_size=64,
    lr=3e-3,
    warmup_steps=5,
    vocab_size=512,
    n_layer=2,
    n_embd=64,
    n_head=2,
    max_train_reviews=1500,
    eval_interval=20,
    eval_tokens=8192,
    threads=2,
)


def test_tiny_pretraining_lowers_held_out_loss(tmp_path, tiny_tokenizer):
    tok_dir = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(tok_dir)
    cfg = PretrainConfig(out=str(tmp_path / "run"), tokenizer=str(tok_dir), **TINY)
    metrics = train(cfg)
    torch.manual_seed(cfg.seed)
    untrained = build_gpt2(len(tiny_tokenizer), n_layer=2, n_embd=64, n_head=2, n_positions=64)
    stream = TokenStream(corpus.texts("test")[:300], tiny_tokenizer)
    before = evaluate(untrained, stream, 64)["loss"]
    assert before == pytest.approx(np.log(512), abs=0.3)
    assert metrics["test_loss"] < before - 0.75  # from uniform (ln 512) to below 5.5 nats
    assert metrics["tokens_seen"] == 40 * 8 * 64
    saved = json.loads((tmp_path / "run" / "final" / "metrics.json").read_text())
    assert saved["test_ppl_token"] == pytest.approx(np.exp(saved["test_loss"]), rel=1e-3)
    assert saved["test_ppl_word"] > saved["test_ppl_token"], "a word is more than one BPE token on average"


def test_interrupt_and_resume_reproduce_uninterrupted_run(tmp_path, tiny_tokenizer, monkeypatch):
    tok_dir = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(tok_dir)
    small = dict(TINY, steps=12, eval_interval=6, eval_tokens=2048, max_train_reviews=300)
    train(PretrainConfig(out=str(tmp_path / "straight"), tokenizer=str(tok_dir), **small))

    calls = {"n": 0}
    original = TokenStream.sample

    def sample_then_ctrl_c(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # a Ctrl-C arrives during step 4
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TokenStream, "sample", sample_then_ctrl_c)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train(PretrainConfig(out=str(out), tokenizer=str(tok_dir), **small))
    state = json.loads((out / "checkpoint-4" / "training_state.json").read_text())
    assert state["state"]["step"] == 4, "the step in flight completes, then the run checkpoints and stops"
    monkeypatch.setattr(TokenStream, "sample", original)
    train(PretrainConfig(tokenizer=str(tok_dir), resume=str(out), **small))

    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(out / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_resume_with_other_config_is_refused(tmp_path, tiny_tokenizer):
    tok_dir = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(tok_dir)
    small = dict(TINY, steps=2, eval_interval=2, eval_tokens=1024, max_train_reviews=200)
    train(PretrainConfig(out=str(tmp_path / "r"), tokenizer=str(tok_dir), **small))
    with pytest.raises(ValueError, match=r"differ from the checkpoint .*\(n_layer: checkpoint 2, this run 3\)"):
        train(PretrainConfig(tokenizer=str(tok_dir), resume=str(tmp_path / "r"), **dict(small, n_layer=3)))
    with pytest.raises(FileNotFoundError, match="--resume .*none: the directory does not exist"):
        train(PretrainConfig(resume=str(tmp_path / "none"), **small))


def test_lr_schedule_warmup_then_cosine():
    cfg = PretrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    assert get_lr(0, cfg) == pytest.approx(1e-4)
    assert get_lr(9, cfg) == pytest.approx(1e-3)
    assert get_lr(55, cfg) == pytest.approx(0.55e-3)
    assert get_lr(100, cfg) == pytest.approx(1e-4)
    lrs = [get_lr(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_token_stream_holds_one_copy_with_eos_between_texts(tiny_tokenizer):
    texts = ["a good film", "bad"]
    stream = TokenStream(texts, tiny_tokenizer)
    ids = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    eos = tiny_tokenizer.eos_token_id
    assert stream.tokens.tolist() == ids[0] + [eos] + ids[1] + [eos]
    assert stream.tokens.dtype == np.uint16 and stream.tokens.base is None
    windows = list(stream.windows(block_size=2))
    targets = [t for w in windows for t in w[1:].tolist()]
    assert targets == stream.tokens[1:].tolist(), "each token after the first is a target exactly once"


def test_bad_config_values():
    with pytest.raises(ValueError, match="n_embd=100 must be divisible by n_head=3"):
        PretrainConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="steps must be positive, got 0"):
        PretrainConfig(steps=0)


@pytest.mark.parametrize("decoupled", [False, True])
def test_make_adam_is_fused_and_takes_torchs_adam_steps(decoupled):
    from pretrain.optim import make_adam

    torch.manual_seed(0)
    weights = [torch.randn(5, 3), torch.randn(3)]
    ours = [w.clone().requires_grad_() for w in weights]
    theirs = [w.clone().requires_grad_() for w in weights]
    optimizer = make_adam(ours, lr=0.1, eps=1e-5, weight_decay=0.01, decoupled=decoupled)
    reference = (torch.optim.AdamW if decoupled else torch.optim.Adam)(theirs, lr=0.1, eps=1e-5, weight_decay=0.01, foreach=False)
    assert optimizer.param_groups[0]["fused"] and isinstance(optimizer, type(reference))
    for step in range(5):
        for params, opt in ((ours, optimizer), (theirs, reference)):
            opt.zero_grad()
            sum(((p - step) ** 2).sum() for p in params).backward()
            opt.step()
    for a, b, w in zip(ours, theirs, weights):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert not torch.equal(a, w)
