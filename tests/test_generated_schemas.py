"""Generated JSON Schemas: a ``GrammarError`` at the call, or 20 sampled replies that validate.

Hypothesis builds schemas from the parts people use (nested objects and arrays, enums,
patterns, length and number bounds, ``allOf``/``anyOf``/``oneOf``, ``$ref``) and
``jsonschema`` judges every reply, on both backends. Sizes are bounded so that every reply can
end: a string without ``maxLength`` or an array without ``maxItems`` lets a sampled reply run
on until ``max_tokens``, which proves nothing about the grammar.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import seqlease

REPLIES = 20
TIMEOUT = 60

Schema = dict[str, Any]

NAMES = st.sampled_from(["id", "name", "tags", "size", "ok", "kind", "a b", 'q"uote'])
WORDS = st.text(alphabet="abcxyz", min_size=1, max_size=5)
PATTERNS = st.sampled_from(
    ["^[a-z]{1,6}$", "^[0-9]{3}-[0-9]{2}$", "^(yes|no|maybe)$", "^[A-Z][a-z]{0,4}$", "^x{1,8}y?$"]
)


@st.composite
def _bounds(draw: st.DrawFn, low: int, high: int) -> tuple[int, int]:
    a = draw(st.integers(low, high))
    return a, draw(st.integers(a, high))


@st.composite
def _string(draw: st.DrawFn) -> Schema:
    kind = draw(st.sampled_from(["length", "pattern", "enum", "const"]))
    if kind == "length":
        lo, hi = draw(_bounds(0, 10))
        return {"type": "string", "minLength": lo, "maxLength": hi}
    if kind == "pattern":
        return {"type": "string", "pattern": draw(PATTERNS)}
    if kind == "enum":
        return {"enum": draw(st.lists(WORDS, min_size=1, max_size=4, unique=True))}
    return {"const": draw(WORDS)}


@st.composite
def _number(draw: st.DrawFn) -> Schema:
    lo, hi = draw(_bounds(-50, 50))
    if draw(st.booleans()):
        return {"type": "integer", "minimum": lo, "maximum": hi}
    # Fraction digits are bounded by seqlease (10), as integers' are (15).
    return {"type": "number", "exclusiveMinimum": lo - 1, "maximum": hi}


LEAVES = st.one_of(
    _string(),
    _number(),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.lists(st.integers(-5, 5), min_size=1, max_size=3, unique=True).map(lambda e: {"enum": e}),
)


def _object(children: st.SearchStrategy[Schema]) -> st.SearchStrategy[Schema]:
    @st.composite
    def build(draw: st.DrawFn) -> Schema:
        props = draw(st.dictionaries(NAMES, children, min_size=1, max_size=3))
        required = draw(st.lists(st.sampled_from(sorted(props)), unique=True))
        return {"type": "object", "properties": props, "required": required}

    return build()


def _array(children: st.SearchStrategy[Schema]) -> st.SearchStrategy[Schema]:
    @st.composite
    def build(draw: st.DrawFn) -> Schema:
        lo, hi = draw(_bounds(0, 3))
        return {"type": "array", "items": draw(children), "minItems": lo, "maxItems": hi}

    return build()


def _combined(children: st.SearchStrategy[Schema]) -> st.SearchStrategy[Schema]:
    @st.composite
    def build(draw: st.DrawFn) -> Schema:
        kind = draw(st.sampled_from(["anyOf", "oneOf", "allOf"]))
        if kind == "anyOf":
            return {"anyOf": draw(st.lists(children, min_size=1, max_size=3))}
        if kind == "oneOf":
            # Alternatives of different types, so that exactly one can match.
            parts = [
                {"type": "boolean"},
                {"type": "null"},
                {"type": "string", "maxLength": 6},
                draw(_object(LEAVES)),
                draw(_array(LEAVES)),
            ]
            picked = draw(st.lists(st.sampled_from(range(len(parts))), min_size=1, unique=True))
            return {"oneOf": [parts[i] for i in picked]}
        lo, hi = draw(_bounds(-20, 20))
        return draw(
            st.sampled_from(
                [
                    {"allOf": [{"type": "integer", "minimum": lo}, {"maximum": hi}]},
                    {"allOf": [{"type": "string", "maxLength": 8}, {"minLength": min(lo, 8) % 4}]},
                ]
            )
        )

    return build()


NODES = st.recursive(
    LEAVES,
    lambda children: st.one_of(_object(children), _array(children), _combined(children)),
    max_leaves=6,
)


@st.composite
def schemas(draw: st.DrawFn) -> Schema:
    """A schema, some of its parts moved to ``$defs`` and used through ``$ref``."""
    root: Schema = draw(_object(NODES)) if draw(st.booleans()) else draw(NODES)
    if draw(st.booleans()) and root.get("type") == "object":
        defs = {}
        for i, name in enumerate(sorted(root["properties"])):
            if draw(st.booleans()):
                defs[f"d{i}"] = root["properties"][name]
                root["properties"][name] = {"$ref": f"#/$defs/d{i}"}
        if defs:
            root = {**root, "$defs": defs}
    return root


@pytest.fixture(scope="module", params=["session", "completion"])
def ctx(request: pytest.FixtureRequest) -> Iterator[seqlease.Context]:
    with seqlease.Context(sequences=4, n_ctx=2048, n_threads=1, backend=request.param) as ctx:
        yield ctx


@pytest.mark.timeout(1500)
def test_a_generated_schema_is_refused_at_the_call_or_every_reply_validates(ctx):
    outcomes: list[str] = []

    def reply(schema: Schema, seed: int) -> seqlease.Result:
        with ctx.lease(timeout=TIMEOUT) as seq:
            return seq.generate(
                "Reply with JSON only; keep numbers and strings short:",
                json_schema=schema,
                temperature=0.9,
                seed=seed,
                max_tokens=400,
            ).result()

    @settings(
        max_examples=12,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(schema=schemas())
    def check(schema: Schema) -> None:
        jsonschema.Draft202012Validator.check_schema(schema)
        try:
            with ThreadPoolExecutor(4) as pool:
                results = list(pool.map(lambda seed: reply(schema, seed), range(REPLIES)))
        except seqlease.GrammarError:  # raised at the call, before anything is queued
            outcomes.append("refused")
            return
        for result in results:
            assert result.finish_reason != "length", f"{schema} ran on: {result.text[:200]!r}"
            jsonschema.validate(json.loads(result.text), schema)
        outcomes.append("valid")

    check()
    valid, refused = outcomes.count("valid"), outcomes.count("refused")
    print(f"{valid} schemas replied and validated, {refused} refused")
    # Refusing everything would pass the check above; most of these schemas compile.
    assert valid >= len(outcomes) * 3 // 4, outcomes
