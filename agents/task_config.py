"""The task a run trains on, as CLI flags: the env id and what a user brings to it.

Every training config (``textgym train ppo|reinforce|dqn|sb3-*``) starts with these fields:

    --env ID              a registered env id; ``module:MyTask-v0`` imports ``module`` first
                          (Gymnasium's syntax), so a user's ``register(...)`` call runs
    --model DIR           the initial policy; the env is built on the same model (its tokenizer,
                          vocabulary and reference), so any HF causal-LM dir works end to end
    --reward SPEC ...     'default' | 'default-classifier' | a reward-model or classifier dir |
                          module:function; several (or the flag repeated) = their weighted sum
    --reward-weights W .. one weight per reward
    --reward-label L      the label a multi-label classifier reward reads (name or index)
    --reward-output O     'logit' (default), 'prob' or 'logprob' of that label
    --gold SPEC           the judge: 'vader', 'none', 'default-classifier', a classifier dir, module:function
    --prompts PATH        train prompts: text (one per line), JSONL, CSV, or a datasets save_to_disk dir
    --eval-prompts PATH   held-out prompts for ``textgym eval``
    --prompt-field NAME   the JSONL field / CSV column / dataset column holding the prompt

An empty value leaves the env's own setting (the registered kwargs, then the env's defaults). The
run's ``run.json`` keeps them, so ``--resume`` and ``textgym eval`` rebuild the same task.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import gymnasium as gym
from gymnasium.envs.registration import load_env_creator

from pretrain.config import hparam, import_user_module

OUTPUTS = ("logit", "prob", "logprob")


@dataclass
class TaskConfig:
    """The env id and the user's model, reward, judge and prompts (module docstring)."""

    env: str = hparam("TextGen-v0", "registered env id (TextGen-v0, TextGenFewShot-v0, TextGenInstruct-v0, TextGenClassifier-v0, "
                                    "TextGenToy-v0; module:MyTask-v0 imports module first)")
    model: str = hparam("auto", "initial policy: 'auto' (the env's LM; a tiny LM for the toy env), 'default' or an HF causal-LM "
                                "dir (the env is then built on it: its tokenizer, vocabulary and reference)")
    reward: list[str] | None = hparam(None, "the reward: 'default' (shipped reward model), 'default-classifier' (shipped "
                                            "classifier of human labels), a reward-model or *ForSequenceClassification dir, or "
                                            "module:function; several = their weighted sum (default: the env's own)")
    reward_weights: list[float] | None = hparam(None, "one weight per --reward (default: 1 each)")
    reward_label: str = hparam("", "the label a multi-label classifier reward reads, by name or index (default: 'positive')")
    reward_output: str = hparam("logit", "what a classifier reward reads of its label: 'logit', 'prob' or 'logprob'")
    gold: str = hparam("", "the gold judge (monitoring, eval): 'vader', 'none', 'default-classifier', a classifier dir or "
                           "module:function (default: the env's own, VADER)")
    prompts: str = hparam("", "train prompts: a text file (one per line), JSONL, CSV or a datasets save_to_disk dir "
                              "(default: the env's own)")
    eval_prompts: str = hparam("", "held-out prompts for textgym eval, same formats (default: the 'test' split of a DatasetDict "
                                   "--prompts, else the env's held-out prompts)")
    prompt_field: str = hparam("prompt", "the JSONL field / CSV column / dataset column that holds the prompt")

    def validate_task(self) -> None:
        """``ValueError`` naming the field for settings that cannot work together."""
        if self.reward is not None and not self.reward:
            raise ValueError("--reward needs at least one reward")
        if self.reward_weights is not None:
            if self.reward is None:
                raise ValueError("--reward-weights needs --reward (one weight per reward)")
            if len(self.reward_weights) != len(self.reward):
                raise ValueError(f"got {len(self.reward)} --reward but {len(self.reward_weights)} --reward-weights; give one weight per reward")
        if self.reward_output not in OUTPUTS:
            raise ValueError(f"unknown reward_output {self.reward_output!r}; expected one of {', '.join(OUTPUTS)}")
        if not self.prompt_field:
            raise ValueError("prompt_field must name a field")


def task_kwargs(cfg: TaskConfig, split: str = "train") -> dict:
    """The env kwargs that ``cfg`` sets (not the model: see ``agents.run.make_env``). ``split="test"``:
    the held-out prompts (``eval_prompts``, else the 'test' split of ``prompts`` if it is a
    DatasetDict dir, else the env's own held-out prompts)."""
    kwargs: dict = {}
    if cfg.reward is not None:
        kwargs["reward"] = list(cfg.reward) if len(cfg.reward) > 1 or cfg.reward_weights is not None else cfg.reward[0]
    if cfg.reward_weights is not None:
        kwargs["reward_weights"] = list(cfg.reward_weights)
    if cfg.reward_label:
        kwargs["reward_label"] = cfg.reward_label
    if cfg.reward_output != "logit":
        kwargs["reward_output"] = cfg.reward_output
    if cfg.gold:
        kwargs["gold"] = cfg.gold
    prompts = cfg.eval_prompts if split == "test" and cfg.eval_prompts else cfg.prompts
    if prompts:
        kwargs["prompts"] = prompts
    if cfg.prompt_field != "prompt":
        kwargs["prompt_field"] = cfg.prompt_field
    return kwargs


def resolve_env_id(env_id: str) -> str:
    """The registered id ``env_id`` names; ``module:Id`` imports ``module`` first (the current
    directory is importable, as with ``python -m``). ``ValueError`` listing the ids otherwise."""
    import envs

    if not isinstance(env_id, str) or not env_id:
        raise ValueError(f"env must be a registered env id, got {env_id!r}")
    module, sep, name = env_id.rpartition(":")
    if sep:
        import_user_module(module, f"env {env_id!r} (the module should register {name!r})")
    else:
        name = env_id
    if name not in gym.registry:
        ours = ", ".join(envs.ENV_IDS)
        hint = f"; {module!r} did not register it" if sep else " (a user's env: --env my_module:MyTask-v0 imports my_module first)"
        raise ValueError(f"unknown env id {name!r}{hint}; the suite's ids: {ours}")
    return name


def env_parameters(env_id: str) -> tuple[set[str], bool]:
    """The keyword arguments the env's vector entry point takes (and whether it takes ``**kwargs``)."""
    spec = gym.spec(env_id)
    entry = spec.vector_entry_point or spec.entry_point
    if isinstance(entry, str):
        entry = load_env_creator(entry)
    params = inspect.signature(entry).parameters
    open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if open_kwargs and isinstance(entry, type):  # a **env_kwargs vector env forwards them to the single env's task
        single = spec.entry_point
        single = load_env_creator(single) if isinstance(single, str) else single
        if single is not None:
            params = {**params, **inspect.signature(single).parameters}
            open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(single).parameters.values())
    return set(params), open_kwargs
