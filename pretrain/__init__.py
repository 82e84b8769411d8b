"""pretrain: the real review corpus and prompts, the tokenizer, causal-LM pretraining, LM load/save.

The bottom layer of the library (``pretrain <- rlhf <- envs <- agents``): it imports nothing of
ours. It ships the embedded default LM (``default_model_dir()``), a small GPT-2 pretrained on
IMDb + Rotten Tomatoes reviews, and loads any Hugging Face causal-LM dir through ``load_lm``.
"""

from pretrain.adapters import load_lm  # pretrain.model.load_lm, plus peft adapter dirs
from pretrain.model import default_model_dir, save_lm

__all__ = ["default_model_dir", "load_lm", "save_lm"]
