"""Experience replay for DQN over token contexts: transitions, and whole episodes.

* ``ReplayBuffer`` (Lin 1992): a ring buffer of the ``capacity`` most recent transitions, sampled
  uniformly.
* ``PrioritizedReplayBuffer`` (Schaul et al. 2016), proportional variant: transition i is sampled
  with probability P(i) = p_i^alpha / sum_k p_k^alpha, p_i = |delta_i| + eps (new transitions get
  the current max priority), through a sum tree (O(log N) sampling and updates, stratified over
  ``batch_size`` equal segments of the total mass). The bias is corrected by importance-sampling
  weights w_i = (N P(i))^-beta / max_j w_j, with beta annealed to 1 over training.

A transition is (s, a, r, s', done, discount): s and s' are token contexts stored compactly as
left-aligned-to-the-right ``int32`` ids plus a length (the mask is implied), r is an n-step
return and ``discount`` = gamma^n. Memory is fixed at construction: capacity x (2 x max_len x 4
+ 21) bytes (two int32 contexts; int32 lengths x 2, int32 action, float32 return, bool done,
float32 discount), plus 16 bytes per leaf of the sum tree (a power of two >= capacity, doubled) for
prioritized replay: :meth:`ReplayBuffer.nbytes`. Checkpoints write each array as a ``.npy`` file
straight from its memory (``np.save``, no pickle) and read it back with ``allow_pickle=False``, so
saving never holds a second copy of the buffer.

``EpisodeReplayBuffer`` / ``PrioritizedEpisodeReplayBuffer`` keep whole episodes instead (the
context once, the completion, per-token rewards and reference log-probs) for multi-step learning
over stored paths, at ~1/20 of the transition buffer's bytes per token (see the class).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class Batch:
    contexts: torch.Tensor  # (B, L) int64, left-padded
    context_mask: torch.Tensor  # (B, L) int64
    actions: torch.Tensor  # (B,)
    rewards: torch.Tensor  # (B,) n-step returns
    next_contexts: torch.Tensor
    next_mask: torch.Tensor
    dones: torch.Tensor  # (B,) float
    discounts: torch.Tensor  # (B,) gamma^n
    is_weights: torch.Tensor  # (B,) importance-sampling weights (1 for uniform replay)
    indices: np.ndarray  # (B,) buffer slots, for update_priorities


class ReplayBuffer:
    """A ring buffer of the ``capacity`` most recent transitions (s, a, r, s', done, gamma^n), sampled
    uniformly; contexts of up to ``max_len`` tokens stored as int32 (module docstring).

    ``add`` raises ``ValueError`` for a context longer than ``max_len`` or a non-finite reward;
    ``sample(batch_size)`` returns a :class:`Batch` of (B, max_len) left-padded int64 contexts and
    their masks, (B,) actions, n-step returns, dones, discounts and ``is_weights`` (1: uniform); sampling an
    empty buffer raises ``RuntimeError``.
    """

    def __init__(self, capacity: int, max_len: int, seed: int = 0, pad_id: int = 0):
        if capacity <= 0 or max_len <= 0:
            raise ValueError(f"capacity and max_len must be positive, got {capacity}, {max_len}")
        self.capacity, self.max_len, self.pad_id = capacity, max_len, pad_id
        self.contexts = np.full((capacity, max_len), pad_id, dtype=np.int32)
        self.next_contexts = np.full((capacity, max_len), pad_id, dtype=np.int32)
        self.lengths = np.zeros(capacity, dtype=np.int32)
        self.next_lengths = np.zeros(capacity, dtype=np.int32)
        self.actions = np.zeros(capacity, dtype=np.int32)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.dones = np.zeros(capacity, dtype=np.bool_)
        self.discounts = np.ones(capacity, dtype=np.float32)
        self.pos = 0
        self.size = 0
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.size

    def add(self, context: list[int], action: int, reward: float, next_context: list[int], done: bool, discount: float) -> int:
        """Store one transition; returns its slot. Contexts longer than ``max_len`` are an error."""
        for name, ctx in (("context", context), ("next_context", next_context)):
            if len(ctx) > self.max_len:
                raise ValueError(f"{name} of {len(ctx)} tokens does not fit max_len={self.max_len}")
        if not np.isfinite(reward):
            raise ValueError(f"non-finite reward {reward} offered to the replay buffer")
        i = self.pos
        self.contexts[i] = self.pad_id
        self.contexts[i, self.max_len - len(context) :] = context
        self.next_contexts[i] = self.pad_id
        if next_context:
            self.next_contexts[i, self.max_len - len(next_context) :] = next_context
        self.lengths[i], self.next_lengths[i] = len(context), len(next_context)
        self.actions[i], self.rewards[i], self.dones[i], self.discounts[i] = action, reward, done, discount
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)
        return i

    def sample_indices(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        if self.size == 0:
            raise RuntimeError("cannot sample from an empty replay buffer")
        return self.rng.integers(0, self.size, size=batch_size), np.ones(batch_size, dtype=np.float32)

    def sample(self, batch_size: int, device="cpu") -> Batch:
        indices, is_weights = self.sample_indices(batch_size)
        positions = np.arange(self.max_len)

        def ids_and_mask(ids, lengths):
            mask = positions[None, :] >= (self.max_len - lengths[indices])[:, None]
            return (torch.from_numpy(ids[indices].astype(np.int64)).to(device),
                    torch.from_numpy(mask.astype(np.int64)).to(device))

        contexts, context_mask = ids_and_mask(self.contexts, self.lengths)
        next_contexts, next_mask = ids_and_mask(self.next_contexts, self.next_lengths)
        as_t = lambda a, dtype=torch.float32: torch.as_tensor(a[indices], dtype=dtype, device=device)  # noqa: E731
        return Batch(contexts, context_mask, as_t(self.actions, torch.long), as_t(self.rewards), next_contexts, next_mask,
                     as_t(self.dones), as_t(self.discounts), torch.as_tensor(is_weights, device=device), indices)

    # -- memory and checkpointing ----------------------------------------------------------------
    _ARRAYS = ("contexts", "next_contexts", "lengths", "next_lengths", "actions", "rewards", "dones", "discounts")

    def nbytes(self) -> int:
        """Bytes held by the buffer's arrays (what the module docstring's formula gives)."""
        return sum(getattr(self, k).nbytes for k in self._ARRAYS)

    def _meta(self) -> dict:
        return {"pos": self.pos, "size": self.size, "rng": self.rng.bit_generator.state}

    def _set_meta(self, meta: dict) -> None:
        self.pos, self.size = meta["pos"], meta["size"]
        self.rng.bit_generator.state = meta["rng"]

    def save(self, directory: str | Path) -> None:
        """Write the buffer into ``directory/replay/`` (one ``.npy`` per array + ``replay.json``), from the arrays' own memory."""
        target = Path(directory) / "replay"
        target.mkdir(parents=True, exist_ok=True)
        for name, array in self._named_arrays():
            np.save(target / f"{name}.npy", array, allow_pickle=False)
        (target / "replay.json").write_text(json.dumps(self._meta()))

    def load(self, directory: str | Path) -> None:
        """Read what :meth:`save` wrote into this buffer (same capacity and max_len; ``ValueError`` otherwise)."""
        source = Path(directory) / "replay"
        for name, array in self._named_arrays():
            value = np.load(source / f"{name}.npy", mmap_mode="r", allow_pickle=False)
            if value.shape != array.shape or value.dtype != array.dtype:
                raise ValueError(f"the replay buffer in {source} has {name} of shape {value.shape} ({value.dtype}), "
                                 f"this buffer {array.shape} ({array.dtype}): resume with the same buffer_size and env")
            array[:] = value
        self._set_meta(json.loads((source / "replay.json").read_text()))

    def _named_arrays(self):
        return [(k, getattr(self, k)) for k in self._ARRAYS]


class SumTree:
    """A complete binary tree over ``capacity`` leaves; each node holds the sum of its children."""

    def __init__(self, capacity: int):
        self.capacity = 1
        while self.capacity < capacity:
            self.capacity *= 2
        self.tree = np.zeros(2 * self.capacity, dtype=np.float64)  # tree[1] is the root

    @property
    def total(self) -> float:
        return float(self.tree[1])

    def update(self, indices: np.ndarray, priorities: np.ndarray) -> None:
        for i, p in zip(np.atleast_1d(indices), np.atleast_1d(priorities)):
            node = int(i) + self.capacity
            self.tree[node] = p
            node //= 2
            while node >= 1:
                self.tree[node] = self.tree[2 * node] + self.tree[2 * node + 1]
                node //= 2

    def get(self, indices: np.ndarray) -> np.ndarray:
        return self.tree[np.asarray(indices) + self.capacity]

    def find(self, mass: float) -> int:
        """The leaf i with prefix_sum(i) <= mass < prefix_sum(i) + p_i."""
        node = 1
        while node < self.capacity:
            left = 2 * node
            if mass < self.tree[left]:
                node = left
            else:
                mass -= self.tree[left]
                node = left + 1
        return node - self.capacity


class Prioritized:
    """Proportional prioritized sampling (Schaul et al. 2016) for a buffer of ``size`` items (transitions
    or episodes): P(i) = p_i^alpha / sum_k p_k^alpha, p_i = |error_i| + eps (a new item gets the current
    max priority), importance-sampling weights w_i = (N P(i))^-beta / max_j w_j. Mixed in before the
    buffer class it prioritizes (``PrioritizedReplayBuffer``, ``PrioritizedEpisodeReplayBuffer``)."""

    def _init_priorities(self, capacity: int, alpha: float, beta: float, eps: float) -> None:
        if alpha < 0 or not 0 <= beta <= 1:
            raise ValueError(f"need alpha >= 0 and 0 <= beta <= 1, got alpha={alpha}, beta={beta}")
        if not eps > 0:  # p_i = |delta_i| + eps > 0: the total priority can never be 0
            raise ValueError(f"eps must be > 0 (with eps = 0, all-zero TD errors leave nothing to sample by), got {eps}")
        self.alpha, self.beta, self.eps = alpha, beta, eps
        self.tree = SumTree(capacity)
        self.max_priority = 1.0

    def add(self, *args, **kwargs) -> int:
        i = super().add(*args, **kwargs)
        self.tree.update(np.array([i]), np.array([self.max_priority**self.alpha]))
        return i

    def sample_indices(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        if self.size == 0:
            raise RuntimeError("cannot sample from an empty replay buffer")
        total = self.tree.total
        segment = total / batch_size
        masses = (np.arange(batch_size) + self.rng.random(batch_size)) * segment
        indices = np.array([min(self.tree.find(m), self.size - 1) for m in masses])
        probs = self.tree.get(indices) / total
        is_weights = (self.size * probs) ** (-self.beta)
        return indices, (is_weights / is_weights.max()).astype(np.float32)

    def update_priorities(self, indices: np.ndarray, td_errors: np.ndarray) -> None:
        """p_i = |delta_i| + eps, stored as p_i^alpha."""
        priorities = np.abs(np.asarray(td_errors, dtype=np.float64)) + self.eps
        if not np.isfinite(priorities).all():
            raise ValueError("non-finite TD errors passed to update_priorities")
        self.max_priority = max(self.max_priority, float(priorities.max()))
        self.tree.update(indices, priorities**self.alpha)

    def anneal_beta(self, fraction: float, beta0: float) -> None:
        """beta goes linearly from ``beta0`` to 1 as training goes from 0 to 1."""
        self.beta = beta0 + min(1.0, max(0.0, fraction)) * (1.0 - beta0)

    def nbytes(self) -> int:
        return super().nbytes() + self.tree.tree.nbytes

    def _named_arrays(self):
        return super()._named_arrays() + [("tree", self.tree.tree)]

    def _meta(self) -> dict:
        return {**super()._meta(), "beta": self.beta, "max_priority": self.max_priority}

    def _set_meta(self, meta: dict) -> None:
        super()._set_meta(meta)
        self.beta, self.max_priority = meta["beta"], meta["max_priority"]


class PrioritizedReplayBuffer(Prioritized, ReplayBuffer):
    """Proportional prioritized replay of transitions (Schaul et al. 2016): P(i) = p_i^alpha / sum_k p_k^alpha,
    p_i = |td_error_i| + eps, importance-sampling weights w_i = (N P(i))^-beta / max_j w_j
    (``Batch.is_weights``, which scale each transition's loss). ``ValueError`` for alpha < 0, beta outside [0, 1] or eps <= 0
    (with eps = 0, all-zero TD errors would leave nothing to sample by)."""

    def __init__(self, capacity: int, max_len: int, alpha: float = 0.6, beta: float = 0.4, eps: float = 1e-6,
                 seed: int = 0, pad_id: int = 0):
        ReplayBuffer.__init__(self, capacity, max_len, seed, pad_id)
        self._init_priorities(capacity, alpha, beta, eps)


@dataclass
class EpisodeBatch:
    """Whole episodes for one teacher-forced pass, laid out like ``agents.rollout.Rollout``."""

    input_ids: torch.Tensor  # (B, C + T) int64: the left-padded context, then the right-padded completion
    attention_mask: torch.Tensor  # (B, C + T) int64
    completion_start: int  # C
    completion_mask: torch.Tensor  # (B, T) bool
    rewards: torch.Tensor  # (B, T) float32: the env's per-step rewards, 0 on padding
    ref_logprobs: torch.Tensor | None  # (B, T) float32: log pi_ref of each token (None if the buffer keeps none)
    is_weights: torch.Tensor  # (B,) importance-sampling weights (1 for uniform replay)
    indices: np.ndarray  # (B,) buffer slots, for update_priorities


class EpisodeReplayBuffer:
    """A ring buffer of the ``capacity`` most recent whole episodes, sampled uniformly: what
    multi-step (path-consistency) learning replays, where a transition buffer would store the
    context again for every token.

    An episode is its context (up to ``max_context`` int32 ids, stored once, right-aligned), its
    completion (up to ``max_new_tokens`` int32 ids, left-aligned), the env's per-step rewards and,
    with ``ref_logprobs=True``, the reference's log-prob of each token (float32 each): per episode
    4 (max_context + max_new_tokens (2 + ref)) + 8 bytes, fixed at construction (:meth:`nbytes`);
    with 32 + 16 tokens and the reference, 328 bytes: 20.5 bytes per generated token, where the
    transition buffer (``ReplayBuffer``, two 48-token contexts per token) holds 405.

    ``add`` raises ``ValueError`` for a context or completion that does not fit, an empty
    completion, mismatched lengths or a non-finite reward; sampling an empty buffer raises
    ``RuntimeError``. ``save``/``load`` as ``ReplayBuffer`` (``.npy`` files, no pickle)."""

    def __init__(self, capacity: int, max_context: int, max_new_tokens: int, ref_logprobs: bool = False, seed: int = 0,
                 pad_id: int = 0):
        if capacity <= 0 or max_context <= 0 or max_new_tokens <= 0:
            raise ValueError(f"capacity, max_context and max_new_tokens must be positive, got {capacity}, {max_context}, "
                             f"{max_new_tokens}")
        self.capacity, self.max_context, self.max_new_tokens, self.pad_id = capacity, max_context, max_new_tokens, pad_id
        self.contexts = np.full((capacity, max_context), pad_id, dtype=np.int32)
        self.completions = np.full((capacity, max_new_tokens), pad_id, dtype=np.int32)
        self.context_lengths = np.zeros(capacity, dtype=np.int32)
        self.completion_lengths = np.zeros(capacity, dtype=np.int32)
        self.rewards = np.zeros((capacity, max_new_tokens), dtype=np.float32)
        self.ref_logprobs = np.zeros((capacity, max_new_tokens), dtype=np.float32) if ref_logprobs else None
        self.pos = 0
        self.size = 0
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.size

    def add(self, context, completion, rewards, ref_logprobs=None) -> int:
        """Store one episode (token-id sequences, per-token rewards and reference log-probs); returns its slot."""
        context, completion = list(context), list(completion)
        rewards = np.asarray(rewards, dtype=np.float32)
        if not 0 < len(context) <= self.max_context:
            raise ValueError(f"a context of {len(context)} tokens does not fit max_context={self.max_context} (or is empty)")
        if not 0 < len(completion) <= self.max_new_tokens:
            raise ValueError(f"a completion of {len(completion)} tokens does not fit max_new_tokens={self.max_new_tokens} (or is empty)")
        if rewards.shape != (len(completion),):
            raise ValueError(f"got {rewards.shape[0] if rewards.ndim else 'no'} rewards for {len(completion)} tokens: give one per token")
        if not np.isfinite(rewards).all():
            raise ValueError(f"non-finite reward {rewards[~np.isfinite(rewards)][0]} offered to the replay buffer")
        if (ref_logprobs is None) != (self.ref_logprobs is None):
            raise ValueError("this buffer " + ("keeps" if self.ref_logprobs is not None else "does not keep")
                             + " reference log-probs: give them with every episode, or never")
        i, n = self.pos, len(completion)
        self.contexts[i] = self.pad_id
        self.contexts[i, self.max_context - len(context) :] = context
        self.completions[i] = self.pad_id
        self.completions[i, :n] = completion
        self.context_lengths[i], self.completion_lengths[i] = len(context), n
        self.rewards[i] = 0.0
        self.rewards[i, :n] = rewards
        if self.ref_logprobs is not None:
            self.ref_logprobs[i] = 0.0
            self.ref_logprobs[i, :n] = np.asarray(ref_logprobs, dtype=np.float32)
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)
        return i

    def add_rollout(self, rollout, ref_logprobs: torch.Tensor | None = None) -> list[int]:
        """Store every episode of an ``agents.rollout.Rollout`` (its env rewards, and the reference
        log-probs ``ref_logprobs`` (N, T), by default the env's own); returns their slots."""
        start = rollout.completion_start
        ids, attn = rollout.input_ids.cpu(), rollout.attention_mask.cpu()
        live = rollout.completion_mask.cpu()
        rewards = rollout.env_rewards.cpu()
        refs = rollout.ref_logprobs if ref_logprobs is None else ref_logprobs
        refs = None if refs is None or self.ref_logprobs is None else refs.detach().float().cpu()
        slots = []
        for row in range(ids.shape[0]):
            context = ids[row, :start][attn[row, :start].bool()].tolist()
            done = live[row]
            slots.append(self.add(context, ids[row, start:][done].tolist(), rewards[row][done].numpy(),
                                  None if refs is None else refs[row][done].numpy()))
        return slots

    def sample_indices(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        if self.size == 0:
            raise RuntimeError("cannot sample from an empty replay buffer")
        return self.rng.integers(0, self.size, size=batch_size), np.ones(batch_size, dtype=np.float32)

    def sample(self, batch_size: int, device="cpu") -> EpisodeBatch:
        """``batch_size`` episodes as one :class:`EpisodeBatch`, padded to the longest sampled context and completion."""
        return self.batch(*self.sample_indices(batch_size), device=device)

    def batch(self, indices: np.ndarray, is_weights: np.ndarray | None = None, device="cpu") -> EpisodeBatch:
        """The episodes in slots ``indices`` (e.g. the ones just added, for an on-policy batch) as one
        :class:`EpisodeBatch`; ``is_weights`` default to 1."""
        indices = np.asarray(indices)
        if len(indices) == 0 or indices.min() < 0 or indices.max() >= self.size:
            raise IndexError(f"slots {indices.tolist()} are not all among the {self.size} stored episodes")
        is_weights = np.ones(len(indices), dtype=np.float32) if is_weights is None else is_weights
        c = int(self.context_lengths[indices].max())
        t = int(self.completion_lengths[indices].max())
        context = self.contexts[indices, self.max_context - c :]
        context_mask = np.arange(c)[None, :] >= (c - self.context_lengths[indices])[:, None]
        completion_mask = np.arange(t)[None, :] < self.completion_lengths[indices][:, None]
        ids = np.concatenate([context, self.completions[indices, :t]], 1).astype(np.int64)
        mask = np.concatenate([context_mask, completion_mask], 1).astype(np.int64)
        as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
        refs = None if self.ref_logprobs is None else as_t(self.ref_logprobs[indices, :t])
        return EpisodeBatch(as_t(ids), as_t(mask), c, as_t(completion_mask), as_t(self.rewards[indices, :t]), refs,
                            torch.as_tensor(is_weights, device=device), indices)

    # -- memory and checkpointing (as ReplayBuffer) --------------------------------------------------
    def _named_arrays(self):
        names = ["contexts", "completions", "context_lengths", "completion_lengths", "rewards"]
        names += ["ref_logprobs"] if self.ref_logprobs is not None else []
        return [(k, getattr(self, k)) for k in names]

    def nbytes(self) -> int:
        """Bytes held by the buffer's arrays (what the class docstring's formula gives)."""
        return sum(array.nbytes for _, array in self._named_arrays())

    _meta = ReplayBuffer._meta
    _set_meta = ReplayBuffer._set_meta
    save = ReplayBuffer.save
    load = ReplayBuffer.load


class PrioritizedEpisodeReplayBuffer(Prioritized, EpisodeReplayBuffer):
    """Prioritized replay of whole episodes: P(i) proportional to (|error_i| + eps)^alpha, with error_i an
    episode's own (e.g. the largest path-consistency or TD error along it), importance-sampling weights
    as ``PrioritizedReplayBuffer``."""

    def __init__(self, capacity: int, max_context: int, max_new_tokens: int, ref_logprobs: bool = False, alpha: float = 0.6,
                 beta: float = 0.4, eps: float = 1e-6, seed: int = 0, pad_id: int = 0):
        EpisodeReplayBuffer.__init__(self, capacity, max_context, max_new_tokens, ref_logprobs, seed, pad_id)
        self._init_priorities(capacity, alpha, beta, eps)
