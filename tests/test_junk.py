"""Junk at every argument of every public entry point: a clear error, at once, and no harm.

For each (entry point, argument) hypothesis sends None, bytes, floats (NaN, infinities),
huge integers, bools, nested lists, strings with lone surrogates and arbitrary objects. A call
either succeeds (the value was valid, or a documented fallback such as a NaN temperature) or
raises ``TypeError``/``ValueError``/a ``SeqleaseError`` whose message names the argument, within
a few seconds. Afterwards the Context passes a health check: a generation works and every
sequence is free and empty.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import seqlease
from helpers import free_slots_are_empty, settle
from tiny_model import tiny_model_path

pytestmark = pytest.mark.timeout(600)

ONE = {"max_tokens": 1, "temperature": 0}

lone_surrogates = st.text(alphabet=st.characters(categories=["Cs"]), min_size=1, max_size=3)
junk = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.binary(max_size=8),
        st.floats(),
        st.just(math.nan),
        st.just(10**400),
        st.just(-(10**400)),
        st.integers(),
        st.builds(lambda a, b: a + b, st.text(max_size=3), lone_surrogates),
        st.just(object()),
        st.just(b"Hi"),
        st.just(1j),
        st.sampled_from([float("inf"), -0.0, 2.5, "", " ", "0", "Hi"]),
    ),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=2), inner),
    max_leaves=4,
)


@pytest.fixture(scope="module")
def ctx() -> Iterator[seqlease.Context]:
    with seqlease.Context(tiny_model_path(), sequences=2, n_ctx=128, n_threads=1) as ctx:
        yield ctx


def _arun(coro: Any) -> Any:
    return asyncio.run(coro)


async def _drain_async(agen: Any) -> str:
    return "".join([chunk async for chunk in agen])


async def _agenerate(seq: seqlease.Sequence, prompt: object) -> str:
    return await _drain_async(seq.agenerate(prompt, **ONE))  # type: ignore[arg-type]


def _with_seq(ctx: seqlease.Context, call: Callable[[seqlease.Sequence], object]) -> object:
    with ctx.lease(timeout=5) as seq:
        return call(seq)


def _with_chat(ctx: seqlease.Context, call: Callable[[seqlease.ChatSession], object]) -> object:
    with ctx.lease(timeout=5) as seq:
        return call(seqlease.ChatSession(seq))


SAMPLING = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repeat_penalty",
    "max_tokens",
    "seed",
    "stop",
)


def _sampling(arg: str, value: object) -> dict[str, object]:
    kwargs: dict[str, object] = dict(ONE)
    kwargs[arg] = value
    return kwargs


# (entry point, argument, the names its error may use, how to call it with a value)
Case = tuple[str, str, tuple[str, ...], Callable[[seqlease.Context, object], object]]
CASES: list[Case] = [
    ("Context", "model_path", ("model_path", "model"), lambda c, v: seqlease.Context(v)),
    *[
        (
            "Context",
            arg,
            (arg,),
            lambda c, v, arg=arg: seqlease.Context(tiny_model_path(), n_threads=1, **{arg: v}),
        )
        for arg in (
            "sequences",
            "n_ctx",
            "n_batch",
            "n_threads",
            "max_waiting",
            "backend",
            "prefix_cache",
            "prefix_cache_tokens",
            "kv_unified",
        )
    ],
    ("Context.lease", "timeout", ("timeout",), lambda c, v: c.lease(v).__enter__().release()),
    ("Context.acquire", "timeout", ("timeout",), lambda c, v: c.acquire(v).release()),
    (
        "Sequence.fork",
        "timeout",
        ("timeout",),
        lambda c, v: _with_seq(c, lambda s: s.fork(v).release()),
    ),
    (
        "Context.alease",
        "timeout",
        ("timeout",),
        lambda c, v: _arun(_alease_once(c, v)),
    ),
    ("Context.complete", "prompt", ("prompt",), lambda c, v: c.complete(v, **ONE)),
    ("Context.complete", "timeout", ("timeout",), lambda c, v: c.complete("Hi", timeout=v, **ONE)),
    *[
        (
            "Context.complete",
            arg,
            (arg,),
            lambda c, v, arg=arg: c.complete("Hi", **_sampling(arg, v)),
        )
        for arg in SAMPLING
    ],
    (
        "Sequence.generate",
        "prompt",
        ("prompt",),
        lambda c, v: _with_seq(c, lambda s: s.generate(v, **ONE).result()),
    ),
    (
        "Sequence.generate",
        "abort",
        ("abort",),
        lambda c, v: _with_seq(c, lambda s: s.generate("Hi", abort=v, **ONE).result()),
    ),
    *[
        (
            "Sequence.generate",
            arg,
            (arg,),
            lambda c, v, arg=arg: _with_seq(
                c, lambda s: s.generate("Hi", **_sampling(arg, v)).result()
            ),
        )
        for arg in SAMPLING
    ],
    (
        "Sequence.agenerate",
        "prompt",
        ("prompt",),
        lambda c, v: _with_seq(c, lambda s: _arun(_agenerate(s, v))),
    ),
    (
        "Sequence.generate_with",
        "params",
        ("params",),
        lambda c, v: _with_seq(c, lambda s: s.generate_with("Hi", v).result()),
    ),
    (
        "Sequence.add_closer",
        "close",
        ("close",),
        lambda c, v: _with_seq(c, lambda s: s.add_closer(v)),
    ),
    ("ChatSession", "seq", ("sequence",), lambda c, v: seqlease.ChatSession(v)),
    (
        "ChatSession",
        "system_prompt",
        ("system_prompt",),
        lambda c, v: _with_seq(c, lambda s: seqlease.ChatSession(s, system_prompt=v)),
    ),
    (
        "ChatSession.prompt",
        "text",
        ("text", "prompt"),
        lambda c, v: _with_chat(c, lambda ch: ch.prompt(v, **ONE)),
    ),
    (
        "ChatSession.stream",
        "text",
        ("text", "prompt"),
        lambda c, v: _with_chat(c, lambda ch: "".join(ch.stream(v, **ONE))),
    ),
    (
        "ChatSession.aprompt",
        "text",
        ("text", "prompt"),
        lambda c, v: _with_chat(c, lambda ch: _arun(ch.aprompt(v, **ONE))),
    ),
    (
        "ChatSession.astream",
        "text",
        ("text", "prompt"),
        lambda c, v: _with_chat(c, lambda ch: _arun(_drain_async(ch.astream(v, **ONE)))),
    ),
    *[
        (
            "ChatSession.prompt",
            arg,
            (arg,),
            lambda c, v, arg=arg: _with_chat(c, lambda ch: ch.prompt("Hi", **_sampling(arg, v))),
        )
        for arg in SAMPLING
    ],
    ("trim_at_stop", "text", ("text",), lambda c, v: seqlease.trim_at_stop(v, ["x"])),
    ("trim_at_stop", "stop", ("stop",), lambda c, v: seqlease.trim_at_stop("text", v)),
]


async def _alease_once(ctx: seqlease.Context, timeout: object) -> None:
    async with ctx.alease(timeout) as seq:  # type: ignore[arg-type]
        seq.check()


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Which values an argument may accept: everything else must raise.
_ACCEPTS: dict[str, Callable[[object], bool]] = {
    "model_path": lambda v: v is None,  # junk strings name no model file
    "backend": lambda v: False,
    "timeout": lambda v: v is None or _is_number(v),
    "prompt": lambda v: isinstance(v, str) or (isinstance(v, list) and all(map(_is_int, v))),
    "text": lambda v: isinstance(v, str),
    "system_prompt": lambda v: v is None or isinstance(v, str),
    "stop": lambda v: v is None or isinstance(v, (str, list)),
    "seed": lambda v: v is None or _is_int(v),
    "top_k": lambda v: v is None or _is_int(v),
    "abort": lambda v: v is None,
    "params": lambda v: False,
    "close": lambda v: False,
    "seq": lambda v: False,
    "prefix_cache": lambda v: isinstance(v, bool),
    "kv_unified": lambda v: v is None or isinstance(v, bool),
}
for _name in ("temperature", "top_p", "min_p", "repeat_penalty", "max_tokens"):
    _ACCEPTS[_name] = lambda v: v is None or _is_number(v)
for _name in ("sequences", "n_ctx", "n_batch", "n_threads", "max_waiting", "prefix_cache_tokens"):
    _ACCEPTS[_name] = lambda v: v is None or _is_int(v)


def _may_succeed(arg: str, value: object) -> bool:
    return _ACCEPTS[arg](value)


def _close_if_context(value: object) -> None:
    if isinstance(value, seqlease.Context):
        value.close()


@pytest.mark.parametrize(
    ("entry", "arg", "names", "call"), CASES, ids=[f"{e}-{a}" for e, a, *_ in CASES]
)
def test_junk_gets_a_clear_error_naming_the_argument(ctx, entry, arg, names, call):
    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(value=junk)
    def check(value: object) -> None:
        start = time.monotonic()
        message = None
        try:
            _close_if_context(call(ctx, value))
        except (TypeError, ValueError, seqlease.SeqleaseError) as exc:
            message = f"{type(exc).__name__}: {exc}"
        if message is None:
            assert _may_succeed(arg, value), f"{entry}({arg}={value!r:.60}) was accepted"
        else:
            assert any(name in message for name in names), (
                f"{entry}({arg}={value!r:.60}) raised, not naming {names}: {message}"
            )
        assert time.monotonic() - start < 10, f"{entry}({arg}={value!r:.60}) took too long"

    check()
    # Health check: the engine serves, and every sequence is free and empty.
    with ctx.lease(timeout=5) as seq:
        assert seq.generate("Hi", **ONE).result().n_generated == 1
    stats = settle(ctx)
    assert (stats.leased, stats.free) == (0, 2)
    assert free_slots_are_empty(ctx) == []


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda s: s.generate("Hi", abort="yes"), "abort"),
        (lambda s: s.generate([1, 2.5]), "prompt"),
        (lambda s: s.generate(b"Hi"), "prompt"),
        (lambda s: s.generate(None), "prompt"),
        (lambda s: s.generate("Hi", stop=5), "stop"),
        (lambda s: s.generate("Hi", seed=10**400), "seed"),
        (lambda s: s.generate("\ud800"), "prompt"),
        (lambda s: seqlease.ChatSession(s, system_prompt=123), "system_prompt"),
    ],
)
def test_the_reported_cases_raise_at_the_call(ctx, call, name):
    with ctx.lease(timeout=5) as seq:
        with pytest.raises((TypeError, ValueError), match=name):
            call(seq)
        assert seq.generate("Hi", **ONE).result().n_generated == 1


def test_numpy_token_ids(ctx):
    np = pytest.importorskip("numpy")  # llama-cpp-python depends on it
    with ctx.lease(timeout=5) as seq:
        assert seq.generate(np.array([1, 2, 3]), **ONE).result().n_generated == 1
        with pytest.raises(TypeError, match="prompt token 0"):
            seq.generate(np.array([1.0, 2.0]))


def test_huge_and_non_finite_numbers_fall_back_or_raise(ctx):
    assert ctx.complete("Hi", temperature=10**400, **{"max_tokens": 1}) is not None
    with pytest.raises(ValueError, match="timeout"):
        ctx.lease(timeout=10**400)
    for bad in (b"Hi", 42):
        with pytest.raises(TypeError, match="prompt"):
            ctx.complete(bad)
