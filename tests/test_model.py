"""load_lm accepts any HF causal-LM dir (GPT-2, Llama, Qwen2) and rejects bad ones clearly."""

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from pretrain.model import build_gpt2, count_parameters, load_lm, save_lm
from pretrain.sample import generate


def test_load_lm_loads_and_generates_each_architecture(tiny_model_dir):
    model, tokenizer = load_lm(tiny_model_dir)
    assert not model.training and model.dtype == torch.float32
    texts = generate(model, tokenizer, ["This movie was", "Awful"], max_new_tokens=5, seed=0)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    again = generate(model, tokenizer, ["This movie was", "Awful"], max_new_tokens=5, seed=0)
    assert texts == again, "sampling must be deterministic per seed"


def test_save_lm_fp16_round_trip(tmp_path, tiny_tokenizer):
    torch.manual_seed(0)
    model = build_gpt2(len(tiny_tokenizer), n_layer=1, n_embd=32, n_head=2, n_positions=64)
    save_lm(model, tiny_tokenizer, tmp_path, dtype=torch.float16)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.dtype == torch.float16
    assert count_parameters(reloaded) == count_parameters(model)
    loaded, _ = load_lm(tmp_path)
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=2e-2, rtol=0)
    assert model.dtype == torch.float32, "saving a fp16 copy must not change the model itself"


def test_missing_path():
    with pytest.raises(FileNotFoundError, match="/no/such/model.*does not exist"):
        load_lm("/no/such/model")


def test_file_instead_of_dir(tmp_path):
    f = tmp_path / "weights.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        load_lm(f)


def test_dir_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_lm(tmp_path)


def test_dir_without_safetensors_refuses_pickle(tmp_path, tiny_model_dir):
    target = tmp_path / "m"
    shutil.copytree(tiny_model_dir, target)
    (target / "model.safetensors").rename(target / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors.*pytorch_model\.bin.*pickle"):
        load_lm(target)


def test_corrupted_weights(tmp_path, tiny_model_dir):
    target = tmp_path / "m"
    shutil.copytree(tiny_model_dir, target)
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"could not load the weights in {target}"):
        load_lm(target)


def test_tokenizer_that_does_not_fit_the_model(tmp_path, tiny_tokenizer):
    model = build_gpt2(vocab_size=100, n_layer=1, n_embd=16, n_head=2, n_positions=32)
    save_lm(model, tiny_tokenizer, tmp_path)
    with pytest.raises(ValueError, match="512 tokens but the model's embedding has only 100 rows"):
        load_lm(tmp_path)


def test_context_overflow_is_an_error(tiny_model_dir):
    model, tokenizer = load_lm(tiny_model_dir)
    with pytest.raises(ValueError, match="exceeds the model's context of 128"):
        generate(model, tokenizer, ["hi"], max_new_tokens=200)
