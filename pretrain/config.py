"""Config dataclass helpers shared by every algorithm's config.

Each algorithm has one ``@dataclass`` config whose fields carry their help text; the ``textgym``
CLI is generated from these dataclasses (``transformers.HfArgumentParser`` reads the help from
``field(metadata={"help": ...})``), so a field's help is written exactly once. Every config's
``__post_init__`` starts with :func:`validate_fields`: a float hyper-parameter that is NaN or
infinite (``--kl-coef nan``) is an error naming the field, never a silent change of behaviour.
"""

from __future__ import annotations

import math
from dataclasses import field, fields
from typing import Any


def hparam(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse's name
    """A dataclass field with a default and its help text for the CLI."""
    return field(default=default, metadata={"help": help})


def validate_fields(cfg: Any) -> None:
    """Raise ``ValueError`` naming the first float field of ``cfg`` (or float in a list field) that is NaN or infinite."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name} must be a finite number, got {value}")
        if isinstance(value, (list, tuple)):
            bad = [v for v in value if isinstance(v, float) and not math.isfinite(v)]
            if bad:
                raise ValueError(f"{f.name} must hold finite numbers, got {bad[0]}")


def require_positive(cfg: Any, *names: str) -> None:
    """Raise ``ValueError("<name> must be positive, got <value>")`` for the first field that is not."""
    for name in names:
        value = getattr(cfg, name)
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")


def require_non_negative(cfg: Any, *names: str) -> None:
    """Raise ``ValueError("<name> must be >= 0, got <value>")`` for the first field that is negative (or NaN)."""
    for name in names:
        value = getattr(cfg, name)
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def require_unit_interval(cfg: Any, *names: str) -> None:
    """Raise ``ValueError("<name> must be in [0, 1], got <value>")`` for the first field outside [0, 1]."""
    for name in names:
        value = getattr(cfg, name)
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {value}")


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int in [low, high]: ``TypeError`` for a non-integer (bools and ``"16"``
    included), ``ValueError`` outside the bounds; both name the argument and the value."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"<= {high}" if low is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def check_float(name: str, value: Any, low: float | None = None, high: float | None = None) -> float:
    """``value`` as a finite float in [low, high] (``TypeError`` / ``ValueError`` naming it otherwise)."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        bounds = "finite" if low is None and high is None else f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def import_user_module(name: str, what: str):
    """``importlib.import_module(name)`` with the current directory importable, as with ``python -m``
    (a console script's ``sys.path`` lacks it); ``ValueError`` naming ``what`` if it does not import."""
    import importlib
    import os
    import sys

    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ValueError(f"{what}: cannot import module {name!r} ({err})") from err


def import_object(spec: str, what: str = "object"):
    """The object ``module:attr`` (``attr`` may be dotted) names, e.g. ``"my_rewards:length_bonus"``.

    Like ``python -m``, the current directory is importable. Raises ``ValueError`` naming the spec
    for a malformed spec, a module that does not import, or a missing attribute.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{what} {spec!r} is not of the form module:name")
    module = import_user_module(module_name, f"{what} {spec!r}")
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj
