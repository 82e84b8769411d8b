"""The batched vector env as an SB3 ``VecEnv``: one tensor step for all sub-envs (see ``agents.sb3``)."""

from __future__ import annotations

import numpy as np
import torch
from stable_baselines3.common.vec_env import VecEnv, VecMonitor

import envs  # noqa: F401  (registers the suite)
from agents.run import make_env
from envs.api import TextVectorEnv


# -- the batched vector env as an SB3 VecEnv ---------------------------------------------------------
class SB3VecEnv(VecEnv):
    """SB3 ``VecEnv`` over a ``TextVectorEnv(autoreset_mode="same_step")``: one tensor step for all envs.

    ``infos[i]`` carries ``ref_logprob`` every step (with a reference loaded) and, when episode i
    ends, ``rm_score``, ``gold_score``, ``text``, ``prompt`` and ``terminal_observation``.
    """

    def __init__(self, env: TextVectorEnv):
        if env.metadata["autoreset_mode"].name != "SAME_STEP":
            raise ValueError("SB3VecEnv needs the vector env in same-step autoreset mode: "
                             "TextVectorEnv(..., autoreset_mode='same_step')")
        self.env = env
        super().__init__(env.num_envs, env.single_observation_space, env.single_action_space)

    def reset(self):
        seeds = self._seeds if any(s is not None for s in self._seeds) else None
        options = None
        if any(self._options):
            prompts = [o.get("prompt") for o in self._options]
            if not all(prompts) or any(set(o) - {"prompt"} for o in self._options):
                raise ValueError(f"SB3VecEnv reset options must give every env a 'prompt' and nothing else, got {self._options}")
            options = {"prompt": prompts}
        obs, _ = self.env.reset(seed=seeds, options=options)
        self._reset_seeds()
        self._reset_options()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions).reshape(self.num_envs)

    def step_wait(self):
        if self._actions.dtype.kind not in "iu":
            raise ValueError(f"actions must be integer token ids, got dtype {self._actions.dtype}")
        out = self.env.step_tensor(torch.as_tensor(self._actions))
        infos = [{"TimeLimit.truncated": False} for _ in range(self.num_envs)]
        if out.ref_logprobs is not None:
            for info, lp in zip(infos, out.ref_logprobs.tolist()):
                info["ref_logprob"] = lp
        dones = out.terminated.cpu().numpy()
        if dones.any():
            final_ids, final_mask = out.final_input_ids.cpu().numpy(), out.final_attention_mask.cpu().numpy()
            for i in np.flatnonzero(dones):
                infos[i].update(out.finished[int(i)])
                infos[i]["terminal_observation"] = {"input_ids": final_ids[i].copy(), "attention_mask": final_mask[i].copy()}
        obs = {"input_ids": out.input_ids.cpu().numpy().copy(), "attention_mask": out.attention_mask.cpu().numpy().copy()}
        return obs, out.rewards.cpu().numpy().astype(np.float32), dones, infos

    def close(self) -> None:
        self.env.close()

    def get_attr(self, attr_name, indices=None):
        return [getattr(self.env, attr_name)] * len(list(self._get_indices(indices)))

    def set_attr(self, attr_name, value, indices=None) -> None:
        raise AttributeError(f"the {self.num_envs} sub-envs share one batched env; set {attr_name!r} on SB3VecEnv.env")

    def env_method(self, method_name, *method_args, indices=None, **method_kwargs):
        if method_name == "action_masks":  # sb3-contrib's MaskablePPO asks each sub-env
            masks = self.env.action_masks()
            return [masks[i] for i in self._get_indices(indices)]
        raise AttributeError(f"SB3VecEnv does not forward {method_name!r} to sub-envs (they are rows of one batched env)")

    def env_is_wrapped(self, wrapper_class, indices=None):
        return [False] * len(list(self._get_indices(indices)))

    def get_images(self):
        return [None] * self.num_envs


def make_sb3_vec_env(env_id: str = "TextGen-v0", num_envs: int = 16, seed: int = 0, device="cpu", **env_kwargs) -> VecMonitor:
    """The registered env's batched version as an SB3 VecEnv, with SB3's episode statistics."""
    vector = make_env(env_id, num_envs, device, seed, autoreset_mode="same_step", **env_kwargs)
    venv = SB3VecEnv(vector)
    venv.seed(seed)
    return VecMonitor(venv)
