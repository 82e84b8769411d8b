"""Preference data: sample K completions per prompt, rank them with the gold scorer, expand to pairs.

The labeller is modelled as Bradley-Terry (Bradley & Terry, 1952): for two completions with gold
scores g_a and g_b,

    P(a > b) = sigmoid((g_a - g_b) / tau)

with tau the labeller's noise (tau -> 0: a noiseless labeller). A ranking of K completions is
drawn from the Plackett-Luce model with utilities g / tau, sampled by sorting g / tau + Gumbel
noise; every pair of that ranking then follows exactly the Bradley-Terry law above (the difference
of two Gumbels is logistic). As in InstructGPT (Ouyang et al. 2022), a ranking of K expands into
its K(K-1)/2 pairs. With tau = 0, exactly tied gold scores carry no preference and give no pair.

Pairs are stored as JSONL lines ``{"prompt": ..., "chosen": ..., "rejected": ...}`` (chosen and
rejected are continuations of the prompt); a user's own file in that format loads the same way.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pretrain import corpus, load_lm
from pretrain.config import hparam, require_positive, validate_fields
from pretrain.progress import progress_bar
from pretrain.sample import generate
from rlhf.gold import GoldScorer, VaderGold, review_texts
from rlhf.jsonl import read_records, write_records

FIELDS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str


def preference_probability(gold_a: float, gold_b: float, tau: float) -> float:
    """Bradley-Terry P(a > b) = sigmoid((g_a - g_b) / tau); tau = 0 is the noiseless limit."""
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    diff = gold_a - gold_b
    if tau == 0:
        return 1.0 if diff > 0 else 0.0 if diff < 0 else 0.5
    return 1.0 / (1.0 + math.exp(-diff / tau))


def sample_ranking(gold: Sequence[float], tau: float, rng: np.random.Generator) -> list[int]:
    """Indices from best to worst, drawn from Plackett-Luce with utilities gold / tau."""
    gold = np.asarray(gold, dtype=np.float64)
    if not np.isfinite(gold).all():
        raise ValueError(f"gold scores must be finite, got {gold.tolist()}")
    if tau == 0:
        return list(np.argsort(-gold, kind="stable"))
    utilities = gold / tau + rng.gumbel(size=len(gold))
    return list(np.argsort(-utilities, kind="stable"))


def ranking_to_pairs(
    prompt: str, completions: Sequence[str], gold: Sequence[float], ranking: Sequence[int], tau: float
) -> list[PreferencePair]:
    """All K(K-1)/2 pairs of a ranking (winner first); with tau = 0, tied gold scores are dropped."""
    pairs = []
    for hi, lo in itertools.combinations(ranking, 2):
        if tau == 0 and gold[hi] == gold[lo]:
            continue
        if completions[hi] == completions[lo]:
            continue  # identical texts carry no preference
        pairs.append(PreferencePair(prompt, completions[hi], completions[lo]))
    return pairs


@dataclass
class PreferenceConfig:
    """Sample K continuations per train prompt from a policy and label them with the gold scorer."""

    model: str = hparam("default", "policy that writes the completions: 'default' or an HF causal-LM dir")
    out: str = hparam("runs/preferences.jsonl", "output JSONL of {prompt, chosen, rejected}")
    num_prompts: int = hparam(3000, "train prompts to use")
    k: int = hparam(4, "completions per prompt (a ranking of K gives K(K-1)/2 pairs)")
    tau: float = hparam(0.0, "Bradley-Terry labeller noise; 0 = noiseless")
    max_new_tokens: int = hparam(32, "tokens per completion")
    temperature: float = hparam(1.0, "sampling temperature")
    batch_size: int = hparam(256, "prompts*k sampled per generate call")
    split: str = hparam("train", "prompt split: 'train' or 'test' (held-out)")
    seed: int = hparam(0, "seed for prompt choice, sampling and labeller noise")
    device: str = hparam("auto", "'auto', 'cpu' or 'cuda'")

    def __post_init__(self):
        validate_fields(self)
        if self.k < 2:
            raise ValueError(f"k must be >= 2 to form pairs, got {self.k}")
        if self.tau < 0:
            raise ValueError(f"tau must be >= 0, got {self.tau}")
        require_positive(self, "num_prompts", "max_new_tokens", "temperature", "batch_size")
        if self.split not in ("train", "test"):
            raise ValueError(f"unknown split {self.split!r}; expected 'train' or 'test'")


def sample_completions(
    model, tokenizer, prompts: Sequence[str], k: int, max_new_tokens: int, temperature: float,
    batch_size: int, seed: int, show_progress: bool = True,
) -> list[list[str]]:
    """K sampled continuations of each prompt, batched; deterministic per seed."""
    flat = [p for p in prompts for _ in range(k)]
    texts: list[str] = []
    with progress_bar("sampling") as bar:
        task = bar.add_task("sampling", total=len(flat), status="", visible=show_progress)
        for i, start in enumerate(range(0, len(flat), batch_size)):
            chunk = flat[start : start + batch_size]
            texts += generate(model, tokenizer, chunk, max_new_tokens, temperature, seed=seed + i)
            bar.update(task, advance=len(chunk))
    return [texts[i * k : (i + 1) * k] for i in range(len(prompts))]


def build_preferences(
    model,
    tokenizer,
    prompts: Sequence[str],
    k: int = 4,
    tau: float = 0.0,
    gold: GoldScorer | None = None,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    batch_size: int = 256,
    seed: int = 0,
) -> list[PreferencePair]:
    """Sample K completions per prompt, rank them through the Bradley-Terry labeller, expand to pairs.

    A pair with a blank side (the LM ended with EOS at once, or wrote only spaces) or two equal
    sides is left out, with a ``UserWarning`` giving the count: ``load_jsonl`` refuses such pairs,
    and the data a run builds must be the data it can read back (on resume, or in other processes)."""
    gold = gold or VaderGold()
    rng = np.random.default_rng(seed)
    samples = sample_completions(model, tokenizer, prompts, k, max_new_tokens, temperature, batch_size, seed)
    pairs: list[PreferencePair] = []
    for prompt, completions in zip(prompts, samples):
        scores = gold(review_texts([prompt] * k, completions))
        ranking = sample_ranking(scores, tau, rng)
        pairs += ranking_to_pairs(prompt, completions, scores, ranking, tau)
    kept = [p for p in pairs if p.chosen.strip() and p.rejected.strip() and p.chosen != p.rejected]
    if len(kept) < len(pairs):
        warnings.warn(f"left out {len(pairs) - len(kept)} of {len(pairs)} preference pairs with a blank or repeated completion",
                      stacklevel=2)
    return kept


def save_jsonl(pairs: Sequence[PreferencePair], path: str | Path) -> Path:
    return write_records((asdict(p) for p in pairs), path)


def load_jsonl(path: str | Path, allow_empty: bool = False) -> list[PreferencePair]:
    """Load ``{prompt, chosen, rejected}`` lines; errors name the file and line number.

    Every field must hold text and chosen must differ from rejected: a pair with an empty side or
    two equal sides carries no preference (DPO would train on it with zero gradient).
    """
    records = read_records(path, FIELDS, allow_empty, non_empty=FIELDS)
    for lineno, r in enumerate(records, start=1):
        if r["chosen"] == r["rejected"]:
            raise ValueError(f"{path}: record {lineno} has chosen == rejected ({r['chosen']!r}): it carries no preference")
    return [PreferencePair(**r) for r in records]


def prompt_texts(split: str, n: int, seed: int) -> list[str]:
    """``n`` shipped prompts of a split, a seeded random subset (all of them if fewer)."""
    prompts = [p.text for p in corpus.load_prompts(split)]
    if n >= len(prompts):
        return prompts
    idx = np.sort(np.random.default_rng(seed).choice(len(prompts), size=n, replace=False))
    return [prompts[i] for i in idx]


def make_preferences(cfg: PreferenceConfig) -> list[PreferencePair]:
    """``textgym preferences``: build and save a preference data set."""
    model, tokenizer = load_lm(cfg.model, device=cfg.device)
    prompts = prompt_texts(cfg.split, cfg.num_prompts, cfg.seed)
    pairs = build_preferences(
        model, tokenizer, prompts, cfg.k, cfg.tau, None, cfg.max_new_tokens, cfg.temperature, cfg.batch_size, cfg.seed
    )
    save_jsonl(pairs, cfg.out)
    print(f"{len(pairs)} pairs from {len(prompts)} prompts (k={cfg.k}, tau={cfg.tau}) -> {cfg.out}")
    return pairs
