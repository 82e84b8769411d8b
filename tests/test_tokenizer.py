import pytest
from transformers import AutoTokenizer

from pretrain.tokenizer import EOS_TOKEN, PAD_TOKEN, load_tokenizer, tokens_per_word, train_tokenizer


def test_round_trip_is_lossless(tiny_tokenizer):
    texts = ["This movie was GREAT!! 10/10 — would watch again.", "naïve café, 'quoted' & <SPOILER>", "  spaces  "]
    for text in texts:
        ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tiny_tokenizer.decode(ids) == text


def test_special_tokens_are_distinct(tiny_tokenizer):
    assert tiny_tokenizer.eos_token == tiny_tokenizer.bos_token == EOS_TOKEN
    assert tiny_tokenizer.pad_token == PAD_TOKEN
    assert tiny_tokenizer.pad_token_id != tiny_tokenizer.eos_token_id
    assert len(tiny_tokenizer) == 512


def test_save_and_load_as_standard_dir(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path)
    for loaded in (AutoTokenizer.from_pretrained(tmp_path), load_tokenizer(tmp_path)):
        assert loaded("a fine film")["input_ids"] == tiny_tokenizer("a fine film")["input_ids"]
        assert loaded.pad_token_id == tiny_tokenizer.pad_token_id


def test_bigger_vocab_compresses_better():
    texts = ["the film was a beautiful and moving story about friendship"] * 50 + ["awful acting, boring plot"] * 50
    small, big = train_tokenizer(texts, 270), train_tokenizer(texts, 400)
    assert tokens_per_word(big, texts) < tokens_per_word(small, texts)


def test_bad_inputs():
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        train_tokenizer(["a"], vocab_size=100)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer("/no/such/tokenizer")
