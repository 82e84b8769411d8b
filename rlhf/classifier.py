"""Any Hugging Face ``*ForSequenceClassification`` dir as a scorer of texts.

The reward of the field's reference experiment (IMDb controlled sentiment in RL4LMs and TRL) is an
off-the-shelf sentiment classifier: DistilBERT trained on the human IMDb labels, with its own
WordPiece tokenizer, read as the logit of its ``POSITIVE`` label. :class:`SequenceClassifier` reads
any such dir, whatever its tokenizer and number of labels:

* the text is tokenised by the *classifier's own* tokenizer (its special tokens added: [CLS] ...
  [SEP] for BERT), never by the policy's, so the score is a function of the text;
* ``num_labels == 1``: the score is the single logit;
* ``num_labels > 1``: one label, by name or index, read as ``"logit"`` (the default, as in the
  reference experiment), ``"prob"`` (softmax) or ``"logprob"`` (log-softmax). Without a ``label``
  the label named ``positive`` (any case) is read; a classifier without one needs ``label``.

Texts are scored in a few right-padded batches of similar length (``pretrain.padding``): the side
every ``*ForSequenceClassification`` reads correctly (absolute positions from the start; causal
models find their last non-pad token). A text longer than the model's context is an error, never
truncated. Everything is checked when the classifier is loaded, with one probe forward, so an
unusable dir fails then, naming the dir and what was expected, never in the middle of a run.

The library's own Bradley-Terry reward models (``rlhf.reward_model``, ``textgym reward``) are
classifiers with one label too, but they read (prompt, completion) as two canonically tokenised
pieces and normalise their scores; they keep their own class. ``rlhf.sentiment_classifier`` trains
the shipped classifier of this kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from pretrain.model import check_weights_finite, disable_dropout, load_config, resolve_device, resolve_model_path, verify_manifest
from pretrain.optim import NonFiniteError
from pretrain.padding import CALL_COST_TOKENS, length_buckets, right_pad

OUTPUTS = ("logit", "prob", "logprob")


def default_classifier_dir() -> Path:
    """The shipped sentiment classifier, trained on the human review labels (``rlhf.sentiment_classifier``)."""
    return Path(__file__).parent / "default_classifier"


def is_classifier_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a config whose architecture is a ``*ForSequenceClassification``."""
    path = Path(path)
    if not (path / "config.json").is_file():
        return False
    archs = load_config(path).architectures or []
    return any(a.endswith("ForSequenceClassification") for a in archs)


def resolve_label(id2label: dict[int, str], num_labels: int, label: str | int | None, where: str) -> int:
    """The index of ``label`` (a name, any case, or an index) among the classifier's labels.

    ``None``: the only output when ``num_labels == 1``, else the label named ``positive``.
    Raises ``ValueError`` listing the labels when it names none of them.
    """
    names = {i: str(id2label.get(i, f"LABEL_{i}")) for i in range(num_labels)}
    listing = ", ".join(f"{i}={n!r}" for i, n in names.items())
    if label is None:
        if num_labels == 1:
            return 0
        positive = [i for i, n in names.items() if n.lower() == "positive"]
        if positive:
            return positive[0]
        raise ValueError(f"{where} has {num_labels} labels ({listing}) and none is named 'positive': "
                         "choose the label to read (label= / --reward-label, a name or an index)")
    if isinstance(label, bool):
        raise TypeError(f"label must be a label name or index, got {label!r}")
    if isinstance(label, int) or (isinstance(label, str) and label.strip().lstrip("-").isdigit()):
        index = int(label)
        if not 0 <= index < num_labels:
            raise ValueError(f"label index {index} is out of range for {where} with labels {listing}")
        return index
    if isinstance(label, str):
        matches = [i for i, n in names.items() if n.lower() == label.lower()]
        if matches:
            return matches[0]
        raise ValueError(f"{where} has no label {label!r}; its labels are {listing}")
    raise TypeError(f"label must be a label name or index, got {type(label).__name__} {label!r}")


class SequenceClassifier:
    """One label of a ``*ForSequenceClassification`` model as a score of texts (module docstring).

    Args:
        path: the classifier dir (config.json, ``*.safetensors``, its tokenizer; a manifest.json,
            if present, is verified).
        label: the label to read (name or index); ``None`` = the single output, or ``positive``.
        output: ``"logit"``, ``"prob"`` or ``"logprob"`` of that label (only ``"logit"`` for one label).
        device, dtype: where and in which precision the model runs (default float32).
        batch_size: texts per forward pass; max_buckets: length buckets per batch.

    Raises:
        FileNotFoundError: no dir, no config, no safetensors weights (pickle files are refused).
        ValueError: not a ``*ForSequenceClassification`` model, an unknown label or output,
            weights that do not load or are not finite, a probe forward whose logits do not have
            ``num_labels`` finite values.
    """

    def __init__(self, path: str | Path, label: str | int | None = None, output: str = "logit",
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 batch_size: int = 64, max_buckets: int = 4):
        path = resolve_model_path(Path(path).expanduser().absolute())  # a dir with config.json and safetensors, never pickle
        config = load_config(path)
        archs = config.architectures or []
        if not any(a.endswith("ForSequenceClassification") for a in archs):
            raise ValueError(f"{path} holds a {', '.join(archs) or 'model without architectures'}; a classifier reward "
                             "needs a *ForSequenceClassification model (AutoModelForSequenceClassification)")
        if output not in OUTPUTS:
            raise ValueError(f"unknown classifier output {output!r}; expected one of {', '.join(OUTPUTS)}")
        if config.num_labels == 1 and output != "logit":
            raise ValueError(f"{path} has a single output (num_labels=1): only output='logit' reads it, got {output!r}")
        self.label = resolve_label(config.id2label or {}, config.num_labels, label, str(path))
        self.label_name = str((config.id2label or {}).get(self.label, f"LABEL_{self.label}"))
        if (path / "manifest.json").is_file():
            verify_manifest(path)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                str(path), dtype=dtype, use_safetensors=True, trust_remote_code=False)
            tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        except (OSError, RuntimeError, ValueError, SafetensorError) as err:
            raise ValueError(f"could not load the classifier in {path}: {err}") from err
        check_weights_finite(model, path)
        if tokenizer.pad_token_id is None:  # a causal-LM classifier: pad with EOS (masked)
            if tokenizer.eos_token_id is None:
                raise ValueError(f"the tokenizer in {path} has neither a pad nor an EOS token to pad a batch with")
            tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            raise ValueError(f"the tokenizer in {path} has {len(tokenizer)} tokens but the classifier's embedding "
                             f"only {model.get_input_embeddings().weight.shape[0]} rows: they do not belong together")
        self.path, self.output = path, output
        self.model = disable_dropout(model).to(resolve_device(device)).eval()
        self.model.requires_grad_(False)
        self.tokenizer = tokenizer
        self.num_labels = config.num_labels
        self.batch_size, self.max_buckets = batch_size, max_buckets
        limits = [getattr(config, "max_position_embeddings", None), getattr(config, "n_positions", None)]
        self.max_length = min([n for n in limits if n] or [10**9])
        self.name = f"{path.name}:{self.label_name}" if self.num_labels > 1 else path.name
        probe = self.logits(["A probe text."])
        if probe.shape != (1, self.num_labels) or not torch.isfinite(probe).all():
            raise ValueError(f"{path}: a probe text gave logits {probe.tolist()} of shape {tuple(probe.shape)}; "
                             f"expected {self.num_labels} finite logits")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's token ids under the classifier's tokenizer, special tokens included.
        Raises ``ValueError`` for a text longer than the model's context (never truncated)."""
        if isinstance(texts, str):
            raise TypeError("a classifier scores a list of texts, got a single str; wrap it in a list")
        ids = self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]
        empty = next((t for t in (self.tokenizer.eos_token_id, self.tokenizer.bos_token_id, self.tokenizer.pad_token_id)
                      if t is not None), None)
        ids = [seq if seq else [empty] for seq in ids]  # the empty text of a tokenizer that adds nothing
        for text, seq in zip(texts, ids):
            if len(seq) > self.max_length:
                raise ValueError(f"a text of {len(seq)} tokens is longer than the classifier {self.path}'s context of "
                                 f"{self.max_length} tokens: {text[:80]!r}...")
        return ids

    @torch.no_grad()
    def logits(self, texts: Sequence[str]) -> torch.Tensor:
        """All labels' logits (R, num_labels) float32 of ``texts``, in length buckets of right-padded batches."""
        sequences = self.encode(texts)
        out = torch.empty(len(sequences), self.num_labels, device=self.device)
        for start in range(0, len(sequences), self.batch_size):
            chunk = range(start, min(start + self.batch_size, len(sequences)))
            for bucket in length_buckets([len(sequences[i]) for i in chunk], self.max_buckets, CALL_COST_TOKENS):
                rows = [chunk[j] for j in bucket]
                input_ids, attention_mask = right_pad([sequences[i] for i in rows], self.tokenizer.pad_token_id, self.device)
                out[rows] = self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        return out

    def scores(self, texts: Sequence[str]) -> torch.Tensor:
        """The chosen label's ``output`` for each text: (R,) float32 on the classifier's device.
        Raises ``NonFiniteError`` if the model outputs a non-finite value."""
        logits = self.logits(texts)
        if self.output == "prob":
            logits = logits.softmax(-1)
        elif self.output == "logprob":
            logits = logits.log_softmax(-1)
        scores = logits[:, self.label]
        if not torch.isfinite(scores).all():
            raise NonFiniteError(f"the classifier {self.path} produced non-finite scores {scores[~torch.isfinite(scores)][:3].tolist()}")
        return scores

    def __call__(self, texts: Sequence[str]) -> list[float]:
        """``scores`` as floats: a gold scorer (``rlhf.gold.GoldScorer``)."""
        return self.scores(texts).tolist()
