"""Bring your own task: a classifier with its own tokenizer, a Python function, weighted sums, a
judge of your own, prompts from files, your own model and your own registered env id, from Python
and from the CLI."""

from __future__ import annotations

import json
import math
import sys
import textwrap

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import save_tiny_lm
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    BertTokenizerFast,
)

import envs  # noqa: F401
from agents.cli import main
from agents.task_config import TaskConfig
from rlhf.classifier import SequenceClassifier

SENTENCES = ["a wonderful film with great acting", "a terrible boring movie", "the plot was dull and slow",
             "I loved every minute of it", "the worst film of the year", "brilliant, moving and funny"] * 4


def save_tiny_bert(path, labels=("NEGATIVE", "POSITIVE"), seed=0, head=True):
    """A random-init BERT classifier with its own WordPiece tokenizer (trained here): not the policy's vocabulary."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(SENTENCES, trainers.WordPieceTrainer(vocab_size=120, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                             mask_token="[MASK]", model_max_length=128)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=128, num_labels=len(labels), id2label=dict(enumerate(labels)),
                        label2id={name: i for i, name in enumerate(labels)})
    model = BertForSequenceClassification(config) if head else BertModel(config)
    model.save_pretrained(path, safe_serialization=True)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def plain_score(path, text, label=1, output="logit"):
    """The classifier's score of one text, computed with plain transformers: what the env must pay."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        logits = model(**tokenizer(text, return_tensors="pt")).logits[0]
    values = {"logit": logits, "prob": logits.softmax(-1), "logprob": logits.log_softmax(-1)}[output]
    return float(values[label])


def play(env, seed=0):
    """One episode with valid random actions; the last step's reward and info."""
    env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    while True:
        mask = env.unwrapped.action_masks()
        _, reward, terminated, truncated, info = env.step(int(rng.choice(np.flatnonzero(mask))))
        if terminated or truncated:
            return reward, info


@pytest.mark.parametrize("label, output, index", [(None, "logit", 1), ("NEGATIVE", "prob", 0), ("0", "logprob", 0)])
def test_a_classifier_with_its_own_tokenizer_pays_its_score_of_the_decoded_review(bert_dir, tiny_gpt2_dir, label, output, index):
    env = gym.make("TextGen-v0", model=str(tiny_gpt2_dir), reward=str(bert_dir), reward_label=label, reward_output=output,
                   max_new_tokens=5, prompts=["This movie was", "Terrible acting and"], gold=False)
    for seed in range(3):
        reward, info = play(env, seed)
        expected = plain_score(bert_dir, info["prompt"] + info["text"], index, output)
        assert reward == pytest.approx(expected, abs=1e-5) and info["rm_score"] == pytest.approx(expected, abs=1e-5)
        assert math.isnan(info["gold_score"])


def test_the_vector_env_pays_the_classifier_score_of_each_finished_episode(bert_dir, tiny_gpt2_dir):
    env = gym.make_vec("TextGen-v0", num_envs=4, vectorization_mode="vector_entry_point", model=str(tiny_gpt2_dir),
                       reward=str(bert_dir), max_new_tokens=4, prompts=["This movie was", "Terrible acting and"])
    env.reset(seed=0)
    checked = 0
    for _ in range(8):
        actions = np.array([np.flatnonzero(m)[7] for m in env.unwrapped.action_masks()])
        _, rewards, terminated, _, infos = env.step(actions)
        for i in np.flatnonzero(infos.get("_rm_score", [])):
            assert rewards[i] == pytest.approx(plain_score(bert_dir, infos["prompt"][i] + infos["text"][i]), abs=1e-5)
            checked += 1
    assert checked >= 4


def test_classifier_scores_are_the_same_alone_and_in_length_bucketed_batches(bert_dir):
    texts = ["good", "a terrible boring movie with a dull plot and the worst acting", "", "I loved it", "slow"] * 3
    clf = SequenceClassifier(bert_dir, max_buckets=3, batch_size=4)
    together = clf.scores(texts)
    alone = torch.stack([clf.scores([t])[0] for t in texts])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_an_unusable_classifier_fails_at_construction_naming_the_dir(tmp_path, bert_dir, tiny_gpt2_dir):
    kwargs = dict(model=str(tiny_gpt2_dir), max_new_tokens=4, prompts=["This movie was"])
    no_head = save_tiny_bert(tmp_path / "bert-no-head", head=False)
    with pytest.raises(ValueError, match=r"bert-no-head.*(BertModel|ForSequenceClassification)"):
        gym.make("TextGen-v0", reward=str(no_head), **kwargs)
    three = save_tiny_bert(tmp_path / "three-labels", labels=("anger", "joy", "fear"))
    with pytest.raises(ValueError, match=r"three-labels has 3 labels .*'anger'.*'joy'.*none is named 'positive'"):
        gym.make("TextGen-v0", reward=str(three), **kwargs)
    with pytest.raises(ValueError, match=r"no label 'happy'; its labels are 0='anger', 1='joy', 2='fear'"):
        gym.make("TextGen-v0", reward=str(three), reward_label="happy", **kwargs)
    assert gym.make("TextGen-v0", reward=str(three), reward_label="joy", **kwargs) is not None
    with pytest.raises(ValueError, match="label index 5 is out of range"):
        SequenceClassifier(three, label=5)
    with pytest.raises(ValueError, match="unknown classifier output 'probability'"):
        gym.make("TextGen-v0", reward=str(bert_dir), reward_output="probability", **kwargs)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((bert_dir / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="pickle-based weights are refused"):
        gym.make("TextGen-v0", reward=str(pickled), **kwargs)
    with pytest.raises(FileNotFoundError, match="neither 'default'.*module:function"):
        gym.make("TextGen-v0", reward=str(tmp_path / "missing"), **kwargs)


def length_reward(prompts, completions):
    return [len(c.split()) - 0.5 * len(p) / 10 for p, c in zip(prompts, completions)]


def test_a_python_function_reward_is_paid_on_the_prompt_and_completion_once_per_step(tiny_env_kwargs):
    calls = []

    def counting(prompts, completions):
        calls.append(len(prompts))
        return length_reward(prompts, completions)

    kwargs = {**tiny_env_kwargs, "reward_model": None}
    env = gym.make("TextGen-v0", reward=counting, **kwargs)
    for seed in range(3):
        reward, info = play(env, seed)
        assert reward == pytest.approx(length_reward([info["prompt"]], [info["text"]])[0])
    vec = gym.make_vec("TextGen-v0", num_envs=6, vectorization_mode="vector_entry_point", reward=counting, **kwargs)
    vec.reset(seed=0)
    calls.clear()
    for _ in range(tiny_env_kwargs["max_new_tokens"]):
        vec.step(np.array([np.flatnonzero(m)[3] for m in vec.unwrapped.action_masks()]))
    assert calls == [6]  # every episode ends at the horizon in the same step: one batched call


@pytest.mark.parametrize("returned, message", [
    (lambda n: [0.0] * (n + 1), r"returned \d+ values for \d+ texts"),
    (lambda n: [float("nan")] * n, "returned the non-finite value nan at index 0"),
    (lambda n: "good", "returned str"),
    (lambda n: ["1.0"] * n, "returned str '1.0' at index 0; expected a number"),
    (lambda n: None, "returned NoneType"),
    (lambda n: np.zeros((n, 2)), r"returned an array of shape \(\d+, 2\)"),
])
def test_a_bad_return_of_a_reward_function_raises_naming_the_function(tiny_env_kwargs, returned, message):
    def my_reward(prompts, completions):
        return returned(len(prompts))

    env = gym.make("TextGen-v0", reward=my_reward, **{**tiny_env_kwargs, "reward_model": None})
    with pytest.raises(ValueError, match=f"reward function .*my_reward {message}"):
        play(env)


def test_module_function_specs_name_a_reward_and_a_gold_scorer(tmp_path, monkeypatch, tiny_env_kwargs):
    (tmp_path / "user_scores.py").write_text(textwrap.dedent("""
        def bonus(prompts, completions):
            return [float(len(c)) for c in completions]

        def judge(texts):
            return [float(t.count("e")) for t in texts]

        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    env = gym.make("TextGen-v0", reward="user_scores:bonus", gold="user_scores:judge", **{**tiny_env_kwargs, "reward_model": None})
    reward, info = play(env)
    assert reward == float(len(info["text"])) and info["gold_score"] == float((info["prompt"] + info["text"]).count("e"))
    for spec, message in (("user_scores:NOT_CALLABLE", "is a int, not a callable"), ("user_scores:nope", "has no attribute 'nope'"),
                          ("no_such_module:f", "cannot import module 'no_such_module'")):
        with pytest.raises(ValueError, match=message):
            gym.make("TextGen-v0", reward=spec, **{**tiny_env_kwargs, "reward_model": None})


def test_a_weighted_sum_pays_sum_of_weighted_terms_and_reports_each_term(bert_dir, tiny_env_kwargs, tiny_rm_dir):
    kwargs = {**tiny_env_kwargs, "reward_model": None}
    env = gym.make("TextGen-v0", reward=[length_reward, str(bert_dir), str(tiny_rm_dir)], reward_weights=[2.0, -0.5, 1.0], **kwargs)
    from rlhf.reward_model import RewardModel

    rm = RewardModel.load(tiny_rm_dir)
    for seed in range(3):
        reward, info = play(env, seed)
        prompt, text = info["prompt"], info["text"]
        bert = f"{bert_dir.name}:POSITIVE"  # a classifier term is named dir:label
        terms = {"length_reward": length_reward([prompt], [text])[0], bert: plain_score(bert_dir, prompt + text),
                 tiny_rm_dir.name: rm.score([prompt], [text])[0]}
        assert info["reward_terms"] == pytest.approx(terms, abs=1e-5)
        assert reward == pytest.approx(2 * terms["length_reward"] - 0.5 * terms[bert] + terms[tiny_rm_dir.name], abs=1e-5)
    vec = gym.make_vec("TextGen-v0", num_envs=3, vectorization_mode="vector_entry_point", reward=[length_reward, length_reward],
                       reward_weights=[1.0, 1.0], **kwargs)
    vec.reset(seed=0)
    for _ in range(tiny_env_kwargs["max_new_tokens"]):
        _, rewards, _, _, infos = vec.step(np.array([np.flatnonzero(m)[5] for m in vec.unwrapped.action_masks()]))
    assert set(infos["reward_terms"]) == {"length_reward", "length_reward-2", "_length_reward", "_length_reward-2"}
    np.testing.assert_allclose(rewards, 2 * infos["reward_terms"]["length_reward"], rtol=1e-6)
    with pytest.raises(ValueError, match="got 2 rewards but 1 reward_weights"):
        gym.make("TextGen-v0", reward=[length_reward, length_reward], reward_weights=[1.0], **kwargs)
    with pytest.raises(ValueError, match=r"reward_weights\[1\] must be finite"):
        gym.make("TextGen-v0", reward=[length_reward, length_reward], reward_weights=[1.0, float("inf")], **kwargs)


def test_the_gold_scorer_is_pluggable(bert_dir, tiny_env_kwargs):
    env = gym.make("TextGen-v0", gold=str(bert_dir), **tiny_env_kwargs)
    _, info = play(env)
    assert info["gold_score"] == pytest.approx(plain_score(bert_dir, info["prompt"] + info["text"], 1, "prob"), abs=1e-5)
    _, info = play(gym.make("TextGen-v0", gold=lambda texts: [len(t) for t in texts], **tiny_env_kwargs))
    assert info["gold_score"] == len(info["prompt"] + info["text"])
    for gold in ("none", False):
        assert math.isnan(play(gym.make("TextGen-v0", gold=gold, **tiny_env_kwargs))[1]["gold_score"])
    with pytest.raises(ValueError, match="gold scorer .*<lambda> returned 2 values for 1 texts"):
        play(gym.make("TextGen-v0", gold=lambda texts: [0.0, 1.0], **tiny_env_kwargs))


def test_prompts_come_from_a_jsonl_field(tmp_path, tiny_env_kwargs):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"id": i, "text": t}) for i, t in enumerate(["An odd film", "My cat liked it"])) + "\n")
    env = gym.make("TextGen-v0", **{**tiny_env_kwargs, "prompts": str(path), "prompt_field": "text"})
    seen = {play(env, seed)[1]["prompt"] for seed in range(8)}
    assert seen == {"An odd film", "My cat liked it"}
    with pytest.raises(ValueError, match=r"prompts.jsonl line 1.*'id', 'text'"):
        gym.make("TextGen-v0", **{**tiny_env_kwargs, "prompts": str(path)})


def test_task_flags_are_validated(capsys):
    with pytest.raises(ValueError, match="--reward-weights needs --reward"):
        TaskConfig(reward_weights=[1.0]).validate_task()
    with pytest.raises(ValueError, match="got 2 --reward but 1 --reward-weights"):
        TaskConfig(reward=["default", "x:y"], reward_weights=[1.0]).validate_task()
    with pytest.raises(ValueError, match="unknown reward_output"):
        TaskConfig(reward_output="odds").validate_task()
    with pytest.raises(SystemExit):  # argparse's usage error, exit status 2
        main(["train", "ppo", "--reward", "default", "--reward-weights", "nan"])
    assert "reward_weights must hold finite numbers, got nan" in capsys.readouterr().err


USER_MODULE = """
import gymnasium as gym

def polite(prompts, completions):
    return [float(c.count("e")) - 0.1 * len(c) for c in completions]

gym.register(
    id="{env_id}",
    entry_point="envs.text_gen:TextGenEnv",
    vector_entry_point="envs.vector:TextGenVectorEnv",
    kwargs=dict(model={model!r}, reward="{module}:polite", prompts={prompts!r}, max_new_tokens=4, gold="none"),
)
"""


def test_a_user_registered_env_id_trains_with_the_cli_and_evaluates(tmp_path, monkeypatch, tiny_gpt2_dir):
    """README's "your own task": a module registers an id with a reward, prompts and a model; the CLI
    imports it with --env module:Id, trains, resumes the same task, and textgym eval rebuilds it."""
    prompts = tmp_path / "my_prompts.txt"
    prompts.write_text("The service was\nOur stay was\nThe food\n")
    module = "my_task_module"
    (tmp_path / f"{module}.py").write_text(USER_MODULE.format(env_id="MyTask-v0", model=str(tiny_gpt2_dir), module=module,
                                                               prompts=str(prompts)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, module, raising=False)
    run = tmp_path / "runs" / "mine"
    args = ["train", "reinforce", "--env", f"{module}:MyTask-v0", "--num-envs", "4", "--rloo-k", "2", "--max-new-tokens", "4",
            "--total-steps", "32", "--device", "cpu", "--out", str(run)]
    assert main(args) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and "reward/gold" not in metrics[0]  # gold="none": no gold metric
    assert json.loads((run / "run.json").read_text())["config"]["env"] == f"{module}:MyTask-v0"
    assert main(["eval", "--runs", str(run), "--episodes", "8", "--num-envs", "4", "--max-new-tokens", "4",
                 "--out", str(tmp_path / "eval"), "--device", "cpu"]) == 0
    points = json.loads((tmp_path / "eval" / "eval.json").read_text())["mine"]
    assert [p["label"] for p in points] == ["initial", "final"]
    assert all(math.isfinite(p["rm"]) and p["rm"] <= 4.0 for p in points)  # "polite" pays <= #e's - 0.1 len <= 4 on 4 tokens


def test_the_cli_builds_the_env_on_the_users_model_and_evaluates_the_run(tmp_path, tiny_tokenizer, bert_dir):
    """`--model DIR` with its own (512-token) tokenizer: the env speaks it (actions, reference), the
    reward re-tokenises the text; before, this failed with 'the env has 8192 actions but the policy 512'."""
    model_dir = save_tiny_lm("llama", tmp_path / "my-llama", tiny_tokenizer)
    run = tmp_path / "run"
    assert main(["train", "ppo", "--model", str(model_dir), "--reward", str(bert_dir), "--reward", "default",
                 "--reward-weights", "1", "0.5", "--num-envs", "4", "--num-minibatches", "2", "--max-new-tokens", "4",
                 "--total-steps", "32", "--env-ref-logprob-coef", "0.01", "--device", "cpu", "--out", str(run)]) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"reward/terms/rm", f"reward/terms/{bert_dir.name}:POSITIVE"} <= set(metrics[-1])
    last = metrics[-1]
    assert last["reward/rm"] == pytest.approx(last[f"reward/terms/{bert_dir.name}:POSITIVE"] + 0.5 * last["reward/terms/rm"], abs=1e-4)
    assert main(["eval", "--runs", str(run), "--episodes", "8", "--num-envs", "4", "--max-new-tokens", "4",
                 "--out", str(tmp_path / "eval"), "--device", "cpu"]) == 0
    points = json.loads((tmp_path / "eval" / "eval.json").read_text())["run"]
    assert points[0]["model"] == str(model_dir) and points[0]["kl_ref"] == 0.0
