"""Sampling parameters: defaults from the seed note, and what to do with bad values."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

from typing_extensions import Unpack

from seqlease.checks import check_int, check_number, describe
from seqlease.request.structured import grammar_text, logit_biases, logprob_counts
from seqlease.request.text import check_stop

__all__ = ["DEFAULTS", "GREEDY_BELOW", "SamplingKwargs", "SamplingParams", "sanitize"]

_INT32_MAX = (1 << 31) - 1
#: Below this, logits / temperature may overflow float32 (inf - inf: NaN); greedy anyway.
GREEDY_BELOW = 1e-20


@dataclass(frozen=True)
class SamplingParams:
    """How one generation samples, what it may say, and when it stops.

    Build with :func:`sanitize`.
    """

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 40
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    max_tokens: int = 256
    seed: int | None = None
    stop: tuple[str, ...] = ()
    #: The grammar the reply must match, in llguidance's form (from ``grammar=`` GBNF or
    #: ``json_schema=``, converted and checked by :func:`sanitize`).
    grammar: str | None = None
    #: ``(token id, bias)`` pairs added to the logits, by id.
    logit_bias: tuple[tuple[int, float], ...] = ()
    #: Whether the result carries a :class:`~seqlease.TokenLogprob` per generated token.
    logprobs: bool = False
    #: Alternatives per token in ``TokenLogprob.top`` (0 to 20).
    top_logprobs: int = 0


#: The defaults the seed note recommends: temperature 0.6, top-p 0.9, top-k 40, 256 tokens.
DEFAULTS = SamplingParams()


def _finite(value: object, default: float, name: str) -> float:
    if value is None:
        return default
    number = check_number(name, value)
    # A NaN or infinity from a UI slider or a JSON body is a missing value, not an error.
    return number if math.isfinite(number) else default


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
    grammar: str | None
    json_schema: Mapping[str, Any] | type | None
    logit_bias: Mapping[int, float] | None
    logprobs: bool | None
    top_logprobs: int | None


def sanitize(**kwargs: Unpack[SamplingKwargs]) -> SamplingParams:
    """Validate sampling arguments the way the seed note asks.

    Non-finite floats (and a non-finite ``max_tokens``) fall back to the defaults; a
    temperature below :data:`GREEDY_BELOW` is 0 (greedy);
    out-of-range values raise ``ValueError`` saying the allowed range; unknown names raise
    ``TypeError``. ``json_schema`` (a dict or a pydantic model class) becomes the GBNF
    ``grammar``; a bad grammar or schema raises :class:`~seqlease.GrammarError` when the call
    is made (the grammar itself is compiled against the model by the generating call).
    """
    unknown = set(kwargs) - set(SamplingKwargs.__annotations__)
    if unknown:
        allowed = ", ".join(SamplingKwargs.__annotations__)
        raise TypeError(
            f"unknown sampling arguments: {', '.join(sorted(unknown))} (allowed: {allowed})"
        )
    d = DEFAULTS
    temp = _finite(kwargs.get("temperature"), d.temperature, "temperature")
    p = _finite(kwargs.get("top_p"), d.top_p, "top_p")
    mp = _finite(kwargs.get("min_p"), d.min_p, "min_p")
    rp = _finite(kwargs.get("repeat_penalty"), d.repeat_penalty, "repeat_penalty")
    mt = _finite(kwargs.get("max_tokens"), d.max_tokens, "max_tokens")
    top_k, seed, stop = kwargs.get("top_k"), kwargs.get("seed"), kwargs.get("stop")
    if temp < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), not {temp}")
    if temp < GREEDY_BELOW:
        temp = 0.0
    if not 0 < p <= 1:
        raise ValueError(f"top_p must be in (0, 1], not {p}")
    if not 0 <= mp < 1:
        raise ValueError(f"min_p must be in [0, 1), not {mp}")
    if rp <= 0:
        raise ValueError(f"repeat_penalty must be > 0 (1 = off), not {rp}")
    k = d.top_k if top_k is None else check_int("top_k", top_k, 0, _INT32_MAX)
    if mt != int(mt) or not 1 <= mt <= _INT32_MAX:
        raise ValueError(
            f"max_tokens must be a whole number in [1, {_INT32_MAX}], not {describe(mt)}"
        )
    if seed is not None:
        # Any 64-bit int: llama.cpp takes the low 32 bits, as llama-cpp-python does.
        seed = check_int("seed", seed, -(1 << 63), (1 << 64) - 1)
    logprobs, top_logprobs = logprob_counts(kwargs.get("logprobs"), kwargs.get("top_logprobs"))
    return SamplingParams(
        temperature=temp,
        top_p=p,
        top_k=k,
        min_p=mp,
        repeat_penalty=rp,
        max_tokens=int(mt),
        seed=seed,
        stop=check_stop(stop, allow_empty=False),
        grammar=grammar_text(kwargs.get("grammar"), kwargs.get("json_schema")),
        logit_bias=logit_biases(kwargs.get("logit_bias")),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )
