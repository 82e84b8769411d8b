"""TextGenToy-v0: a tiny, fast TextGen env with a known optimal policy, for tests and smoke runs.

Vocabulary (8 words, word-level): ``<|endoftext|> good bad the movie plot was fine``; EOS doubles
as the pad token, so every action is valid. Prompts: "the movie was", "the plot was". Horizon
``max_new_tokens`` (default 4). The reward, given when the episode ends, is

    R = (#good - #bad) / max_new_tokens

so the optimal policy (with ``ref_logprob_coef = 0``) writes "good" at every step and earns exactly 1.0;
stopping early (EOS) or writing anything else earns less. The reference "LM" is a fixed,
state-independent next-token distribution that prefers neutral words, so with ``ref_logprob_coef > 0``
the shaping term beta * log pi_ref(a) pulls against "good" exactly like a real reference does.
The task is built with the same ``TextGenTask`` constructor as the LM tasks: its reward function
(``ToyReward``) counts token ids, its reference (``ToyReference``) is a fixed distribution.
The gold score is R itself.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from envs.prompts import read_prompts
from envs.task import TextGenTask, renamed_kl_coef, valid_action_mask
from envs.text_gen import TextGenEnv
from envs.vector import TextGenVectorEnv
from pretrain.config import check_int
from pretrain.model import resolve_device

WORDS = ["<|endoftext|>", "good", "bad", "the", "movie", "plot", "was", "fine"]
PROMPTS = ["the movie was", "the plot was"]
GOOD, BAD = WORDS.index("good"), WORDS.index("bad")
# Reference next-token probabilities: neutral words are likely, "good"/"bad" are rare.
REF_PROBS = torch.tensor([0.10, 0.05, 0.05, 0.20, 0.15, 0.15, 0.15, 0.15])


def toy_tokenizer() -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<|endoftext|>"))
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=WORDS[0], pad_token=WORDS[0], unk_token=WORDS[0], padding_side="left"
    )


class ToyReference:
    """Same interface as ``CachedLM``; the next-token logits never depend on the context."""

    def __init__(self, logits: torch.Tensor, batch_size: int):
        self.next_logits = logits.view(1, -1).expand(batch_size, -1).clone()

    def reset_rows(self, rows, prompts):
        return self.next_logits[list(rows)]

    def step(self, tokens):
        return self.next_logits


class ToyReward:
    """R = (#good - #bad) / horizon, from the generated token ids (an ``envs.rewards.RewardFunction``)."""

    def __init__(self, horizon: int):
        self.horizon = horizon

    def __call__(self, prompts, completions, completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
        good = ((completion_ids == GOOD) & completion_mask).sum(1)
        bad = ((completion_ids == BAD) & completion_mask).sum(1)
        return (good - bad).float() / self.horizon


class ToyGold:
    def __init__(self, horizon: int):
        self.horizon = horizon

    def __call__(self, texts):
        # The prompts never contain these words (checked), so counting substrings counts completion words.
        return [(t.count("good") - t.count("bad")) / self.horizon for t in texts]


MAX_NEW_TOKENS = 1024  # the toy's horizon; its reward is (#good - #bad) / horizon


def build_toy_task(max_new_tokens: int = 4, ref_logprob_coef: float = 0.0, device: str = "cpu", prompts=None,
                   kl_coef: float | None = None) -> TextGenTask:
    """The toy task; ``max_new_tokens`` in [1, 1024], ``prompts`` (None = the two defaults) use only
    the vocabulary's words. ``TypeError`` / ``ValueError`` naming the argument otherwise."""
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1, MAX_NEW_TOKENS)
    ref_logprob_coef = renamed_kl_coef(ref_logprob_coef, kl_coef)
    tokenizer = toy_tokenizer()
    device = resolve_device(device)
    ref_logits = REF_PROBS.log().to(device)
    return TextGenTask(
        tokenizer=tokenizer,
        prompts=PROMPTS.copy() if prompts is None else read_prompts(prompts, "train", tokenizer),
        max_new_tokens=max_new_tokens,
        ref_logprob_coef=ref_logprob_coef,
        device=device,
        n_actions=len(WORDS),
        valid_actions=valid_action_mask(tokenizer, len(WORDS), device),
        reward_fn=ToyReward(max_new_tokens),
        make_reference=lambda batch_size: ToyReference(ref_logits, batch_size),
        gold=ToyGold(max_new_tokens),
    )


class TextGenToyEnv(TextGenEnv):
    """TextGen on an 8-word vocabulary; see the module docstring for the optimal policy."""

    def __init__(self, max_new_tokens: int = 4, ref_logprob_coef: float = 0.0, device: str = "cpu", prompts=None,
                 render_mode=None, kl_coef: float | None = None):
        super().__init__(task=build_toy_task(max_new_tokens, ref_logprob_coef, device, prompts, kl_coef), render_mode=render_mode)


class TextGenToyVectorEnv(TextGenVectorEnv):
    """The toy task's native vector env (see ``envs.vector``)."""

    def __init__(self, num_envs: int = 8, max_new_tokens: int = 4, ref_logprob_coef: float = 0.0, device: str = "cpu",
                 prompts=None, render_mode=None, autoreset_mode="next_step", kl_coef: float | None = None):
        super().__init__(num_envs=num_envs, task=build_toy_task(max_new_tokens, ref_logprob_coef, device, prompts, kl_coef),
                         render_mode=render_mode, autoreset_mode=autoreset_mode)
