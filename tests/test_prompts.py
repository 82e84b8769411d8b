"""envs.prompts: every source gives exactly its prompts; every bad input is refused saying where."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from envs.prompts import describe_prompts, read_prompts
from envs.toy import toy_tokenizer
from pretrain import corpus


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def dataset(**columns):
    return pytest.importorskip("datasets").Dataset.from_dict(columns)


def dataset_dict(**splits):
    return pytest.importorskip("datasets").DatasetDict({name: dataset(prompt=texts) for name, texts in splits.items()})


def saved(tmp_path: Path, data) -> Path:
    data.save_to_disk(tmp_path / "saved")
    return tmp_path / "saved"


JSONL = '{"prompt": "The film was", "label": 1}\n\n{"prompt": "  I expected\u2028more ", "label": 0}\n'
CSV = 'id,prompt\n1,"Well, the plot"\n2,"A long\nopening "\n'

# (make(tmp_path) -> (prompts, kwargs of read_prompts), the exact list it must give)
SOURCES = [
    pytest.param(lambda tmp: (["The film", "  spaced  "], {}), ["The film", "  spaced  "], id="list"),
    pytest.param(lambda tmp: (("a", "b"), {"split": "test"}), ["a", "b"], id="tuple-any-split"),
    pytest.param(lambda tmp: ((t for t in ["a", "b"]), {}), ["a", "b"], id="generator"),
    pytest.param(lambda tmp: (write(tmp, "p.txt", "The film\n\n   \n  kept verbatim \n"), {}), ["The film", "  kept verbatim "], id="txt"),
    pytest.param(lambda tmp: (str(write(tmp, "p.txt", b"\xef\xbb\xbfFirst\r\nSecond\r\n")), {"split": "test"}), ["First", "Second"],
                 id="txt-str-path-bom-crlf"),
    pytest.param(lambda tmp: (write(tmp, "p.jsonl", JSONL), {}), ["The film was", "  I expected\u2028more "], id="jsonl"),
    pytest.param(lambda tmp: (write(tmp, "p.jsonl", '{"text": "Custom", "prompt": 3}\n'), {"field": "text"}), ["Custom"], id="jsonl-field"),
    pytest.param(lambda tmp: (write(tmp, "p.csv", CSV), {}), ["Well, the plot", "A long\nopening "], id="csv"),
    pytest.param(lambda tmp: (write(tmp, "p.csv", "text,prompt\nCustom,\n"), {"field": "text"}), ["Custom"], id="csv-field"),
    pytest.param(lambda tmp: (dataset(prompt=["a", " b"], label=[0, 1]), {}), ["a", " b"], id="Dataset"),
    pytest.param(lambda tmp: (dataset(text=["a"]), {"field": "text"}), ["a"], id="Dataset-field"),
    pytest.param(lambda tmp: (dataset_dict(train=["tr"], test=["te"]), {"split": "train"}), ["tr"], id="DatasetDict-train"),
    pytest.param(lambda tmp: (dataset_dict(train=["tr"], test=["te"]), {"split": "test"}), ["te"], id="DatasetDict-test"),
    pytest.param(lambda tmp: (dataset_dict(train=["tr"], validation=["va"]), {"split": "test"}), ["va"],
                 id="DatasetDict-test-falls-back-to-validation"),
    pytest.param(lambda tmp: (saved(tmp, dataset(prompt=["a", "b"])), {"split": "test"}), ["a", "b"], id="saved-Dataset"),
    pytest.param(lambda tmp: (saved(tmp, dataset_dict(train=["tr"], test=["te"])), {"split": "train"}), ["tr"], id="saved-DatasetDict-train"),
    pytest.param(lambda tmp: (str(saved(tmp, dataset_dict(train=["tr"], test=["te"]))), {"split": "test"}), ["te"], id="saved-DatasetDict-test"),
]


@pytest.mark.parametrize("make, expected", SOURCES)
def test_every_source_reads_exactly_its_prompts(tmp_path, make, expected):
    prompts, kwargs = make(tmp_path)
    assert read_prompts(prompts, **kwargs) == expected


@pytest.mark.parametrize("split", ["train", "test"])
def test_the_shipped_prompts_of_a_split_are_its_review_openings(split):
    prompts = read_prompts(None, split)
    assert prompts and prompts == [p.text for p in corpus.load_prompts(split)]
    assert describe_prompts(None, split) == f"shipped {split} prompts ({len(prompts)})"


def test_the_shipped_train_and_test_prompts_come_from_disjoint_reviews():
    # Disjoint by review, not by text: short generic openings ("This is a") occur in both splits.
    prompts = corpus.load_prompts()
    train, test = ({p.review_id for p in prompts if p.split == split} for split in ("train", "test"))
    assert train and test and not train & test


def test_a_file_gives_the_same_prompts_for_every_split(tmp_path):
    path = write(tmp_path, "p.jsonl", JSONL)
    assert read_prompts(path, "train") == read_prompts(path, "test")


@pytest.mark.parametrize("make, expected", [
    pytest.param(lambda tmp: ["a", "b"], "a list of 2 prompts", id="list"),
    pytest.param(lambda tmp: write(tmp, "p.jsonl", JSONL), "p.jsonl (field 'prompt', 2 prompts)", id="jsonl"),
    pytest.param(lambda tmp: write(tmp, "p.csv", CSV), "p.csv (column 'prompt', 2 prompts)", id="csv"),
    pytest.param(lambda tmp: write(tmp, "p.txt", "a\n"), "p.txt (1 prompt, one per line)", id="txt"),
    pytest.param(lambda tmp: dataset_dict(train=["tr"], validation=["va"]),
                 "DatasetDict split 'validation' for 'test' (column 'prompt', 1 prompt)", id="DatasetDict-fallback"),
    pytest.param(lambda tmp: saved(tmp, dataset(prompt=["a"])), "saved Dataset", id="saved-Dataset"),
])
def test_the_description_names_the_source_and_counts_its_prompts(tmp_path, make, expected):
    assert expected in describe_prompts(make(tmp_path), "test")


# (file name, content, kwargs, error, what the message must contain: the file, the line, the fields...)
BAD_FILES = [
    ("missing.jsonl", None, {}, FileNotFoundError, r"missing\.jsonl' does not exist"),
    ("latin1.txt", b"fine\ncaf\xe9\n", {}, ValueError, r"latin1\.txt is not UTF-8 text: line 2 has the byte\(s\) b'\\xe9'"),
    ("empty.txt", "", {}, ValueError, r"empty\.txt is empty"),
    ("blank.txt", "\n  \n", {}, ValueError, r"blank\.txt has no prompts"),
    ("blank.jsonl", "\n\n", {}, ValueError, r"blank\.jsonl has no prompts"),
    ("bad.jsonl", '{"prompt": "a"}\n\n{"prompt": "b",\n', {}, ValueError, r"bad\.jsonl line 3 is not valid JSON"),
    ("array.jsonl", '{"prompt": "a"}\n["b"]\n', {}, ValueError, r"array\.jsonl line 2 is a JSON array, not an object"),
    ("string.jsonl", '"b"\n', {}, ValueError, r"string\.jsonl line 1 is a JSON string, not an object"),
    ("field.jsonl", '{"prompt": "a"}\n{"text": "b", "label": 1}\n', {}, ValueError,
     r"field\.jsonl line 2 has no field 'prompt'; its fields: \['text', 'label'\]"),
    ("custom.jsonl", '{"prompt": "a"}\n', {"field": "text"}, ValueError, r"custom\.jsonl line 1 has no field 'text'; its fields: \['prompt'\]"),
    ("int.jsonl", '{"prompt": "a"}\n{"prompt": 7}\n', {}, ValueError, r"int\.jsonl line 2 field 'prompt' must be a str, got int 7"),
    ("null.jsonl", '{"prompt": null}\n', {}, ValueError, r"null\.jsonl line 1 field 'prompt' must be a str, got NoneType"),
    ("blankvalue.jsonl", '{"prompt": "a"}\n{"prompt": " \\t"}\n', {}, ValueError,
     r"blankvalue\.jsonl line 2 field 'prompt' is an empty or whitespace-only prompt"),
    ("column.csv", "text,label\na,1\n", {}, ValueError, r"column\.csv has no column 'prompt' in its header \(line 1\); its columns: \['text', 'label'\]"),
    ("header.csv", "prompt\n", {}, ValueError, r"header\.csv has a header but no rows"),
    ("emptycell.csv", 'prompt,label\na,1\n"multi\nline",2\n  ,3\n', {}, ValueError,
     r"emptycell\.csv line 5 column 'prompt' is an empty or whitespace-only prompt"),
    ("short.csv", "label,prompt\n1,a\n2\n", {}, ValueError, r"short\.csv line 3 has 1 value\(s\) for the 2 columns .*no value in column 'prompt'"),
    ("quote.csv", 'prompt\na\n"unterminated\n', {}, ValueError, r"quote\.csv line 3 is not valid CSV"),
]


@pytest.mark.parametrize("name, content, kwargs, error, match", BAD_FILES, ids=[f[0] for f in BAD_FILES])
def test_a_bad_file_is_refused_naming_the_file_and_the_line(tmp_path, name, content, kwargs, error, match):
    path = tmp_path / name if content is None else write(tmp_path, name, content)
    with pytest.raises(error, match=match):
        read_prompts(path, **kwargs)


@pytest.mark.parametrize("make, split, match", [
    pytest.param(lambda tmp: dataset(text=["a"], label=[1]), "train", r"Dataset has no column 'prompt'; its columns: \['text', 'label'\]",
                 id="Dataset-column"),
    pytest.param(lambda tmp: dataset(prompt=["a", None]), "train", r"Dataset\['prompt'\]\[1\] must be a str, got NoneType", id="Dataset-None"),
    pytest.param(lambda tmp: dataset(prompt=["a", "  "]), "train", r"Dataset\['prompt'\]\[1\] is an empty or whitespace-only prompt",
                 id="Dataset-blank"),
    pytest.param(lambda tmp: dataset_dict(train=["a"], dev=["b"]), "test", r"DatasetDict has no split 'test'; its splits: \['train', 'dev'\]",
                 id="DatasetDict-split"),
    pytest.param(lambda tmp: saved(tmp, dataset_dict(train=["a"])), "test", r"saved has no split 'test'; its splits: \['train'\]",
                 id="saved-DatasetDict-split"),
    pytest.param(lambda tmp: saved(tmp, dataset(label=[1])), "train", r"saved has no column 'prompt'; its columns: \['label'\]",
                 id="saved-Dataset-column"),
    pytest.param(lambda tmp: tmp, "train", r"is a directory but not one written by Dataset.save_to_disk", id="plain-directory"),
])
def test_a_bad_dataset_is_refused_naming_the_row_or_listing_what_it_has(tmp_path, make, split, match):
    with pytest.raises(ValueError, match=match):
        read_prompts(make(tmp_path), split)


@pytest.mark.parametrize("prompts, split, match", [
    pytest.param(b"the movie was", "train", r"got bytes", id="bytes"),
    pytest.param({"prompt": "a"}, "train", r"got dict", id="dict"),
    pytest.param(3, "train", r"got int 3", id="int"),
    pytest.param({"a", "b"}, "train", r"set, whose order changes", id="set"),
    pytest.param([], "train", r"the prompt list is empty", id="empty-list"),
    pytest.param(["a", 3], "train", r"prompts\[1\] must be a str, got int 3", id="list-int"),
    pytest.param(["a", ""], "train", r"prompts\[1\] is an empty or whitespace-only prompt", id="list-blank"),
    pytest.param(None, "validation", r"unknown prompt split 'validation'", id="shipped-split"),
])
def test_a_wrong_prompts_argument_is_refused(prompts, split, match):
    with pytest.raises(ValueError, match=match):
        read_prompts(prompts, split)


@pytest.mark.parametrize("name, content, where", [
    ("vocab.jsonl", '{"prompt": "the movie was"}\n{"prompt": "the film was"}\n', "vocab.jsonl line 2 field 'prompt'"),
    ("special.txt", "the movie was\n\nthe plot was<|endoftext|>\n", "special.txt line 3"),
    ("vocab.csv", "prompt\nthe plot was\nthe actors were\n", "vocab.csv line 3 column 'prompt'"),
])
def test_with_a_tokenizer_each_prompt_is_checked_under_its_file_and_line(tmp_path, name, content, where):
    tokenizer = toy_tokenizer()
    assert read_prompts(write(tmp_path, "ok.txt", "the movie was\n"), tokenizer=tokenizer) == ["the movie was"]
    with pytest.raises(ValueError, match=re.escape(where) + r" '.*' (has words outside|contains the special token)"):
        read_prompts(write(tmp_path, name, content), tokenizer=tokenizer)
