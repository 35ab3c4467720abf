"""Structured-output arguments: a grammar or JSON Schema, logit bias, logprob counts.

Checked at the call like every other argument: a grammar or schema becomes an llguidance
grammar (``seqlease.native.guidance``) when the :class:`SamplingParams` are made. What needs
the model (compiling that grammar against its vocabulary, token ids in range) is
:func:`check_for_model`, run on the caller's thread before the job is queued; a grammar that
fails there never reaches the engine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from seqlease.checks import check_bool, check_int, check_number, describe
from seqlease.errors import GrammarError
from seqlease.native.guidance import Constraint, gbnf_grammar, schema_grammar

if TYPE_CHECKING:
    from seqlease.request.params import SamplingParams

__all__ = [
    "MAX_LOGIT_BIAS",
    "MAX_TOP_LOGPROBS",
    "GrammarChecker",
    "check_for_model",
    "grammar_text",
    "logit_biases",
    "logprob_counts",
]

#: The most alternatives ``top_logprobs`` may ask for, as in OpenAI's API.
MAX_TOP_LOGPROBS = 20


class GrammarChecker(Protocol):
    """A model that compiles grammars against its vocabulary."""

    @property
    def n_vocab(self) -> int:
        """Vocabulary size."""
        ...

    def constraint(self, grammar: str) -> Constraint:
        """A reply's :class:`Constraint` for ``grammar``; raises :class:`GrammarError`."""
        ...


def grammar_text(grammar: object, json_schema: object) -> str | None:
    """The llguidance grammar for ``grammar`` (GBNF) or ``json_schema``; at most one is given.

    ``json_schema`` is a JSON Schema mapping or a pydantic model class (its
    ``model_json_schema()``). Only local ``$ref``s (``#/...``) are allowed: nothing is fetched.

    Raises:
        GrammarError: both are given, the grammar is empty, or either cannot be enforced.
        TypeError: either has the wrong type.

    """
    if grammar is not None and json_schema is not None:
        raise GrammarError("give grammar= or json_schema=, not both")
    if grammar is not None:
        if not isinstance(grammar, str):
            raise TypeError(f"grammar must be GBNF text (str), not {describe(grammar)}")
        if not grammar.strip():
            raise GrammarError("grammar is empty: give GBNF text with a `root` rule, or None")
        return gbnf_grammar(grammar)
    if json_schema is None:
        return None
    return schema_grammar(_schema_mapping(json_schema))


def _schema_mapping(json_schema: object) -> Mapping[str, Any]:
    if isinstance(json_schema, Mapping):
        return json_schema
    if isinstance(json_schema, type):
        to_schema = getattr(json_schema, "model_json_schema", None)  # pydantic 2
        if callable(to_schema):
            schema = to_schema()
            if isinstance(schema, Mapping):
                return schema
    raise TypeError(
        "json_schema must be a JSON Schema (dict) or a pydantic model class, not "
        f"{describe(json_schema)}"
    )


#: The most ``logit_bias`` entries accepted: checked on the caller's thread, and biased at every
#: token of the reply on the engine thread. Banning every end-of-turn token takes a few.
MAX_LOGIT_BIAS = 1024


def logit_biases(value: object) -> tuple[tuple[int, float], ...]:
    """``{token id: bias}`` as sorted pairs; biases must be finite (ids are checked later).

    Raises:
        TypeError: not a mapping of ints to numbers.
        ValueError: a negative id, a non-finite bias, or more than :data:`MAX_LOGIT_BIAS`.

    """
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise TypeError(f"logit_bias must be a mapping of token id to bias, not {describe(value)}")
    if len(value) > MAX_LOGIT_BIAS:
        raise ValueError(
            f"logit_bias has {len(value):,} entries, more than the {MAX_LOGIT_BIAS} accepted: "
            "bias fewer tokens, or constrain the reply with a grammar"
        )
    pairs: list[tuple[int, float]] = []
    for token, bias in value.items():
        # JSON object keys are strings: "15339" is a token id too.
        key = int(token) if isinstance(token, str) and token.isdigit() else token
        tid = check_int("a logit_bias token id", key, 0, (1 << 31) - 1)
        number = check_number(f"logit_bias[{tid}]", bias)
        if not math.isfinite(number):
            raise ValueError(
                f"logit_bias[{tid}] must be a finite number (-100 all but bans it), not {number}"
            )
        pairs.append((tid, number))
    return tuple(sorted(pairs))


def logprob_counts(logprobs: object, top_logprobs: object) -> tuple[bool, int]:
    """``(logprobs, top_logprobs)`` checked: 0 to 20 alternatives, and only with logprobs.

    Raises:
        TypeError: ``logprobs`` is not a bool.
        ValueError: ``top_logprobs`` is out of range, or given without ``logprobs=True``.

    """
    wanted = check_bool("logprobs", False if logprobs is None else logprobs)
    top = check_int(
        "top_logprobs", 0 if top_logprobs is None else top_logprobs, 0, MAX_TOP_LOGPROBS
    )
    if top and not wanted:
        raise ValueError("top_logprobs needs logprobs=True (as in OpenAI's API)")
    return wanted, top


def check_for_model(model: GrammarChecker, params: SamplingParams) -> Constraint | None:
    """The checks that need the model: the biased ids exist, the grammar compiles.

    Run on every generating call, also with hand-made :class:`SamplingParams`: llama.cpp
    writes a bias at its token id unchecked. Returns the reply's compiled grammar.

    Raises:
        GrammarError: the grammar does not compile.
        ValueError: a biased token id is outside the vocabulary, or a bias is not finite.

    """
    for token, bias in params.logit_bias:
        if not 0 <= token < model.n_vocab:
            raise ValueError(
                f"logit_bias token id {token} is outside the vocabulary [0, {model.n_vocab})"
            )
        if not math.isfinite(bias):
            raise ValueError(f"logit_bias[{token}] must be a finite number, not {bias}")
    return None if params.grammar is None else model.constraint(params.grammar)
