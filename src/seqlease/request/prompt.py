"""A prompt as token ids, checked before anything is queued: the same rules on both backends."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

from seqlease.checks import check_text, describe
from seqlease.errors import ContextOverflowError, EmptyPromptError

__all__ = [
    "PieceSizes",
    "Tokenizer",
    "check_prompt",
    "check_text_fits",
    "common_prefix",
    "prompt_text",
    "prompt_tokens",
]


class PieceSizes(Protocol):
    """What the length check before tokenizing needs of a model."""

    @property
    def max_piece_bytes(self) -> int:
        """The longest text one token stands for, in bytes."""
        ...


class Tokenizer(PieceSizes, Protocol):
    """What prompt checking needs of a model."""

    @property
    def n_vocab(self) -> int:
        """Vocabulary size."""
        ...

    def tokenize(self, text: str, *, special: bool = False, add_bos: bool = True) -> list[int]:
        """Token ids of ``text`` (``special``: control-token text becomes control tokens)."""
        ...


def check_text_fits(text_length: int, model: PieceSizes, n_ctx: int) -> None:
    """Refuse text of ``text_length`` characters that cannot fit ``n_ctx`` tokens, untokenized.

    Tokenizing holds a thread for as long as the text is (a second for 10 MB, measured), so a
    prompt that cannot fit is refused from its length alone: no token stands for more than
    ``max_piece_bytes`` bytes, nor a character for less than one byte. Half that bound, in
    case a tokenizer's normalization drops characters.
    """
    least = text_length // (2 * max(1, model.max_piece_bytes))
    if least >= n_ctx:
        raise ContextOverflowError(
            f"the prompt is {text_length:,} characters, at least {least:,} tokens, and a "
            f"sequence holds n_ctx={n_ctx} tokens: shorten the prompt or create the Context "
            "with a larger n_ctx"
        )


def prompt_text(name: str, text: object) -> str:
    """``text`` as a prompt: a valid Unicode ``str`` with something besides whitespace.

    Raises:
        TypeError: not a ``str``.
        ValueError: a lone surrogate.
        EmptyPromptError: empty, or whitespace only.

    """
    check_text(name, text)
    assert isinstance(text, str)
    if not text.strip():
        raise EmptyPromptError(f"the prompt is empty: got {name}={text!r:.40}; send some text")
    return text


def prompt_tokens(prompt: object, model: Tokenizer, n_ctx: int | None = None) -> list[int]:
    """``prompt`` (text, or token ids) as a list of token ids inside the vocabulary.

    ``n_ctx``: text that cannot fit is refused before it is tokenized (:func:`check_text_fits`).

    Raises:
        TypeError: not a ``str`` nor an iterable of integers (bytes, floats, None, ...).
        EmptyPromptError: empty, or whitespace-only text.
        ValueError: a token id outside the vocabulary, or text that is not valid Unicode.
        ContextOverflowError: text far too long for ``n_ctx``.

    """
    if isinstance(prompt, str):
        if n_ctx is not None:
            check_text_fits(len(prompt), model, n_ctx)
        return model.tokenize(prompt_text("prompt", prompt), special=True)
    if isinstance(prompt, (bytes, bytearray, memoryview, Mapping)) or not isinstance(
        prompt, Iterable
    ):
        hint = " (decode bytes to str first)" if isinstance(prompt, (bytes, bytearray)) else ""
        raise TypeError(
            f"prompt must be a str or a list of token ids, not {describe(prompt)}{hint}"
        )
    tokens: list[int] = []
    for i, token in enumerate(prompt):
        if isinstance(token, (bool, float)):
            raise TypeError(f"prompt token {i} must be an int token id, not {describe(token)}")
        try:
            tokens.append(operator.index(token))
        except TypeError:
            raise TypeError(
                f"prompt token {i} must be an int token id, not {describe(token)}"
            ) from None
        if not 0 <= tokens[-1] < model.n_vocab:
            raise ValueError(
                f"prompt token {i} is {tokens[-1]}, outside the vocabulary [0, {model.n_vocab})"
            )
    if not tokens:
        raise EmptyPromptError("the prompt has no tokens: send at least one")
    return tokens


def check_prompt(tokens: list[int], n_ctx: int) -> None:
    """Reject a prompt that leaves no room for a reply in a sequence of ``n_ctx`` tokens."""
    if len(tokens) >= n_ctx:
        raise ContextOverflowError(
            f"the prompt has {len(tokens)} tokens but a sequence holds n_ctx={n_ctx} "
            "tokens, and at least one must be left for the reply: shorten the prompt or "
            "create the Context with a larger n_ctx"
        )


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists.

    Binary search over slice comparisons: prompts run to thousands of tokens and are matched
    against every sequence at each request, and a slice compare runs in C.
    """
    lo, hi = 0, min(len(a), len(b))
    if hi and a[0] != b[0]:
        return 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
