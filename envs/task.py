"""What a TextGen environment is made of: tokenizer, prompts, reference LM, reward model, gold scorer.

A :class:`TextGenTask` is built once (models loaded, prompts tokenized) and shared by the single env
and the vector env, which both run the same batched episode logic in ``envs.batch``. The variants
of the suite differ only in how a prompt becomes the LM's context:

* ``plain``     context = the prompt (a review opening).
* ``few_shot``  context = k positive demonstration reviews, each followed by EOS, then the prompt
                (the LM saw reviews separated by EOS in pretraining).
* ``instruct``  context = an instruction ("Write a glowing review of a film about <topic>: "),
                optionally after a chain-of-thought style preface, then the prompt.

What is judged is the same in every variant: *the review*, i.e. the prompt followed by the
completion, as text. The reward (``envs.rewards``: by default the reward model, which scores
(prompt, completion) with each text canonically tokenised; or a classifier, a Python function, a
weighted sum) is a function of the text, not of the policy's segmentation, and the gold scorer
(``rlhf.gold``) scores prompt + completion. Demonstrations, instruction and preface are context for
the LM only; neither the reward nor the gold scorer ever sees them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from envs.prompts import read_prompts
from envs.rewards import RewardFunction, make_reward
from pretrain import corpus, load_lm
from pretrain.config import check_float, check_int
from pretrain.kv_cache import CachedLM
from pretrain.model import load_config, resolve_device, resolve_model_path
from pretrain.tokenizer import load_tokenizer
from rlhf.gold import GoldScorer, VaderGold, load_gold
from rlhf.reward_model import RewardModel

INSTRUCTION = "Write a glowing review of a film about {topic}: "
COT_PREFACE = "First think about what makes the film great, then write the review. "
TOPICS = (
    "a heist that goes wrong", "a haunted house", "two rival chefs", "a small-town detective",
    "a family road trip", "a boxer's last fight", "first love in high school", "a space rescue mission",
    "a struggling jazz musician", "a war veteran coming home", "a talking dog", "a courtroom battle",
    "a zombie outbreak", "an aging rock band", "a mountain expedition", "a con artist and a nun",
)


@dataclass
class Episode:
    """The text side of one prompt: what the LM is conditioned on, and the prompt that is judged."""

    prompt: str  # the task prompt (a review opening): the RM scores (prompt, completion), gold prompt + completion
    context: str  # what the LM continues (the prompt, after demonstrations or an instruction)


class Reference(Protocol):
    """A reference LM advanced alongside B episodes: ``pretrain.kv_cache.CachedLM``, or the toy's fixed one."""

    next_logits: torch.Tensor  # (B, V) logits of every row's next token

    def reset_rows(self, rows: Sequence[int], prompts: Sequence[Sequence[int]]) -> torch.Tensor: ...

    def step(self, tokens: torch.Tensor) -> torch.Tensor: ...


@dataclass
class TextGenTask:
    """Everything a TextGen environment is made of, built once and shared by its single and vector envs.

    Built by :func:`build_lm_task` (an LM's tokenizer and reference, a reward model) or
    ``envs.toy.build_toy_task``; any other task is built the same way, with its own reward function
    and reference.

    Attributes:
        tokenizer: the env's tokenizer; its token ids are the actions.
        prompts: the prompts episodes are drawn from (non-empty, each checked by ``envs.inputs.check_prompt``).
        max_new_tokens: the episode horizon in tokens.
        ref_logprob_coef: beta of the per-step shaping reward beta * log pi_ref(a_t | s_t), >= 0.
        device: where the episode state and the models live.
        n_actions: V, the logit width of the env's LM (>= the tokenizer's size).
        valid_actions: (V,) bool, the token ids a policy may emit.
        reward_fn: pays the episodes that finish in a step (``envs.rewards``).
        make_reference: ``batch_size -> Reference``, the reference LM advanced alongside the
            episodes (KV-cached), or None when no step needs it (no shaping, no top-k/top-p).
        gold: the gold scorer of the judged text (prompt + completion), monitoring only; or None.
        variant, shots, cot: how a prompt becomes the LM's context (module docstring).
        top_k, top_p: restrict the valid actions to the reference's top-k / nucleus tokens (0, 1 = off).
        max_context_tokens: the longest context over the prompts (computed when 0); the observation
            length is this + ``max_new_tokens``.
        lm_path: the causal-LM dir whose tokenizer this is (None: no pretrained LM speaks it).
        reference_model: the dir of the reference LM that ``make_reference`` runs, or None.
    """

    tokenizer: object
    prompts: list[str]
    max_new_tokens: int
    ref_logprob_coef: float
    device: torch.device
    n_actions: int
    valid_actions: torch.Tensor
    reward_fn: RewardFunction
    make_reference: Callable[[int], Reference] | None = None
    gold: GoldScorer | None = None
    variant: str = "plain"
    shots: Sequence[str] = ()
    cot: bool = False
    top_k: int = 0
    top_p: float = 1.0
    max_context_tokens: int = 0
    lm_path: Path | None = None
    reference_model: Path | None = None

    def __post_init__(self):
        if not self.max_context_tokens:
            self.max_context_tokens = max(len(self.encode(self.episode(p, i).context)) for i, p in enumerate(self.prompts))

    @cached_property
    def valid_actions_host(self) -> np.ndarray:
        """``valid_actions`` as a read-only numpy array (host-side checks without a device round trip)."""
        mask = self.valid_actions.cpu().numpy().copy()
        mask.setflags(write=False)
        return mask

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

    def episode(self, prompt: str, topic_index: int = 0) -> Episode:
        if self.variant == "few_shot":
            eos = self.tokenizer.eos_token
            return Episode(prompt, "".join(s + eos for s in self.shots) + prompt)
        if self.variant == "instruct":
            topic = TOPICS[topic_index % len(TOPICS)]
            context = (COT_PREFACE if self.cot else "") + INSTRUCTION.format(topic=topic) + prompt
            return Episode(prompt, context)
        return Episode(prompt, prompt)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @property
    def max_len(self) -> int:
        """Observation length: the longest context plus the generation budget."""
        return self.max_context_tokens + self.max_new_tokens


DEMONSTRATION_POOL = 400  # short positive train reviews the few-shot demonstrations are chosen from


def positive_demonstrations(k: int, seed: int = 0, max_words: int = 30) -> list[str]:
    """``k`` (<= ``DEMONSTRATION_POOL``) short train reviews with the highest gold (VADER) scores
    among a seeded pool of ``DEMONSTRATION_POOL``, for few-shot prompting."""
    check_int("shots", k, 0, DEMONSTRATION_POOL)
    if k == 0:
        return []
    short = [r.text for r in corpus.reviews("train") if r.label == 1 and len(r.text.split(" ")) <= max_words]
    rng = np.random.default_rng(seed)
    pool = [short[i] for i in rng.choice(len(short), size=min(len(short), DEMONSTRATION_POOL), replace=False)]
    scores = VaderGold()(pool)
    order = np.argsort(scores, kind="stable")[::-1]
    return [pool[i] for i in order[:k]]


def build_lm_task(
    model: str | Path = "default",
    reward_model: str | Path | RewardModel | None = None,
    prompts=None,
    prompt_split: str = "train",
    max_new_tokens: int = 24,
    ref_logprob_coef: float = 0.0,
    device: str | torch.device = "cpu",
    variant: str = "plain",
    shots: int = 2,
    cot: bool = False,
    top_k: int = 0,
    top_p: float = 1.0,
    gold=True,
    kl_coef: float | None = None,
    reward=None,
    reward_weights: Sequence[float] | None = None,
    reward_label: str | int | None = None,
    reward_output: str = "logit",
    prompt_field: str = "prompt",
) -> TextGenTask:
    """Load everything an LM-backed TextGen env needs (validates every argument first: ``TypeError``
    for a wrong type, ``ValueError`` for a bad value, each naming the argument and the value).

    ``reward`` (``reward_model`` is its older name: give one of them) is any reward spec of
    ``envs.rewards.make_reward`` or a list of them with ``reward_weights``; ``reward_label`` /
    ``reward_output`` choose what a multi-label classifier's score is. ``gold`` is any spec of
    ``rlhf.gold.load_gold`` (True = VADER). ``prompts`` is any source of ``envs.prompts.read_prompts``
    (``prompt_field``: the JSONL field / CSV column / dataset column), ``prompt_split`` the split
    asked of the shipped prompts or a ``DatasetDict``.
    """
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
    ref_logprob_coef = renamed_kl_coef(ref_logprob_coef, kl_coef)
    top_k, top_p = check_int("top_k", top_k, 0), check_float("top_p", top_p, 0.0, 1.0)
    if top_p == 0:
        raise ValueError("top_p must be in (0, 1], got 0.0")
    if variant not in ("plain", "few_shot", "instruct"):
        raise ValueError(f"unknown variant {variant!r}; expected 'plain', 'few_shot' or 'instruct'")
    shots = check_int("shots", shots, 0, DEMONSTRATION_POOL)
    if not isinstance(cot, bool):
        raise TypeError(f"cot must be a bool, got {type(cot).__name__} {cot!r}")
    if reward is not None and reward_model is not None:
        raise ValueError("give reward or its older name reward_model, not both")
    reward = reward if reward is not None else reward_model if reward_model is not None else "default"
    device = resolve_device(device)
    model_dir = resolve_model_path(model)
    tokenizer = load_tokenizer(model_dir)
    reference = None
    if ref_logprob_coef > 0 or top_k > 0 or top_p < 1:  # a step needs the reference's next-token distribution
        reference, _ = load_lm(model_dir, device=device)
        reference.requires_grad_(False)
    config = load_config(model_dir)
    n_actions = int(config.vocab_size)
    if len(tokenizer) > n_actions:
        raise ValueError(f"tokenizer in {model_dir} has {len(tokenizer)} tokens but the model only {n_actions} logits")
    n_positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if n_positions and max_new_tokens >= n_positions:
        raise ValueError(f"max_new_tokens={max_new_tokens} does not fit the model's context of {n_positions} tokens with a prompt")
    demonstrations = positive_demonstrations(shots) if variant == "few_shot" else ()
    if demonstrations and n_positions:  # before encoding every prompt after them
        demo_tokens = sum(len(tokenizer(d + tokenizer.eos_token, add_special_tokens=False)["input_ids"]) for d in demonstrations)
        if demo_tokens + max_new_tokens >= n_positions:
            raise ValueError(f"shots={shots} demonstrations take {demo_tokens} tokens; with max_new_tokens={max_new_tokens} "
                             f"they leave no room for a prompt in the model's context of {n_positions} tokens")
    task_prompts = read_prompts(prompts, prompt_split, tokenizer, prompt_field)
    reward_fn = make_reward(reward, device, reward_weights, reward_label, reward_output)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    task = TextGenTask(
        tokenizer=tokenizer,
        prompts=task_prompts,
        max_new_tokens=max_new_tokens,
        ref_logprob_coef=ref_logprob_coef,
        device=device,
        n_actions=n_actions,
        valid_actions=valid_action_mask(tokenizer, n_actions, device),
        reward_fn=reward_fn,
        make_reference=None if reference is None else (lambda batch_size: CachedLM(reference, batch_size, pad)),
        gold=load_gold(gold, device),
        variant=variant,
        shots=demonstrations,
        cot=cot,
        top_k=top_k,
        top_p=top_p,
        lm_path=model_dir,
        reference_model=model_dir if reference is not None else None,
    )
    if n_positions and task.max_len > n_positions:
        raise ValueError(
            f"the longest context ({task.max_context_tokens} tokens) + max_new_tokens ({max_new_tokens}) "
            f"exceeds the model's context of {n_positions} tokens"
        )
    return task


def check_ref_logprob_coef(coef: float, name: str = "ref_logprob_coef") -> float:
    """The shaping coefficient must be a finite number >= 0 (NaN would silently switch the shaping off)."""
    if isinstance(coef, bool) or not (isinstance(coef, (int, float)) and math.isfinite(coef) and coef >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {coef!r}")
    return float(coef)


def renamed_kl_coef(ref_logprob_coef: float, kl_coef: float | None) -> float:
    """``ref_logprob_coef``, or ``kl_coef`` (its old name: deprecated, with a warning)."""
    if kl_coef is None:
        return check_ref_logprob_coef(ref_logprob_coef)
    warnings.warn("the env's kl_coef is now called ref_logprob_coef (it is beta of the beta * log pi_ref(a_t|s_t) "
                  "shaping, not an agent's full KL penalty); kl_coef will be removed", DeprecationWarning, stacklevel=3)
    if ref_logprob_coef:
        raise ValueError("give ref_logprob_coef or its old name kl_coef, not both")
    return check_ref_logprob_coef(kl_coef, "kl_coef")


def valid_action_mask(tokenizer, n_actions: int, device) -> torch.Tensor:
    """True for every token a policy may emit: all real tokens and EOS; never pad/other specials."""
    valid = torch.zeros(n_actions, dtype=torch.bool, device=device)
    valid[: len(tokenizer)] = True
    for token_id in tokenizer.all_special_ids:
        valid[token_id] = False
    valid[tokenizer.eos_token_id] = True
    return valid
