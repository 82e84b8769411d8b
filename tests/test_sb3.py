"""Stable-Baselines3 on the TextGen suite: LM policies, the batched VecEnv adapter, callback, CLI."""

import json
import re

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from stable_baselines3 import DQN, PPO, SAC
from stable_baselines3.common.buffers import DictReplayBuffer
from stable_baselines3.common.vec_env import VecEnvWrapper
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

import envs  # noqa: F401
from agents.cli import main
from agents.run import make_policy_model
from agents.sb3 import (
    LMActorCriticPolicy,
    LMQNetworkPolicy,
    SB3DQNConfig,
    SB3PPOConfig,
    SB3VecEnv,
    TextGenCallback,
    export_hf,
    make_sb3_agent,
    make_sb3_vec_env,
    train,
)
from envs.text_gen import TextGenEnv
from envs.vector import TextGenVectorEnv
from pretrain.model import default_model_dir


def lm_next_token_probs(model_dir, obs, valid):
    """What the LM alone says about the next token of each (unpadded) context."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids, mask = torch.as_tensor(obs["input_ids"]), torch.as_tensor(obs["attention_mask"])
    rows = []
    for i in range(ids.shape[0]):
        context = ids[i][mask[i].bool()].view(1, -1)
        with torch.no_grad():
            logits = model(context).logits[0, -1]
        rows.append(torch.softmax(logits.masked_fill(~valid, float("-inf")), -1))
    return torch.stack(rows)


def test_ppo_lm_policy_starts_with_the_lms_next_token_distribution(tiny_model_dir, tiny_env_kwargs):
    env = gym.make("TextGen-v0", **{**tiny_env_kwargs, "model": str(tiny_model_dir)})
    agent = PPO(LMActorCriticPolicy, env, policy_kwargs={"model": str(tiny_model_dir)}, device="cpu", seed=0)
    obs, _ = env.reset(seed=0)
    obs_tensor, _ = agent.policy.obs_to_tensor(obs)
    expected = lm_next_token_probs(tiny_model_dir, {k: v[None] for k, v in obs.items()}, agent.policy.valid_actions)
    with torch.no_grad():  # the acting (KV-cached) path
        acting = agent.policy.get_distribution(obs_tensor).distribution.probs
    learning = agent.policy.get_distribution(obs_tensor).distribution.probs  # the full-context path
    torch.testing.assert_close(acting, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(learning.detach(), expected, atol=1e-5, rtol=1e-4)
    assert agent.policy.predict_values(obs_tensor).item() == 0.0, "the value head starts at zero"


def test_default_env_and_shipped_lm_policy_agree():
    env = gym.make("TextGen-v0")
    agent = PPO(LMActorCriticPolicy, env, n_steps=8, batch_size=8, device="cpu", seed=0)
    obs, _ = env.reset(seed=1)
    with torch.no_grad():
        probs = agent.policy.get_distribution(agent.policy.obs_to_tensor(obs)[0]).distribution.probs
    expected = lm_next_token_probs(default_model_dir(), {k: v[None] for k, v in obs.items()}, agent.policy.valid_actions)
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-4)


def test_acting_cache_equals_full_context_forward_across_resets_and_updates(tiny_env_kwargs):
    venv = make_sb3_vec_env("TextGen-v0", 3, seed=5, **tiny_env_kwargs)
    agent = PPO(LMActorCriticPolicy, venv, policy_kwargs={"model": tiny_env_kwargs["model"]}, device="cpu", seed=0)
    policy = agent.policy
    obs = venv.reset()
    rng = np.random.default_rng(0)
    eos = policy.tokenizer.eos_token_id
    resets = 0
    for step in range(20):
        obs_tensor, _ = policy.obs_to_tensor(obs)
        with torch.no_grad():
            cached, _, cached_logp = policy(obs_tensor)
            cached_log_policy = policy.last_log_policy
            ids, mask = obs_tensor["input_ids"], obs_tensor["attention_mask"]
            full_logits = policy.full_pass(ids, mask, hidden=False)[0].masked_fill(~policy.valid_actions, float("-inf"))
            full = F.log_softmax(full_logits, -1)
        torch.testing.assert_close(cached_log_policy, full, atol=1e-4, rtol=1e-4)
        if step == 10:  # an update changes the weights: the cache must not serve stale keys/values
            loss = -policy.evaluate_actions(obs_tensor, cached)[1].mean()
            policy.optimizer.zero_grad()
            loss.backward()
            policy.optimizer.step()
        actions = cached.numpy().copy()
        actions[rng.random(3) < 0.15] = eos  # early EOS: staggered resets
        obs, _, dones, _ = venv.step(actions)
        resets += int(dones.sum())
    assert resets >= 3


def test_sb3_vec_env_reproduces_single_envs_with_same_step_resets(tiny_env_kwargs):
    n, seed = 3, 11
    venv = SB3VecEnv(TextGenVectorEnv(num_envs=n, autoreset_mode="same_step", ref_logprob_coef=0.05, **tiny_env_kwargs))
    singles = [TextGenEnv(ref_logprob_coef=0.05, **tiny_env_kwargs) for _ in range(n)]
    venv.seed(seed)
    obs = venv.reset()
    for i, env in enumerate(singles):
        assert obs["input_ids"][i].tolist() == env.reset(seed=seed + i)[0]["input_ids"].tolist()
    rng = np.random.default_rng(0)
    ended = 0
    for _ in range(14):
        actions = np.array([rng.choice(np.flatnonzero(m)) for m in venv.env.action_masks()])
        obs, rewards, dones, infos = venv.step(actions)
        for i, env in enumerate(singles):
            o, r, terminated, _, info = env.step(int(actions[i]))
            assert rewards[i] == pytest.approx(r, abs=1e-4)
            assert infos[i]["ref_logprob"] == pytest.approx(info["ref_logprob"], abs=1e-5)
            assert bool(dones[i]) == terminated
            if terminated:
                ended += 1
                assert infos[i]["terminal_observation"]["input_ids"].tolist() == o["input_ids"].tolist()
                assert infos[i]["text"] == info["text"] and infos[i]["rm_score"] == pytest.approx(info["rm_score"], abs=1e-4)
                o, _ = env.reset()  # SB3 convention: the returned observation is already the next episode's
            assert obs["input_ids"][i].tolist() == o["input_ids"].tolist()
            assert obs["attention_mask"][i].tolist() == o["attention_mask"].tolist()
    assert ended >= n


def test_same_step_vector_env_reports_final_observations(tiny_env_kwargs):
    vec = TextGenVectorEnv(num_envs=2, autoreset_mode="same_step", **tiny_env_kwargs)
    vec.reset(seed=0)
    eos = vec.tokenizer.eos_token_id
    before = vec.batch.observation()["input_ids"][0]
    obs, _, terminated, _, infos = vec.step(np.array([eos, 300]))
    assert terminated.tolist() == [True, False] and infos["_final_obs"].tolist() == [True, False]
    assert infos["final_obs"][0]["input_ids"][:-1].tolist() == before[1:].tolist()
    assert infos["final_obs"][0]["input_ids"][-1] == eos
    assert obs["input_ids"][0][-1] != eos, "the returned observation is the new episode's prompt"
    with pytest.raises(ValueError, match="unsupported autoreset_mode 'disabled'"):
        TextGenVectorEnv(num_envs=2, autoreset_mode="disabled", **tiny_env_kwargs)


def test_random_token_actions_are_always_valid():
    space = gym.make("TextGen-v0").action_space
    space.seed(0)
    draws = np.array([space.sample() for _ in range(20_000)])
    assert space.valid[draws].all()
    assert not space.valid[1], "the pad token is not a valid action"


def toy_env(n=8):
    return make_sb3_vec_env("TextGenToy-v0", n, seed=0, max_new_tokens=4)


def mean_return(agent, deterministic: bool, episodes: int, num_envs: int = 8, seed: int = 123) -> float:
    """Mean toy-env return of the agent's greedy (deterministic) or sampling policy on fresh episodes."""
    env = make_sb3_vec_env("TextGenToy-v0", num_envs, seed=seed, max_new_tokens=4)
    obs, returns = env.reset(), []
    while len(returns) < episodes:
        actions, _ = agent.predict(obs, deterministic=deterministic)
        obs, _, dones, infos = env.step(actions)
        returns += [info["rm_score"] for info, done in zip(infos, dones) if done]
    return float(np.mean(returns))


@pytest.mark.parametrize("algorithm", ["ppo", "a2c"])
def test_ppo_and_a2c_raise_the_toy_reward(tmp_path, algorithm):
    env = toy_env()
    model_dir = make_policy_model("auto", env.unwrapped.env, tmp_path, seed=0)
    kwargs = dict(n_steps=16, batch_size=64) if algorithm == "ppo" else dict(n_steps=8)
    agent = make_sb3_agent(algorithm, env, model=model_dir, learning_rate=1e-3, gamma=1.0, seed=0, device="cpu", **kwargs)
    before = mean_return(agent, deterministic=False, episodes=64, num_envs=16)
    agent.learn(2048)
    after = mean_return(agent, deterministic=False, episodes=64, num_envs=16)
    assert before < 0.3 and after > before + 0.4, (before, after)


def test_kl_callback_charges_beta_log_pi_on_the_stored_rewards(tmp_path):
    class RecordRewards(VecEnvWrapper):
        def __init__(self, venv):
            super().__init__(venv)
            self.rewards = []

        def reset(self):
            return self.venv.reset()

        def step_wait(self):
            obs, rewards, dones, infos = self.venv.step_wait()
            self.rewards.append(rewards.copy())
            return obs, rewards, dones, infos

    beta = 0.1
    env = RecordRewards(make_sb3_vec_env("TextGenToy-v0", 4, seed=0, max_new_tokens=4, ref_logprob_coef=beta))
    model_dir = make_policy_model("auto", env.unwrapped.env, tmp_path, seed=0)
    agent = make_sb3_agent("ppo", env, model=model_dir, n_steps=8, batch_size=32, seed=0, device="cpu")
    agent.learn(32, callback=TextGenCallback(kl_coef=beta))
    buffer = agent.rollout_buffer
    env_rewards = np.stack(env.rewards)  # beta log pi_ref(a_t) per step + the reward at episode ends
    log_probs = buffer.log_probs.reshape(4, 8).T  # SB3's update flattened it env-major: back to (steps, envs)
    np.testing.assert_allclose(buffer.rewards, env_rewards - beta * log_probs, rtol=1e-5, atol=1e-6)
    assert (env_rewards != 0).all(), "the env paid its beta log pi_ref shaping on every step"


def test_sb3_dqn_with_its_replay_buffer_reaches_the_optimal_toy_policy(tmp_path):
    summary = train(SB3DQNConfig(out=str(tmp_path / "dqn"), device="cpu"), "dqn")
    agent = DQN.load(tmp_path / "dqn" / "sb3_model.zip", device="cpu")
    assert isinstance(agent.policy, LMQNetworkPolicy)
    assert agent.replay_buffer_class is DictReplayBuffer
    assert agent.policy.q_net_target is not agent.policy.q_net
    assert mean_return(agent, deterministic=True, episodes=16) == 1.0, "greedy policy writes 'good' at every step"
    assert summary["env_steps"] == 4000


def test_save_load_round_trip_and_hf_export(tmp_path):
    env = toy_env()
    model_dir = make_policy_model("auto", env.unwrapped.env, tmp_path, seed=0)
    agent = make_sb3_agent("ppo", env, model=model_dir, n_steps=16, batch_size=64, learning_rate=1e-3, seed=0, device="cpu")
    agent.learn(256)
    agent.save(tmp_path / "agent.zip")
    loaded = PPO.load(tmp_path / "agent.zip", device="cpu")
    for (name, a), b in zip(agent.policy.state_dict().items(), loaded.policy.state_dict().values()):
        assert torch.equal(a, b), name
    obs = env.reset()
    obs_tensor, _ = agent.policy.obs_to_tensor(obs)
    torch.testing.assert_close(loaded.policy.get_distribution(obs_tensor).distribution.probs,
                               agent.policy.get_distribution(obs_tensor).distribution.probs)
    exported = export_hf(agent, tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(exported).eval()
    ids, mask = obs_tensor["input_ids"].long(), obs_tensor["attention_mask"].long()
    with torch.no_grad():
        ours = agent.policy.full_pass(ids, mask, hidden=False)[0]
        theirs = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits[:, -1]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_bad_input_is_a_clear_error(tmp_path, tiny_gpt2_dir, tiny_env_kwargs):
    env = toy_env()
    with pytest.raises(ValueError, match="the policy model has 512 logits but the env has 8 actions"):
        PPO(LMActorCriticPolicy, env, policy_kwargs={"model": str(tiny_gpt2_dir)}, device="cpu")
    with pytest.raises(ValueError, match="the policy model has 512 logits but the env has 8 actions"):
        DQN(LMQNetworkPolicy, env, policy_kwargs={"model": str(tiny_gpt2_dir)}, device="cpu")
    for algorithm in ("sac", SAC):
        with pytest.raises(ValueError, match="'(sac|SAC)' is not supported with the LM policies; supported: ppo, a2c, dqn"):
            make_sb3_agent(algorithm, env)
    with pytest.raises(ValueError, match="same-step autoreset"):
        SB3VecEnv(TextGenVectorEnv(num_envs=2, **tiny_env_kwargs))
    with pytest.raises(ValueError, match="unknown kl_route 'bonus'; expected 'reward' or 'entropy'"):
        SB3PPOConfig(kl_route="bonus")
    entropy_route = SB3PPOConfig(kl_route="entropy", kl_coef=0.1).algorithm_kwargs()
    assert entropy_route["ent_coef"] == 0.1 and entropy_route["normalize_advantage"] is False
    with pytest.raises(ValueError, match="needs an on-policy algorithm"):
        DQN(LMQNetworkPolicy, env, policy_kwargs={"model": make_policy_model("auto", env.unwrapped.env, tmp_path, 0)},
            learning_starts=0, device="cpu").learn(16, callback=TextGenCallback(kl_coef=0.1))
    with pytest.raises(ValueError, match="temperature must be positive"):
        DQN(LMQNetworkPolicy, env, policy_kwargs={"model": str(tiny_gpt2_dir), "temperature": 0.0}, device="cpu")


def test_cli_trains_logs_exports_and_evaluates(tmp_path, capsys):
    out = tmp_path / "sb3-ppo"
    assert main(["train", "sb3-ppo", "--env", "TextGenToy-v0", "--num-envs", "8", "--max-new-tokens", "4", "--n-steps", "8",
                 "--batch-size", "64", "--total-steps", "256", "--kl-coef", "0.05", "--sample-every", "1", "--device", "cpu",
                 "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["env_steps"] == 256, "stdout holds the summary alone (the progress is on stderr)"
    assert re.search(r"sb3-ppo 256/256 \(100%\).* rm -?\d\.\d{3}  gold -?\d\.\d{3}  kl -?\d\.\d{3}", captured.err), captured.err
    events = EventAccumulator(str(out))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"reward/rm", "reward/gold", "kl/ref", "policy/entropy", "policy/approx_kl", "loss/value", "rollout/ep_rew_mean"} <= tags
    assert not {"train/entropy_loss", "train/approx_kl"} & tags, "one tag scheme: SB3's names are mapped"
    assert min(e.value for e in events.Scalars("policy/entropy")) > 0, "an entropy, not SB3's entropy loss"
    assert "samples" in str(events.Tags()["tensors"])
    assert AutoModelForCausalLM.from_pretrained(out / "final").config.vocab_size == 8
    summary = json.loads((out / "summary.json").read_text())
    assert summary["env_steps"] == 256 and summary["initial_model"].endswith("init-model")
    assert main(["eval", "--runs", str(out), "--env", "TextGenToy-v0", "--episodes", "16", "--num-envs", "8",
                 "--max-new-tokens", "4", "--device", "cpu", "--out", str(tmp_path / "eval")]) == 0
    results = json.loads((tmp_path / "eval" / "eval.json").read_text())["sb3-ppo"]
    assert [p["label"] for p in results] == ["initial", "final"] and results[0]["kl_ref"] == pytest.approx(0.0, abs=1e-5)
    assert main(["train", "sb3-ppo", "--out", str(out)]) == 1, "an existing run is not overwritten"
