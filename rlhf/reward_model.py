"""The learned reward model: a causal-LM backbone with a scalar head, trained with Bradley-Terry.

    r_theta(x, y) = w . h_T(x, y)            h_T: backbone hidden state at the last non-pad token
    loss = -log sigmoid(r_theta(x, y_w) - r_theta(x, y_l) - m)     (Bradley-Terry, optional margin m)

The model is stored as a standard Hugging Face ``*ForSequenceClassification`` dir with
``num_labels = 1`` (backbone initialised from the pretrained LM, head ``score``), so
``AutoModelForSequenceClassification.from_pretrained(dir)`` loads it with one call and any causal-LM
architecture with a sequence-classification class (GPT-2, Llama, Qwen2, ...) works as a backbone.
``config.reward_mean`` / ``config.reward_std`` hold the normalisation measured on the training
completions: :meth:`RewardModel.score` returns ``(r - mean) / std``, so a reward of 0 is the
average completion of the policy that wrote the data, and 1 is one standard deviation better.

What the RM reads is a function of the *text* (prompt, completion): the canonical tokenisation of
each (``rlhf.logprobs.tokenize_pairs``), prompt then completion, in training, in the env's reward,
in evaluation and in :meth:`RewardModel.score` alike. The empty text (an empty prompt and an
immediate EOS) is the single token EOS. The saved tokenizer pads on the right, the side on which
plain transformers' ``*ForSequenceClassification`` (which derives positions from the sequence
start) scores a padded batch exactly like this class does.

With ``--peft lora`` (:meth:`RewardModel.from_lm` given ``pretrain.adapters.ModelOptions``) the
backbone is frozen and carries a LoRA adapter (Hu et al. 2021) while the score head is trained in
full (peft's ``modules_to_save``); :meth:`RewardModel.save` writes the merged model, a plain
``*ForSequenceClassification`` dir like any other, and :meth:`RewardModel.save_adapter` the adapter
and head alone (a checkpoint).

Training, evaluation and shipping (``textgym reward``) are in ``rlhf.reward_training``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModelForSequenceClassification

from pretrain import load_lm
from pretrain.adapters import ModelOptions, adapter_path, default_target_modules, enable_gradient_checkpointing
from pretrain.model import (
    check_vocab_fits,
    check_weights_finite,
    disable_dropout,
    load_config,
    resolve_device,
    resolve_model_path,
    verify_manifest,
)
from pretrain.optim import NonFiniteError
from pretrain.padding import CALL_COST_TOKENS, left_pad, length_buckets, position_ids_from_mask
from pretrain.tokenizer import load_tokenizer
from rlhf.logprobs import tokenize_pairs

DEFAULT_RM_DIR = Path(__file__).parent / "default_rm"


def default_reward_model_dir() -> Path:
    """The shipped sentiment reward model (fp16 safetensors + manifest)."""
    return DEFAULT_RM_DIR


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Per-pair -log sigmoid(r_chosen - r_rejected - margin), computed stably as softplus."""
    return F.softplus(-(chosen - rejected - margin))


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended token of each row (works for left and right padding): (B,)."""
    return attention_mask.shape[1] - 1 - attention_mask.flip(1).long().argmax(1)


class RewardModel(nn.Module):
    """A ``*ForSequenceClassification`` model read at the last non-pad token, plus its tokenizer.

    Dropout is off (``disable_dropout``): the chosen and rejected rewards of a pair, the training
    metrics and :meth:`score` are one deterministic function of the weights.

    ``peft`` is the ``peft.PeftModel`` of a LoRA reward model (``model`` is then its HF model, with
    the LoRA layers injected in place) on the causal LM in ``base_dir``; None for all weights.
    """

    def __init__(self, model, tokenizer, max_length: int | None = None, peft=None, base_dir: str | Path | None = None):
        super().__init__()
        if model.config.num_labels != 1:
            raise ValueError(f"a reward model has one output, this model has num_labels={model.config.num_labels}")
        self.model = disable_dropout(model)
        self.tokenizer = tokenizer
        # Not a registered submodule: it holds the same modules as self.model.
        object.__setattr__(self, "peft", peft)
        self.base_dir = None if base_dir is None else Path(base_dir)
        self.max_length = max_length or getattr(model.config, "n_positions", None) or getattr(
            model.config, "max_position_embeddings", None
        )

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def mean(self) -> float:
        return float(getattr(self.model.config, "reward_mean", 0.0))

    @property
    def std(self) -> float:
        return float(getattr(self.model.config, "reward_std", 1.0))

    @classmethod
    def from_lm(cls, path: str | Path = "default", device: str | torch.device = "cpu", options: ModelOptions | None = None,
                resume_from: str | Path | None = None) -> RewardModel:
        """A fresh reward model whose backbone is the pretrained causal LM at ``path``.

        With ``options.peft == "lora"`` the backbone is frozen under a new LoRA adapter (or the one
        saved in ``resume_from``, a checkpoint's dir, by :meth:`save_adapter`) and the score head is
        trained in full. ``options.gradient_checkpointing`` switches that on. Raises ``ValueError``
        for another adapter kind (a soft prompt or a 4-bit base is not supported for reward models)."""
        options = options or ModelOptions()
        if options.peft not in ("", "lora"):
            raise ValueError(f"a reward model trains all weights or a LoRA adapter (--peft lora), not --peft {options.peft}")
        lm_dir = resolve_model_path(path)
        _, tokenizer = load_lm(lm_dir)  # validates the dir (safetensors, manifest, vocab)
        model = AutoModelForSequenceClassification.from_pretrained(
            str(lm_dir), num_labels=1, dtype=torch.float32, use_safetensors=True, trust_remote_code=False
        )
        model.config.pad_token_id = tokenizer.pad_token_id
        nn.init.zeros_(model.score.weight)  # r = 0 for everything at the start
        peft_model = None
        if options.peft:
            from peft import PeftModel, get_peft_model

            if resume_from is not None:
                peft_model = PeftModel.from_pretrained(model, str(adapter_path(resume_from)), is_trainable=True)
            else:
                peft_model = get_peft_model(model, reward_lora_config(options, model, lm_dir))
            model = peft_model.get_base_model()
        if options.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        return cls(model, tokenizer, peft=peft_model, base_dir=lm_dir).to(resolve_device(device))

    @classmethod
    def load(cls, path: str | Path = "default", device: str | torch.device = "cpu", dtype=torch.float32) -> RewardModel:
        """Load a saved reward model dir (``"default"`` = the shipped one), in eval mode."""
        path = default_reward_model_dir() if str(path) == "default" else Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"reward model dir {path} does not exist")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a reward model dir: it has no config.json")
        config = load_config(path)
        archs = config.architectures or []
        if not any(a.endswith("ForSequenceClassification") for a in archs) or config.num_labels != 1:
            raise ValueError(
                f"{path} is not a reward model dir: expected a *ForSequenceClassification model with "
                f"num_labels=1, found architectures={archs}, num_labels={config.num_labels}"
            )
        if (path / "manifest.json").is_file():
            verify_manifest(path)
        if not any(path.glob("*.safetensors")):
            raise FileNotFoundError(f"{path} has no *.safetensors weights")
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                str(path), dtype=dtype, use_safetensors=True, trust_remote_code=False
            )
        except (OSError, RuntimeError, ValueError, SafetensorError) as err:
            raise ValueError(f"could not load the reward model's weights in {path}: {err}") from err
        check_weights_finite(model, path)
        tokenizer = load_tokenizer(path)
        check_vocab_fits(model, tokenizer, path)
        return cls(model, tokenizer).to(resolve_device(device)).eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Raw (unnormalised) rewards (B,) read at each row's last attended token."""
        hidden = self.model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask)
        ).last_hidden_state  # (B, T, H)
        last = last_token_index(attention_mask)
        return self.model.score(hidden[torch.arange(len(last), device=hidden.device), last]).squeeze(-1).float()

    def tokenize(self, prompts: Sequence[str], completions: Sequence[str]) -> list[list[int]]:
        """The token ids the RM reads for each (prompt, completion) text pair: the canonical tokenisation
        of the prompt then of the completion (``rlhf.logprobs.tokenize_pairs``); the empty pair is
        ``[EOS]``. Raises ``ValueError`` for a pair longer than the model's context."""
        prompt_ids, completion_ids = tokenize_pairs(self.tokenizer, list(prompts), list(completions), self.max_length)
        empty = [self.empty_text_id]
        return [p + c or empty for p, c in zip(prompt_ids, completion_ids)]

    @property
    def empty_text_id(self) -> int:
        """The token that stands for the empty text (EOS; BOS or pad if the tokenizer has no EOS)."""
        for token_id in (self.tokenizer.eos_token_id, self.tokenizer.bos_token_id, self.tokenizer.pad_token_id):
            if token_id is not None:
                return token_id
        raise ValueError("the reward model's tokenizer has no EOS, BOS or pad token to represent the empty text")

    def sequence_rewards(self, sequences: Sequence[Sequence[int]], model: nn.Module | None = None) -> torch.Tensor:
        """Raw (unnormalised) rewards (B,) of non-empty token-id sequences, one left-padded batch (with
        gradients), computed by ``model`` (this reward model in a data-parallel wrapper) or by itself."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.empty_text_id
        return (self if model is None else model)(*left_pad(sequences, pad, self.device))

    @torch.no_grad()
    def rewards(self, prompts: Sequence[str], completions: Sequence[str], max_buckets: int = 4) -> torch.Tensor:
        """Normalised rewards (B,) float32 on the RM's device of (prompt, completion) texts.

        Scored in up to ``max_buckets`` left-padded batches of similar length
        (``pretrain.model.length_buckets``), so a batch of short episodes is not padded to its longest.
        Raises ``NonFiniteError`` if the model outputs a non-finite score.
        """
        sequences = self.tokenize(prompts, completions)
        rewards = torch.empty(len(sequences), device=self.device)
        for bucket in length_buckets([len(seq) for seq in sequences], max_buckets, CALL_COST_TOKENS):
            rewards[bucket] = self.sequence_rewards([sequences[j] for j in bucket])
        rewards = (rewards - self.mean) / self.std
        if not torch.isfinite(rewards).all():
            raise NonFiniteError(f"the reward model produced non-finite scores {rewards[~torch.isfinite(rewards)][:3].tolist()}")
        return rewards

    def score(self, prompts: Sequence[str], completions: Sequence[str], batch_size: int = 128) -> list[float]:
        """Normalised rewards of (prompt, completion) texts as floats, ``batch_size`` pairs per pass."""
        out: list[float] = []
        for start in range(0, len(prompts), batch_size):
            out += self.rewards(prompts[start : start + batch_size], completions[start : start + batch_size]).tolist()
        return out

    def save(self, path: str | Path, dtype: torch.dtype | None = None) -> Path:
        """An HF ``*ForSequenceClassification`` dir (safetensors) with a right-padding tokenizer; a
        LoRA reward model is saved merged (:meth:`merged_model`)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        model = self.model if self.peft is None else self.merged_model()
        if dtype is not None and dtype != model.dtype:
            weights = model.state_dict()
            model = type(model)(model.config).to(dtype)
            model.load_state_dict({k: v.to(dtype) for k, v in weights.items()})
        model.save_pretrained(str(path), safe_serialization=True)
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "right"  # what plain transformers needs to score a padded batch exactly
        try:
            self.tokenizer.save_pretrained(str(path))
        finally:
            self.tokenizer.padding_side = side
        return path

    def save_adapter(self, path: str | Path) -> Path:
        """A LoRA reward model's adapter and score head alone, in peft's format (a checkpoint, which
        :meth:`from_lm` resumes); ``ValueError`` for an all-weights reward model."""
        if self.peft is None:
            raise ValueError("this reward model has no adapter: save it with save()")
        path = Path(path)
        self.peft.save_pretrained(str(path), safe_serialization=True)
        return path

    def merged_model(self):
        """The ``*ForSequenceClassification`` model of a LoRA reward model with the adapter merged into
        its weights (W + alpha / r B A; the trained score head), built on the CPU from the base dir
        (never a second copy on the GPU); its config carries the normalisation."""
        from peft import PeftModel

        base = AutoModelForSequenceClassification.from_pretrained(
            str(self.base_dir), num_labels=1, dtype=torch.float32, use_safetensors=True, trust_remote_code=False
        )
        base.config.pad_token_id = self.model.config.pad_token_id
        with tempfile.TemporaryDirectory() as tmp:
            self.save_adapter(tmp)
            merged = PeftModel.from_pretrained(base, tmp).merge_and_unload()
        for key in ("reward_mean", "reward_std"):
            if hasattr(self.model.config, key):
                setattr(merged.config, key, getattr(self.model.config, key))
        return merged


def reward_lora_config(opts: ModelOptions, model, base_dir: str | Path):
    """peft's LoRA config of a reward model: the adapter on the backbone's linear maps (as for a
    causal LM, ``pretrain.adapters.DEFAULT_TARGET_MODULES``), the score head trained in full."""
    from peft import LoraConfig, TaskType

    config = LoraConfig(r=opts.lora_r, lora_alpha=opts.lora_alpha, lora_dropout=opts.lora_dropout,
                        target_modules=opts.lora_target_modules or default_target_modules(model), bias="none",
                        task_type=TaskType.SEQ_CLS, modules_to_save=["score"], fan_in_fan_out=model.config.model_type == "gpt2")
    config.base_model_name_or_path = str(Path(base_dir).resolve())
    return config
