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
completion, as text. The reward model scores (prompt, completion) (``RewardModel.rewards``: each
text canonically tokenised, so the reward is a function of the text, not of the policy's
segmentation) and the gold scorer scores prompt + completion. Demonstrations, instruction and
preface are context for the LM only; neither the reward model nor the gold scorer ever sees them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from envs.inputs import check_prompt
from pretrain import corpus, load_lm
from pretrain.config import check_float, check_int
from pretrain.model import load_config, resolve_device, resolve_model_path
from pretrain.tokenizer import load_tokenizer
from rlhf.gold import GoldScorer, VaderGold
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


@dataclass
class TextGenTask:
    tokenizer: object
    prompts: list[str]
    max_new_tokens: int
    kl_coef: float
    device: torch.device
    n_actions: int
    reference: torch.nn.Module | None = None
    reward_model: RewardModel | None = None
    gold: GoldScorer | None = None
    variant: str = "plain"
    shots: Sequence[str] = ()
    cot: bool = False
    top_k: int = 0
    top_p: float = 1.0
    max_context_tokens: int = 0  # longest context over the prompts (sets the observation length)
    toy_reward: object | None = None  # envs.toy: a reward function of token ids (replaces the RM)
    toy_ref_logits: torch.Tensor | None = None  # envs.toy: the fixed next-token logits of its reference
    valid_actions: torch.Tensor = field(default=None)  # (n_actions,) bool

    @cached_property
    def valid_actions_host(self) -> np.ndarray:
        """``valid_actions`` as a read-only numpy array (host-side checks without a device round trip)."""
        mask = self.valid_actions.cpu().numpy().copy()
        mask.setflags(write=False)
        return mask

    def make_reference(self, batch_size: int):
        """The reference LM advanced alongside B episodes (KV-cached), or None when not needed."""
        if self.reference is not None:
            from envs.kv_cache import CachedLM

            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
            return CachedLM(self.reference, batch_size, pad)
        if self.toy_ref_logits is not None:
            from envs.toy import ToyReference

            return ToyReference(self.toy_ref_logits, batch_size)
        return None

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


def read_prompts(prompts, split: str, tokenizer=None) -> list[str]:
    """``None`` = the shipped prompts of ``split``; a list of strings; or a UTF-8 text file, one per
    line. Each prompt is checked (``envs.inputs.check_prompt``) when a ``tokenizer`` is given."""
    if prompts is None:
        if split not in ("train", "test"):
            raise ValueError(f"unknown prompt_split {split!r}; expected 'train' or 'test'")
        return [p.text for p in corpus.load_prompts(split)]
    if isinstance(prompts, (str, Path)):
        path = Path(prompts)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file {path} does not exist (pass a list of strings or a text file)")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"prompts file {path} is not UTF-8 text (byte {err.start}: {err.object[err.start:err.start + 8]!r})") from err
        prompts = [line for line in text.splitlines() if line.strip()]
    elif isinstance(prompts, (bytes, dict)) or not hasattr(prompts, "__iter__"):
        raise ValueError(f"prompts must be None, a list of str or a text file path, got {type(prompts).__name__} {prompts!r}"[:300])
    prompts = list(prompts)
    if not prompts:
        raise ValueError("the prompt list is empty")
    for i, p in enumerate(prompts):
        if tokenizer is not None:
            check_prompt(tokenizer, p, f"prompts[{i}]")
        elif not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompts[{i}] must be a str holding text, got {p!r}")
    return prompts


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
    reward_model: str | Path | RewardModel = "default",
    prompts=None,
    prompt_split: str = "train",
    max_new_tokens: int = 24,
    kl_coef: float = 0.0,
    device: str | torch.device = "cpu",
    variant: str = "plain",
    shots: int = 2,
    cot: bool = False,
    top_k: int = 0,
    top_p: float = 1.0,
    gold: bool = True,
) -> TextGenTask:
    """Load everything an LM-backed TextGen env needs (validates every argument first: ``TypeError``
    for a wrong type, ``ValueError`` for a bad value, each naming the argument and the value)."""
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
    check_kl_coef(kl_coef)
    top_k, top_p = check_int("top_k", top_k, 0), check_float("top_p", top_p, 0.0, 1.0)
    if top_p == 0:
        raise ValueError("top_p must be in (0, 1], got 0.0")
    if variant not in ("plain", "few_shot", "instruct"):
        raise ValueError(f"unknown variant {variant!r}; expected 'plain', 'few_shot' or 'instruct'")
    shots = check_int("shots", shots, 0, DEMONSTRATION_POOL)
    for name, flag in (("cot", cot), ("gold", gold)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__} {flag!r}")
    device = resolve_device(device)
    model_dir = resolve_model_path(model)
    tokenizer = load_tokenizer(model_dir)
    needs_reference = kl_coef > 0 or top_k > 0 or top_p < 1
    reference = None
    if needs_reference:
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
    rm = reward_model if isinstance(reward_model, RewardModel) else RewardModel.load(reward_model, device=device)
    task = TextGenTask(
        tokenizer=tokenizer,
        prompts=read_prompts(prompts, prompt_split, tokenizer),
        max_new_tokens=max_new_tokens,
        kl_coef=kl_coef,
        device=device,
        n_actions=n_actions,
        reference=reference,
        reward_model=rm,
        gold=VaderGold() if gold else None,
        variant=variant,
        shots=demonstrations,
        cot=cot,
        top_k=top_k,
        top_p=top_p,
    )
    task.valid_actions = valid_action_mask(tokenizer, n_actions, device)
    task.max_context_tokens = max(
        len(task.encode(task.episode(p, i).context)) for i, p in enumerate(task.prompts)
    )
    if n_positions and task.max_len > n_positions:
        raise ValueError(
            f"the longest context ({task.max_context_tokens} tokens) + max_new_tokens ({max_new_tokens}) "
            f"exceeds the model's context of {n_positions} tokens"
        )
    return task


def check_kl_coef(kl_coef: float) -> None:
    """``kl_coef`` must be a finite number >= 0 (NaN would silently switch the KL shaping off)."""
    if isinstance(kl_coef, bool) or not (isinstance(kl_coef, (int, float)) and math.isfinite(kl_coef) and kl_coef >= 0):
        raise ValueError(f"kl_coef must be a finite number >= 0, got {kl_coef!r}")


def valid_action_mask(tokenizer, n_actions: int, device) -> torch.Tensor:
    """True for every token a policy may emit: all real tokens and EOS; never pad/other specials."""
    valid = torch.zeros(n_actions, dtype=torch.bool, device=device)
    valid[: len(tokenizer)] = True
    for token_id in tokenizer.all_special_ids:
        valid[token_id] = False
    valid[tokenizer.eos_token_id] = True
    return valid
