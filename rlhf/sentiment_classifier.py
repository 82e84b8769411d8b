"""A sentiment classifier trained on the human review labels: the second shipped reward (``textgym classifier``).

The reference IMDb experiment of RLHF puts a *classifier* where our first reward puts a learned
preference model. Ziegler et al. (2019, "Fine-Tuning Language Models from Human Preferences") set the
task of continuing a text with positive sentiment and, to study RL without humans in the loop, scored
it with a trained sentiment classifier; its IMDb re-creations (TRL's ``gpt2-sentiment`` example,
trlx's ``ppo_sentiments``, RL4LMs' IMDb task) reward the policy with a classifier fine-tuned on the
*human* IMDb labels (``lvwerra/distilbert-imdb``: P(POSITIVE), or its logit) and judge the result with
an evaluator outside the loop. Here the reward is this classifier and the judge stays VADER
(``rlhf.gold``), which neither reward is trained on.

    p_theta(POSITIVE | x) = softmax(W h_[CLS](x))_1           a small BERT read at its [CLS] token
    loss = -log p_theta(y | x)                                 y: the review's human label (0/1)

* Tokenizer: a lowercasing WordPiece (BERT conventions: ``[PAD] [UNK] [CLS] [SEP] [MASK]``) trained
  on the train-split review texts only, so the reward reads text through a vocabulary different from
  the policy LM's byte-level BPE (as DistilBERT's does in the reference experiment): the policy
  cannot game the reward through token ids, only through the text.
* Model: ``BertForSequenceClassification`` trained from scratch (2 layers, hidden 128 by default),
  ``id2label = {0: "NEGATIVE", 1: "POSITIVE"}``.
* Data: each epoch, every train review is seen whole, and a random ``prefix_fraction`` of them also as
  an extra text cut to its first ``min_prefix_words``..``max_prefix_words`` words (same label). The
  reward scores short texts (a 2-8 word opening plus 16 generated tokens, ~15-30 words). Measured on
  the validation split after one epoch (accuracy on whole reviews / on the first 24 / 12 / 8 words;
  NLL on the first 8 words, ln 2 = 0.69 is a coin flip):

      whole reviews only                  0.817 / 0.738 / 0.699 / 0.669   NLL8 0.72 (over-confident)
      half replaced by openings (earlier) 0.785 / 0.706 / 0.671 / 0.649   NLL8 0.64
      whole + openings of half (default)  0.813 / 0.732 / 0.709 / 0.680   NLL8 0.61

  Replacing whole reviews by openings loses signal; adding openings keeps the whole-review accuracy
  and makes the classifier better on 8-12 words and calibrated on short texts, for ~20% more time.
* Truncation: a whole review is truncated at ``max_length`` tokens (about the first 90 words) in
  training and in the full-review evaluation (``accuracy``: "full reviews, truncated at max_length").
  The shipped tokenizer has ``model_max_length = max_length``: plain transformers warns about a longer
  text and :func:`positive_probabilities` refuses one unless asked to truncate, so nothing is cut
  silently when the classifier scores episodes.

Held-out evaluation on the test split (``final/metrics.json``, and the manifest of the shipped dir):
accuracy on full reviews, accuracy on short prefixes (the first 24 words of each review), and on those
prefixes the agreement with VADER (fraction of texts with sign(compound) == the predicted label; a
compound of exactly 0 agrees with neither label) and the Spearman correlation of P(POSITIVE) with
VADER's compound. ``--ship`` writes fp16 safetensors + tokenizer + ``manifest.json`` into
``rlhf/default_classifier/`` (:func:`default_classifier_dir`); plain
``AutoModelForSequenceClassification.from_pretrained(dir)`` + ``AutoTokenizer.from_pretrained(dir)``
load it (right padding: BERT's positions count from the start of the sequence).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizer,
    PreTrainedTokenizerBase,
    get_linear_schedule_with_warmup,
)

from pretrain import corpus
from pretrain.checkpoint import StepRun
from pretrain.config import hparam, require_non_negative, require_positive, require_unit_interval, validate_fields
from pretrain.corpus import Review, opening
from pretrain.model import resolve_device, sha256_file
from pretrain.optim import check_finite, check_model_finite, optimizer_step
from pretrain.progress import progress_bar
from rlhf.classifier import default_classifier_dir  # rlhf/default_classifier/: what --ship writes
from rlhf.gold import VaderGold

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0-4
ID2LABEL = {0: "NEGATIVE", 1: "POSITIVE"}
PREFIX_WORDS = 24  # the short-text evaluation: the first 24 words of each held-out review


@dataclass
class ClassifierConfig:
    """Train a sentiment classifier on the human review labels; defaults build the shipped one."""

    out: str = hparam("", "run dir: TensorBoard events, checkpoint-<step>/, final/ (the classifier) (default: runs/classifier; "
                          "with --resume: the resumed run's dir)")
    vocab_size: int = hparam(8000, "WordPiece vocabulary size (trained on the train-split reviews)")
    max_length: int = hparam(128, "tokens per text, [CLS] and [SEP] included; longer reviews are truncated in training")
    n_layer: int = hparam(2, "transformer layers")
    hidden: int = hparam(128, "hidden size")
    heads: int = hparam(2, "attention heads (must divide hidden)")
    intermediate: int = hparam(512, "feed-forward size")
    dropout: float = hparam(0.1, "dropout of the hidden states and attention probabilities in training")
    prefix_fraction: float = hparam(0.5, "each epoch, this fraction of the reviews is also seen cut to a short opening (an extra text)")
    min_prefix_words: int = hparam(4, "shortest opening (words)")
    max_prefix_words: int = hparam(48, "longest opening (words)")
    train_reviews: int = hparam(0, "train on a fixed sample of N train-split reviews (0 = all)")
    eval_reviews: int = hparam(0, "evaluate on a fixed sample of N validation / test reviews (0 = all)")
    epochs: int = hparam(1, "passes over the train reviews")
    batch_size: int = hparam(32, "texts per step (grouped by length)")
    lr: float = hparam(1e-3, "peak AdamW learning rate (linear warmup and decay)")
    warmup_ratio: float = hparam(0.05, "fraction of steps spent warming up")
    weight_decay: float = hparam(0.01, "AdamW weight decay")
    max_grad_norm: float = hparam(1.0, "clip the global gradient norm (0 = off)")
    seed: int = hparam(0, "seed")
    device: str = hparam("auto", "'auto', 'cpu' or 'cuda'")
    ship: bool = hparam(False, "write the result (fp16) + manifest into the package's default_classifier dir")
    resume: str = hparam("", "continue the run in this dir from its newest complete checkpoint, with its settings")
    overwrite: bool = hparam(False, "start a new run in --out even if it holds another run or other files")
    checkpoint_every: int = hparam(200, "optimizer steps between checkpoints (0 = only on Ctrl-C)")
    keep_checkpoints: int = hparam(2, "complete checkpoints kept (older ones are deleted once a newer one is complete)")

    def __post_init__(self):
        validate_fields(self)
        require_positive(self, "vocab_size", "max_length", "n_layer", "hidden", "heads", "intermediate", "min_prefix_words",
                         "epochs", "batch_size", "lr")
        require_non_negative(self, "train_reviews", "eval_reviews", "weight_decay", "max_grad_norm", "checkpoint_every")
        require_positive(self, "keep_checkpoints")
        require_unit_interval(self, "prefix_fraction")
        if self.vocab_size < 2 * len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size must be >= {2 * len(SPECIAL_TOKENS)}, got {self.vocab_size}")
        if self.max_length < 3:
            raise ValueError(f"max_length must be >= 3 ([CLS], a token, [SEP]), got {self.max_length}")
        if self.hidden % self.heads:
            raise ValueError(f"heads must divide hidden, got heads={self.heads}, hidden={self.hidden}")
        if self.max_prefix_words < self.min_prefix_words:
            raise ValueError(f"max_prefix_words must be >= min_prefix_words ({self.min_prefix_words}), got {self.max_prefix_words}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


# -- the tokenizer ------------------------------------------------------------------------------------------------
def train_wordpiece(texts: Sequence[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerBase:
    """A lowercasing BERT-style WordPiece trained on ``texts``; the same texts give the same tokenizer."""
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    # The trainer numbers the word-continuation pieces ("##e") in hash-map order and breaks ties
    # between equally frequent merges by those numbers, so on a small corpus two runs learn different
    # vocabularies. Numbering the pieces up front (as special tokens of the trainer) makes it
    # deterministic; the tokenizer itself is then built fresh, with the five real special tokens.
    alphabet = sorted({c for raw in set("".join(texts)) for c in normalizer.normalize_str(raw)} - set(" \t\n\r"))
    scratch = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    scratch.normalizer, scratch.pre_tokenizer = normalizer, pre_tokenizer
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                        special_tokens=SPECIAL_TOKENS + [f"##{c}" for c in alphabet])
    scratch.train_from_iterator(texts, trainer=trainer)
    # Canonical ids: the special tokens, then the rest sorted (WordPiece's greedy longest match reads
    # only the set of tokens, so the ids change nothing but the numbering).
    learned = sorted(set(scratch.get_vocab()) - set(SPECIAL_TOKENS))
    wordpiece = Tokenizer(models.WordPiece({token: i for i, token in enumerate(SPECIAL_TOKENS + learned)}, unk_token="[UNK]"))
    wordpiece.normalizer, wordpiece.pre_tokenizer, wordpiece.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return BertTokenizer(tokenizer_object=wordpiece, do_lower_case=True, model_max_length=max_length, padding_side="right")


# -- the model ----------------------------------------------------------------------------------------------------
def build_classifier(cfg: ClassifierConfig, vocab_size: int) -> BertForSequenceClassification:
    """A randomly initialised BERT with a two-way head (NEGATIVE, POSITIVE)."""
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.heads,
        intermediate_size=cfg.intermediate,
        max_position_embeddings=cfg.max_length,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        pad_token_id=SPECIAL_TOKENS.index("[PAD]"),
        num_labels=2,
        id2label=dict(ID2LABEL),
        label2id={label: i for i, label in ID2LABEL.items()},
        problem_type="single_label_classification",
    )
    return BertForSequenceClassification(config)


# -- the data -----------------------------------------------------------------------------------------------------
def draw_views(reviews: Sequence[Review], cfg: ClassifierConfig, rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
    """An epoch's texts and labels: every review whole, plus, for a random ``prefix_fraction`` of them,
    its first ``min_prefix_words``..``max_prefix_words`` words as an extra text with the same label."""
    extra = rng.choice(len(reviews), size=round(cfg.prefix_fraction * len(reviews)), replace=False)
    n_words = rng.integers(cfg.min_prefix_words, cfg.max_prefix_words + 1, size=len(extra))
    texts = [r.text for r in reviews] + [opening(reviews[i].text, int(n)) for i, n in zip(extra, n_words)]
    labels = [r.label for r in reviews] + [reviews[i].label for i in extra]
    return texts, np.array(labels)


def length_grouped_batches(lengths: Sequence[int], batch_size: int, rng: np.random.Generator, group: int = 50) -> list[np.ndarray]:
    """Shuffled batches of texts of similar length (a batch is padded to its longest): shuffle, sort
    each chunk of ``group`` batches by length, cut it into batches, shuffle the batches (as
    transformers' ``LengthGroupedSampler`` does)."""
    lengths = np.asarray(lengths)
    order = rng.permutation(len(lengths))
    batches = []
    for start in range(0, len(order), batch_size * group):
        chunk = order[start : start + batch_size * group]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def token_lengths(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[int]:
    """Tokens of each text, [CLS] and [SEP] included, untruncated (``verbose=False``: no warning about the length)."""
    return [len(ids) for ids in tokenizer(list(texts), verbose=False)["input_ids"]]


def encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], device, truncate: bool = False) -> dict[str, torch.Tensor]:
    """A right-padded batch; a text longer than ``model_max_length`` is a ``ValueError`` unless ``truncate``."""
    if not truncate:
        too_long = [n for n in token_lengths(tokenizer, texts) if n > tokenizer.model_max_length]
        if too_long:
            raise ValueError(f"{len(too_long)} text(s) are longer than the classifier's {tokenizer.model_max_length} tokens "
                             f"(up to {max(too_long)}); pass truncate=True to score their first {tokenizer.model_max_length} tokens")
    batch = tokenizer(list(texts), truncation=truncate, padding=True, return_tensors="pt")
    return {k: v.to(device) for k, v in batch.items()}


# -- evaluation ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def positive_probabilities(model, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], batch_size: int = 64,
                           truncate: bool = False) -> np.ndarray:
    """P(POSITIVE) (N,) of each text, in eval mode, ``batch_size`` texts per pass (see :func:`encode` on length)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    probabilities = []
    for start in range(0, len(texts), batch_size):
        logits = model(**encode(tokenizer, texts[start : start + batch_size], device, truncate)).logits.float()
        probabilities.append(logits.softmax(-1)[:, 1].cpu())
    model.train(was_training)
    return torch.cat(probabilities).numpy() if probabilities else np.zeros(0)


def accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of texts whose predicted label (P(POSITIVE) > 0.5, the argmax) is the human label."""
    return float(((probabilities > 0.5).astype(int) == labels).mean())


def evaluate_classifier(model, tokenizer: PreTrainedTokenizerBase, reviews: Sequence[Review], gold: VaderGold | None = None) -> dict:
    """Accuracy on whole reviews (truncated at ``max_length`` tokens) and on their first 24 words;
    with ``gold``, agreement and Spearman correlation with VADER on those 24-word prefixes."""
    if not reviews:
        raise ValueError("no reviews to evaluate the classifier on")
    labels = np.array([r.label for r in reviews])
    full = [r.text for r in reviews]
    prefixes = [opening(r.text, PREFIX_WORDS) for r in reviews]
    metrics = {
        "accuracy": accuracy(positive_probabilities(model, tokenizer, full, truncate=True), labels),
        "truncated_fraction": float(np.mean(np.array(token_lengths(tokenizer, full)) > tokenizer.model_max_length)),
    }
    p_prefix = positive_probabilities(model, tokenizer, prefixes, truncate=True)
    metrics[f"accuracy_prefix{PREFIX_WORDS}"] = accuracy(p_prefix, labels)
    if gold is not None:
        compound = np.array(gold(prefixes))
        predicted_sign = np.where(p_prefix > 0.5, 1.0, -1.0)
        metrics[f"vader_agreement_prefix{PREFIX_WORDS}"] = float((np.sign(compound) == predicted_sign).mean())
        metrics[f"vader_spearman_prefix{PREFIX_WORDS}"] = float(spearmanr(p_prefix, compound).statistic)
        metrics[f"vader_neutral_prefix{PREFIX_WORDS}"] = float((compound == 0).mean())  # agree with neither label
        metrics[f"vader_accuracy_prefix{PREFIX_WORDS}"] = float((np.sign(compound) == 2 * labels - 1).mean())  # VADER vs humans
    metrics["eval_reviews"] = len(reviews)
    return metrics


# -- training -----------------------------------------------------------------------------------------------------
def check_finite_classifier(model, probe: dict[str, torch.Tensor], step: int) -> None:
    """Weights and the logits of a probe batch finite: a classifier fit to save. The probe runs in
    eval mode: dropout would draw from torch's RNG, and a run checkpointed at other steps (Ctrl-C)
    would then not continue exactly."""
    check_model_finite(model, where=f"after classifier step {step}")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        check_finite("the classifier's logits", model(**probe).logits, f"after classifier step {step}")
    model.train(was_training)


def save_classifier(model, tokenizer: PreTrainedTokenizerBase, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """An HF ``BertForSequenceClassification`` dir (safetensors) + its tokenizer; ``dtype`` casts a copy."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if dtype is not None and dtype != model.dtype:
        copy = type(model)(model.config).to(dtype)
        copy.load_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()})
        model = copy
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    return path


def split_reviews(split: str, limit: int = 0) -> list[Review]:
    """The reviews of a split, or (``limit`` > 0) a fixed sample of ``limit`` of them: the first of a
    permutation drawn with seed 0, in corpus order (the corpus lists a source's positives together)."""
    reviews = corpus.reviews(split)
    if not limit or limit >= len(reviews):
        return reviews
    return [reviews[i] for i in np.sort(np.random.default_rng(0).permutation(len(reviews))[:limit])]


def train_classifier(cfg: ClassifierConfig) -> dict:
    """``textgym classifier``: train the tokenizer and the classifier, evaluate on the test split,
    save ``OUT/final`` (and ship).

    Checkpoints every ``checkpoint_every`` steps and on Ctrl-C (``pretrain.checkpoint.StepRun``);
    ``--resume OUT`` continues exactly (the tokenizer is read back from the checkpoint, the texts
    and batches are a function of the seed).
    """
    steps = StepRun(cfg, "classifier")
    if (finished := steps.finished) is not None:
        return finished
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    reviews = split_reviews("train", cfg.train_reviews)
    if steps.checkpoint:
        model = BertForSequenceClassification.from_pretrained(str(steps.checkpoint), dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(steps.checkpoint))
    else:
        tokenizer = train_wordpiece([r.text for r in reviews], cfg.vocab_size, cfg.max_length)
        model = build_classifier(cfg, len(tokenizer))
    model.to(device)

    # Every epoch's texts and batches up front (the same rng draws as drawing them per epoch): a
    # resumed run skips exactly the batches it already took.
    batches = []
    for epoch in range(cfg.epochs):
        texts, labels = draw_views(reviews, cfg, rng)
        lengths = [len(text.split(" ")) for text in texts]
        batches += [(epoch, [texts[i] for i in index], labels[index])
                    for index in length_grouped_batches(lengths, cfg.batch_size, rng)]
    n_steps = len(batches)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * n_steps), n_steps)
    steps.restore(optimizer=optimizer, np_rng=rng, scheduler=scheduler)
    writer = steps.writer()
    validation = split_reviews("validation", cfg.eval_reviews)
    probe = encode(tokenizer, [reviews[0].text], device, truncate=True)  # checked finite before each save
    model.train()
    with steps, progress_bar("classifier") as bar:
        task = bar.add_task("classifier", total=n_steps, completed=steps.step, status="")
        for step in range(steps.step + 1, n_steps + 1):
            epoch, texts, batch_labels = batches[step - 1]
            logits = model(**encode(tokenizer, texts, device, truncate=True)).logits  # (B, 2)
            targets = torch.as_tensor(batch_labels, device=device)
            loss = F.cross_entropy(logits, targets)
            optimizer_step(loss, optimizer, model.parameters(), cfg.max_grad_norm, scheduler, f"at classifier step {step}")
            train_accuracy = (logits.argmax(-1) == targets).float().mean().item()
            writer.add_scalar("loss/train", loss.item(), step)
            writer.add_scalar("train/accuracy", train_accuracy, step)
            writer.add_scalar("lr", scheduler.get_last_lr()[0], step)
            bar.update(task, advance=1, status=f"epoch {epoch} loss {loss.item():.3f} acc {train_accuracy:.2f}")
            if step == n_steps or batches[step][0] != epoch:  # the end of an epoch: held-out accuracy (validation split)
                for key, value in evaluate_classifier(model, tokenizer, validation).items():
                    if key.startswith("accuracy"):
                        writer.add_scalar(f"eval/{key}", value, step)
            steps.after_step(step, lambda d: save_classifier(model, tokenizer, d), optimizer=optimizer, np_rng=rng,
                             scheduler=scheduler, check=lambda s: check_finite_classifier(model, probe, s))
    model.eval()
    check_finite_classifier(model, probe, n_steps)
    metrics = {**evaluate_classifier(model, tokenizer, split_reviews("test", cfg.eval_reviews), VaderGold()),
               "train_reviews": len(reviews), "steps": n_steps, "vocab_size": len(tokenizer)}
    for key, value in metrics.items():
        if key.startswith(("accuracy", "vader_agreement", "vader_spearman")):
            writer.add_scalar(f"test/{key}", value, n_steps)
    writer.close()

    def write_final(directory: Path) -> None:
        save_classifier(model, tokenizer, directory)
        (directory / "metrics.json").write_text(json.dumps(metrics, indent=1))

    steps.save_final(write_final)
    print(json.dumps(metrics))
    if cfg.ship:
        ship(model, tokenizer, cfg, metrics)
    return metrics


def command_line(cfg: ClassifierConfig) -> str:
    """The ``textgym classifier`` command that builds this config (the flags that differ from the defaults)."""
    flags = [f"--out {cfg.out or 'runs/classifier'}"]
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name not in ("out", "ship", "resume", "overwrite", "device") and value != f.default:
            flags.append(f"--{f.name.replace('_', '-')}" + ("" if value is True else f" {value}"))
    return " ".join(["textgym classifier", *flags, "--ship"])


def ship(model, tokenizer: PreTrainedTokenizerBase, cfg: ClassifierConfig, trained: dict) -> Path:
    """fp16 weights + tokenizer + manifest into :func:`default_classifier_dir`. The manifest's metrics
    are those of the weights *as shipped* (fp16, loaded in fp32), measured again on the test split."""
    target = default_classifier_dir()
    target.mkdir(exist_ok=True)
    for stale in target.glob("*"):
        stale.unlink()
    save_classifier(model, tokenizer, target, dtype=torch.float16)
    shipped = AutoModelForSequenceClassification.from_pretrained(str(target), dtype=torch.float32, use_safetensors=True)
    metrics = evaluate_classifier(shipped, AutoTokenizer.from_pretrained(str(target)), split_reviews("test", cfg.eval_reviews), VaderGold())
    manifest = {
        "command": command_line(cfg),
        "gold": VaderGold.name,
        "config": asdict(cfg),
        **{k: round(v, 4) if isinstance(v, float) and math.isfinite(v) else v for k, v in metrics.items()},
        **{k: trained[k] for k in ("train_reviews", "steps", "vocab_size")},
        "dtype": "float16",
        "sha256": sha256_file(target / "model.safetensors"),
    }
    (target / "manifest.json").write_text(json.dumps(manifest, indent=1))
    for shipped_file in target.iterdir():  # package data: readable by every user (safetensors writes 0600)
        shipped_file.chmod(0o644)
    print(f"shipped to {target}")
    return target
