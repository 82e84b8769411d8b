"""The TextGen suite: checkers, determinism, vector == N singles, rewards, masks, bad input."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import envs
from envs.text_gen import TextGenEnv
from envs.toy import BAD, GOOD, REF_PROBS, TextGenToyEnv
from envs.vector import TextGenVectorEnv
from pretrain import load_lm
from rlhf.reward_model import RewardModel


@pytest.mark.parametrize("env_id", envs.ENV_IDS)
def test_registered_envs_pass_both_checkers(env_id):
    env = gym.make(env_id, max_new_tokens=4)
    env.unwrapped.action_space.seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gym_check_env(env.unwrapped, skip_render_check=True)
    sb3_check_env(env.unwrapped, warn=False)


@pytest.mark.parametrize("env_id", envs.ENV_IDS)
def test_default_env_makes_with_no_arguments_and_vector_entry_point_works(env_id):
    env = gym.make(env_id)
    obs, info = env.reset(seed=0)
    assert obs["input_ids"].dtype == np.int64 and obs["input_ids"].shape == env.observation_space["input_ids"].shape
    vec = gym.make_vec(env_id, num_envs=3, vectorization_mode="vector_entry_point")
    obs, _ = vec.reset(seed=0)
    assert obs["input_ids"].shape == (3, env.observation_space["input_ids"].shape[0])
    assert isinstance(vec.unwrapped, TextGenVectorEnv)


def rollout(env, seed, actions_from, steps=14):
    obs, info = env.reset(seed=seed)
    trace = [obs["input_ids"].tolist()]
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        valid = np.flatnonzero(env.unwrapped.action_masks())
        action = int(rng.choice(valid if actions_from is None else actions_from))
        obs, reward, terminated, truncated, info = env.step(action)
        trace.append((obs["input_ids"].tolist(), reward, terminated, info.get("text")))
        if terminated:
            obs, info = env.reset()
            trace.append(obs["input_ids"].tolist())
    return trace


def test_same_seed_same_rollout(tiny_env_kwargs):
    a = rollout(TextGenEnv(ref_logprob_coef=0.1, **tiny_env_kwargs), 3, None)
    b = rollout(TextGenEnv(ref_logprob_coef=0.1, **tiny_env_kwargs), 3, None)
    assert a == b
    c = rollout(TextGenEnv(ref_logprob_coef=0.1, **tiny_env_kwargs), 4, None)
    assert a != c


def test_vector_env_reproduces_single_envs(tiny_env_kwargs):
    n, steps = 3, 12
    seed = 7
    singles = [TextGenEnv(ref_logprob_coef=0.05, **tiny_env_kwargs) for _ in range(n)]
    vec = TextGenVectorEnv(num_envs=n, ref_logprob_coef=0.05, **tiny_env_kwargs)
    vec_obs, _ = vec.reset(seed=seed)
    single_obs = [env.reset(seed=seed + i)[0] for i, env in enumerate(singles)]
    for i in range(n):
        assert vec_obs["input_ids"][i].tolist() == single_obs[i]["input_ids"].tolist()
    rng = np.random.default_rng(0)
    needs_reset = [False] * n
    for _ in range(steps):
        masks = vec.action_masks()
        actions = np.array([rng.choice(np.flatnonzero(m)) for m in masks])
        vec_obs, vec_rewards, vec_term, _, infos = vec.step(actions)
        for i, env in enumerate(singles):
            if needs_reset[i]:  # NEXT_STEP autoreset: the vector env reset this sub-env now
                obs, _ = env.reset()
                reward, terminated = 0.0, False
                needs_reset[i] = False
            else:
                obs, reward, terminated, _, info = env.step(int(actions[i]))
                if terminated:
                    assert infos["_text"][i] and infos["text"][i] == info["text"]
                    assert infos["rm_score"][i] == pytest.approx(info["rm_score"], abs=1e-4)
                needs_reset[i] = terminated
            assert vec_obs["input_ids"][i].tolist() == obs["input_ids"].tolist()
            assert vec_obs["attention_mask"][i].tolist() == obs["attention_mask"].tolist()
            assert vec_rewards[i] == pytest.approx(reward, abs=1e-4)
            assert bool(vec_term[i]) == terminated


def test_observation_is_left_padded_context(tiny_env_kwargs):
    env = TextGenEnv(**tiny_env_kwargs)
    obs, _ = env.reset(options={"prompt": "Terrible"})
    prompt_ids = env.tokenizer("Terrible", add_special_tokens=False)["input_ids"]
    assert obs["input_ids"][obs["attention_mask"] == 1].tolist() == prompt_ids
    assert obs["attention_mask"][-1] == 1 and obs["attention_mask"][0] == 0
    token = int(np.flatnonzero(env.action_masks())[5])
    obs, *_ = env.step(token)
    assert obs["input_ids"][-1] == token
    assert obs["input_ids"][obs["attention_mask"] == 1].tolist() == prompt_ids + [token]


def test_kl_shaping_is_beta_times_reference_logprob(tiny_env_kwargs):
    env = TextGenEnv(ref_logprob_coef=0.3, **tiny_env_kwargs)
    env.reset(seed=0, options={"prompt": "This movie was"})
    ref, _ = load_lm(env.task.reference_model)  # the env's reference: the LM it was built on
    context = env.tokenizer("This movie was", add_special_tokens=False)["input_ids"]
    token = int(np.flatnonzero(env.action_masks())[10])
    with torch.no_grad():
        logits = ref(torch.tensor([context])).logits[0, -1]
        logits[~env.task.valid_actions] = float("-inf")  # pi_ref over valid actions only
        expected = torch.log_softmax(logits, -1)[token].item()
    _, reward, terminated, _, info = env.step(token)
    assert not terminated
    assert info["ref_logprob"] == pytest.approx(expected, abs=1e-4)
    assert reward == pytest.approx(0.3 * expected, abs=1e-4)


def test_final_reward_is_the_reward_model_score(tiny_env_kwargs, tiny_rm_dir):
    env = TextGenEnv(**tiny_env_kwargs)
    env.reset(seed=1, options={"prompt": "I watched it and"})
    token = int(np.flatnonzero(env.action_masks())[42])
    for _ in range(6):
        _, reward, terminated, _, info = env.step(token)
    assert terminated
    rm = RewardModel.load(tiny_rm_dir)
    expected = rm.score(["I watched it and"], [info["text"]])[0]
    assert reward == pytest.approx(expected, abs=1e-4) == pytest.approx(info["rm_score"], abs=1e-4)
    assert -1 <= info["gold_score"] <= 1 and info["prompt"] == "I watched it and"


def play(env, prompt: str, tokens: list[int]):
    """Reset ``env`` to ``prompt`` and step ``tokens`` (ending with EOS); returns the last (reward, info)."""
    env.reset(seed=0, options={"prompt": prompt})
    for token in tokens:
        _, reward, terminated, _, info = env.step(token)
    assert terminated
    return reward, info


@pytest.mark.parametrize("variant", ["plain", "few_shot", "instruct"])
def test_reward_and_gold_judge_the_review_text_whatever_the_segmentation(tiny_env_kwargs, tiny_rm_dir, variant):
    """The RM scores (prompt, completion) and gold sees prompt + completion, as text, in every variant:
    one character per token (a non-canonical segmentation), the canonical one, and an immediate EOS
    (the empty completion) each get exactly rm.score(prompt, text). Demonstrations and instructions
    are never judged."""
    env = TextGenEnv(variant=variant, shots=1, **{**tiny_env_kwargs, "max_new_tokens": 12})
    seen = []
    gold = env.task.gold
    env.task.gold = lambda texts: seen.extend(texts) or gold(texts)
    tokenizer, eos = env.tokenizer, env.tokenizer.eos_token_id
    prompt, text = "This movie was", " the movie"
    canonical = tokenizer(text, add_special_tokens=False)["input_ids"]
    per_char = [tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in text]
    assert per_char != canonical and tokenizer.decode(per_char) == text
    rm = RewardModel.load(tiny_rm_dir)
    for tokens, expected_text in ((per_char + [eos], text), (canonical + [eos], text), ([eos], "")):
        reward, info = play(env, prompt, tokens)
        assert info["text"] == expected_text and info["prompt"] == prompt
        assert reward == pytest.approx(rm.score([prompt], [expected_text])[0], abs=1e-5) == pytest.approx(info["rm_score"])
        assert seen[-1] == prompt + expected_text
        assert info["gold_score"] == pytest.approx(gold([prompt + expected_text])[0])


def test_vector_env_scores_segmentations_and_the_empty_completion_like_rm_score(tiny_env_kwargs, tiny_rm_dir):
    vec = TextGenVectorEnv(num_envs=3, **{**tiny_env_kwargs, "max_new_tokens": 12})
    tokenizer, eos = vec.tokenizer, vec.tokenizer.eos_token_id
    prompt, text = "Terrible", " the film,"
    per_char = [tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in text]
    canonical = tokenizer(text, add_special_tokens=False)["input_ids"]
    rows = [per_char + [eos], canonical + [eos], [eos]]
    vec.reset(seed=0, options={"prompt": [prompt] * 3})
    rewards = {}
    for t in range(max(map(len, rows))):
        actions = torch.tensor([row[t] if t < len(row) else eos for row in rows])
        out = vec.step_tensor(actions)
        for i, info in out.finished.items():
            if i not in rewards:
                rewards[i] = (float(out.rewards[i]), info["text"])
    rm = RewardModel.load(tiny_rm_dir)
    expected = rm.score([prompt] * 3, [text, text, ""])
    assert [rewards[i][1] for i in range(3)] == [text, text, ""]
    assert [rewards[i][0] for i in range(3)] == pytest.approx(expected, abs=1e-5)


def test_eos_ends_the_episode(tiny_env_kwargs):
    env = TextGenEnv(**tiny_env_kwargs)
    env.reset(seed=0)
    _, _, terminated, _, info = env.step(env.tokenizer.eos_token_id)
    assert terminated and info["text"] == ""
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step(5)


def test_action_masks(tiny_env_kwargs):
    env = TextGenEnv(**tiny_env_kwargs)
    env.reset(seed=0)
    mask = env.action_masks()
    assert mask[env.tokenizer.eos_token_id] and not mask[env.tokenizer.pad_token_id]
    assert mask.sum() == len(env.tokenizer) - 1
    top = TextGenEnv(top_k=5, **tiny_env_kwargs)
    _, info = top.reset(seed=0)
    assert info["action_mask"].sum() == 5
    nucleus = TextGenEnv(top_p=0.5, **tiny_env_kwargs)
    nucleus.reset(seed=0)
    assert 1 <= nucleus.action_masks().sum() < mask.sum()


def test_step_before_reset_is_a_clear_error(tiny_env_kwargs):
    with pytest.raises(RuntimeError, match="before reset"):
        TextGenEnv(**tiny_env_kwargs).step(5)


BAD_LM_ENV_INPUTS = [  # (call on a reset env, message)
    (lambda env: env.step(env.action_space.n), r"action 512 is out of range: valid token ids are 0..511"),
    (lambda env: env.step(-1), "action -1 is out of range"),
    (lambda env: env.step(env.tokenizer.pad_token_id), r"action 1 \('<\|pad\|>'\) is masked"),
    (lambda env: env.step(3.0), "got float"),
    (lambda env: env.step(np.array(3, dtype=np.float32)), "got dtype float32"),
    (lambda env: env.step(True), "got bool"),
    (lambda env: env.reset(options={"promt": "x"}), r"unknown reset option\(s\) \['promt'\]"),
    (lambda env: env.reset(options={"prompt": "word " * 200}), "longer than this env's context budget"),
]


@pytest.mark.parametrize("call, message", BAD_LM_ENV_INPUTS, ids=[m.split(":")[0][:30] for _, m in BAD_LM_ENV_INPUTS])
def test_bad_input_to_the_lm_env_is_a_clear_error(tiny_env_kwargs, call, message):
    env = TextGenEnv(**tiny_env_kwargs)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=message):
        call(env)
    env.step(int(np.flatnonzero(env.action_masks())[5]))  # still usable


@pytest.mark.parametrize("kwargs, message", [
    ({"render_mode": "rgb_array"}, "unknown render_mode"),
    ({"ref_logprob_coef": -1}, "ref_logprob_coef must be a finite number >= 0"),
])
def test_bad_lm_env_arguments_are_clear_errors(tiny_env_kwargs, kwargs, message):
    with pytest.raises(ValueError, match=message):
        TextGenEnv(**{**tiny_env_kwargs, **kwargs})


def test_render_modes(tiny_env_kwargs, capsys):
    env = TextGenEnv(render_mode="ansi", **tiny_env_kwargs)
    env.reset(options={"prompt": "Terrible"})
    assert env.render() == "Terrible"
    human = TextGenEnv(render_mode="human", **tiny_env_kwargs)
    human.reset(options={"prompt": "Terrible"})
    human.step(int(np.flatnonzero(human.action_masks())[7]))
    assert capsys.readouterr().out.startswith("Terrible")


def test_toy_env_optimal_policy_earns_one():
    env = TextGenToyEnv()
    env.reset(seed=0)
    total, terminated = 0.0, False
    while not terminated:
        _, reward, terminated, _, info = env.step(GOOD)
        total += reward
    assert total == 1.0 and info["gold_score"] == 1.0 and info["text"] == "good good good good"


def test_entropy_bonus_with_shaping_equals_kl_regularised_objective():
    """What the env pays, plus an entropy bonus beta H(pi), is the KL-regularised objective
    E_pi[R] - beta KL(pi || pi_ref) computed by hand from the task's true reward and reference
    (one-token episodes of the toy env, so the expectations are exact sums)."""
    beta = 0.2
    env = TextGenToyEnv(max_new_tokens=1, ref_logprob_coef=beta)
    pi = torch.tensor([0.05, 0.5, 0.05, 0.1, 0.1, 0.1, 0.05, 0.05], dtype=torch.float64)
    env_return = []  # what the env pays for each first (and last) token
    for a in range(len(pi)):
        env.reset(seed=0)
        _, reward, terminated, _, _ = env.step(a)
        assert terminated
        env_return.append(reward)
    env_return = torch.tensor(env_return, dtype=torch.float64)
    true_reward = torch.zeros(len(pi), dtype=torch.float64)
    true_reward[GOOD], true_reward[BAD] = 1.0, -1.0  # (#good - #bad) / horizon, horizon 1
    ref = REF_PROBS.double()
    objective = (pi * true_reward).sum() - beta * (pi * (pi.log() - ref.log())).sum()
    entropy = -(pi * pi.log()).sum()
    assert (pi * env_return).sum().item() + beta * entropy.item() == pytest.approx(objective.item(), abs=1e-6)


@pytest.mark.parametrize("coef", [float("nan"), float("inf"), -0.5])
def test_ref_logprob_coef_must_be_finite_and_non_negative(tiny_env_kwargs, coef):
    """NaN used to pass (``kl_coef < 0`` is False): TextGen-v0 silently dropped the shaping, the toy env paid NaN."""
    with pytest.raises(ValueError, match="ref_logprob_coef must be a finite number >= 0"):
        TextGenEnv(ref_logprob_coef=coef, **tiny_env_kwargs)
    with pytest.raises(ValueError, match="ref_logprob_coef must be a finite number >= 0"):
        gym.make("TextGenToy-v0", ref_logprob_coef=coef)
    with pytest.raises(ValueError, match="ref_logprob_coef must be a finite number >= 0"):
        gym.make_vec("TextGenToy-v0", num_envs=2, vectorization_mode="vector_entry_point", ref_logprob_coef=coef)


def test_the_old_name_kl_coef_still_works_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="kl_coef is now called ref_logprob_coef"):
        env = gym.make("TextGenToy-v0", kl_coef=0.2).unwrapped
    assert env.task.ref_logprob_coef == 0.2
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="kl_coef must be a finite number >= 0, got nan"):
        gym.make("TextGenToy-v0", kl_coef=float("nan"))



def test_the_reference_skips_the_step_after_every_episode_ended(tiny_env_kwargs):
    """Once every episode has ended, the reference step that nobody would read is not run (the next
    reset re-primes the reference), and the episodes after the reset are shaped as before."""
    vec = TextGenVectorEnv(num_envs=2, ref_logprob_coef=0.05, **tiny_env_kwargs)
    single = TextGenEnv(ref_logprob_coef=0.05, **tiny_env_kwargs)
    steps = []
    step = vec.batch.reference.step
    vec.batch.reference.step = lambda tokens: (steps.append(1), step(tokens))
    token = int(np.flatnonzero(vec.action_masks()[0])[42])
    for seed in (0, 1):
        vec.reset(seed=seed, options={"prompt": "This movie was"})
        single.reset(seed=seed, options={"prompt": "This movie was"})
        for _ in range(6):  # max_new_tokens=6: both episodes end at the last step
            _, rewards, terminated, _, _ = vec.step(np.full(2, token))
            _, reward, *_ = single.step(token)
            assert rewards[0] == pytest.approx(reward, abs=1e-5) and rewards[0] == rewards[1]
        assert terminated.all()
    assert len(steps) == 2 * 5


def test_the_terminal_steps_top_k_action_mask_is_the_final_observations(tiny_env_kwargs):
    """With top-k, the action mask is drawn from the reference's next-token logits, so the reference
    still reads the episode's last token: the terminal step's mask is the final context's top-k."""
    env = TextGenEnv(top_k=5, **tiny_env_kwargs)
    env.reset(seed=0, options={"prompt": "This movie was"})
    ref, _ = load_lm(env.task.reference_model)
    for _ in range(6):  # max_new_tokens=6
        obs, _, terminated, _, info = env.step(int(np.flatnonzero(env.action_masks())[0]))
    assert terminated
    context = obs["input_ids"][obs["attention_mask"] == 1].tolist()
    with torch.no_grad():
        logits = ref(torch.tensor([context])).logits[0, -1].masked_fill(~env.task.valid_actions, float("-inf"))
    assert set(np.flatnonzero(info["action_mask"])) == set(logits.topk(5).indices.tolist())
