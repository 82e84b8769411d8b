"""Causal LMs: build the library's small GPT-2, and load/save any Hugging Face causal-LM dir.

Every code path in the library takes a model as ``"default"`` (the shipped LM in package data) or
a path to a Hugging Face causal-LM dir (GPT-2, Llama, Qwen2, ... architectures). Loading is
safetensors-only and ``trust_remote_code=False``: no pickle is ever unpickled and no code from a
model dir is ever run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, PreTrainedModel, PreTrainedTokenizerBase

from pretrain.run_dir import sha256_file, verify_dir
from pretrain.tokenizer import load_tokenizer

DEFAULT_DIR = Path(__file__).parent / "default"
MANIFEST = "manifest.json"


def default_model_dir() -> Path:
    """The shipped default LM + tokenizer (fp16 safetensors), loadable by ``from_pretrained``."""
    return DEFAULT_DIR


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU; anything else is passed to torch."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {type(device).__name__} {device!r}")
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}; expected 'auto', 'cpu', 'cuda' or 'cuda:N'") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {str(device)!r} requested but CUDA is not available")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {str(device)!r} is not supported; expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return device


def build_gpt2(
    vocab_size: int,
    n_layer: int = 4,
    n_embd: int = 256,
    n_head: int = 4,
    n_positions: int = 256,
    dropout: float = 0.0,
    eos_token_id: int = 0,
    pad_token_id: int = 1,
) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2-architecture causal LM with tied input/output embeddings."""
    config = GPT2Config(
        activation_function="gelu_pytorch_tanh",  # GPT-2's tanh GELU (gelu_new) in one fused kernel instead of five
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_inner=4 * n_embd,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        tie_word_embeddings=True,
    )
    return GPT2LMHeadModel(config)


def resolve_model_path(path: str | Path) -> Path:
    """``"default"`` → the shipped dir; otherwise a path that must be a causal-LM dir."""
    path = default_model_dir() if str(path) == "default" else Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist (expected 'default' or an HF model dir)")
    if not path.is_dir():
        raise NotADirectoryError(f"model path {str(path)!r} is a file; expected an HF model dir")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not an HF model dir: it has no config.json")
    if not any(path.glob("*.safetensors")):
        found = sorted(p.name for p in path.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt"})
        extra = f" (found {found}: pickle-based weights are refused, convert them to safetensors)" if found else ""
        raise FileNotFoundError(f"{path} has no *.safetensors weights{extra}")
    return path


def verify_manifest(path: str | Path) -> dict:
    """Check the dir's files against its manifest.json; return the manifest.

    A manifest lists the sha256 of every file (``files``: checkpoints and ``final/`` dirs, see
    ``pretrain.run_dir``) or of ``model.safetensors`` alone (``sha256``: the shipped artifacts).
    Raises ``ValueError`` naming the file for an unreadable manifest or a mismatch.
    """
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path / MANIFEST} is not valid JSON ({err}); restore it or delete it to skip the integrity check") from err
    if not isinstance(manifest, dict) or ("files" not in manifest and "sha256" not in manifest):
        raise ValueError(f"{path / MANIFEST} lists no checksums (expected a 'files' or 'sha256' field)")
    if "files" in manifest:
        problem = verify_dir(path)
        if problem is not None:
            raise ValueError(f"{path} does not match its manifest: {problem} (corrupted or incomplete)")
        return manifest
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{path} has a manifest but no model.safetensors")
    actual = sha256_file(weights)
    if actual != manifest["sha256"]:
        raise ValueError(
            f"{weights} does not match its manifest: sha256 {actual} != {manifest['sha256']} "
            "(corrupted or replaced weights; regenerate with the command in the manifest)"
        )
    return manifest


def load_lm(
    path: str | Path = "default",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    quantization_config=None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` from ``"default"`` or any HF causal-LM dir, in eval mode.

    ``dtype`` defaults to float32 (the shipped weights are stored as fp16 to stay small, but CPU
    kernels are fastest and exact in fp32). ``quantization_config`` is passed to ``from_pretrained``
    (QLoRA's 4-bit base). Raises a clear error for a missing path, a dir without safetensors,
    corrupted weights, or a tokenizer whose vocabulary does not fit the model. (``pretrain.load_lm``
    also loads a peft adapter dir: ``pretrain.adapters.load_lm``.)
    """
    path = resolve_model_path(path)
    if (path / MANIFEST).is_file():
        verify_manifest(path)
    dtype = dtype or torch.float32
    config = load_config(path)
    architectures = getattr(config, "architectures", None) or []
    if architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise ValueError(f"{path} holds a {', '.join(architectures)} model, not a causal LM (expected a *ForCausalLM "
                         "or *LMHeadModel architecture; a reward-model dir goes where a reward model is asked for)")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), config=config, dtype=dtype, use_safetensors=True, trust_remote_code=False,
            **({"quantization_config": quantization_config, "device_map": {"": str(resolve_device(device))}}
               if quantization_config is not None else {}),
        )
    except (OSError, RuntimeError, ValueError, SafetensorError) as err:
        raise ValueError(f"could not load the weights in {path}: {err}") from err
    check_weights_finite(model, path)
    tokenizer = load_tokenizer(path)
    check_vocab_fits(model, tokenizer, path)
    if quantization_config is not None:  # bitsandbytes placed the weights on the GPU already
        return model.eval(), tokenizer
    return model.to(resolve_device(device)).eval(), tokenizer


def load_config(path: Path):
    """The HF config of a model dir (``ValueError`` naming the dir for a missing or malformed one)."""
    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}/config.json is not a valid model config: {err}") from err


def check_weights_finite(model: torch.nn.Module, path: str | Path) -> None:
    """``ValueError`` naming the first NaN/infinite weight of a just-loaded model."""
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise ValueError(f"{path}: the weight {name} holds non-finite values (NaN or inf): the model is corrupted")


def check_vocab_fits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, where: str | Path = "") -> None:
    """Every token id the tokenizer can emit must index a row of the model's embedding."""
    n_embed = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > n_embed:
        raise ValueError(
            f"tokenizer{' in ' + str(where) if where else ''} has {len(tokenizer)} tokens but the model's "
            f"embedding has only {n_embed} rows: they do not belong together"
        )


def save_lm(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    path: str | Path,
    dtype: torch.dtype | None = None,
) -> Path:
    """Save model (safetensors) + tokenizer as an HF dir; ``dtype`` casts a copy (e.g. fp16 to ship)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    to_save = model
    if dtype is not None and dtype != model.dtype:
        to_save = type(model)(model.config).to(dtype)
        to_save.load_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()})
    to_save.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    return path


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Switch every dropout of ``model`` off, in place, whatever mode it is in; returns ``model``.

    Fine-tuning computes ratios pi / pi_old, KLs to a reference and DPO margins from separate forward
    passes; with dropout active (GPT-2 checkpoints ship with p = 0.1) two passes of *identical*
    weights disagree (PPO at learning rate 0 then reports approx_kl 0.2 and clips 72% of tokens), so
    every fine-tuning trainer runs the deterministic network, as TRL does by default. Covers
    ``nn.Dropout`` modules and attention implementations that read a float attribute
    (``attention_dropout`` in Llama/Qwen2). The config is left unchanged, so a saved model keeps
    the user's dropout settings.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
