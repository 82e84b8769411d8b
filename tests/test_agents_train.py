"""Agents learn the toy env, log what they promise, resume exactly, and fail loudly."""

import copy
import json
import os
import signal
import types

import gymnasium as gym
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from agents import dqn, grpo, ppo, reinforce, trpo
from agents.cli import main
from agents.policy import LMPolicy
from agents.run import NonFiniteError, Run
from envs.toy import TextGenToyEnv
from pretrain.padding import position_ids_from_mask
from pretrain.run_dir import sha256_file
from rlhf.logprobs import completion_logprobs

TOY = dict(env="TextGenToy-v0", max_new_tokens=4, device="cpu")
TD_TOY = dict(**TOY, objective="td", num_envs=16, lr=1e-3, gradient_steps=8, max_grad_norm=10.0)  # the TD objective's toy settings


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def teacher_forced(model, ids, attn, start, valid_actions):
    """log pi(a_t | s_t) of the completion columns >= start, through the shared completion log-prob function."""
    mask = attn.clone()
    mask[:, :start] = 0
    with torch.no_grad():
        return completion_logprobs(model, ids, attn, mask, valid_actions)[:, start:]


def greedy_return(model_dir) -> float:
    """Play the toy env greedily with a trained model; the optimum is 1.0."""
    policy = LMPolicy.load(model_dir, "cpu", value_head=False)
    env = TextGenToyEnv()
    total = 0.0
    for seed in range(4):
        obs, _ = env.reset(seed=seed)
        terminated = False
        while not terminated:
            ids = torch.as_tensor(obs["input_ids"])[None]
            mask = torch.as_tensor(obs["attention_mask"])[None]
            with torch.no_grad():
                logits = policy.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits[0, -1]
            obs, reward, terminated, _, _ = env.step(int(logits.argmax()))
            total += reward
    return total / 4


def test_ppo_learns_the_toy_env(tmp_path):
    out = tmp_path / "ppo"
    result = ppo.train(ppo.PPOConfig(**TOY, num_envs=16, total_steps=16 * 4 * 20, lr=3e-3, kl_coef=0.0,
                                      num_minibatches=2, target_kl=0.0, out=str(out)))
    rewards = [m["reward/rm"] for m in metrics(out)]
    assert rewards[0] < 0.3 and np.mean(rewards[-3:]) > 0.9
    assert greedy_return(result["final"]) == 1.0


def test_reinforce_learns_the_toy_env(tmp_path):
    out = tmp_path / "reinforce"
    reinforce.train(reinforce.ReinforceConfig(**TOY, num_envs=16, total_steps=16 * 4 * 40, lr=5e-3, kl_coef=0.0,
                                              baseline="rloo", rloo_k=4, out=str(out)))
    rewards = [m["reward/rm"] for m in metrics(out)]
    assert rewards[0] < 0.3 and np.mean(rewards[-3:]) > 0.75


def test_reinforce_rloos_update_and_reference_passes_read_each_prompt_once(tmp_path, monkeypatch):
    """RLOO's k samples of a prompt reach the update and reference passes as one packed row each
    (rlhf.logprobs.shared_prefix_layout), not as k padded rows."""
    import rlhf.logprobs

    layouts = []

    def recording(input_ids, predicts, *args):
        layout = shared_prefix_layout(input_ids, predicts, *args)
        layouts.append((input_ids.shape, layout))
        return layout

    shared_prefix_layout = rlhf.logprobs.shared_prefix_layout
    monkeypatch.setattr(rlhf.logprobs, "shared_prefix_layout", recording)
    reinforce.train(reinforce.ReinforceConfig(**TOY, num_envs=8, total_steps=8 * 4 * 2, lr=1e-3, kl_coef=0.05,
                                              baseline="rloo", rloo_k=4, out=str(tmp_path / "rloo")))
    assert len(layouts) == 4, "per update: the reference pass and the update pass"
    for (rows, width), layout in layouts:
        assert layout is not None
        assert layout.input_ids.numel() <= rows * width * rlhf.logprobs.MAX_LAYOUT_COST


def test_dqn_with_prioritized_replay_reaches_the_optimal_policy(tmp_path):
    out = tmp_path / "dqn"
    result = dqn.train(dqn.DQNConfig(**TD_TOY, total_steps=2500, prioritized=True, n_step=2, out=str(out)))
    assert greedy_return(result["final"]) == 1.0
    last = metrics(out)[-1]
    assert last["replay/size"] == last["env_steps"] and last["explore/epsilon"] == pytest.approx(0.05)


def steps_to_solve(out, threshold=0.9) -> float:
    """Env steps until the training reward first averages >= threshold over 3 updates (inf if never)."""
    rows = metrics(out)
    for i in range(2, len(rows)):
        if np.mean([r["reward/rm"] for r in rows[i - 2 : i + 1]]) >= threshold:
            return rows[i]["env_steps"]
    return float("inf")


def test_path_consistency_reaches_the_toy_optimum_in_fewer_env_steps_than_single_step_dqn(tmp_path):
    """The reward is paid on the last token only: one-step TD moves it back one token per update, the
    whole-episode consistency reaches every token at once (issue 21)."""
    dqn.train(dqn.DQNConfig(**TD_TOY, total_steps=4096, out=str(tmp_path / "td")))
    same = {k: v for k, v in TD_TOY.items() if k != "objective"}  # same batch, lr, steps per update and clipping
    result = dqn.train(dqn.DQNConfig(**same, kl_coef=0.05, total_steps=1024, out=str(tmp_path / "pcl")))
    pcl_steps, td_steps = steps_to_solve(tmp_path / "pcl"), steps_to_solve(tmp_path / "td")
    assert pcl_steps <= 768 and 2 * pcl_steps < td_steps < float("inf"), (pcl_steps, td_steps)  # 680 vs 1,858 steps
    assert greedy_return(result["final"]) == 1.0
    last = metrics(tmp_path / "pcl")[-1]
    assert last["replay/size"] == 1024 // 4 and last["replay/on_policy_fraction"] == pytest.approx(16 / (16 + 32))


def test_path_consistency_fine_tunes_any_causal_lm_dir(tmp_path, tiny_model_dir, tiny_rm_dir):
    """`textgym train dqn` (PCL) on a GPT-2, Llama or Qwen2 dir with its reward model: the LM moves."""
    out = tmp_path / "run"
    assert main(["train", "dqn", "--model", str(tiny_model_dir), "--reward", str(tiny_rm_dir), "--num-envs", "4",
                 "--max-new-tokens", "4", "--total-steps", "48", "--replay-batch-size", "4", "--lr", "1e-3",
                 "--device", "cpu", "--out", str(out)]) == 0
    rows = metrics(out)
    assert len(rows) == 3 and rows[-1]["replay/size"] == 12 and rows[-1]["kl/ref"] != 0
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


TAGS = {
    "ppo": ["reward/rm", "reward/gold", "kl/ref", "policy/entropy", "loss/policy", "loss/value", "policy/clipfrac",
            "policy/approx_kl", "value/explained_variance", "lr", "perf/tokens_per_s"],
    "dqn": ["reward/rm", "reward/gold", "kl/ref", "loss/consistency", "consistency/abs_mean", "value/mean", "value/abs_max",
            "replay/size", "replay/on_policy_fraction", "lr", "perf/tokens_per_s"],
    "dqn_td": ["reward/rm", "reward/gold", "value/td_error", "explore/epsilon", "replay/size", "loss/value", "lr", "perf/tokens_per_s"],
    "grpo": ["reward/rm", "reward/gold", "kl/ref", "policy/entropy", "loss/policy", "grpo/frac_zero_std_groups",
             "grpo/clip_ratio_low", "grpo/clip_ratio_high", "lr", "perf/tokens_per_s"],
    "trpo": ["reward/rm", "reward/gold", "kl/ref", "policy/entropy", "loss/value", "value/explained_variance", "trpo/kl",
             "trpo/cg_iters", "trpo/line_search_steps", "trpo/step_accepted", "perf/tokens_per_s"],
}
MODULES = {"ppo": ppo, "dqn": dqn, "dqn_td": dqn, "grpo": grpo, "trpo": trpo}


def small_config(algo, out, **kw):
    common = dict(**TOY, num_envs=8, total_steps=8 * 4 * 6, checkpoint_every=3, sample_every=2, out=str(out), **kw)
    if algo == "grpo":
        return grpo.GRPOConfig(**common, lr=1e-3, group_size=4, kl_penalty="loss")
    if algo == "trpo":
        return trpo.TRPOConfig(**common, num_minibatches=2, max_kl=0.05)
    if algo == "ppo":
        return ppo.PPOConfig(**TOY, num_envs=8, total_steps=8 * 4 * 6, lr=1e-3, num_minibatches=2,
                             checkpoint_every=3, sample_every=2, out=str(out), **kw)
    if algo == "dqn":  # path consistency, prioritized episode replay
        return dqn.DQNConfig(**common, lr=1e-3, replay_batch_size=8, prioritized=True)
    return dqn.DQNConfig(**TOY, objective="td", num_envs=8, total_steps=8 * 4 * 6, learning_starts=32, gradient_steps=2,
                         prioritized=True, checkpoint_every=3, sample_every=2, out=str(out), **kw)


@pytest.mark.parametrize("algo", ["ppo", "dqn", "dqn_td", "grpo", "trpo"])
def test_resume_reproduces_the_uninterrupted_metric_stream(tmp_path, monkeypatch, algo):
    module = MODULES[algo]
    module.train(small_config(algo, tmp_path / "straight"))

    calls = {"n": 0}
    original = Run.log

    def log_then_ctrl_c(self, *args, **kwargs):
        original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:  # Ctrl-C during update 2: the run checkpoints after it and stops
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Run, "log", log_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        module.train(small_config(algo, tmp_path / "resumed"))
    monkeypatch.setattr(Run, "log", original)
    assert len(metrics(tmp_path / "resumed")) == 2
    module.train(small_config(algo, tmp_path / "resumed", resume=str(tmp_path / "resumed")))

    def strip(rows):
        return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]

    assert strip(metrics(tmp_path / "resumed")) == strip(metrics(tmp_path / "straight"))
    ea = EventAccumulator(str(tmp_path / "straight"))
    ea.Reload()
    assert set(TAGS[algo]) <= set(ea.Tags()["scalars"])
    assert "samples" in " ".join(ea.Tags()["tensors"])


def test_a_dqn_run_saved_before_objectives_existed_resumes_as_td(tmp_path, capsys):
    out = tmp_path / "old"
    dqn.train(small_config("dqn_td", out))
    for state in [out / "run.json", *out.glob("checkpoint-*/training_state.json")]:  # as the code before issue 21 saved them
        data = json.loads(state.read_text())
        config = data["state"]["config"] if "state" in data else data["config"]
        del config["objective"]
        state.write_text(json.dumps(data))
        manifest = state.parent / "manifest.json"
        if state.name != "run.json":  # the checkpoint's checksum of the rewritten file
            listed = json.loads(manifest.read_text())
            listed["files"][state.name] = sha256_file(state)
            manifest.write_text(json.dumps(listed))
    with pytest.raises(ValueError, match=r"objective: checkpoint 'td', this run 'pcl'"):
        dqn.train(dqn.DQNConfig(**TOY, num_envs=8, resume=str(out)))
    assert main(["train", "dqn", "--resume", str(out), "--total-steps", str(8 * 4 * 9)]) == 0
    assert metrics(out)[-1]["update"] == 9 and "value/td_error" in metrics(out)[-1]


def test_incompatible_resume_is_refused_and_nothing_is_overwritten(tmp_path):
    out = tmp_path / "run"
    dqn.train(small_config("dqn", out))
    before = sorted(p.name for p in out.iterdir()), (out / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="it holds a 'train dqn' run, not 'train ppo'"):
        ppo.train(small_config("ppo", "", resume=str(out)))
    with pytest.raises(ValueError, match=r"differ from the checkpoint .*\(num_envs: checkpoint 8, this run 16; prioritized: checkpoint True"):
        dqn.train(dqn.DQNConfig(**TOY, num_envs=16, total_steps=512, lr=1e-3, replay_batch_size=8, resume=str(out)))
    with pytest.raises(ValueError, match="continues that run in its own dir, but --out is"):
        dqn.train(small_config("dqn", tmp_path / "elsewhere", resume=str(out)))
    with pytest.raises(FileExistsError, match="already holds a 'train dqn' run; continue it with --resume"):
        dqn.train(small_config("dqn", out))
    with pytest.raises(FileExistsError, match="already holds a 'train dqn' run; pick another --out"):
        ppo.train(small_config("ppo", out))
    assert (sorted(p.name for p in out.iterdir()), (out / "metrics.jsonl").read_text()) == before
    assert not (tmp_path / "elsewhere").exists()


def test_non_finite_reward_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from envs import toy

    out = tmp_path / "nan"
    state = {"checkpointed": False}
    original_checkpoint, original_reward = Run.checkpoint, toy.ToyReward.__call__

    def checkpoint(self, *args, **kwargs):
        original_checkpoint(self, *args, **kwargs)
        state["checkpointed"] = True

    def nan_after_first_checkpoint(self, *args):
        scores = original_reward(self, *args)
        return scores * float("nan") if state["checkpointed"] else scores

    monkeypatch.setattr(Run, "checkpoint", checkpoint)
    monkeypatch.setattr(toy.ToyReward, "__call__", nan_after_first_checkpoint)
    with pytest.raises(NonFiniteError, match=r"the reward became non-finite \(\[nan.* in update 4; stopping. "
                                              r"The last good checkpoint is .*checkpoint-3 \(update 3; continue with --resume"):
        ppo.train(small_config("ppo", out))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"], "the last good checkpoint is kept"
    saved = json.loads((out / "checkpoint-3" / "training_state.json").read_text())
    assert saved["state"]["update"] == 3


def test_padding_after_an_early_eos_gives_finite_logprobs(tiny_gpt2_dir):
    policy = LMPolicy.load(tiny_gpt2_dir, "cpu", valid_actions=None)
    pad, eos = policy.tokenizer.pad_token_id, policy.tokenizer.eos_token_id
    policy.valid_actions[pad] = False
    ids = torch.tensor([[5, 6, 7, eos, pad, pad], [5, 6, 7, 8, 9, 10]])
    attn = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    logprobs, entropy, values = policy.evaluate(ids, attn, completion_start=3)
    assert torch.isfinite(logprobs).all() and torch.isfinite(entropy).all() and torch.isfinite(values).all()
    assert logprobs[0, 1:].eq(0).all() and entropy[0, 1:].eq(0).all()
    assert logprobs[0, 0] < 0 and logprobs[1].lt(0).all()


def test_evaluate_logprobs_equal_unpadded_forwards_for_each_architecture(tiny_model_dir):
    """Left-padded contexts, right-padded completions: each completion token's log-prob is the one a
    lone, unpadded forward gives (only the completion positions go through the LM head)."""
    policy = LMPolicy.load(tiny_model_dir, "cpu", valid_actions=None, value_head=False)
    pad = policy.tokenizer.pad_token_id
    contexts, completions = [[11, 12], [13, 14, 15, 16]], [[20, 21, 22], [23, 24]]
    width = max(map(len, contexts))
    ids = torch.tensor([[pad] * (width - len(c)) + c + r + [pad] * (3 - len(r)) for c, r in zip(contexts, completions)])
    attn = torch.tensor([[0] * (width - len(c)) + [1] * (len(c) + len(r)) + [0] * (3 - len(r)) for c, r in zip(contexts, completions)])
    logprobs, _, _ = policy.evaluate(ids, attn, width, entropy="none")
    for row, (c, r) in enumerate(zip(contexts, completions)):
        with torch.no_grad():
            logits = policy.model(input_ids=torch.tensor([c + r])).logits[0].float()
        expected = torch.log_softmax(logits[len(c) - 1 : -1], -1).gather(-1, torch.tensor(r)[:, None]).squeeze(-1)
        torch.testing.assert_close(logprobs[row, : len(r)], expected, atol=1e-4, rtol=1e-4)
        assert logprobs[row, len(r) :].eq(0).all()
    ref = teacher_forced(policy.reference(), ids, attn, width, policy.valid_actions)
    torch.testing.assert_close(ref, logprobs.detach())


@pytest.mark.parametrize("env_reference", [False, True], ids=["alone", "beside-the-envs-reference"])
def test_the_rollouts_recorded_logprobs_entropy_and_values_are_the_teacher_forced_ones(tiny_model_dir, tiny_env_kwargs,
                                                                                         env_reference):
    """PPO's and GRPO's pi_old and V come from the acting pass (record_logprobs) instead of a pass of
    their own: for every architecture they must be what evaluate gives on the finished rollout, 0 on
    padding, also when the policy is advanced on the side thread beside the env's reference (the
    values are read before the advance replaces them)."""
    from agents.rollout import collect_rollout
    from agents.run import make_env

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        env = make_env("TextGen-v0", 6, "cpu", 0, **{**tiny_env_kwargs, "model": tiny_model_dir,
                                                    "ref_logprob_coef": 0.1 if env_reference else 0.0})
        policy = LMPolicy.load(tiny_model_dir, "cpu", valid_actions=env.valid_actions)
        torch.nn.init.normal_(policy.value_head.weight, std=0.3)  # V != 0
        policy.valid_actions[:] = False  # a masked vocabulary of 4 tokens and EOS: some episodes end early
        policy.valid_actions[[env.eos_token_id, 40, 41, 42, 43]] = True
        torch.manual_seed(0)
        rollout = collect_rollout(env, policy, record_logprobs=True)
        live = rollout.completion_mask
        assert not live.all() and live.any(1).all(), "episodes of different lengths"
        logprobs, entropy, values = policy.evaluate(rollout.input_ids, rollout.attention_mask, rollout.completion_start,
                                                    entropy="detached")
        for recorded, expected in ((rollout.logprobs, logprobs), (rollout.entropy, entropy), (rollout.values, values)):
            torch.testing.assert_close(recorded, expected.detach(), rtol=0, atol=2e-5)
            assert recorded[~live].eq(0).all()
        assert rollout.values.abs().max() > 0.01 and rollout.logprobs[live].lt(0).all()
        assert collect_rollout(env, policy).logprobs is None, "recorded only when asked"
        no_head = LMPolicy.load(tiny_model_dir, "cpu", valid_actions=env.valid_actions, value_head=False)
        unvalued = collect_rollout(env, no_head, record_logprobs=True)
        assert unvalued.values is None and unvalued.logprobs is not None
    finally:
        torch.set_num_threads(before)


def test_pi_old_comes_from_the_acting_pass_only_in_float32():
    """bf16 (autocast, or QLoRA's 4-bit base) rounds the acting pass and the teacher-forced pass
    differently by ~1e-2: PPO and GRPO then score pi_old in a pass of their own."""
    from agents.rollout import acting_gives_old_logprobs

    assert acting_gives_old_logprobs(ppo.PPOConfig(**TOY))
    assert not acting_gives_old_logprobs(ppo.PPOConfig(**TOY, dtype="bfloat16"))
    assert not acting_gives_old_logprobs(grpo.GRPOConfig(**TOY, dtype="bfloat16"))
    assert not acting_gives_old_logprobs(types.SimpleNamespace(dtype="float32", peft="qlora"))  # a QLoRA config needs CUDA


def test_entropy_modes_give_the_same_values_with_and_without_a_graph(tiny_gpt2_dir):
    """entropy="detached": the same entropies outside the graph; "none": skipped; logprobs unchanged."""
    policy = LMPolicy.load(tiny_gpt2_dir, "cpu", valid_actions=None)
    ids = torch.tensor([[5, 6, 7, 8, 9], [7, 6, 5, 4, 3]])
    attn = torch.ones_like(ids)
    logprobs, entropy, _ = policy.evaluate(ids, attn, completion_start=2)
    logprobs_detached, entropy_detached, _ = policy.evaluate(ids, attn, completion_start=2, entropy="detached")
    logprobs_none, entropy_none, _ = policy.evaluate(ids, attn, completion_start=2, entropy="none")
    assert entropy.requires_grad and not entropy_detached.requires_grad and entropy_none is None
    torch.testing.assert_close(entropy_detached, entropy.detach())
    assert (entropy.detach() > 0).all()
    torch.testing.assert_close(logprobs_detached, logprobs)
    torch.testing.assert_close(logprobs_none, logprobs)
    with pytest.raises(ValueError, match="entropy must be 'grad', 'detached' or 'none', got 'yes'"):
        policy.evaluate(ids, attn, completion_start=2, entropy="yes")


def test_vocabulary_mismatch_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="the env has 8 actions but the policy model has 8192 logits"):
        ppo.train(ppo.PPOConfig(**{**TOY, "out": str(tmp_path / "x")}, model="default"))


def test_evaluate_model_plays_the_given_prompts_in_order(tmp_path):
    """With ``prompts``, every model is scored on the same prompts (the env would redraw a row's
    prompt whenever its episode ends); a count that does not fill whole batches is refused."""
    from agents.evaluate import evaluate_model
    from agents.policy import load_reference
    from agents.run import make_env, make_policy_model

    env = make_env("TextGenToy-v0", 4, "cpu", 0, max_new_tokens=4)
    model_dir = make_policy_model("auto", env, tmp_path, 0)
    reference = load_reference(model_dir, env, "cpu")
    prompts = ["the plot was"] * 4 + ["the movie was"] * 4
    first = evaluate_model(model_dir, reference, env, 8, seed=3, prompts=prompts)
    assert [s["prompt"] for s in first["samples"]] == ["the plot was"] * 3
    assert evaluate_model(model_dir, reference, env, 8, seed=3, prompts=prompts) == first
    with pytest.raises(ValueError, match="multiple of the env's num_envs=4, got 6"):
        evaluate_model(model_dir, reference, env, 6, seed=3, prompts=prompts[:6])


def test_cli_trains_evaluates_and_exports_on_the_toy_env(tmp_path, capsys):
    out = tmp_path / "cli-ppo"
    assert main(["train", "ppo", "--env", "TextGenToy-v0", "--num-envs", "8", "--max-new-tokens", "4",
                 "--total-steps", "96", "--kl-coef", "0", "--num-minibatches", "2", "--device", "cpu", "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.config.vocab_size == 8
    ev = tmp_path / "eval"
    assert main(["eval", "--runs", str(out), "--env", "TextGenToy-v0", "--episodes", "16", "--num-envs", "8",
                 "--max-new-tokens", "4", "--device", "cpu", "--out", str(ev)]) == 0
    results = json.loads((ev / "eval.json").read_text())
    labels = [p["label"] for p in results["cli-ppo"]]
    assert labels == ["initial", "final"], "the last checkpoint is the final model and is evaluated once"
    assert results["cli-ppo"][0]["kl_ref"] == pytest.approx(0.0, abs=1e-5)
    sample = results["cli-ppo"][1]["samples"][0]
    assert sample["prompt"] in ("the movie was", "the plot was") and isinstance(sample["completion"], str)
    assert (ev / "eval.png").stat().st_size > 1000
    assert main(["train", "ppo", "--env", "NoSuchEnv-v0", "--out", str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err
    assert "unknown env id 'NoSuchEnv-v0'" in err and "the suite's ids: TextGen-v0" in err
    with pytest.raises(SystemExit):
        main(["train", "dqn", "--epsilon", "0.1"])
    assert "--epsilon" in capsys.readouterr().err
    assert main(["train", "sac"]) == 2
    assert "valid algorithms: ppo, reinforce, grpo, trpo, dqn" in capsys.readouterr().err


# -- one network mode: at identical weights, ratio 1 and KL 0, even for a model configured with dropout --
def test_policy_networks_are_deterministic_for_a_dropout_model(tiny_dropout_dir):
    """LMPolicy (PPO, REINFORCE, eval), its reference copy and DQN's Q-values: one function of the weights."""
    policy = LMPolicy.load(tiny_dropout_dir, "cpu", valid_actions=None).train()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [7, 6, 5, 4, 3, 2]])
    attn = torch.ones_like(ids)
    first, _, values = policy.evaluate(ids, attn, completion_start=2, entropy="none")
    again, _, values_again = policy.evaluate(ids, attn, completion_start=2, entropy="none")
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    torch.testing.assert_close(values, values_again, rtol=0, atol=0)
    ref = teacher_forced(policy.reference(), ids, attn, 2, policy.valid_actions)
    torch.testing.assert_close(ref, first.detach(), rtol=0, atol=1e-6)
    cfg = dqn.DQNConfig(objective="td", q_form="log_policy")
    target = dqn.q_values(copy.deepcopy(policy).eval(), ids, attn, cfg)
    torch.testing.assert_close(dqn.q_values(policy, ids, attn, cfg), target, rtol=0, atol=1e-6)


@pytest.mark.parametrize("algo", ["ppo", "reinforce"])
def test_learning_rate_zero_gives_ratio_one_and_zero_kl_with_a_dropout_model(tmp_path, toy_dropout_dir, algo):
    """The input that exposed the fault: GPT-2 with dropout 0.1, lr 0. PPO used to report approx_kl 0.21
    and clip 72% of tokens; REINFORCE a KL to the reference of -3.6 nats."""
    common = dict(TOY, model=toy_dropout_dir, num_envs=8, total_steps=8 * 4 * 3, lr=0.0, kl_coef=0.05, out=str(tmp_path / algo))
    if algo == "ppo":
        ppo.train(ppo.PPOConfig(**common, num_minibatches=2))
    else:
        reinforce.train(reinforce.ReinforceConfig(**common, rloo_k=2))
    for row in metrics(tmp_path / algo):
        assert row["kl/ref"] == pytest.approx(0.0, abs=1e-6)
        if algo == "ppo":
            assert row["policy/approx_kl"] == pytest.approx(0.0, abs=1e-7) and row["policy/clipfrac"] == 0.0



# -- the agents are not tied to TextGenVectorEnv: a user's env, written against envs.api alone ---------------------
class MovieCountEnv(gym.vector.VectorEnv):
    """A user's own task: continue "the plot was" over the toy's 8 words; the reward, paid at the end,
    is the fraction of "movie" tokens. Written against the documented tensor API (envs.api) only."""

    metadata = {"autoreset_mode": gym.vector.AutoresetMode.NEXT_STEP}

    def __init__(self, num_envs: int = 8, max_new_tokens: int = 3, device: str = "cpu", ref_logprob_coef: float = 0.0):
        from envs.spaces import action_space, observation_space
        from envs.toy import WORDS, toy_tokenizer

        self.num_envs, self.horizon, self._device = num_envs, max_new_tokens, torch.device(device)
        self._tokenizer = toy_tokenizer()
        self.prompt_ids = self._tokenizer("the plot was", add_special_tokens=False)["input_ids"]
        self.movie = WORDS.index("movie")
        self.length = len(self.prompt_ids) + max_new_tokens
        self._valid = torch.ones(len(WORDS), dtype=torch.bool)
        self.single_observation_space = observation_space(len(WORDS), self.length)
        self.single_action_space = action_space(self._valid)
        self.rng = np.random.default_rng()

    tokenizer = property(lambda self: self._tokenizer)
    pad_token_id = property(lambda self: self._tokenizer.pad_token_id)
    eos_token_id = property(lambda self: self._tokenizer.eos_token_id)
    valid_actions = property(lambda self: self._valid)
    prompts = property(lambda self: ["the plot was"])
    max_new_tokens = property(lambda self: self.horizon)
    device = property(lambda self: self._device)
    lm_path = property(lambda self: None)  # no pretrained LM speaks 8 words: the agents build a tiny one
    reference_model = property(lambda self: None)

    def get_rng_state(self):
        return [self.rng.bit_generator.state]

    def set_rng_state(self, state):
        self.rng.bit_generator.state = state[0]

    def _start(self, rows):
        self.ids[rows] = self.pad_token_id
        self.ids[rows, -len(self.prompt_ids):] = torch.tensor(self.prompt_ids)
        self.mask[rows] = 0
        self.mask[rows, -len(self.prompt_ids):] = 1
        self.n[rows], self.needs_reset[rows] = 0, False

    def reset_tensor(self, *, seed=None, options=None):
        from envs.api import VectorReset

        if seed is not None:
            self.rng = np.random.default_rng(seed)
        self.ids = torch.full((self.num_envs, self.length), self.pad_token_id)
        self.mask = torch.zeros((self.num_envs, self.length), dtype=torch.long)
        self.n = torch.zeros(self.num_envs, dtype=torch.long)
        self.needs_reset = torch.zeros(self.num_envs, dtype=torch.bool)
        self._start(torch.arange(self.num_envs))
        return VectorReset(self.ids.clone(), self.mask.clone(), ["the plot was"] * self.num_envs)

    def reset(self, *, seed=None, options=None):
        out = self.reset_tensor(seed=seed, options=options)
        return {"input_ids": out.input_ids.numpy(), "attention_mask": out.attention_mask.numpy()}, {}

    def step_tensor(self, actions):
        from envs.api import VectorStep

        actions = torch.as_tensor(actions).long()
        restart = self.needs_reset.clone()
        live = ~restart
        self.ids[live] = torch.cat([self.ids[live, 1:], actions[live, None]], 1)
        self.mask[live] = torch.cat([self.mask[live, 1:], torch.ones_like(self.mask[live, :1])], 1)
        self.n[live] += 1
        ended = live & ((actions == self.eos_token_id) | (self.n >= self.horizon))
        rewards = torch.zeros(self.num_envs)
        finished = {}
        for i in ended.nonzero().flatten().tolist():
            completion = self.ids[i, -int(self.n[i]):]
            rewards[i] = float((completion == self.movie).sum()) / self.horizon
            text = self.tokenizer.decode(completion.tolist(), skip_special_tokens=True)
            finished[i] = {"rm_score": float(rewards[i]), "gold_score": float(rewards[i]), "text": text, "prompt": "the plot was"}
        if restart.any():
            self._start(restart.nonzero().flatten())
        self.needs_reset = ended
        return VectorStep(self.ids.clone(), self.mask.clone(), rewards, ended, restart, None, finished)


def test_reinforce_trains_on_a_user_defined_env_through_the_public_surface_only(tmp_path):
    from gymnasium.envs.registration import register, registry

    from envs.api import TextVectorEnv

    if "MovieCount-v0" not in registry:
        register(id="MovieCount-v0", entry_point=None, vector_entry_point=MovieCountEnv)
    assert isinstance(MovieCountEnv(), TextVectorEnv)
    out = tmp_path / "user-env"
    reinforce.train(reinforce.ReinforceConfig(env="MovieCount-v0", max_new_tokens=3, device="cpu", num_envs=16,
                                              total_steps=16 * 3 * 30, lr=5e-3, kl_coef=0.0, rloo_k=4, out=str(out)))
    rewards = [m["reward/rm"] for m in metrics(out)]
    assert rewards[0] < 0.35 and np.mean(rewards[-3:]) > 0.8, rewards
