"""The batched TextGen vector env: N episodes advanced in one tensor step on the models' device.

    envs = gym.make_vec("TextGen-v0", num_envs=64, vectorization_mode="vector_entry_point")

A native ``gymnasium.vector.VectorEnv`` (not N copies of the single env): one reference-LM forward
of shape (N, 1) per step against an incremental KV cache, one reward-model batch for all episodes
that end in a step, and Gymnasium 1.x autoreset. The default, ``NEXT_STEP``: the step after a
sub-env terminates resets it (its action is ignored, reward 0, terminated False).
``autoreset_mode="same_step"`` resets a sub-env in the step that terminates it and returns the
reset observation, with the terminal one in ``infos["final_obs"]`` (what Stable-Baselines3's VecEnv
API expects; ``agents.sb3`` uses it). Sub-env i is seeded with seed + i
and draws its prompts exactly like a single ``TextGenEnv`` reset with that seed, so the vector env
reproduces N single envs (tested).

The tensor API for batched agents (``envs.api.TextVectorEnv``, what this library's agents use
and all they use): :meth:`reset_tensor` and :meth:`step_tensor` take and return device tensors
(observation, rewards, ``ref_logprobs``, termination, finished episodes) with no host copy, plus
the properties ``tokenizer``, ``pad_token_id``, ``eos_token_id``, ``valid_actions``, ``prompts``,
``max_new_tokens``, ``device``, ``lm_path``, ``reference_model`` and ``get_rng_state`` /
``set_rng_state`` for exact resume.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from envs.api import VectorReset, VectorStep
from envs.batch import TextGenBatch
from envs.inputs import as_actions, check_prompt, reset_options, vector_seeds
from envs.spaces import action_space, observation_space
from envs.task import TextGenTask, build_lm_task
from pretrain.config import check_int
from pretrain.kv_cache import CachedLM

MAX_STATE_BYTES = 8 * 2**30  # observations of all sub-envs; beyond this, a typo (num_envs=10**9) rather than a plan


def parse_autoreset_mode(mode: str | AutoresetMode) -> AutoresetMode:
    """``AutoresetMode.NEXT_STEP`` / ``SAME_STEP``, or their names: "next_step", "NextStep", ..."""
    names = {"next_step": AutoresetMode.NEXT_STEP, "nextstep": AutoresetMode.NEXT_STEP,
             "same_step": AutoresetMode.SAME_STEP, "samestep": AutoresetMode.SAME_STEP}
    if isinstance(mode, AutoresetMode) and mode in names.values():
        return mode
    if isinstance(mode, str) and mode.lower() in names:
        return names[mode.lower()]
    raise ValueError(f"unsupported autoreset_mode {mode!r}; expected 'next_step' or 'same_step'")


class TextGenVectorEnv(VectorEnv):
    """N TextGen episodes in one tensor step (the module docstring); ``env_kwargs`` are
    ``TextGenEnv``'s arguments. Raises ``ValueError`` / ``TypeError`` naming any bad argument,
    seed, option or action (``envs.inputs``)."""

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": ["ansi"]}

    def __init__(
        self,
        num_envs: int = 8,
        render_mode: str | None = None,
        task: TextGenTask | None = None,
        autoreset_mode: str | AutoresetMode = AutoresetMode.NEXT_STEP,
        **env_kwargs,
    ):
        num_envs = check_int("num_envs", num_envs, 1)
        self.autoreset_mode = parse_autoreset_mode(autoreset_mode)
        self.metadata = {**self.metadata, "autoreset_mode": self.autoreset_mode}
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"unknown render_mode {render_mode!r}; expected one of {self.metadata['render_modes']}")
        self.render_mode = render_mode
        self.task = task or build_lm_task(**env_kwargs)
        state_bytes = 16 * num_envs * self.task.max_len  # input_ids + attention_mask, int64
        if state_bytes > MAX_STATE_BYTES:
            raise ValueError(f"num_envs={num_envs} x observation length {self.task.max_len} would hold {state_bytes / 2**30:.1f} GiB "
                             f"of observations (limit {MAX_STATE_BYTES / 2**30:.0f} GiB); use fewer envs or tokens")
        self.num_envs = num_envs
        self.batch = TextGenBatch(self.task, num_envs)
        self.single_observation_space = observation_space(self.task.n_actions, self.task.max_len)
        self.single_action_space = action_space(self.task.valid_actions)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._rngs = [seeding.np_random()[0] for _ in range(num_envs)]
        self._autoreset = torch.zeros(num_envs, dtype=torch.bool, device=self.task.device)
        self._started = False

    # -- the tensor API (envs.api.TextVectorEnv) ----------------------------------------------------
    @property
    def tokenizer(self):
        return self.task.tokenizer

    @property
    def pad_token_id(self) -> int:
        return self.task.pad_token_id

    @property
    def eos_token_id(self) -> int:
        return self.task.tokenizer.eos_token_id

    @property
    def valid_actions(self) -> torch.Tensor:
        """(V,) bool on the env's device: the token ids a policy may emit."""
        return self.task.valid_actions

    @property
    def prompts(self) -> list[str]:
        return self.task.prompts

    @property
    def max_new_tokens(self) -> int:
        return self.task.max_new_tokens

    @property
    def device(self) -> torch.device:
        return self.task.device

    @property
    def lm_path(self) -> Path | None:
        return self.task.lm_path

    @property
    def reference_model(self) -> Path | None:
        return self.task.reference_model

    def shard_prompts(self, index: int, count: int) -> None:
        """Draw episodes only from prompts ``index``, ``index + count``, ... of the task's: ``count``
        data-parallel processes, each with its own ``index``, then train on disjoint prompt sets.
        The observation space is unchanged. ``ValueError`` when there are fewer prompts than shards."""
        count = check_int("count", count, 1)
        index = check_int("index", index, 0, count - 1)
        if len(self.task.prompts) < count:
            raise ValueError(f"{len(self.task.prompts)} prompts cannot be split into {count} disjoint shards")
        self.task.prompts = self.task.prompts[index::count]

    def share_reference(self, model) -> None:
        """Run ``model`` as the reference LM from now on (a frozen causal LM over this env's tokenizer:
        an agent's policy with its adapter disabled, ``pretrain.adapters.ReferenceLM``) and drop the
        env's own copy, so one set of base weights serves the policy, its KL and the env's shaping.
        Takes effect at the next reset; a no-op for an env that runs no reference."""
        if self.task.make_reference is None:
            return
        pad = self.task.pad_token_id
        self.task.make_reference = lambda batch_size: CachedLM(model, batch_size, pad)
        self.batch.reference = self.task.make_reference(self.num_envs)  # its rows start at the next reset

    def get_rng_state(self) -> list[dict]:
        """The prompt-drawing RNG state of every sub-env (JSON-able), for exact resume."""
        return [rng.bit_generator.state for rng in self._rngs]

    def set_rng_state(self, state: list[dict]) -> None:
        if len(state) != self.num_envs:
            raise ValueError(f"got {len(state)} RNG states for {self.num_envs} envs")
        for rng, saved in zip(self._rngs, state):
            rng.bit_generator.state = saved

    def reset(self, *, seed: int | list[int | None] | None = None, options: dict | None = None):
        out = self.reset_tensor(seed=seed, options=options)
        return self.batch.observation(), {"prompt": np.array(out.prompts, dtype=object)}

    def reset_tensor(self, *, seed: int | list[int | None] | None = None, options: dict | None = None) -> VectorReset:
        """Start an episode in every sub-env; device tensors (see ``envs.api.VectorReset``)."""
        # Everything is checked before anything changes: a rejected reset leaves the env as it was.
        seeds, options = vector_seeds(seed, self.num_envs), reset_options(options)
        prompts = None
        if "prompt" in options:
            prompts = options["prompt"]
            prompts = [prompts] * self.num_envs if isinstance(prompts, str) else prompts
            if not isinstance(prompts, (list, tuple)) or len(prompts) != self.num_envs:
                raise ValueError(f"options['prompt'] must be a str or a list of {self.num_envs} str, got {prompts!r}")
            for i, p in enumerate(prompts):
                check_prompt(self.tokenizer, p, f"options['prompt'][{i}]")
        for i, s in enumerate(seeds):
            if s is not None or not self._started:
                self._rngs[i] = seeding.np_random(s)[0]
        rows = list(range(self.num_envs))
        if prompts is not None:
            self.batch.reset_rows(rows, [0] * self.num_envs, list(prompts))
        else:
            self.batch.reset_rows(rows, self._draw_prompts(rows))
        self._autoreset[:] = False
        self._started = True
        return VectorReset(self.batch.input_ids, self.batch.attention_mask, [e.prompt for e in self.batch.episodes])

    def _draw_prompts(self, rows: list[int]) -> list[int]:
        return [int(self._rngs[r].integers(len(self.task.prompts))) for r in rows]

    def step_tensor(self, actions: torch.Tensor) -> VectorStep:
        """Advance every sub-env by its action (any integer dtype); device tensors (see ``envs.api.VectorStep``)."""
        if not self._started:
            raise RuntimeError("step() called before reset()")
        actions = as_actions(actions, self.num_envs).to(self.task.device)
        self.batch.validate(actions)
        final_ids = final_mask = None
        if self.autoreset_mode == AutoresetMode.NEXT_STEP:
            resetting = self._autoreset.clone()
            result = self.batch.step(actions, active=~resetting)
            if resetting.any():  # these sub-envs start over now, their actions ignored
                self._reset_now(resetting)
                result.rewards[resetting] = 0.0
            self._autoreset = result.terminated.clone()
        else:  # SAME_STEP: sub-envs that terminate start over in this step
            result = self.batch.step(actions)
            resetting = result.terminated.clone()
            if resetting.any():
                final_ids, final_mask = self.batch.input_ids.clone(), self.batch.attention_mask.clone()
                self._reset_now(resetting)
        return VectorStep(
            self.batch.input_ids, self.batch.attention_mask, result.rewards, result.terminated,
            resetting, result.ref_logprobs, result.finished, final_ids, final_mask,
        )

    def _reset_now(self, rows_mask: torch.Tensor) -> None:
        rows = rows_mask.nonzero().flatten().tolist()
        self.batch.reset_rows(rows, self._draw_prompts(rows))

    def step(self, actions):
        out = self.step_tensor(as_actions(actions, self.num_envs))
        return (
            self.batch.observation(),
            out.rewards.cpu().numpy().astype(np.float64),
            out.terminated.cpu().numpy(),
            np.zeros(self.num_envs, dtype=bool),
            self._infos(out),
        )

    def _infos(self, out: VectorStep) -> dict:
        """Gymnasium vector infos: ``{key: values, "_key": which sub-envs have the key}``."""
        infos: dict = {}
        finished = out.finished
        same_step = self.autoreset_mode == AutoresetMode.SAME_STEP
        if out.ref_logprobs is not None:
            infos["ref_logprob"] = out.ref_logprobs.cpu().numpy().astype(np.float64)
            infos["_ref_logprob"] = np.ones(self.num_envs, dtype=bool) if same_step else ~out.reset.cpu().numpy()
        if out.final_input_ids is not None:
            ids, mask = out.final_input_ids.cpu().numpy(), out.final_attention_mask.cpu().numpy()
            ended = out.reset.cpu().numpy()
            final_obs = np.full(self.num_envs, None, dtype=object)
            for i in np.flatnonzero(ended):
                final_obs[i] = {"input_ids": ids[i].copy(), "attention_mask": mask[i].copy()}
            infos["final_obs"], infos["_final_obs"] = final_obs, ended
        if finished:
            mask = np.zeros(self.num_envs, dtype=bool)
            mask[list(finished)] = True
            for key in ("rm_score", "gold_score"):
                values = np.zeros(self.num_envs)
                for i, f in finished.items():
                    values[i] = f[key]
                infos[key], infos[f"_{key}"] = values, mask.copy()
            for key in ("text", "prompt"):
                values = np.full(self.num_envs, None, dtype=object)
                for i, f in finished.items():
                    values[i] = f[key]
                infos[key], infos[f"_{key}"] = values, mask.copy()
            first = next(iter(finished.values()))
            if "reward_terms" in first:  # a weighted reward: each term, as a nested info dict
                terms = {}
                for name in first["reward_terms"]:
                    values = np.zeros(self.num_envs)
                    for i, f in finished.items():
                        values[i] = f["reward_terms"][name]
                    terms[name], terms[f"_{name}"] = values, mask.copy()
                infos["reward_terms"], infos["_reward_terms"] = terms, mask.copy()
        return infos

    def action_masks(self) -> np.ndarray:
        """(num_envs, V) bool: the valid actions of each sub-env now."""
        return self.batch.action_masks().cpu().numpy()

    def render(self):
        texts = []
        for i in range(self.num_envs):
            ids, mask = self.batch.generated_ids(torch.tensor([i], device=self.task.device))
            completion = self.tokenizer.decode(ids[0][mask[0]].tolist(), skip_special_tokens=True)
            texts.append(self.batch.episodes[i].prompt + completion)
        return texts
