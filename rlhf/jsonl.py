"""JSONL records with required string fields; errors name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from pretrain.checkpoint import write_text_atomic


def read_records(path: str | Path, fields: Sequence[str], allow_empty: bool = False,
                 non_empty: Sequence[str] = ()) -> list[dict[str, str]]:
    """All non-blank lines of a UTF-8 JSONL file as dicts holding (at least) the string ``fields``,
    those in ``non_empty`` holding text; a file with no records is a ``ValueError`` unless
    ``allow_empty``. Every error names the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"data file {path} is not UTF-8 text (byte {err.start}: {err.object[err.start:err.start + 8]!r})") from err
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object with {tuple(fields)}, got {type(record).__name__}")
        missing = [f for f in fields if f not in record]
        if missing:
            raise ValueError(f"{path}:{lineno}: missing field(s) {missing}; each line needs {tuple(fields)}")
        bad = [f for f in fields if not isinstance(record[f], str)]
        if bad:
            raise ValueError(f"{path}:{lineno}: field(s) {bad} must be strings")
        empty = [f for f in non_empty if not record[f].strip()]
        if empty:
            raise ValueError(f"{path}:{lineno}: field(s) {empty} are empty")
        records.append({f: record[f] for f in fields})
    if not records and not allow_empty:
        raise ValueError(f"data file {path} holds no records")
    return records


def write_records(records: Iterable[dict], path: str | Path) -> Path:
    """Write records as JSONL all-or-nothing (temp file, fsync, rename): a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
