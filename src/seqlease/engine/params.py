"""Sampling parameters: defaults from the seed note, and what to do with bad values."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict

from typing_extensions import Unpack

__all__ = ["DEFAULTS", "SamplingKwargs", "SamplingParams", "sanitize"]


@dataclass(frozen=True)
class SamplingParams:
    """How one generation samples and when it stops. Build with :func:`sanitize`."""

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 40
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    max_tokens: int = 256
    seed: int | None = None
    stop: tuple[str, ...] = ()


#: The defaults the seed note recommends: temperature 0.6, top-p 0.9, top-k 40, 256 tokens.
DEFAULTS = SamplingParams()


def _finite(value: float | None, default: float, name: str) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    # A NaN or infinity from a UI slider or a JSON body is a missing value, not an error.
    return float(value) if math.isfinite(value) else default


class SamplingKwargs(TypedDict, total=False):
    """The sampling keyword arguments every generating call accepts (all optional)."""

    temperature: float | None
    top_p: float | None
    top_k: int | None
    min_p: float | None
    repeat_penalty: float | None
    max_tokens: int | float | None
    seed: int | None
    stop: str | Sequence[str] | None


def sanitize(**kwargs: Unpack[SamplingKwargs]) -> SamplingParams:
    """Validate sampling arguments the way the seed note asks.

    Non-finite floats (and a non-finite ``max_tokens``) fall back to the defaults;
    out-of-range values raise ``ValueError`` saying the allowed range; unknown names raise
    ``TypeError``.
    """
    unknown = set(kwargs) - set(SamplingKwargs.__annotations__)
    if unknown:
        raise TypeError(f"unknown sampling arguments: {', '.join(sorted(unknown))}")
    temperature = kwargs.get("temperature")
    top_p = kwargs.get("top_p")
    top_k = kwargs.get("top_k")
    min_p = kwargs.get("min_p")
    repeat_penalty = kwargs.get("repeat_penalty")
    max_tokens = kwargs.get("max_tokens")
    seed = kwargs.get("seed")
    stop = kwargs.get("stop")
    d = DEFAULTS
    temp = _finite(temperature, d.temperature, "temperature")
    p = _finite(top_p, d.top_p, "top_p")
    mp = _finite(min_p, d.min_p, "min_p")
    rp = _finite(repeat_penalty, d.repeat_penalty, "repeat_penalty")
    mt = _finite(max_tokens, d.max_tokens, "max_tokens")
    k = d.top_k if top_k is None else top_k
    if temp < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), not {temp}")
    if not 0 < p <= 1:
        raise ValueError(f"top_p must be in (0, 1], not {p}")
    if not 0 <= mp < 1:
        raise ValueError(f"min_p must be in [0, 1), not {mp}")
    if rp <= 0:
        raise ValueError(f"repeat_penalty must be > 0 (1 = off), not {rp}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), not {k!r}")
    if mt != int(mt) or mt < 1:
        raise ValueError(f"max_tokens must be a whole number >= 1, not {max_tokens!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an int or None, not {seed!r}")
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if any(not isinstance(s, str) or not s for s in stops):
        raise ValueError(f"stop must be non-empty strings, not {stop!r}")
    return SamplingParams(
        temperature=temp,
        top_p=p,
        top_k=k,
        min_p=mp,
        repeat_penalty=rp,
        max_tokens=int(mt),
        seed=seed,
        stop=stops,
    )
