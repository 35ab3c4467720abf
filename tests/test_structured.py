"""Structured output and token details per request, on the real default model, both backends.

Grammars (GBNF), JSON Schemas (dicts and pydantic classes), logit bias and logprobs: checked
at the call, honoured by every generating call, isolated between leases.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import llama_cpp
import pydantic
import pytest

import seqlease
from helpers import never_end, settle
from seqlease.native.guidance import gbnf_grammar, schema_grammar
from seqlease.request.params import SamplingParams

BACKENDS = ["session", "completion"]
CHOICE = 'root ::= "red" | "green" | "blue"'
COLOURS = {"red", "green", "blue"}
TIMEOUT = 60

#: The five kinds of schema of the issue: nested objects, bounded arrays, enums, numbers,
#: booleans. Strings carry a maxLength: an unbounded string at temperature 0.8 may run past
#: max_tokens, and a cut reply is no JSON.
SCHEMAS: dict[str, dict[str, object]] = {
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 16},
                    "address": {
                        "type": "object",
                        "properties": {
                            "city": {"type": "string", "maxLength": 16},
                            "zip": {"type": "string", "minLength": 5, "maxLength": 5},
                        },
                        "required": ["city", "zip"],
                    },
                },
                "required": ["name", "address"],
            }
        },
        "required": ["user"],
    },
    "arrays": {
        "type": "object",
        "properties": {
            "scores": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        },
        "required": ["scores", "tags"],
    },
    "enums": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"type": "string", "enum": ["S", "M", "L", "XL"]},
            "n": {"enum": [1, 2, 3]},
        },
        "required": ["color", "size", "n"],
    },
    "numbers": {
        "type": "object",
        "properties": {
            "price": {"type": "number"},
            "qty": {"type": "integer"},
            "discount": {"type": "number"},
        },
        "required": ["price", "qty"],
    },
    "booleans": {
        "type": "object",
        "properties": {
            "in_stock": {"type": "boolean"},
            "on_sale": {"type": "boolean"},
            "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 4},
        },
        "required": ["in_stock", "on_sale", "flags"],
    },
}

BAD_GRAMMARS = {
    "undefined rule": "root ::= colour",
    "no root": 'answer ::= "yes"',
    "unterminated string": 'root ::= "yes',
    "bad character class": "root ::= [a-",
}


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=16)
    age: int
    likes_cats: bool


@pytest.fixture(scope="module", params=BACKENDS)
def ctx(request: pytest.FixtureRequest) -> Iterator[seqlease.Context]:
    with seqlease.Context(sequences=8, n_ctx=512, n_threads=1, backend=request.param) as ctx:
        yield ctx


def jobs_run(ctx: seqlease.Context) -> int:
    """How much work the backend has done: decode steps, or generations ended."""
    return ctx.probe.steps


def valid(text: str, schema: object) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


# -- arguments, checked at the call ---------------------------------------------------------


def test_grammar_and_schema_are_one_or_the_other() -> None:
    with pytest.raises(seqlease.GrammarError, match="not both"):
        seqlease.sanitize(grammar=CHOICE, json_schema=SCHEMAS["enums"])
    assert seqlease.sanitize().grammar is None
    assert seqlease.sanitize(grammar=CHOICE).grammar == gbnf_grammar(CHOICE)
    assert "color" in (seqlease.sanitize(json_schema=SCHEMAS["enums"]).grammar or "")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"grammar": "  "}, seqlease.GrammarError, "grammar is empty"),
        ({"grammar": b"root ::= 'a'"}, TypeError, "GBNF text"),
        ({"json_schema": "{}"}, TypeError, "pydantic model class"),
        ({"json_schema": int}, TypeError, "pydantic model class"),
        ({"json_schema": {"type": "object", "default": object()}}, seqlease.GrammarError, "JSON"),
        ({"json_schema": {"$ref": "https://example.com/s.json"}}, seqlease.GrammarError, "local"),
        ({"logprobs": 1}, TypeError, "logprobs must be True or False"),
        ({"top_logprobs": 3}, ValueError, "needs logprobs=True"),
        ({"logprobs": True, "top_logprobs": 21}, ValueError, r"top_logprobs .*\[0, 20\]"),
        ({"logit_bias": [(1, 2.0)]}, TypeError, "mapping of token id"),
        ({"logit_bias": {-1: 1.0}}, ValueError, "token id"),
        ({"logit_bias": {5: math.nan}}, ValueError, "finite"),
        ({"logit_bias": {5: math.inf}}, ValueError, "finite"),
        ({"logit_bias": {5: "high"}}, TypeError, "must be a number"),
    ],
)
def test_bad_arguments_say_what_was_wrong(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        seqlease.sanitize(**kwargs)


def test_logit_bias_takes_json_object_keys() -> None:
    assert seqlease.sanitize(logit_bias={"15": -2, 3: 1.5}).logit_bias == ((3, 1.5), (15, -2.0))


def test_a_pydantic_class_is_its_json_schema() -> None:
    params = seqlease.sanitize(json_schema=Person)
    assert params.grammar == schema_grammar(Person.model_json_schema())


# -- at the call, on the model --------------------------------------------------------------


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("name", sorted(BAD_GRAMMARS))
def test_a_bad_grammar_raises_before_anything_is_queued(ctx: seqlease.Context, name: str) -> None:
    bad = BAD_GRAMMARS[name]
    with ctx.lease() as seq:
        before = jobs_run(ctx)
        with pytest.raises(seqlease.GrammarError, match=r"^grammar "):
            seq.generate("Pick a colour:", grammar=bad)
        with pytest.raises(seqlease.GrammarError):
            seqlease.ChatSession(seq).prompt("Pick a colour:", grammar=bad)
        assert seq.n_tokens == 0  # nothing was evaluated
        assert jobs_run(ctx) == before
        # The sequence is not left busy: the next reply runs.
        reply = seq.generate("Pick a colour:", grammar=CHOICE, max_tokens=4).result()
        assert reply.text in COLOURS
    with pytest.raises(seqlease.GrammarError):
        ctx.complete("Pick a colour:", grammar=bad, timeout=0)
    assert settle(ctx).leased == 0


@pytest.mark.timeout(TIMEOUT)
def test_bad_logit_bias_ids_are_refused_at_the_call(ctx: seqlease.Context) -> None:
    n_vocab = 49152  # SmolLM2's vocabulary
    with ctx.lease() as seq:
        with pytest.raises(ValueError, match=rf"token id {n_vocab} is outside the vocabulary"):
            seq.generate("Hi", logit_bias={n_vocab: 1.0})
        # Hand-made parameters skip sanitize(): still checked before llama.cpp writes at the id.
        with pytest.raises(ValueError, match="token id -3"):
            seq.generate_with("Hi", SamplingParams(logit_bias=((-3, 1.0),)))
        with pytest.raises(ValueError, match="finite"):
            seq.generate_with("Hi", SamplingParams(logit_bias=((3, math.nan),)))
        assert seq.generate("Hi", max_tokens=2).result().n_generated >= 1


@pytest.mark.timeout(TIMEOUT)
def test_a_reply_its_grammar_would_take_on_ends_at_max_tokens(ctx: seqlease.Context) -> None:
    with ctx.lease() as seq:
        result = seq.generate(
            "Say something:",
            grammar='root ::= "a" root | "a"',
            max_tokens=12,
            logit_bias=never_end(ctx),
        ).result()
    assert result.finish_reason == "length"
    assert result.n_generated == 12
    assert set(result.text) == {"a"}


@pytest.mark.timeout(TIMEOUT)
def test_a_grammar_no_text_can_complete_fails_its_reply_only(ctx: seqlease.Context) -> None:
    # `root ::= "a" root` has no end: it matches no text at all. llguidance's parser gives up
    # within its work bound (the old path went on to max_tokens).
    with ctx.lease() as seq:
        with pytest.raises(seqlease.GrammarError, match="Too many items"):
            seq.generate("Say:", grammar='root ::= "a" root', max_tokens=200).result()
        assert seq.generate("Pick a colour:", grammar=CHOICE).result().text in COLOURS


@pytest.mark.timeout(TIMEOUT)
def test_a_grammar_of_one_byte_gets_that_byte(ctx: seqlease.Context) -> None:
    # SmolLM2 has a token for every byte, NUL included (llama.cpp's grammar sampler refused
    # that one: its strings end at NUL).
    with ctx.lease() as seq:
        result = seq.generate("Hi", grammar="root ::= [\\x00]", max_tokens=4).result()
    assert (result.text, result.finish_reason) == ("\x00", "eog")


@pytest.mark.timeout(TIMEOUT)
def test_every_generating_call_takes_the_arguments(ctx: seqlease.Context) -> None:
    args = {"grammar": CHOICE, "max_tokens": 4, "logprobs": True, "top_logprobs": 2}
    answers: list[str] = [ctx.complete("Pick a colour:", **args)]
    with ctx.lease() as seq:
        answers.append(seq.generate("Pick a colour:", **args).result().text)

        async def agenerate() -> str:
            return "".join([c async for c in seq.agenerate("Pick a colour:", **args)])

        answers.append(asyncio.run(agenerate()))
    with ctx.lease() as seq:
        chat = seqlease.ChatSession(seq)
        answers.append(chat.prompt("Pick a colour.", **args))
        answers.append("".join(chat.stream("Another one.", **args)))

        async def chat_async() -> list[str]:
            first = await chat.aprompt("And another.", **args)
            second = "".join([c async for c in chat.astream("One more.", **args)])
            return [first, second]

        answers.extend(asyncio.run(chat_async()))
    assert len(answers) == 7
    assert set(answers) <= COLOURS


@pytest.mark.timeout(TIMEOUT)
def test_a_pydantic_reply_parses_back_into_the_model(ctx: seqlease.Context) -> None:
    with ctx.lease() as seq:
        chat = seqlease.ChatSession(seq, system_prompt="You describe people as JSON.")
        reply = chat.prompt("Describe Ada, 36, who likes cats.", json_schema=Person)
    person = Person.model_validate_json(reply)
    assert list(json.loads(reply)) == ["name", "age", "likes_cats"]  # the class's order
    assert isinstance(person.age, int)
    assert len(person.name) <= 16


@pytest.mark.timeout(TIMEOUT)
def test_grammar_with_a_repeat_penalty(ctx: seqlease.Context) -> None:
    # The penalty sees the prompt's tokens; the grammar must not (it would refuse them).
    with ctx.lease() as seq:
        reply = seq.generate("red green blue red:", grammar=CHOICE, repeat_penalty=1.3).result()
    assert reply.text in COLOURS


# -- logprobs and logit bias ----------------------------------------------------------------


@pytest.mark.timeout(TIMEOUT)
def test_logprobs_are_off_by_default_and_one_per_token_when_on(ctx: seqlease.Context) -> None:
    with ctx.lease() as seq:
        plain = seq.generate("The sky is", max_tokens=6).result()
        assert plain.logprobs is None
        result = seq.generate(
            "The sky is", max_tokens=6, logprobs=True, top_logprobs=5, temperature=0.9, seed=3
        ).result()
    assert result.logprobs is not None
    assert len(result.logprobs) == result.n_generated
    for entry in result.logprobs:
        assert entry.logprob <= 0.0
        assert len(entry.top) == 5
        assert [lp for _, lp in entry.top] == sorted((lp for _, lp in entry.top), reverse=True)
        assert entry.top[-1][1] <= entry.top[0][1] <= 0.0
    texts = "".join(e.text for e in result.logprobs)
    assert texts.startswith(result.text) or result.finish_reason == "eog"


@pytest.mark.timeout(TIMEOUT)
def test_greedy_logprobs_equal_llama_logits_all(ctx: seqlease.Context) -> None:
    """The issue's check: llama-cpp-python's own logprobs (``logits_all=True``), within 1e-2."""
    text = "The three primary colours are"
    reference = llama_cpp.Llama(
        model_path=str(seqlease.default_model_path()),
        n_ctx=256,
        n_threads=1,
        logits_all=True,
        verbose=False,
    )
    try:
        expected = reference.create_completion(
            text, max_tokens=12, temperature=0, logprobs=3, stop=[]
        )["choices"][0]["logprobs"]
        prompt = reference.tokenize(text.encode())
    finally:
        reference.close()
    with ctx.lease() as seq:
        result = seq.generate(
            prompt, temperature=0, max_tokens=12, logprobs=True, top_logprobs=3
        ).result()
    assert result.logprobs is not None
    assert [e.text for e in result.logprobs] == expected["tokens"][: len(result.logprobs)]
    for entry, logprob, top in zip(
        result.logprobs, expected["token_logprobs"], expected["top_logprobs"], strict=False
    ):
        assert entry.logprob == pytest.approx(logprob, abs=1e-2)
        # At temperature 0 the chosen token is the best of the alternatives.
        assert entry.top[0] == (entry.text, pytest.approx(entry.logprob))
        assert dict(entry.top) == pytest.approx(top, abs=1e-2)


@pytest.mark.timeout(TIMEOUT)
def test_logit_bias_bans_and_forces_tokens(ctx: seqlease.Context) -> None:
    with ctx.lease() as seq:
        first = seq.generate("The capital of France is", temperature=0, max_tokens=1, logprobs=True)
        top = first.result().logprobs[0].token  # type: ignore[index]
        banned = seq.generate(
            "The capital of France is",
            temperature=0,
            max_tokens=1,
            logprobs=True,
            logit_bias={top: -100},
        ).result()
        forced = seq.generate(
            "The capital of France is",
            temperature=0,
            max_tokens=3,
            logprobs=True,
            logit_bias={42: 100},
        ).result()
    assert banned.logprobs is not None and banned.logprobs[0].token != top
    assert forced.logprobs is not None and [e.token for e in forced.logprobs] == [42, 42, 42]
    # Logprobs are of the raw logits: the bias does not show in them.
    assert forced.logprobs[0].logprob < -1.0


# -- the "must show" ----------------------------------------------------------------


@pytest.mark.timeout(600)
def test_fifty_replies_per_schema_all_validate(ctx: seqlease.Context) -> None:
    """50 generations x 5 schemas at temperature 0.8: every one parses and validates."""

    def generate(name: str, seed: int) -> tuple[str, str, str]:
        with ctx.lease(timeout=TIMEOUT) as seq:
            result = seq.generate(
                f"Reply with one JSON object ({name}):",
                json_schema=SCHEMAS[name],
                temperature=0.8,
                seed=seed,
                max_tokens=256,
            ).result()
        return name, result.text, result.finish_reason

    jobs = [(name, seed) for name in SCHEMAS for seed in range(50)]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda job: generate(*job), jobs))
    invalid = [(n, t, r) for n, t, r in replies if not valid(t, SCHEMAS[n])]
    assert invalid == []
    assert len(replies) == 250


@pytest.mark.timeout(120)
def test_eight_schemas_decode_in_the_same_batches() -> None:
    names = [*SCHEMAS, "nested", "arrays", "enums"]
    with seqlease.Context(sequences=8, n_ctx=512, n_threads=1, backend="session") as ctx:
        probe = ctx.probe
        barrier = threading.Barrier(8)

        def generate(i: int) -> seqlease.Result:
            with ctx.lease(timeout=TIMEOUT) as seq:
                barrier.wait(TIMEOUT)
                return seq.generate(
                    f"Reply with JSON #{i}:", json_schema=SCHEMAS[names[i]], seed=i, max_tokens=128
                ).result()

        steps = probe.steps
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(generate, range(8)))
        steps = probe.steps - steps
    assert all(valid(r.text, SCHEMAS[names[i]]) for i, r in enumerate(results))
    generated = sum(r.n_generated for r in results)
    # One at a time would take a step per token; together, 8 sequences share each step.
    assert steps < generated / 3


@pytest.mark.timeout(180)
def test_a_bad_grammar_in_one_lease_changes_no_other_reply(ctx: seqlease.Context) -> None:
    prompts = ["The ocean is", "My favourite food is", "In the morning I"]

    def three_replies(disturb: bool) -> list[str]:
        stop = threading.Event()
        errors: list[BaseException] = []

        def saboteur() -> None:
            with ctx.lease(timeout=TIMEOUT) as seq:
                while not stop.is_set():
                    for bad in BAD_GRAMMARS.values():
                        try:
                            seq.generate("Hi", grammar=bad)
                        except seqlease.GrammarError:
                            pass
                        else:
                            errors.append(AssertionError(f"accepted {bad!r}"))
                    try:  # and one that fails in the middle of its reply
                        seq.generate("Hi", grammar='root ::= "a" root').result()
                    except seqlease.GrammarError:
                        pass
                    else:
                        errors.append(AssertionError("a grammar with no end produced a reply"))

        def reply(prompt: str) -> str:
            with ctx.lease(timeout=TIMEOUT) as seq:
                return seq.generate(prompt, temperature=0, max_tokens=24).result().text

        thread = threading.Thread(target=saboteur) if disturb else None
        if thread is not None:
            thread.start()
        try:
            with ThreadPoolExecutor(3) as pool:
                texts = list(pool.map(reply, prompts))
        finally:
            stop.set()
            if thread is not None:
                thread.join(TIMEOUT)
        assert errors == []
        return texts

    alone = three_replies(disturb=False)
    assert three_replies(disturb=True) == alone
    assert settle(ctx).leased == 0
