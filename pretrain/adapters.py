"""Adapters (LoRA, QLoRA, prompt tuning) through ``peft``, bf16 autocast, gradient checkpointing.

Every trainer (``textgym train ppo|reinforce``, ``dpo``, ``sft``, ``reward``) takes the same model
options (:class:`ModelOptions`, the flags ``--peft``, ``--lora-r``, ``--dtype``, ...) and loads its
trainable model through :func:`load_trainable_lm`:

* ``--peft lora`` (Hu et al. 2021): W x + (alpha / r) B A x on the target modules, B = 0 at the
  start, so the adapted model *is* the base model at step 0; only A and B are trained.
* ``--peft qlora`` (Dettmers et al. 2023): the same LoRA on a base quantised to 4-bit NF4 by
  bitsandbytes (compute in bf16), which needs a CUDA GPU.
* ``--peft prompt-tuning`` (Lester et al. 2021): ``num_virtual_tokens`` trainable embeddings are
  put before every context; the base model is untouched.

The wrapper :class:`AdaptedLM` runs the ``transformers`` model itself (LoRA layers are injected in
place by peft; the soft prompt is prepended here), so every caller keeps passing ``position_ids``
and KV caches exactly as for a plain model. Its :meth:`AdaptedLM.reference` is the frozen reference
pi_ref = the same weights with the adapter disabled: no second copy of the base model is loaded.

Saving: ``save_adapter(dir)`` writes peft's format (``adapter_config.json`` +
``adapter_model.safetensors``, the base dir recorded); :func:`save_merged` writes a plain HF dir
(LoRA merged into the weights) that ``AutoModelForCausalLM.from_pretrained`` loads. ``load_lm``
(``pretrain.model``) loads an adapter dir as an :class:`AdaptedLM` on its base.

Precision: ``--dtype float32`` (the default) or ``bfloat16``, which autocasts on either device (the
weights stay fp32, the matmuls run in bf16: ``torch.autocast``), so the policy, its reference and
the reward model all compute in one dtype, in regions that may span optimizer steps (the weight
cast is not cached: :func:`autocast`). fp32 stays the default on CUDA too (README, "Bigger models"). ``--gradient-checkpointing`` recomputes
activations in the backward pass instead of storing them (Chen et al. 2016).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pretrain import model as lm
from pretrain.config import hparam, require_non_negative, require_positive

PEFT_KINDS = ("", "lora", "qlora", "prompt-tuning")
DTYPES = ("float32", "bfloat16")
ADAPTER_DIR = "adapter"  # where a checkpoint or final/ keeps the adapter (peft's format)
ADAPTER_CONFIG = "adapter_config.json"

# LoRA targets per architecture (``config.model_type``): every linear map of attention and MLP,
# the choice of the QLoRA paper ("all linear layers") spelled out; others take peft's "all-linear".
DEFAULT_TARGET_MODULES = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # Conv1D layers (peft transposes them: fan_in_fan_out)
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


@dataclass
class ModelOptions:
    """How the trained model is held: all weights or an adapter, its dtype, gradient checkpointing."""

    peft: str = hparam("", "train an adapter instead of all weights: 'lora', 'qlora' (LoRA on a 4-bit base; CUDA and "
                           "bitsandbytes) or 'prompt-tuning'; '' = all weights")
    lora_r: int = hparam(16, "LoRA rank r")
    lora_alpha: float = hparam(32.0, "LoRA scale alpha (the update is alpha / r * B A)")
    lora_dropout: float = hparam(0.0, "dropout on the LoRA input (the RL trainers and DPO switch dropout off)")
    lora_target_modules: list[str] | None = hparam(None, "module names LoRA adapts (default: every attention and MLP "
                                                         "linear map: GPT-2 c_attn c_proj c_fc; Llama/Qwen2 q k v o gate "
                                                         "up down _proj; else peft's all-linear)")
    num_virtual_tokens: int = hparam(8, "soft-prompt length for --peft prompt-tuning")
    dtype: str = hparam("float32", "compute dtype: 'float32' or 'bfloat16' (autocast; weights and optimizer state stay fp32)")
    gradient_checkpointing: bool = hparam(False, "recompute activations in the backward pass (less memory, about a third more time)")

    def validate_model_options(self) -> None:
        """``ValueError`` naming the field for an unknown adapter kind or dtype, or a bad size;
        ``RuntimeError`` for QLoRA where it cannot run (before a run dir is claimed)."""
        if self.peft not in PEFT_KINDS:
            raise ValueError(f"unknown peft {self.peft!r}; expected one of 'lora', 'qlora', 'prompt-tuning' or '' (all weights)")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {DTYPES}")
        require_positive(self, "lora_r", "lora_alpha", "num_virtual_tokens")
        require_non_negative(self, "lora_dropout")
        if self.lora_dropout >= 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        defaults = ModelOptions()
        unused = [] if self.peft in ("lora", "qlora") else [f for f in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
                                                            if getattr(self, f) != getattr(defaults, f)]
        if self.peft != "prompt-tuning" and self.num_virtual_tokens != defaults.num_virtual_tokens:
            unused.append("num_virtual_tokens")
        if unused:  # a setting that would be silently ignored
            raise ValueError(f"{', '.join(unused)} set, but peft is {self.peft or 'off'!r}: they apply to "
                             f"{'--peft prompt-tuning' if unused == ['num_virtual_tokens'] else '--peft lora or qlora'}")
        if self.peft == "qlora" and hasattr(self, "device"):
            check_qlora_available(lm.resolve_device(self.device))


def model_options(cfg) -> ModelOptions:
    """The :class:`ModelOptions` fields of any config (defaults for a config without them)."""
    return ModelOptions(**{k: getattr(cfg, k) for k in ModelOptions.__dataclass_fields__ if hasattr(cfg, k)})


# -- precision ------------------------------------------------------------------------------------
def autocast(dtype: str, device: torch.device | str):
    """``torch.autocast`` to bf16 for ``dtype`` 'bfloat16' (everything run inside it: policy,
    reference, reward model), a no-op context for 'float32'; ``ValueError`` for another dtype.
    Weights, optimizer state and losses stay fp32."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {DTYPES}")
    if dtype == "float32":
        return contextlib.nullcontext()
    # cache_enabled=False: autocast otherwise keeps the bf16 copy of each weight until the outermost
    # region exits, so a region around a training loop would run every later forward on the weights
    # of the first one while the optimizer moves the fp32 ones (measured: PPO's KL read 0.06 nats
    # while the weights had moved 9).
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, cache_enabled=False)


# -- adapters -------------------------------------------------------------------------------------
def default_target_modules(model) -> list[str] | str:
    """LoRA's target modules for this architecture (``DEFAULT_TARGET_MODULES``, else "all-linear")."""
    return DEFAULT_TARGET_MODULES.get(getattr(model.config, "model_type", ""), "all-linear")


def peft_config(opts: ModelOptions, model, base_dir: str | Path):
    """The ``peft`` config of ``opts`` for ``model`` (its base recorded as ``base_dir``)."""
    from peft import LoraConfig, PromptTuningConfig, PromptTuningInit, TaskType

    if opts.peft in ("lora", "qlora"):
        targets = opts.lora_target_modules or default_target_modules(model)
        config = LoraConfig(r=opts.lora_r, lora_alpha=opts.lora_alpha, lora_dropout=opts.lora_dropout, target_modules=targets,
                            bias="none", task_type=TaskType.CAUSAL_LM, fan_in_fan_out=model.config.model_type == "gpt2")
    elif opts.peft == "prompt-tuning":
        # Initialised from the embeddings of tokens drawn from the vocabulary (not N(0, 1), which is
        # ~50x the scale of a trained embedding and would derail the model at step 0).
        config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=opts.num_virtual_tokens,
                                    prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB)
    else:
        raise ValueError(f"no adapter for peft={opts.peft!r}")
    config.base_model_name_or_path = str(Path(base_dir).resolve())
    return config


class AdaptedLM(nn.Module):
    """A causal LM with a peft adapter, called like the plain ``transformers`` model.

    ``forward`` takes the model's own arguments (``input_ids``, ``attention_mask``, ``position_ids``,
    a KV cache, ``logits_to_keep``, ...). With prompt tuning, a call without a KV cache (a prefill
    or a teacher-forced pass) prepends the ``num_virtual_tokens`` soft-prompt vectors, at positions
    0..n-1 with the real tokens after them, and strips them from the returned logits and hidden
    states, so outputs line up with ``input_ids``; its returned KV cache holds the n virtual columns
    first (``pretrain.kv_cache.CachedLM`` reads :attr:`num_virtual_tokens` and keeps them). A call
    with a cache passes straight through. Other attributes (``config``, ``get_output_embeddings``,
    ...) are the base model's.

    Attributes:
        peft: the ``peft.PeftModel``; ``kind``: 'lora' or 'prompt-tuning'; ``base_dir``: the base model's dir.
    """

    def __init__(self, peft_model, base_dir: str | Path):
        super().__init__()
        self.peft = peft_model
        self.base_dir = Path(base_dir)
        self.kind = "prompt-tuning" if peft_model.active_peft_config.is_prompt_learning else "lora"
        self._disabled = False

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "peft":
                raise
            return getattr(self.peft.get_base_model(), name)

    @property
    def base_model(self):
        """The ``transformers`` model (with LoRA's layers injected; without the soft prompt)."""
        return self.peft.get_base_model()

    @property
    def num_virtual_tokens(self) -> int:
        """Columns the soft prompt adds in front of every context (0 for LoRA or while disabled)."""
        return 0 if self.kind == "lora" or self._disabled else self.peft.active_peft_config.num_virtual_tokens

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        has_cache = any(kwargs.get(k) is not None for k in ("cache", "past_key_values"))
        n = self.num_virtual_tokens
        if n == 0 or has_cache:
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        batch, width = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        embeds = self.base_model.get_input_embeddings()(input_ids)
        prompt = self.peft.get_prompt(batch_size=batch).to(embeds.dtype)  # (B, n, hidden)
        virtual = torch.arange(n, device=input_ids.device).expand(batch, n)
        out = self.base_model(
            inputs_embeds=torch.cat([prompt, embeds], 1),
            attention_mask=torch.cat([attention_mask.new_ones(batch, n), attention_mask], 1),
            position_ids=torch.cat([virtual, position_ids + n], 1),
            **kwargs,
        )
        if out.logits is not None and out.logits.shape[1] == n + width:
            out.logits = out.logits[:, n:]
        if getattr(out, "hidden_states", None) is not None:
            out.hidden_states = tuple(h[:, n:] for h in out.hidden_states)
        return out

    @contextlib.contextmanager
    def adapter_disabled(self):
        """Within: the base model's function (LoRA layers off, no soft prompt)."""
        was, self._disabled = self._disabled, True
        try:
            if self.kind == "lora":
                with self.peft.disable_adapter():
                    yield
            else:
                yield
        finally:
            self._disabled = was

    def reference(self) -> ReferenceLM:
        """pi_ref: this model with its adapter disabled, sharing every base weight (frozen, eval mode)."""
        return ReferenceLM(self)

    def generate(self, *args, **kwargs):
        return self.peft.generate(*args, **kwargs)

    def save_adapter(self, path: str | Path) -> Path:
        """The adapter alone, in peft's format. ``adapter_config.json`` names the base dir so that the
        run dir can move: 'default' for the shipped LM, a path relative to the adapter dir for a base
        inside the same run dir (``<run>/init-model`` of ``<run>/final/adapter``), else absolute."""
        path = Path(path)
        self.peft.save_pretrained(str(path), safe_serialization=True)
        base = self.base_dir.resolve()
        run_dir = path.resolve().parent.parent
        if base == lm.default_model_dir().resolve():
            recorded = "default"
        elif base.is_relative_to(run_dir):
            recorded = os.path.relpath(base, path.resolve())
        else:
            recorded = str(base)
        config_file = path / ADAPTER_CONFIG
        config = json.loads(config_file.read_text())
        config["base_model_name_or_path"] = recorded
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
        return path


class ReferenceLM(nn.Module):
    """The frozen reference of an :class:`AdaptedLM`: every call runs with the adapter disabled.

    Holds the adapted model without registering it as a submodule, so the reference adds no
    parameters (and no copy) to whatever owns it."""

    def __init__(self, adapted: AdaptedLM):
        super().__init__()
        object.__setattr__(self, "_adapted", adapted)

    def forward(self, *args, **kwargs):
        with torch.no_grad(), self._adapted.adapter_disabled():
            return self._adapted(*args, **kwargs)

    def __getattr__(self, name: str):
        if name == "_adapted":
            raise AttributeError(name)
        return getattr(self._adapted.base_model, name)

    def parameters(self, recurse: bool = True):
        return iter(())

    def named_parameters(self, *args, **kwargs):
        return iter(())

    @property
    def num_virtual_tokens(self) -> int:
        return 0


def is_adapter_dir(path: str | Path) -> bool:
    """Whether ``path`` holds an adapter (peft's ``adapter_config.json``, at its root or in ``adapter/``)
    rather than a full model: a prompt-tuned ``final/`` or an adapter run's checkpoint."""
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() or (not (path / "config.json").is_file() and (path / ADAPTER_DIR / ADAPTER_CONFIG).is_file())


def adapter_path(path: str | Path) -> Path:
    path = Path(path)
    return path if (path / ADAPTER_CONFIG).is_file() else path / ADAPTER_DIR


def adapter_base_dir(path: str | Path) -> Path:
    """The base model dir an adapter dir was trained on (``base_model_name_or_path``); ``ValueError`` if unreadable."""
    config_file = adapter_path(path) / ADAPTER_CONFIG
    try:
        base = json.loads(config_file.read_text())["base_model_name_or_path"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{config_file} is not a peft adapter config naming its base model ({err})") from err
    if base == "default":
        return lm.default_model_dir()
    resolved = Path(base) if Path(base).is_absolute() else (config_file.parent / base).resolve()
    if not base or not resolved.is_dir():
        raise ValueError(f"{config_file} names the base model {base!r}, which is not a directory here "
                         "(the adapter needs the model it was trained on)")
    return resolved


def load_lm(path: str | Path = "default", device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
            quantization_config=None):
    """``pretrain.model.load_lm``, which also loads a peft adapter dir (``adapter_config.json`` at
    its root, or in ``adapter/`` with no model beside it: a prompt-tuned ``final/``, an adapter run's
    checkpoint) as a frozen :class:`AdaptedLM` on the base model it names. This is ``pretrain.load_lm``."""
    if str(path) != "default" and Path(path).is_dir() and is_adapter_dir(path):
        if (Path(path) / lm.MANIFEST).is_file():
            lm.verify_manifest(path)
        base_dir = adapter_base_dir(path)
        base, tokenizer = lm.load_lm(base_dir, device=device, dtype=dtype, quantization_config=quantization_config)
        return add_adapter(base, None, base_dir, adapter_dir=path, trainable=False).eval(), tokenizer
    return lm.load_lm(path, device=device, dtype=dtype, quantization_config=quantization_config)


def add_adapter(model, opts: ModelOptions, base_dir: str | Path, adapter_dir: str | Path | None = None,
                trainable: bool = True) -> AdaptedLM:
    """Wrap ``model`` (loaded from ``base_dir``) with a new adapter as ``opts`` says, or the one saved in
    ``adapter_dir`` (resume, evaluation). The base weights are frozen; the adapter's are trainable
    unless ``trainable`` is False."""
    from peft import PeftModel, get_peft_model

    if adapter_dir is not None:
        peft_model = PeftModel.from_pretrained(model, str(adapter_path(adapter_dir)), is_trainable=trainable)
    else:
        peft_model = get_peft_model(model, peft_config(opts, model, base_dir))
    return AdaptedLM(peft_model, base_dir)


def check_qlora_available(device: torch.device) -> None:
    """``RuntimeError`` naming what QLoRA needs when the device or bitsandbytes lacks it."""
    if torch.device(device).type != "cuda":
        raise RuntimeError(f"--peft qlora quantises the base model to 4 bits with bitsandbytes, which needs a CUDA GPU "
                           f"(this run's device is {str(device)!r}); use --peft lora on this machine")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise RuntimeError("--peft qlora needs the bitsandbytes package (pip install bitsandbytes)") from err


def load_trainable_lm(path: str | Path, opts: ModelOptions, device: str | torch.device = "cpu", resume_from: str | Path | None = None):
    """``(model, tokenizer)`` to train: the LM in ``path`` ('default' or an HF causal-LM dir) with all
    weights trainable, or, with ``opts.peft``, an :class:`AdaptedLM` on it (the adapter saved in
    ``resume_from`` when resuming, else a new one). ``resume_from`` of a full-weights run is the
    checkpoint dir to load instead of ``path``. Gradient checkpointing is switched on as ``opts`` says.

    Raises ``RuntimeError`` for QLoRA without CUDA/bitsandbytes, the errors of ``load_lm`` otherwise."""
    device = lm.resolve_device(device)
    if not opts.peft:
        model, tokenizer = load_lm(resume_from or path, device=device)
    else:
        base_dir = lm.resolve_model_path(path)
        quantization = None
        if opts.peft == "qlora":
            check_qlora_available(device)
            from transformers import BitsAndBytesConfig

            quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                              bnb_4bit_compute_dtype=torch.bfloat16)
        model, tokenizer = lm.load_lm(base_dir, device=device, quantization_config=quantization)
        if quantization is not None:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=opts.gradient_checkpointing)
        model = add_adapter(model, opts, base_dir, adapter_dir=resume_from)
    if opts.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model, tokenizer


def enable_gradient_checkpointing(model) -> None:
    """Recompute each block's activations in the backward pass (non-reentrant: works with frozen
    embeddings, i.e. with adapters). Active in train mode only, as in ``transformers``."""
    base = model.base_model if isinstance(model, AdaptedLM) else model
    if hasattr(base, "activation_checkpointing_enable"):  # the name in transformers >= 5.2x
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def trainable_parameters(*modules: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer should hold: those with ``requires_grad`` (adapter + heads), each once."""
    seen, params = set(), []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def save_merged(model: AdaptedLM, tokenizer, path: str | Path) -> Path:
    """A plain HF dir of the adapted model (LoRA merged into the weights: W + alpha / r B A) that
    ``AutoModelForCausalLM.from_pretrained`` loads. The base is re-read from ``model.base_dir`` on the
    CPU in fp32 (never a second copy on the GPU; a 4-bit QLoRA base is merged in full precision).
    Raises ``ValueError`` for prompt tuning, which cannot be merged into weights."""
    from peft import PeftModel

    if model.kind != "lora":
        raise ValueError("a prompt-tuning adapter cannot be merged into the weights; load its dir with pretrain.load_lm")
    path = Path(path)
    base, _ = lm.load_lm(model.base_dir, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        model.save_adapter(tmp)
        merged = PeftModel.from_pretrained(base, tmp).merge_and_unload()
    return lm.save_lm(merged, tokenizer, path)
