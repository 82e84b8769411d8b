"""rlhf.logprobs' completion pass: rows that share a context read it once, with every row's outputs
exactly those of the row read alone."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, MistralConfig, OPTConfig, Qwen2Config, Qwen3Config

import rlhf.logprobs as logprobs
from pretrain.model import load_lm
from pretrain.padding import left_pad
from rlhf.logprobs import (
    attention_window,
    categorical_entropy,
    causal_pass,
    mask_invalid_actions,
    masked_log_softmax,
    prefix_sharing_width,
    shared_prefix_layout,
    token_logprobs,
    token_logprobs_and_entropy,
)


def grouped_batch(vocab: int, seed: int = 0, group: int = 4, prompts: int = 3, completion: int = 6):
    """Left-padded [prompt | completion] rows, ``group`` completions per prompt, some of them ended
    early (right padding), one of them empty (no target), and one row with a prompt of its own."""
    g = torch.Generator().manual_seed(seed)
    rows, targets = [], []
    for p in range(prompts):
        prompt = torch.randint(2, vocab, (3 + 2 * p,), generator=g).tolist()
        for k in range(group):
            n = 0 if (p, k) == (1, 2) else completion - (k % 3)
            rows.append(prompt + torch.randint(2, vocab, (n,), generator=g).tolist())
            targets.append([False] * len(prompt) + [True] * n)
    rows.append(torch.randint(2, vocab, (9,), generator=g).tolist())
    targets.append([False] * 4 + [True] * 5)
    ids, mask = left_pad(rows, pad_id=1)
    width = ids.shape[1]
    target = torch.tensor([[False] * (width - len(t)) + t for t in targets])
    return rows, targets, ids, mask, target


def alone(model, rows, targets, hidden=False):
    """The hand computation: each row read alone, unpadded, its logits at the positions before its targets."""
    logits, states = [], []
    for row, target in zip(rows, targets):
        out = model(input_ids=torch.tensor([row]), output_hidden_states=True)
        at = [t - 1 for t, f in enumerate(target) if f]
        logits.append(out.logits[0, at])
        states.append(out.hidden_states[-1][0, at])
    return torch.cat(logits), torch.cat(states)


def check_shared_pass(model, monkeypatch=None, width: int | None = None):
    rows, targets, ids, mask, target = grouped_batch(model.config.vocab_size)
    model.double().eval()  # float64 (eval: no dropout; gradients flow all the same)
    if width is not None:
        monkeypatch.setattr(logprobs, "prefix_sharing_width", lambda m: width)
    weights = torch.randn(int(target.sum()), model.config.hidden_size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = []
    for compute in (lambda: causal_pass(model, ids, mask, target, hidden_states=True), lambda: alone(model, rows, targets)):
        model.zero_grad()
        logits, hidden = compute()
        (hidden * weights).sum().backward()  # float64 end to end (the pass returns float32 logits)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        if len(grads) == 1:
            got = logits.detach(), hidden.detach()
    torch.testing.assert_close(got[0], logits.detach().float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(got[1], hidden.detach(), rtol=0, atol=1e-10)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[1]:  # Llama-family norms compute in float32 even in a float64 model: ~1e-6 of the largest entry
        scale = float(grads[1][name].abs().max())
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=1e-5 * scale, msg=name)


def test_rows_sharing_a_prompt_get_the_logits_hidden_states_and_gradients_of_each_row_alone(tiny_model_dir):
    model, _ = load_lm(tiny_model_dir)
    assert prefix_sharing_width(model) == model.config.hidden_size
    check_shared_pass(model)


@pytest.mark.parametrize("width", [10, 1000])
def test_groups_split_by_the_width_limit_or_packed_whole_are_exact(tiny_gpt2_dir, monkeypatch, width):
    model, _ = load_lm(tiny_gpt2_dir)
    check_shared_pass(model, monkeypatch, width)


def tiny(config_cls, **kw):
    torch.manual_seed(0)
    config = config_cls(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=1, **kw)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("make", [lambda: tiny(Qwen3Config, head_dim=8), lambda: tiny(MistralConfig, sliding_window=None)],
                         ids=["qwen3", "mistral"])
def test_the_other_listed_architectures_are_exact(make):
    check_shared_pass(make())


def test_eager_attention_reads_the_mask_as_additive_scores(tmp_path, tiny_tokenizer):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tiny_tokenizer), n_layer=2, n_embd=32, n_head=2, n_positions=128, pad_token_id=1)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    check_shared_pass(model)


def test_a_shared_prompt_pass_gives_the_same_gradients_every_time(tiny_tokenizer):
    """A shared prompt's last position predicts every completion's first token, so its gradient is a
    sum over the group; on a multi-threaded CPU that sum must come out the same on every backward
    (advanced indexing's backward added it in a varying order: GRPO, same seed, drifted apart)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=256, n_layer=1, n_head=2, n_positions=256)).eval()
    # 128 completions of one prompt: half the scored positions are that prompt's last token
    rows, targets, ids, mask, target = grouped_batch(model.config.vocab_size, group=128, prompts=1, completion=2)
    weights = torch.randn(int(target.sum()), 256, generator=torch.Generator().manual_seed(1))
    first = None
    for _ in range(20):
        model.zero_grad()
        _, hidden = causal_pass(model, ids, mask, target, hidden_states=True)
        (hidden * weights).sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        first = first or grads
        assert all(torch.equal(a, b) for a, b in zip(first, grads))


def test_the_layout_reads_each_shared_prompt_once():
    rows, targets, ids, mask, target = grouped_batch(vocab=64)  # token ids >= 2; the layout pads with 0
    right = torch.stack([torch.cat([r[m.bool()], r[~m.bool()]]) for r, m in zip(ids, mask)])
    predicts = torch.zeros_like(target)
    for i, t in enumerate(targets):
        predicts[i, [k - 1 for k, f in enumerate(t) if f]] = True
    layout = shared_prefix_layout(right, predicts, max_width=1000)
    # Prompts of 3, 5 and 7 tokens once each, every completion but its last token, the lone row's 8 tokens.
    branches = sum(max(sum(t) - 1, 0) for t in targets[:-1])
    assert int((layout.input_ids != 0).sum()) == 3 + 5 + 7 + branches + 8
    assert int((layout.input_ids != 0).sum()) < sum(len(r) for r in rows)
    assert bool(layout.attends[:, 0].diagonal(dim1=1, dim2=2).all()), "every token reads at least itself"
    assert layout.rows.numel() == layout.columns.numel() == int(predicts.sum())
    assert shared_prefix_layout(right[-1:], predicts[-1:], 1000) is None, "nothing shared: the plain pass"


def test_models_that_cannot_read_a_packed_row_take_the_plain_pass():
    opt = AutoModelForCausalLM.from_config(OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                                     num_attention_heads=4, word_embed_proj_dim=32))
    assert prefix_sharing_width(opt) == 0, "OPT derives its positions from the 2-D mask"
    prompt_tuned = torch.nn.Module()
    prompt_tuned.num_virtual_tokens, prompt_tuned.config = 8, GPT2Config()
    assert prefix_sharing_width(prompt_tuned) == 0


@pytest.mark.parametrize("make", [lambda: tiny(MistralConfig, sliding_window=8),
                                  lambda: tiny(Qwen2Config, use_sliding_window=True, sliding_window=8, max_window_layers=0)],
                         ids=["mistral", "qwen2"])
def test_a_sliding_window_model_is_packed_only_where_no_row_outgrows_the_window(make):
    """The packed rows' mask replaces the model's own, window included: with a row longer than the
    window the padded pass is used, and each row still gets its outputs read alone."""
    model = make().double().eval()
    assert attention_window(model) == 8
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(2, 64, (4,), generator=g).tolist()
    short = [prompt + torch.randint(2, 64, (2,), generator=g).tolist() for _ in range(8)]
    rows = short + [torch.randint(2, 64, (18,), generator=g).tolist()]  # 18 tokens: past the window
    targets = [[False] * 4 + [True] * 2] * 8 + [[False] * 4 + [True] * 14]
    ids, mask = left_pad(rows, pad_id=1)
    target = torch.tensor([[False] * (ids.shape[1] - len(t)) + t for t in targets])
    logits, _ = causal_pass(model, ids, mask, target)
    torch.testing.assert_close(logits, alone(model, rows, targets)[0].float(), rtol=0, atol=1e-6)
    right = torch.stack([torch.cat([r[m.bool()], r[~m.bool()]]) for r, m in zip(ids, mask)])
    predicts = torch.zeros_like(target)
    for i, t in enumerate(targets):
        predicts[i, [k - 1 for k, f in enumerate(t) if f]] = True
    assert shared_prefix_layout(right, predicts, 1000) is not None, "without the window it would pack"
    assert shared_prefix_layout(right, predicts, 1000, window=8) is None
    assert shared_prefix_layout(right[:8], predicts[:8], 1000, window=8) is not None, "the short rows alone fit"


def test_categorical_entropy_is_minus_p_log_p_over_the_unmasked_tokens_with_finite_gradients():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, dtype=torch.float64, requires_grad=True)
    valid = torch.ones(11, dtype=torch.bool)
    valid[[0, 4]] = False
    log_probs = masked_log_softmax(logits, valid)
    got = categorical_entropy(log_probs)
    p = torch.softmax(logits[..., valid].float(), -1)  # the distribution over the valid tokens alone
    expected = -(p * p.log()).sum(-1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    (grad,) = torch.autograd.grad(got.sum(), logits)
    (expected_grad,) = torch.autograd.grad(expected.sum(), logits)
    assert torch.isfinite(grad).all() and (grad[..., ~valid] == 0).all()
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-5)
    # A row of padding (log-probs all 0, as unpack leaves them) and a one-hot distribution have entropy 0.
    assert categorical_entropy(torch.zeros(2, 1)).tolist() == [0.0, 0.0]
    assert categorical_entropy(torch.tensor([[0.0, float("-inf"), float("-inf")]])).item() == 0.0


@pytest.mark.parametrize("n_invalid", [0, 1, 2, 12])
def test_mask_invalid_actions_sets_exactly_the_invalid_logits(n_invalid):
    """The (V,) action mask is applied to its invalid columns alone (index_fill), per-position masks
    elementwise: either way the result is masked_fill's, in place or not, with no gradient through
    the masked logits."""
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 13, requires_grad=True)
    valid = torch.ones(13, dtype=torch.bool)
    valid[torch.randperm(13)[:n_invalid]] = False
    expected = torch.where(valid, logits, float("-inf"))
    got = mask_invalid_actions(logits, valid)
    assert torch.equal(got, expected) and got.data_ptr() != logits.data_ptr()
    (grad,) = torch.autograd.grad(got[got.isfinite()].sum(), logits)
    assert torch.equal(grad, valid.float().expand_as(grad))
    per_position = torch.rand(3, 4, 13) < 0.7
    assert torch.equal(mask_invalid_actions(logits, per_position), torch.where(per_position, logits, float("-inf")))
    target = logits.detach().clone()
    assert mask_invalid_actions(target, valid, value=0.0, inplace=True) is target
    assert torch.equal(target, torch.where(valid, logits, 0.0))
    assert mask_invalid_actions(logits, None) is logits
    # The invalid columns are found once per mask, and again after the mask is changed in place.
    valid[:] = True
    valid[5] = False
    assert torch.equal(mask_invalid_actions(logits, valid), torch.where(valid, logits, float("-inf")))
    with pytest.raises(TypeError, match="bool mask"):
        mask_invalid_actions(logits, valid.long())
    with pytest.raises(ValueError, match="covers 8 tokens, the logits 13"):
        mask_invalid_actions(logits, valid[:8])
    with torch.inference_mode():  # a mask made there has no version counter
        inference_valid = valid.clone()
    assert torch.equal(mask_invalid_actions(logits, inference_valid), torch.where(valid, logits, float("-inf")))


@pytest.mark.parametrize("masked", [False, True])
def test_token_logprobs_values_and_gradients_are_autograds_through_log_softmax(masked):
    """The closed-form backward (onehot(y) - softmax(x)) * g, written in place, must give what autograd
    gives through (masked_fill,) log_softmax and gather: values, gradients (0 on masked logits, also
    for a label outside the valid tokens, whose log-prob is -inf) and the detached entropy."""
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 13, requires_grad=True)
    labels = torch.randint(13, (4, 6))
    valid = None
    if masked:
        valid = torch.ones(13, dtype=torch.bool)
        valid[[2, 7]] = False
        labels[(labels == 2) | (labels == 7)] = 3
        labels[0, 0] = 7  # outside the valid tokens
    weights = torch.randn(4, 6)  # an upstream gradient g that is not all ones
    expected_log_probs = torch.log_softmax(logits if valid is None else logits.masked_fill(~valid, float("-inf")), -1)
    expected = expected_log_probs.gather(-1, labels[..., None]).squeeze(-1)
    finite = torch.isfinite(expected)
    (expected_grad,) = torch.autograd.grad(expected, logits, weights)  # finite: a masked logit gets no gradient

    got, entropy = token_logprobs_and_entropy(logits, labels, valid)
    assert torch.equal(got.isfinite(), finite) and finite.sum() == 24 - masked
    torch.testing.assert_close(got[finite], expected[finite].detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(entropy, categorical_entropy(expected_log_probs).detach(), rtol=0, atol=1e-6)
    assert not entropy.requires_grad
    (grad,) = torch.autograd.grad(got, logits, weights)
    assert torch.isfinite(expected_grad).all()
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-6)
    if masked:
        assert (grad[..., ~valid] == 0).all()
    torch.testing.assert_close(token_logprobs(logits, labels, valid), got.detach(), rtol=0, atol=0)
    # Written over the logits: the same values and gradient, and the logits then hold the log-softmax.
    head = torch.randn(4, 6, 5, requires_grad=True)
    projection = torch.randn(5, 13)
    overwritten = head @ projection  # what the LM head makes, for this call alone
    in_place = token_logprobs(overwritten, labels, valid, overwrite_logits=True)
    fresh = token_logprobs(head @ projection, labels, valid)
    assert torch.equal(in_place, fresh)
    torch.testing.assert_close(overwritten.detach(), masked_log_softmax(head @ projection, valid).detach(), rtol=0, atol=0)
    (grad_in_place,) = torch.autograd.grad(in_place, head, weights)
    (grad_fresh,) = torch.autograd.grad(fresh, head, weights)
    assert torch.equal(grad_in_place, grad_fresh)


def test_token_logprobs_backward_refuses_to_run_twice():
    """Its backward consumes the saved log-softmax in place: a second one must fail, not return garbage."""
    logits = torch.randn(3, 5, requires_grad=True)
    out = token_logprobs(logits, torch.tensor([0, 1, 2])).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once"):
        out.backward()


def test_a_plain_head_is_checked_on_the_models_first_pass_only(tiny_gpt2_dir):
    """causal_pass compares the model's own last-position logits with its head's once per model:
    later passes run the head on the scored positions only, and give the same log-probs."""
    model, _ = load_lm(tiny_gpt2_dir)
    calls = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: calls.append(args[0].shape[:-1].numel()))
    ids = torch.tensor([[5, 6, 7, 8, 9], [7, 6, 5, 4, 3]])
    targets = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 1, 0]], dtype=torch.bool)
    first, _ = causal_pass(model, ids, torch.ones_like(ids), targets)
    assert calls == [2, 2, 5]  # the model's own (last position of each row), the check, the scored positions
    calls.clear()
    second, _ = causal_pass(model, ids, torch.ones_like(ids), targets)
    assert calls == [0, 5], "the model computes no logits of its own once its head is known plain"
    assert torch.equal(first, second)


def test_token_logprobs_takes_a_mask_per_position_and_leaves_views_and_unused_outputs_alone():
    """A (..., V) mask per position gets the gradient autograd gives; logits that are a view are not
    overwritten (they get a tensor of their own); the backward builds no gradient for the outputs
    nobody used (the entropy, the overwritten logits)."""
    torch.manual_seed(0)
    logits = torch.randn(5, 11, requires_grad=True)
    labels = torch.randint(11, (5,))
    valid = torch.rand(5, 11) > 0.3
    valid[torch.arange(5), labels] = True
    weights = torch.randn(5)
    expected = masked_log_softmax(logits, valid).gather(-1, labels[:, None]).squeeze(-1)
    got = token_logprobs(logits, labels, valid)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(got, logits, weights)[0], torch.autograd.grad(expected, logits, weights)[0],
                               rtol=0, atol=1e-6)

    base = torch.randn(5, 3, 11)
    view = base[:, -1]
    before = view.clone()
    token_logprobs(view, labels, overwrite_logits=True)
    assert torch.equal(view, before) and torch.equal(base[:, -1], before)

    head = torch.randn(5, 4, requires_grad=True)
    with torch.profiler.profile() as prof:
        token_logprobs_and_entropy(head @ torch.randn(4, 11), labels, overwrite_logits=True)[0].sum().backward()
    assert not [e for e in prof.events() if e.name in ("aten::zeros", "aten::zeros_like")], "no zero gradient was built"


def test_a_forward_hook_added_after_the_check_is_caught(tiny_gpt2_dir):
    """The plain-head check is redone when the model's forward hooks change: a hook that transforms
    the logits after the first pass is read through the model's own logits, as before it."""
    model, _ = load_lm(tiny_gpt2_dir)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    targets = torch.tensor([[0, 0, 1, 1, 1]], dtype=torch.bool)
    plain, _ = causal_pass(model, ids, torch.ones_like(ids), targets)

    def halve(module, args, output):
        output.logits = output.logits / 2
        return output

    model.register_forward_hook(halve)
    halved, _ = causal_pass(model, ids, torch.ones_like(ids), targets)
    torch.testing.assert_close(halved, plain / 2, rtol=1e-5, atol=1e-5)
