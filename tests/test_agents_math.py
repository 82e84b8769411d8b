"""The update math of the agents against hand computations and analytic gradients."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from agents.ppo import clipped_policy_loss, clipped_value_loss, compute_gae, whiten
from agents.reinforce import reinforce_loss, rloo_baseline
from agents.replay import EpisodeReplayBuffer, PrioritizedEpisodeReplayBuffer, PrioritizedReplayBuffer, ReplayBuffer, SumTree


def test_gae_matches_hand_computation():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.4, 0.3], [0.5, 0.4, 0.3]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the second episode ended after 2 tokens
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=0.9)
    # row 0: delta = [-0.1, -0.1, 0.7]; A2 = 0.7, A1 = -0.1 + 0.9 * 0.7, A0 = -0.1 + 0.9 * A1
    a1 = -0.1 + 0.9 * 0.7
    torch.testing.assert_close(adv[0], torch.tensor([-0.1 + 0.9 * a1, a1, 0.7]))
    torch.testing.assert_close(ret[0], adv[0] + values[0])
    # row 1: V after the end is 0: delta1 = 1 - 0.4, A0 = -0.1 + 0.9 * 0.6; masked position is 0
    torch.testing.assert_close(adv[1], torch.tensor([-0.1 + 0.9 * 0.6, 0.6, 0.0]))
    adv_g, _ = compute_gae(rewards, values, mask, gamma=0.5, lam=1.0)
    assert adv_g[0, 1].item() == pytest.approx(0 + 0.5 * 0.3 - 0.4 + 0.5 * 0.7)


def test_whiten_uses_only_masked_entries():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    w = whiten(x, mask)
    vals = w[mask.bool()]
    assert vals.mean().item() == pytest.approx(0, abs=1e-6)
    assert (vals**2).mean().item() == pytest.approx(1, abs=1e-4)
    assert (w[~mask.bool()] == 0).all()


def test_clipped_policy_loss_matches_hand_computation():
    logprobs = torch.log(torch.tensor([[1.5, 0.5]]))
    old = torch.zeros(1, 2)
    adv = torch.tensor([[1.0, -1.0]])
    loss, clipfrac = clipped_policy_loss(logprobs, old, adv, torch.ones(1, 2), clip_coef=0.2)
    # token 0: ratio 1.5, A=+1 -> -min(1.5, 1.2) = -1.2; token 1: ratio 0.5, A=-1 -> max(0.5, 0.8) = 0.8
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert clipfrac.item() == 1.0
    inside, frac = clipped_policy_loss(torch.log(torch.tensor([[1.1]])), torch.zeros(1, 1), torch.tensor([[2.0]]), torch.ones(1, 1), 0.2)
    assert inside.item() == pytest.approx(-2.2) and frac.item() == 0.0


def test_clipped_value_loss_matches_hand_computation():
    v, v_old, ret, m = torch.tensor([[2.0]]), torch.tensor([[1.0]]), torch.tensor([[2.5]]), torch.ones(1, 1)
    # unclipped (2 - 2.5)^2 = 0.25; clipped V = 1.2 -> (1.2 - 2.5)^2 = 1.69; 0.5 * max = 0.845
    assert clipped_value_loss(v, v_old, ret, m, 0.2).item() == pytest.approx(0.845)
    assert clipped_value_loss(v, v_old, ret, m, 0.0).item() == pytest.approx(0.125)


def test_reinforce_gradient_matches_analytic_bandit_gradient():
    torch.manual_seed(0)
    theta = torch.tensor([0.2, -0.3, 0.5], requires_grad=True)
    r = torch.tensor([1.0, 0.0, 2.0])
    pi = torch.softmax(theta, 0)
    analytic = (pi * (r - (pi * r).sum())).detach()  # dJ/dtheta for J = sum_a pi_a r_a
    n, k = 200_000, 4
    actions = torch.multinomial(pi.detach(), n, replacement=True)
    logprobs = torch.log_softmax(theta, 0)[actions].view(n, 1)
    returns = r[actions]
    for baseline in (torch.zeros(n), rloo_baseline(returns, k)):
        theta.grad = None
        reinforce_loss(logprobs, torch.ones(n, 1), returns, baseline).backward(retain_graph=True)
        torch.testing.assert_close(-theta.grad, analytic, atol=0.01, rtol=0)


def test_rloo_baseline_is_leave_one_out_mean():
    returns = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    torch.testing.assert_close(rloo_baseline(returns, 3), torch.tensor([2.5, 2.0, 1.5, 25.0, 20.0, 15.0]))


def test_sum_tree_invariants():
    rng = np.random.default_rng(0)
    tree = SumTree(10)
    priorities = np.zeros(10)
    for _ in range(200):
        i = rng.integers(10, size=3)
        p = rng.random(3) * 5
        tree.update(i, p)
        priorities[i] = p
    assert tree.total == pytest.approx(priorities.sum())
    for node in range(1, tree.capacity):
        assert tree.tree[node] == pytest.approx(tree.tree[2 * node] + tree.tree[2 * node + 1])
    prefix = np.concatenate([[0], np.cumsum(priorities)])
    for mass in rng.random(100) * priorities.sum():
        leaf = tree.find(mass)
        assert prefix[leaf] <= mass < prefix[leaf + 1] + 1e-9


def filled_per(priorities, alpha, beta=0.4):
    buf = PrioritizedReplayBuffer(len(priorities), max_len=4, alpha=alpha, beta=beta, eps=1e-12, seed=0)
    for i in range(len(priorities)):
        buf.add([i + 2], i, 0.0, [i + 2, 5], False, 1.0)
    buf.update_priorities(np.arange(len(priorities)), np.array(priorities))
    return buf


def test_per_sampling_frequencies_follow_priority_to_the_alpha():
    priorities, alpha = np.array([1.0, 2.0, 3.0, 4.0]), 0.7
    buf = filled_per(priorities, alpha)
    counts = np.zeros(4)
    for _ in range(2000):
        idx, _ = buf.sample_indices(16)
        np.add.at(counts, idx, 1)
    expected = priorities**alpha / (priorities**alpha).sum()
    np.testing.assert_allclose(counts / counts.sum(), expected, atol=0.01)


def test_per_importance_weights():
    priorities, alpha, beta = np.array([1.0, 2.0, 3.0, 4.0]), 0.5, 0.6
    buf = filled_per(priorities, alpha, beta)
    idx, weights = buf.sample_indices(64)
    probs = priorities**alpha / (priorities**alpha).sum()
    raw = (4 * probs[idx]) ** (-beta)
    np.testing.assert_allclose(weights, raw / raw.max(), rtol=1e-5)
    assert weights.max() == pytest.approx(1.0)
    buf.anneal_beta(1.0, 0.4)
    assert buf.beta == 1.0


def test_replay_keeps_the_most_recent_transitions_compactly():
    buf = ReplayBuffer(capacity=3, max_len=5, seed=0)
    for i in range(5):
        buf.add([10, 11 + i], i, float(i), [10, 11 + i, i], i == 4, 0.9)
    assert len(buf) == 3 and buf.contexts.dtype == np.int32
    assert sorted(buf.actions.tolist()) == [2, 3, 4]
    batch = buf.sample(8)
    for row in range(8):
        a = int(batch.actions[row])
        assert batch.contexts[row][batch.context_mask[row].bool()].tolist() == [10, 11 + a]
        assert batch.next_contexts[row][batch.next_mask[row].bool()].tolist() == [10, 11 + a, a]
        assert batch.rewards[row].item() == a and batch.discounts[row].item() == pytest.approx(0.9)
    with pytest.raises(ValueError, match="does not fit max_len=5"):
        buf.add(list(range(6)), 0, 0.0, [], True, 1.0)
    with pytest.raises(ValueError, match="non-finite reward"):
        buf.add([1], 0, float("nan"), [], True, 1.0)


def test_replay_state_round_trip(tmp_path):
    buf = PrioritizedReplayBuffer(8, max_len=4, seed=0)
    for i in range(5):
        buf.add([i + 1], i, float(i), [], True, 1.0)
    buf.update_priorities(np.array([0, 3]), np.array([5.0, 0.1]))
    buf.save(tmp_path)
    other = PrioritizedReplayBuffer(8, max_len=4, seed=1)
    other.load(tmp_path)
    assert other.sample_indices(16)[0].tolist() == buf.sample_indices(16)[0].tolist()
    with pytest.raises(ValueError, match="has contexts of shape \\(8, 4\\).*this buffer \\(16, 4\\)"):
        PrioritizedReplayBuffer(16, max_len=4).load(tmp_path)


def test_replay_memory_is_what_the_docstring_says_and_saving_does_not_copy_it(tmp_path):
    """capacity x (2 x max_len x 4 + 21) bytes (+ 16 bytes per sum-tree leaf); a checkpoint writes
    the arrays from their own memory (it used to copy each, then serialise the copies)."""
    import tracemalloc

    capacity, max_len = 20_000, 64
    uniform = ReplayBuffer(capacity, max_len)
    assert uniform.nbytes() == capacity * (2 * max_len * 4 + 21)
    prioritized = PrioritizedReplayBuffer(capacity, max_len)
    assert prioritized.nbytes() == uniform.nbytes() + 2 * 32_768 * 8
    for i in range(capacity):
        uniform.add([5] * (i % max_len + 1), 3, 0.5, [6], False, 1.0)
    tracemalloc.start()
    uniform.save(tmp_path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 0.05 * uniform.nbytes(), f"saving allocated {peak} bytes for a {uniform.nbytes()}-byte buffer"
    again = ReplayBuffer(capacity, max_len)
    again.load(tmp_path)
    assert (again.contexts == uniform.contexts).all() and again.size == capacity


def test_dqn_log_policy_q_is_the_lm_and_its_soft_value_is_the_value_head(tiny_gpt2_dir):
    from agents.dqn import DQNConfig, q_values
    from agents.policy import LMPolicy

    policy = LMPolicy.load(tiny_gpt2_dir, "cpu", value_head=True)
    policy.valid_actions[policy.tokenizer.pad_token_id] = False
    ids = torch.tensor([[1, 1, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    cfg = DQNConfig(objective="td", soft_q=True, soft_q_beta=0.5, q_form="log_policy")
    with torch.no_grad():
        q = q_values(policy, ids, mask, cfg)
        logits = q_values(policy, ids, mask, DQNConfig(objective="td", q_form="logits"))
        # Boltzmann at beta is the LM; soft value beta*logsumexp(Q/beta) = V(s) = 0 for the zero-init head
        torch.testing.assert_close(torch.softmax(q / 0.5, -1), torch.softmax(logits, -1))
        torch.testing.assert_close(0.5 * torch.logsumexp(q / 0.5, -1), torch.zeros(2), atol=1e-5, rtol=0)
        torch.nn.init.constant_(policy.value_head.bias, 2.0 / cfg.value_scale)  # V = value_scale * head
        torch.testing.assert_close(0.5 * torch.logsumexp(q_values(policy, ids, mask, cfg) / 0.5, -1), torch.full((2,), 2.0))
    assert torch.isinf(q[:, policy.tokenizer.pad_token_id]).all(), "invalid tokens stay at -inf"
    with pytest.raises(ValueError, match="unknown q_form 'dueling'"):
        DQNConfig(objective="td", q_form="dueling")


def test_dqn_settings_of_the_other_objective_or_without_room_to_replay_are_errors():
    from agents.dqn import DQNConfig

    with pytest.raises(ValueError, match="n_step=3 is an option of objective 'td', not of 'pcl': drop it, or add --objective td"):
        DQNConfig(n_step=3)
    with pytest.raises(ValueError, match="kl_coef=0.3 is an option of objective 'pcl', not of 'td'"):
        DQNConfig(objective="td", kl_coef=0.3)
    with pytest.raises(ValueError, match=r"replay_episodes \(32\) must hold more than one batch of num_envs \(32\)"):
        DQNConfig(replay_episodes=32)
    assert DQNConfig(replay_episodes=32, replay_batch_size=0).replay_episodes == 32  # on-policy only: one batch is enough
    with pytest.raises(ValueError, match="critic_tau must be in"):
        DQNConfig(critic_tau=0.0)


def test_inverse_cdf_sampling_matches_the_probabilities_and_never_draws_masked_tokens():
    from agents.policy import sample_categorical

    probs = torch.tensor([0.0, 0.1, 0.0, 0.2, 0.7, 0.0])  # masked tokens at both ends and inside
    gen = torch.Generator().manual_seed(0)
    draws = torch.cat([sample_categorical(probs.expand(1000, -1), gen) for _ in range(100)])
    freq = torch.bincount(draws, minlength=6).float() / draws.numel()
    assert freq[[0, 2, 5]].eq(0).all()
    torch.testing.assert_close(freq, probs, atol=0.005, rtol=0)  # 100k draws: std ~0.0015
    again = torch.cat([sample_categorical(probs.expand(1000, -1), torch.Generator().manual_seed(0)) for _ in range(1)])
    assert torch.equal(again, draws[:1000]), "seeded: same generator state, same tokens"
    one_hot = torch.zeros(3, 8192)
    one_hot[torch.arange(3), torch.tensor([0, 4000, 8191])] = 1.0
    assert sample_categorical(one_hot).tolist() == [0, 4000, 8191]


def test_episode_replay_stores_whole_episodes_and_samples_them_for_one_pass():
    """Context once (right-aligned), completion, per-token rewards and reference log-probs; a sample
    is laid out like a rollout: [left-padded context | right-padded completion]."""
    buf = EpisodeReplayBuffer(capacity=3, max_context=6, max_new_tokens=4, ref_logprobs=True, seed=0)
    episodes = {}
    for i in range(5):  # the ring keeps the last 3
        context, completion = [10 + i] * (i % 3 + 1), [20 + i] * (i % 4 + 1)
        rewards, refs = [0.0] * (len(completion) - 1) + [float(i)], [-0.5 - i] * len(completion)
        episodes[i] = (context, completion, rewards, refs)
        buf.add(context, completion, rewards, refs)
    assert len(buf) == 3 and buf.contexts.dtype == np.int32 and buf.completions.dtype == np.int32
    batch = buf.sample(16)
    start = batch.completion_start
    assert start == batch.input_ids.shape[1] - batch.completion_mask.shape[1]
    seen = set()
    for row in range(16):
        i = int(batch.input_ids[row, start]) - 20  # the episode, from its first completion token
        context, completion, rewards, refs = episodes[i]
        seen.add(i)
        assert batch.input_ids[row, :start][batch.attention_mask[row, :start].bool()].tolist() == context
        live = batch.completion_mask[row]
        assert batch.input_ids[row, start:][live].tolist() == completion
        assert batch.attention_mask[row, start:].bool().tolist() == live.tolist()
        assert batch.rewards[row][live].tolist() == rewards and batch.ref_logprobs[row][live].tolist() == refs
        assert float(batch.rewards[row][~live].abs().sum()) == 0
    assert seen == {2, 3, 4}
    # per episode 4 (max_context + max_new_tokens (2 + ref)) + 8 bytes
    assert buf.nbytes() == 3 * (4 * (6 + 4 * 3) + 8)
    with pytest.raises(ValueError, match="does not fit max_new_tokens=4"):
        buf.add([1], [2] * 5, [0.0] * 5, [0.0] * 5)
    with pytest.raises(ValueError, match="one per token"):
        buf.add([1], [2, 3], [0.0], [0.0, 0.0])
    with pytest.raises(ValueError, match="reference log-probs"):
        buf.add([1], [2], [0.0])


def test_episode_replay_takes_a_rollout():
    rollout = SimpleNamespace(
        input_ids=torch.tensor([[0, 5, 6, 7, 8, 9], [4, 5, 6, 7, 1, 1]]), attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]),
        completion_start=3, completion_mask=torch.tensor([[True, True, True], [True, False, False]]),
        env_rewards=torch.tensor([[0.0, 0.0, 1.5], [-1.0, 0.0, 0.0]]), ref_logprobs=torch.tensor([[-1.0, -2.0, -3.0], [-4.0, 0.0, 0.0]]))
    buf = EpisodeReplayBuffer(4, max_context=4, max_new_tokens=3, ref_logprobs=True)
    assert buf.add_rollout(rollout) == [0, 1]
    assert buf.contexts[0, -2:].tolist() == [5, 6] and buf.context_lengths.tolist()[:2] == [2, 3]
    assert buf.completions[1, :1].tolist() == [7] and buf.completion_lengths.tolist()[:2] == [3, 1]
    assert buf.rewards[0].tolist() == [0.0, 0.0, 1.5] and buf.ref_logprobs[1].tolist() == [-4.0, 0.0, 0.0]
    # another reference's log-probs instead of the env's; then the stored slots, in one on-policy batch
    assert buf.add_rollout(rollout, ref_logprobs=torch.full((2, 3), -0.25)) == [2, 3]
    assert buf.ref_logprobs[2].tolist() == [-0.25] * 3 and buf.ref_logprobs[3].tolist() == [-0.25, 0.0, 0.0]
    batch = buf.batch(np.array([0, 1]))
    torch.testing.assert_close(batch.input_ids[:, batch.completion_start:] * batch.completion_mask,
                               rollout.input_ids[:, 3:] * rollout.completion_mask)
    assert batch.is_weights.tolist() == [1.0, 1.0]
    with pytest.raises(IndexError, match=r"slots \[4\] are not all among the 4 stored episodes"):
        buf.batch(np.array([4]))


def test_path_consistency_of_a_3_step_path_by_hand():
    """C_t = -V(s_t) + gamma^d V'(s_{t+d}) + sum_{i<d} gamma^i (r_{t+i} - beta (log pi - log pi_ref)), V' = 0 past the end."""
    from agents.pcl import consistency_loss, path_consistency

    beta, gamma = 0.1, 0.9
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, 0.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, -1.0], [-1.0, 0.0, 0.0]])
    rewards = torch.tensor([[0.0, 0.0, 2.0], [-1.0, 0.0, 0.0]])  # the RM pays on the last token
    values = torch.tensor([[0.3, 0.6, 1.2], [0.4, 0.0, 0.0]], requires_grad=True)
    target = torch.tensor([[0.5, 0.7, 1.1], [0.2, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    u0 = [0.0 - beta * (-1.0 + 1.5), 0.0 - beta * (-2.0 + 1.0), 2.0 - beta * (-0.5 + 1.0)]  # r - beta (log pi - log pi_ref)
    u1 = -1.0 - beta * (-1.5 + 1.0)
    by_hand = {
        0: [[-0.3 + u0[0] + gamma * u0[1] + gamma**2 * u0[2], -0.6 + u0[1] + gamma * u0[2], -1.2 + u0[2]], [-0.4 + u1, 0, 0]],
        1: [[-0.3 + u0[0] + gamma * 0.7, -0.6 + u0[1] + gamma * 1.1, -1.2 + u0[2]], [-0.4 + u1, 0, 0]],
        2: [[-0.3 + u0[0] + gamma * u0[1] + gamma**2 * 1.1, -0.6 + u0[1] + gamma * u0[2], -1.2 + u0[2]], [-0.4 + u1, 0, 0]],
    }
    for d, expected in by_hand.items():
        c = path_consistency(values, target, logprobs, ref, rewards, mask, beta, gamma, d)
        torch.testing.assert_close(c, torch.tensor(expected), rtol=0, atol=1e-6)
    c = path_consistency(values, target, logprobs, ref, rewards, mask, beta, gamma, 3)
    torch.testing.assert_close(c, torch.tensor(by_hand[0]), rtol=0, atol=1e-6, msg="d >= T is d = 0, to the end")
    # the gradient of sum_{b,t} w_b C^2 / 2 / n (d = T): dL/dV(s_t) = -w C_t / n and
    # dL/dlog pi(a_i) = -beta sum_{t <= i} gamma^(i - t) w C_t / n: each token answers for every path through it
    weights = torch.tensor([1.0, 0.5])
    consistency_loss(c, mask, weights).backward()
    w = weights[:, None] * mask
    torch.testing.assert_close(values.grad, -w * c.detach() / 4)
    wc = (w * c.detach()).tolist()
    expected = [[-beta * sum(gamma ** (i - t) * row[t] for t in range(i + 1)) / 4 for i in range(3)] for row in wc]
    torch.testing.assert_close(logprobs.grad, torch.tensor(expected) * mask)
    torch.testing.assert_close(consistency_loss(c, mask, weights), (w * c.detach() ** 2).sum() / 2 / 4)


def test_prioritized_episodes_are_sampled_by_priority_and_survive_a_checkpoint(tmp_path):
    priorities, alpha = np.array([1.0, 2.0, 3.0, 4.0]), 0.7
    buf = PrioritizedEpisodeReplayBuffer(4, max_context=2, max_new_tokens=2, alpha=alpha, eps=1e-12, seed=0)
    for i in range(4):
        buf.add([i + 1], [i + 1], [float(i)])
    buf.update_priorities(np.arange(4), priorities)
    counts = np.zeros(4)
    for _ in range(2000):
        np.add.at(counts, buf.sample_indices(16)[0], 1)
    np.testing.assert_allclose(counts / counts.sum(), priorities**alpha / (priorities**alpha).sum(), atol=0.01)
    buf.save(tmp_path)
    other = PrioritizedEpisodeReplayBuffer(4, max_context=2, max_new_tokens=2, alpha=alpha, eps=1e-12, seed=1)
    other.load(tmp_path)
    assert other.sample_indices(16)[0].tolist() == buf.sample_indices(16)[0].tolist()
    with pytest.raises(ValueError, match="this buffer"):
        EpisodeReplayBuffer(8, max_context=2, max_new_tokens=2).load(tmp_path)
