"""The episode logic of B TextGen environments, advanced together in one tensor step.

Both ``TextGenEnv`` (B = 1) and ``TextGenVectorEnv`` (B = N) run this code, so a vector env
produces exactly what N single envs produce. All state lives in tensors on the task's device:

    input_ids, attention_mask   (B, max_len)  the observation, LEFT-padded: the newest token is
                                              always at index -1, and ``input_ids[mask.bool()]`` is
                                              the current context
    n_generated, done           (B,)         the completion so far is the last n_generated
                                              tokens of input_ids (see ``generated_ids``)

Per step and row, with a_t the action and beta = ``ref_logprob_coef``:

    reward_t = beta * log pi_ref(a_t | s_t)  +  [episode ends at t] * RM(prompt, completion)

The episode ends when a_t is EOS or ``max_new_tokens`` tokens have been generated. The completion
is the *text* of the generated tokens (EOS excluded): the task's reward function (``envs.rewards``;
for the LM tasks a reward model's score of the canonically re-tokenised text) pays all rows that
finish in a step in one call; the gold scorer (monitoring only, never in the reward) sees prompt +
completion.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from envs.rewards import score_with_terms
from envs.task import TextGenTask
from rlhf.logprobs import mask_invalid_actions


@dataclass
class StepResult:
    rewards: torch.Tensor  # (B,) float32
    terminated: torch.Tensor  # (B,) bool
    ref_logprobs: torch.Tensor | None  # (B,) log pi_ref(a_t | s_t), when a reference is loaded
    finished: dict  # per finished row index: {"rm_score", "gold_score", "text", "prompt"[, "reward_terms"]}


class TextGenBatch:
    """B episodes of a :class:`~envs.task.TextGenTask`, as tensors on the task's device (the module
    docstring gives the state and the reward). ``reset_rows`` starts episodes, ``validate`` checks
    actions (``ValueError`` naming the first bad one), ``step`` advances every live row by its
    action and scores the rows that finish."""

    def __init__(self, task: TextGenTask, batch_size: int):
        self.task = task
        self.batch_size = batch_size
        device = task.device
        self.pad_id = task.pad_token_id
        self.eos_id = task.tokenizer.eos_token_id
        L = task.max_len
        self.input_ids = torch.full((batch_size, L), self.pad_id, dtype=torch.long, device=device)
        self.attention_mask = torch.zeros((batch_size, L), dtype=torch.long, device=device)
        self.n_generated = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.done = torch.ones(batch_size, dtype=torch.bool, device=device)  # nothing started yet
        self.done_rows = set(range(batch_size))  # the same, known on the host without a device sync
        self.episodes = [None] * batch_size
        self.reference = task.make_reference(batch_size) if task.make_reference is not None else None
        self.ones = torch.ones((batch_size, 1), dtype=torch.long, device=device)

    # -- resets -----------------------------------------------------------------------------------
    def reset_rows(self, rows: list[int], prompt_indices: list[int], prompts: list[str] | None = None) -> None:
        """Start episodes in ``rows`` from the task's prompts (by index) or from explicit prompt strings."""
        task = self.task
        contexts = []
        for j, row in enumerate(rows):
            prompt = prompts[j] if prompts is not None else task.prompts[prompt_indices[j]]
            episode = task.episode(prompt, prompt_indices[j])
            ids = task.encode(episode.context)
            if not ids:
                raise ValueError(f"prompt {prompt!r} encodes to no tokens")
            if len(ids) > task.max_context_tokens:
                raise ValueError(
                    f"prompt {prompt!r} is {len(ids)} tokens, longer than this env's context budget of "
                    f"{task.max_context_tokens} tokens (observation length {task.max_len} = context + max_new_tokens)"
                )
            self.episodes[row] = episode
            contexts.append(ids)
            self.input_ids[row] = self.pad_id
            self.attention_mask[row] = 0
            self.input_ids[row, -len(ids) :] = torch.as_tensor(ids, device=task.device)
            self.attention_mask[row, -len(ids) :] = 1
        index = torch.as_tensor(rows, dtype=torch.long, device=task.device)
        self.n_generated[index] = 0
        self.done[index] = False
        self.done_rows.difference_update(rows)
        if self.reference is not None:
            self.reference.reset_rows(rows, contexts)

    # -- action masks ----------------------------------------------------------------------------
    def action_masks(self) -> torch.Tensor:
        """(B, n_actions) bool: valid tokens, optionally restricted to the reference's top-k / top-p."""
        task = self.task
        mask = task.valid_actions.expand(self.batch_size, -1).clone()
        if self.reference is not None and (task.top_k > 0 or task.top_p < 1):
            logits = self.reference.next_logits.masked_fill(~mask, float("-inf"))
            keep = torch.zeros_like(mask)
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            rank_ok = torch.ones_like(sorted_logits, dtype=torch.bool)
            if task.top_k > 0:
                rank_ok[:, task.top_k :] = False
            if task.top_p < 1:
                probs = sorted_logits.softmax(-1)
                # keep the smallest prefix whose mass reaches top_p (the first token always stays)
                rank_ok &= (probs.cumsum(-1) - probs) < task.top_p
            keep.scatter_(1, order, rank_ok)
            mask &= keep
        return mask

    # -- step ------------------------------------------------------------------------------------
    @property
    def restricts_per_state(self) -> bool:
        """Whether the valid actions depend on the state (the reference's top-k / top-p), not just the vocabulary."""
        return self.reference is not None and (self.task.top_k > 0 or self.task.top_p < 1)

    def validate(self, actions: torch.Tensor) -> None:
        """``ValueError`` naming the first action that is out of range or masked; ``actions`` (B,) int64."""
        if actions.shape != (self.batch_size,):
            raise ValueError(f"expected {self.batch_size} actions of shape ({self.batch_size},), got shape {tuple(actions.shape)}")
        if actions.dtype.is_floating_point or actions.dtype == torch.bool:
            raise ValueError(f"actions must be integer token ids, got dtype {actions.dtype}")
        n = self.task.n_actions
        out_of_range = (actions < 0) | (actions >= n)
        if out_of_range.any():
            self.reject(int(actions[out_of_range][0]))
        if self.restricts_per_state:
            allowed = self.action_masks().gather(1, actions.view(-1, 1)).squeeze(1)
        else:  # no per-state restriction: a (V,) lookup, not a (B, V) mask per step
            allowed = self.task.valid_actions[actions]
        invalid = ~allowed & ~self.done
        if invalid.any():
            self.reject(int(actions[invalid][0]))

    def validate_one(self, action: int) -> None:
        """``validate`` for one row and a host int, with no device round trip (the single env's hot path)."""
        if not 0 <= action < self.task.n_actions:
            self.reject(action)
        if self.restricts_per_state or not self.task.valid_actions_host[action]:
            self.validate(torch.tensor([action], device=self.task.device))

    def reject(self, action: int) -> None:
        """Raise the ValueError that names a bad action and why it is bad."""
        n = self.task.n_actions
        if not 0 <= action < n:
            raise ValueError(f"action {action} is out of range: valid token ids are 0..{n - 1}")
        token = self.task.tokenizer.convert_ids_to_tokens(action) if action < len(self.task.tokenizer) else "<unused>"
        raise ValueError(f"action {action} ({token!r}) is masked: special/pad tokens (or tokens outside the allowed set) are not valid actions")

    def step(self, actions: torch.Tensor, active: torch.Tensor | None = None) -> StepResult:
        """Advance every row in ``active`` (default: all not-done rows) by its action."""
        task = self.task
        every_row = active is None and not self.done_rows  # known on the host: no torch.where needed
        if active is None and not every_row:
            active = ~self.done
        ref_logprobs = None
        if self.reference is not None:
            # The reference distribution over the valid actions (pad/special tokens excluded).
            # In place: the reference's next logits are read only here and by action_masks (which
            # masks the same tokens); the next reference step replaces them.
            ref_logits = mask_invalid_actions(self.reference.next_logits, task.valid_actions, inplace=True)
            # log pi_ref(a_t | s_t) = -cross-entropy of a_t: log-softmax and gather in one kernel.
            ref_logprobs = -F.cross_entropy(ref_logits, actions.long(), reduction="none")
            rewards = task.ref_logprob_coef * ref_logprobs
            if not every_row:
                rewards = torch.where(active, rewards, 0.0)  # inactive rows: no reward
        else:
            rewards = torch.zeros(self.batch_size, dtype=torch.float32, device=task.device)

        # Append the token: shift the left-padded window by one, write the action at the end.
        # (No boolean indexing, so no host sync; and few ops, because a single env's step costs
        # exactly these beyond its reference forward.)
        if every_row:
            self.input_ids = torch.cat([self.input_ids[:, 1:], actions.view(-1, 1).long()], dim=1)
            self.attention_mask = torch.cat([self.attention_mask[:, 1:], self.ones], dim=1)
            self.n_generated += 1
        else:
            shift = active.view(-1, 1)
            self.input_ids = torch.where(shift, self.input_ids.roll(-1, dims=1), self.input_ids)
            self.attention_mask = torch.where(shift, self.attention_mask.roll(-1, dims=1), self.attention_mask)
            self.input_ids[:, -1] = torch.where(active, actions, self.input_ids[:, -1])
            appended = active.long()
            self.attention_mask[:, -1] |= appended
            self.n_generated += appended
        ended = actions == self.eos_id
        ended |= self.n_generated >= task.max_new_tokens
        if not every_row:
            ended &= active
        rows = ended.nonzero().flatten() if ended.any() else None  # one host sync per step: which rows finished
        if rows is not None:
            self.done[rows] = True
            self.done_rows.update(rows.tolist())
        # The reference reads the new token, unless every episode has ended and no action mask is
        # drawn from it (top-k / top-p): its next logits would never be read (a reset re-primes the
        # rows), so the last step of a batch costs no reference forward.
        if self.reference is not None and (len(self.done_rows) < self.batch_size or self.restricts_per_state):
            self.reference.step(actions if every_row else torch.where(active, actions, self.pad_id))
        finished = {}
        if rows is not None:
            scores, finished = self.score_finished(rows)
            rewards[rows] += scores
        return StepResult(rewards, ended, ref_logprobs, finished)

    def generated_ids(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The completions of ``rows`` so far, right-padded: ids (R, max_new_tokens) and their mask.

        They are the last ``n_generated`` tokens of each observation (the window always holds the
        whole context plus every generated token), so no separate buffer is written per step.
        """
        width, horizon = self.input_ids.shape[1], self.task.max_new_tokens
        n = self.n_generated[rows].view(-1, 1)
        offsets = torch.arange(horizon, device=self.input_ids.device).view(1, -1)
        mask = offsets < n
        columns = (width - n + offsets).clamp(max=width - 1)
        ids = self.input_ids[rows].gather(1, columns).masked_fill(~mask, self.pad_id)
        return ids, mask

    # -- episode end -----------------------------------------------------------------------------
    def score_finished(self, rows: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """RM scores (device tensor) of finished rows in one batch, plus their monitoring info."""
        task = self.task
        gen, gen_mask = self.generated_ids(rows)
        gen_mask &= gen != self.eos_id  # the EOS that ended an episode is not part of the text
        row_list = rows.tolist()
        completion_ids = [[t for t, keep in zip(g, m) if keep] for g, m in zip(gen.tolist(), gen_mask.tolist())]
        completions = [task.tokenizer.decode(ids, skip_special_tokens=True) for ids in completion_ids]
        prompts = [self.episodes[r].prompt for r in row_list]
        scores, terms = score_with_terms(task.reward_fn, prompts, completions, gen, gen_mask)
        gold = task.gold([p + c for p, c in zip(prompts, completions)]) if task.gold is not None else None
        terms = {name: values.tolist() for name, values in terms.items()}
        finished = {}
        for j, r in enumerate(row_list):
            finished[r] = {
                "rm_score": float(scores[j]),
                "gold_score": float(gold[j]) if gold is not None else float("nan"),
                "text": completions[j],
                "prompt": self.episodes[r].prompt,
            }
            if terms:
                finished[r]["reward_terms"] = {name: values[j] for name, values in terms.items()}
        return scores, finished

    # -- numpy views for the Gymnasium API ---------------------------------------------------------
    def observation(self) -> dict[str, np.ndarray]:
        # Copies: the caller owns the arrays; later steps must not change an observation already returned.
        return {"input_ids": self.input_ids.cpu().numpy().copy(), "attention_mask": self.attention_mask.cpu().numpy().copy()}
