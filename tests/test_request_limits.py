"""Size limits checked before any native call: a request too large fails alone, at once."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import seqlease
from seqlease.request.prompt import check_text_fits
from seqlease.request.structured import MAX_LOGIT_BIAS
from seqlease.request.text import MAX_STOP_CHARS, MAX_STOPS

HUGE = "word " * 2_000_000  # 10 MB


@pytest.fixture(scope="module", params=["session", "completion"])
def ctx(request: pytest.FixtureRequest) -> Iterator[seqlease.Context]:
    with seqlease.Context(sequences=1, n_ctx=512, n_threads=1, backend=request.param) as ctx:
        yield ctx


class _Pieces:
    max_piece_bytes = 10


def test_text_too_long_for_any_tokenization_is_refused_from_its_length() -> None:
    check_text_fits(19 * 100, _Pieces(), 100)  # could be 95 tokens: tokenize to know
    with pytest.raises(seqlease.ContextOverflowError, match=r"2,000 characters, at least 100"):
        check_text_fits(2_000, _Pieces(), 100)


def test_a_10_mb_prompt_is_refused_untokenized_and_the_sequence_serves_on(ctx) -> None:
    # "characters": the length check's message; the tokenized path counts tokens instead.
    with ctx.lease() as seq:
        with pytest.raises(seqlease.ContextOverflowError, match="10,000,000 characters"):
            seq.generate(HUGE, max_tokens=1)
        chat = seqlease.ChatSession(seq)
        with pytest.raises(seqlease.ContextOverflowError, match="10,000,000 characters"):
            chat.prompt(HUGE, max_tokens=1)
        assert chat.prompt("Say hi.", temperature=0, max_tokens=4)
    # A prompt the bound lets through still gets the exact, tokenized check.
    with ctx.lease() as seq, pytest.raises(seqlease.ContextOverflowError, match="tokens but"):
        seq.generate("word " * 600, max_tokens=1)
    assert ctx.stats().leased == 0


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"stop": [f"s{i}" for i in range(MAX_STOPS + 1)]}, f"at most {MAX_STOPS} strings"),
        ({"stop": "x" * (MAX_STOP_CHARS + 1)}, "stop at a shorter marker"),
        ({"logit_bias": {i: -1.0 for i in range(MAX_LOGIT_BIAS + 1)}}, "bias fewer tokens"),
    ],
)
def test_too_many_or_too_long_stops_and_biases_are_refused(kwargs, says) -> None:
    with pytest.raises(ValueError, match=says):
        seqlease.sanitize(**kwargs)


def test_the_limits_themselves_are_accepted(ctx) -> None:
    params = seqlease.sanitize(
        stop=[f"stop{i}" for i in range(MAX_STOPS - 1)] + ["y" * MAX_STOP_CHARS],
        logit_bias={i: 0.0 for i in range(MAX_LOGIT_BIAS)},
        temperature=0,
        max_tokens=4,
    )
    with ctx.lease() as seq:
        assert seq.generate_with("Hello", params).result().n_generated >= 1
