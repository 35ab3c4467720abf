"""Argument checks at the door: every public entry point validates before anything is queued.

Each check names the argument, says what was given and what is allowed, and raises
``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, wrong value). Nothing that
fails here ever reaches llama.cpp, which aborts the process on some bad values.
"""

from __future__ import annotations

import math
import operator
from typing import Any

__all__ = [
    "check_bool",
    "check_callable",
    "check_int",
    "check_number",
    "check_text",
    "check_timeout",
    "describe",
]


def describe(value: object) -> str:
    """A short, safe description of a bad value for an error message."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is a bool: a switch given ``1`` or ``"no"`` is a mistake, not a choice."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, not {describe(value)}")
    return value


def check_int(name: str, value: object, low: int, high: int) -> int:
    """``value`` as an int in ``[low, high]``; bools and floats are refused.

    Always ``ValueError``, also for a wrong type: integer options have raised it since 0.1.
    """
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif not isinstance(value, (bool, float)):
        try:  # numpy integers and other exact integer types
            number = operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            number = None
    if number is None:
        raise ValueError(f"{name} must be an int in [{low}, {high}], not {describe(value)}")
    if not low <= number <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}], not {describe(value)}")
    return int(number)


def check_number(name: str, value: object) -> float:
    """``value`` as a float, which may be NaN or infinite; only its type is checked here.

    An int too large for a float (``10**400``) counts as infinite: it is a number, just not
    one llama.cpp can use.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number, not {describe(value)}")
    if not isinstance(value, (int, float)):
        try:
            return check_number(name, operator.index(value))  # type: ignore[arg-type]
        except TypeError:  # not an integer type; maybe a numpy float
            pass
        if hasattr(value, "__float__") and not isinstance(value, (str, bytes, complex)):
            return check_number(name, float(value))  # numpy floats, Decimal, Fraction
        raise TypeError(f"{name} must be a number, not {describe(value)}")
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def check_timeout(value: object) -> float | None:
    """A wait limit: ``None`` (wait as long as it takes) or a finite number of seconds >= 0."""
    if value is None:
        return None
    seconds = check_number("timeout", value)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(
            f"timeout must be None (no limit) or a finite number of seconds >= 0, not "
            f"{describe(value)}"
        )
    return seconds


def check_text(name: str, value: object, *, allow_empty: bool = True) -> str:
    """``value`` as a ``str`` that can be encoded as UTF-8 (no lone surrogates)."""
    if not isinstance(value, str):
        hint = " (decode it first: .decode('utf-8'))" if isinstance(value, bytes) else ""
        raise TypeError(f"{name} must be a str, not {describe(value)}{hint}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{name} holds a lone surrogate ({value[exc.start]!r} at index {exc.start}), which "
            "is not valid Unicode text: fix the text where it was decoded (errors='replace')"
        ) from None
    if not allow_empty and not value:
        raise ValueError(f"{name} must be a non-empty string, not ''")
    return value


def check_callable(name: str, value: Any, method: str) -> None:
    """Refuse an object without the callable ``method`` it is used through."""
    if not callable(getattr(value, method, None)):
        raise TypeError(
            f"{name} must have a callable .{method}() (a threading.Event, for example), not "
            f"{describe(value)}"
        )
