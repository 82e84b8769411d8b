"""Config dataclass helpers shared by every algorithm's config.

Each algorithm has one ``@dataclass`` config whose fields carry their help text; the ``textgym``
CLI is generated from these dataclasses (``transformers.HfArgumentParser`` reads the help from
``field(metadata={"help": ...})``), so a field's help is written exactly once.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any


def hparam(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse's name
    """A dataclass field with a default and its help text for the CLI."""
    return field(default=default, metadata={"help": help})


def require_positive(cfg: Any, *names: str) -> None:
    """Raise ``ValueError("<name> must be positive, got <value>")`` for the first field that is not."""
    for name in names:
        value = getattr(cfg, name)
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")
