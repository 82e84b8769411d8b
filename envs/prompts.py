"""A user's prompts, read from any common source and checked at the door.

Sources (the ``prompts`` argument of :func:`read_prompts`):

* ``None``                 the shipped prompts of ``split`` ('train' or 'test', ``pretrain.corpus.load_prompts``).
* a list / tuple           (any non-str iterable with a fixed order) of str.
* a ``datasets.Dataset``   its column ``field``.
* a ``datasets.DatasetDict``  its split ``split``, column ``field``. A dict without a 'test' split
                           gives its 'validation' split for ``split='test'``.
* a path (str or Path):
    - a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``: loaded with
      ``datasets.load_from_disk`` (local only: nothing is ever fetched from the Hub), then as above;
    - ``*.jsonl`` (or ``*.json`` as ``Dataset.to_json`` writes it): one JSON object per line, the
      prompt in its key ``field``;
    - ``*.csv``: a header row, then the column ``field``;
    - anything else (``*.txt``): UTF-8 text, one prompt per non-blank line.

Splits: a list or a file is taken whole, whatever ``split`` is asked for: the caller gives the train
prompts with ``prompts`` and the held-out ones with a separate ``eval_prompts``. A ``DatasetDict``
(in memory or saved) provides both, by split name.

Prompts are kept verbatim (no stripping, no deduplication). Nothing is dropped silently except the
blank (empty or whitespace-only) lines of a text or JSONL file; a UTF-8 byte-order mark at the start
of a file is not part of the first prompt. Every other problem is an error that says where it is:
``FileNotFoundError`` for a path that does not exist, ``ValueError`` for everything else (a file that
is not UTF-8, empty, or holds no prompt; invalid JSON; a line that is not a JSON object; a missing
field or column, listing the ones there are; a value that is not a str, or is blank; an unknown
split, listing the splits there are; a ``prompts`` of the wrong type), naming the file and the
1-based line (``prompts.jsonl line 3``), or the index into a list or dataset
(``DatasetDict['train']['prompt'][2]``). With a ``tokenizer``, each prompt is also checked by
``envs.inputs.check_prompt`` under the same name.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from envs.inputs import check_prompt
from pretrain import corpus

SHIPPED_SPLITS = ("train", "test")
JSONL_SUFFIXES = (".jsonl", ".json")
SPLIT_FALLBACKS = {"test": "validation"}  # a DatasetDict without the split asked for -> this one


def read_prompts(prompts=None, split: str = "train", tokenizer=None, field: str = "prompt") -> list[str]:
    """The prompts of ``prompts`` (module docstring: the sources, the split semantics, the errors).

    Args:
        prompts: None (the shipped prompts), a list of str, a ``datasets.Dataset`` / ``DatasetDict``,
            or the path of a saved dataset directory, a ``.jsonl``, ``.csv`` or text file.
        split: the split to read: of the shipped prompts ('train' or 'test') or of a ``DatasetDict``;
            a list or a file is taken whole for any split.
        tokenizer: when given, every prompt must also pass ``envs.inputs.check_prompt`` with it.
        field: the JSONL key / CSV or dataset column that holds the prompt.
    """
    return _read(prompts, split, tokenizer, field)[0]


def describe_prompts(prompts=None, split: str = "train", field: str = "prompt") -> str:
    """A short description of the source for logs, e.g. ``"shipped test prompts (1670)"`` or
    ``"prompts.jsonl (field 'prompt', 120 prompts)"``. Reads (and checks) the source like
    :func:`read_prompts`, except a one-shot iterator, which is described without being consumed."""
    if isinstance(prompts, Iterator):
        return "an iterator of prompts"
    return _read(prompts, split, None, field)[1]


def _read(prompts, split: str, tokenizer, field: str) -> tuple[list[str], str]:
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a split name such as 'train' or 'test', got {type(split).__name__} {split!r}")
    if not isinstance(field, str) or not field:
        raise ValueError(f"field must be the name of the key/column holding the prompt, got {type(field).__name__} {field!r}")
    if prompts is None:
        if split not in SHIPPED_SPLITS:
            raise ValueError(f"unknown prompt split {split!r} of the shipped prompts; expected 'train' or 'test'")
        texts = [p.text for p in corpus.load_prompts(split)]
        return _checked(texts, lambda i: f"shipped {split} prompts[{i}]", tokenizer), f"shipped {split} prompts ({len(texts)})"
    if isinstance(prompts, (str, os.PathLike)):
        return _read_path(Path(prompts), split, tokenizer, field)
    dataset_types = _dataset_types()
    if dataset_types and isinstance(prompts, dataset_types):
        return _read_dataset(prompts, split, tokenizer, field, type(prompts).__name__)
    _check_iterable(prompts)
    texts = list(prompts)
    if not texts:
        raise ValueError("the prompt list is empty")
    return _checked(texts, lambda i: f"prompts[{i}]", tokenizer), f"a list of {_count(texts)}"


def _count(texts: list) -> str:
    return f"{len(texts)} prompt" + ("" if len(texts) == 1 else "s")


def _dataset_types() -> tuple[type, ...]:
    """``(Dataset, DatasetDict)`` when ``datasets`` is imported; a user's dataset object means it is."""
    datasets = sys.modules.get("datasets")
    return (datasets.Dataset, datasets.DatasetDict) if datasets is not None else ()


def _check_iterable(prompts) -> None:
    kind = type(prompts).__name__
    if kind in ("IterableDataset", "IterableDatasetDict"):
        raise ValueError(f"prompts is a streaming datasets.{kind}: load it without streaming=True, or pass a list of str")
    if kind == "DataFrame":
        raise ValueError("prompts is a DataFrame (iterating it gives column names): pass df['prompt'].tolist()")
    if isinstance(prompts, io.IOBase):
        raise ValueError("prompts is an open file (its lines would keep their newlines): pass its path")
    if isinstance(prompts, (set, frozenset)):
        raise ValueError(f"prompts is a {kind}, whose order changes from run to run: pass a list (e.g. sorted(prompts))")
    if isinstance(prompts, (bytes, bytearray, Mapping)) or not isinstance(prompts, Iterable):
        raise ValueError(
            f"prompts must be None, a list of str, a datasets.Dataset/DatasetDict or the path of a saved dataset, "
            f".jsonl, .csv or text file; got {kind} {prompts!r}"[:300]
        )


def _checked(texts: list, where, tokenizer) -> list[str]:
    """``texts`` after checking every one: a str holding text (and passing ``check_prompt``)."""
    for i, text in enumerate(texts):
        _check_text(text, where(i), tokenizer)
    return texts


def _check_text(text, where: str, tokenizer) -> None:
    if not isinstance(text, str):
        raise ValueError(f"{where} must be a str, got {type(text).__name__} {text!r}"[:300])
    if not text.strip():
        raise ValueError(f"{where} is an empty or whitespace-only prompt: {text!r}")
    if tokenizer is not None:
        check_prompt(tokenizer, text, where)


def _read_dataset(dataset, split: str, tokenizer, field: str, origin: str) -> tuple[list[str], str]:
    """A Dataset's column ``field``, or that of a DatasetDict's split ``split`` (``origin`` names it in messages)."""
    description = origin
    if isinstance(dataset, dict):  # a DatasetDict
        name = split
        if name not in dataset and SPLIT_FALLBACKS.get(split) in dataset:
            name = SPLIT_FALLBACKS[split]
        if name not in dataset:
            raise ValueError(f"{origin} has no split {split!r}; its splits: {list(dataset)}")
        dataset, origin = dataset[name], f"{origin}[{name!r}]"
        description += f" split {name!r}" + (f" for {split!r}" if name != split else "")
    if field not in dataset.column_names:
        raise ValueError(f"{origin} has no column {field!r}; its columns: {dataset.column_names}")
    if len(dataset) == 0:
        raise ValueError(f"{origin} has no rows: no prompts")
    texts = list(dataset[field])
    _checked(texts, lambda i: f"{origin}[{field!r}][{i}]", tokenizer)
    return texts, f"{description} (column {field!r}, {_count(texts)})"


def _read_path(path: Path, split: str, tokenizer, field: str) -> tuple[list[str], str]:
    if path.is_dir():
        return _read_saved_dataset(path, split, tokenizer, field)
    if not path.is_file():
        raise FileNotFoundError(
            f"prompts file {str(path)!r} does not exist (to give the prompts themselves, pass a list of str; "
            f"Hub datasets are never downloaded: load one with datasets.load_dataset and pass it)"
        )
    text = _read_text(path)
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        texts = _parse_jsonl(path, text, tokenizer, field)
        return texts, f"{path} (field {field!r}, {_count(texts)})"
    if suffix == ".csv":
        texts = _parse_csv(path, text, tokenizer, field)
        return texts, f"{path} (column {field!r}, {_count(texts)})"
    texts = []
    for lineno, line in enumerate(text.splitlines(), start=1):  # verbatim, as the text reader always has
        if line.strip():
            _check_text(line, f"{path} line {lineno}", tokenizer)
            texts.append(line)
    if not texts:
        raise ValueError(f"prompts file {path} has no prompts: every line is blank")
    return texts, f"{path} ({_count(texts)}, one per line)"


def _read_text(path: Path) -> str:
    """The file's text (UTF-8, a leading byte-order mark removed); an empty or non-UTF-8 file is an error."""
    raw = path.read_bytes()
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        lineno = raw.count(b"\n", 0, err.start) + 1
        raise ValueError(
            f"prompts file {path} is not UTF-8 text: line {lineno} has the byte(s) {raw[err.start:err.end]!r} "
            f"({err.reason}); save it as UTF-8"
        ) from err
    if not text:
        raise ValueError(f"prompts file {path} is empty")
    if not text.strip():
        raise ValueError(f"prompts file {path} has no prompts: it holds only blank lines")
    return text


def _parse_jsonl(path: Path, text: str, tokenizer, field: str) -> list[str]:
    texts = []
    for lineno, line in enumerate(text.split("\n"), start=1):  # JSON strings may hold U+2028: split on \n only
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where} is not valid JSON ({err.msg} at column {err.colno}; expected one JSON object "
                             f"per line): {line[:80]!r}") from err
        if not isinstance(record, dict):
            raise ValueError(f"{where} is a JSON {_json_kind(record)}, not an object holding the prompt in {field!r}: {line[:80]!r}")
        if field not in record:
            raise ValueError(f"{where} has no field {field!r}; its fields: {list(record)}")
        _check_text(record[field], f"{where} field {field!r}", tokenizer)
        texts.append(record[field])
    if not texts:
        raise ValueError(f"prompts file {path} has no prompts: every line is blank")
    return texts


def _json_kind(value) -> str:
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def _parse_csv(path: Path, text: str, tokenizer, field: str) -> list[str]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header, rows, start = [], [], 1
    try:
        header = next(reader)
        start = reader.line_num + 1
        for row in reader:
            rows.append((start, row))  # a quoted value may span lines: name the line the row starts on
            start = reader.line_num + 1
    except csv.Error as err:
        raise ValueError(f"{path} line {start} is not valid CSV ({err})") from err
    if header.count(field) != 1:
        problem = "twice" if header.count(field) > 1 else "no"
        raise ValueError(f"{path} has {problem} column {field!r} in its header (line 1); its columns: {header}")
    column = header.index(field)
    if not rows:
        raise ValueError(f"{path} has a header but no rows: no prompts")
    texts = []
    for lineno, row in rows:
        where = f"{path} line {lineno}"
        if column >= len(row):
            raise ValueError(f"{where} has {len(row)} value(s) for the {len(header)} columns {header}: no value in column {field!r}")
        _check_text(row[column], f"{where} column {field!r}", tokenizer)
        texts.append(row[column])
    return texts


def _read_saved_dataset(path: Path, split: str, tokenizer, field: str) -> tuple[list[str], str]:
    """A directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (local only)."""
    is_dataset = (path / "dataset_info.json").is_file() and (path / "state.json").is_file()
    if not is_dataset and not (path / "dataset_dict.json").is_file():
        raise ValueError(
            f"prompts path {path} is a directory but not one written by Dataset.save_to_disk or DatasetDict.save_to_disk "
            f"(no state.json + dataset_info.json, no dataset_dict.json); pass a .jsonl, .csv or text file instead"
        )
    try:
        import datasets
    except ImportError as err:
        raise ValueError(f"prompts path {path} is a saved dataset: reading it needs the `datasets` package (pip install datasets)") from err
    dataset = datasets.load_from_disk(str(path.resolve()))
    kind = type(dataset).__name__
    texts, description = _read_dataset(dataset, split, tokenizer, field, str(path))
    return texts, f"saved {kind} {description}"
