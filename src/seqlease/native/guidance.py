"""Structured output on llguidance: grammars and JSON Schemas as a mask per reply and token.

Why not llama.cpp's grammar sampler: its GBNF parser recurses once per nesting level (about
20,000 levels overflow the C stack: the process dies), the binding's JSON Schema port writes
``maxLength: N`` as N nested levels and ignores keywords, and checking one token against an
ambiguous grammar can take unbounded time on the engine thread, where every lease waits.
llguidance (the constrained decoding of vLLM, SGLang and llama.cpp's own optional backend)
compiles with bounded fuel, bounds the work of every mask (:data:`LIMITS`) and puts a matcher
in an error state instead of raising or looping: a bad grammar fails its own reply only.

llguidance never holds a native pointer here: its tokenizer is built from the token pieces
(:func:`tokenizer_from`) and tokenizes through :class:`~seqlease.native.model.NativeModel`,
which refuses once the model is freed, so a grammar compiled during ``close()`` cannot touch
freed memory.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ParamSpec, TypeVar

import llguidance
import numpy as np
from llguidance.gbnf_to_lark import any_to_lark

from seqlease.errors import GrammarError

__all__ = [
    "LIMITS",
    "MAX_GBNF_RULES",
    "MAX_GRAMMAR_CHARS",
    "Constraint",
    "gbnf_grammar",
    "schema_grammar",
    "tokenizer_from",
]

#: The longest grammar or JSON Schema text accepted (characters). The largest real schemas seen
#: (OpenAPI tool sets) are under 100 kB. Compiling runs on the caller's thread but in this
#: process, and a busy Python thread slows the engine's steps through the GIL: a 950 kB
#: schema (a chain of 12,000 ``$ref``s) took 0.6 s to compile and made neighbours' steps 2x
#: longer meanwhile (measured); at this bound the worst took a quarter of that.
MAX_GRAMMAR_CHARS = 250_000

#: The most rules a GBNF grammar may define. llguidance's converter is pure Python and
#: quadratic in rules, holding the GIL (1,000 rules: 0.04 s, 10,000: 3.2 s, measured); grammars
#: people write have tens, and a JSON Schema goes through ``json_schema=`` instead.
MAX_GBNF_RULES = 1_000

_RULE = re.compile(r"^[ \t]*[A-Za-z0-9_-]+[ \t]*::=", re.MULTILINE)

#: The stack of the thread that compiles. llguidance compiles recursively, a few kB of C stack
#: per rule it goes through: a chain of 3,000 rules (or of 5,000 ``$ref``s in a schema)
#: overflowed a thread's 8 MiB and killed the process (SIGSEGV, measured). 1 GiB is address
#: space, touched only as deep as a grammar goes.
_COMPILE_STACK = 1 << 30
_stack_size = threading.Lock()

_P = ParamSpec("_P")
_T = TypeVar("_T")


def _on_deep_stack(fn: Callable[_P, _T]) -> Callable[_P, _T]:
    """``fn`` run on a thread of its own with a :data:`_COMPILE_STACK` stack, then joined."""

    @functools.wraps(fn)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        outcome: list[tuple[bool, Any]] = []

        def call() -> None:
            try:
                outcome.append((True, fn(*args, **kwargs)))
            except BaseException as exc:  # re-raised on the caller's thread
                outcome.append((False, exc))

        with _stack_size:  # the size is process-wide: set it for this one thread only
            before = threading.stack_size(_COMPILE_STACK)
            try:
                thread = threading.Thread(target=call, name="seqlease-grammar", daemon=True)
                thread.start()
            finally:
                threading.stack_size(before)
        thread.join()
        ok, value = outcome[0]
        if ok:
            return value  # type: ignore[no-any-return]
        raise value

    return run


#: Work bounds for compiling and for every token's mask. llguidance's defaults allow 200k lexer
#: fuel a step (about 14 ms at its ~14k/ms); a quarter of that still covers every schema in
#: the tests at 0.05-0.15 ms a mask, and keeps a hostile grammar's token near one normal step
#: (8 ms for one sequence on 2 cores). Earley items keep llguidance's default (50k, about
#: 2.5 ms): fewer refuse plain right recursion (``root ::= "a" root``) within a dozen tokens.
LIMITS = llguidance.LLParserLimits(
    step_lexer_fuel=50_000,
    max_grammar_size=200_000,
    verbose_errors=False,
)

#: JSON output as OpenAI and ``json.dumps`` write it (``{"a": 1, "b": 2}``): free whitespace
#: lets a small model pad a reply with newlines until max_tokens.
_JSON_OPTIONS: Any = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
    "lenient": False,
}


def schema_grammar(schema: Mapping[str, Any]) -> str:
    """The llguidance grammar for a JSON Schema, checked (no model needed).

    Raises:
        GrammarError: the schema is not JSON, too large, or uses what cannot be enforced.

    """
    try:
        text = json.dumps(_closed(schema))
    except RecursionError as exc:
        raise GrammarError(
            "json_schema nests too deeply: use $defs and $ref for recursive structures"
        ) from exc
    except (TypeError, ValueError) as exc:
        raise GrammarError(f"json_schema is not JSON-serialisable: {_short(exc)}") from exc
    _check_size("json_schema", text)
    return _schema_text_grammar(text)


#: Converted grammars kept by their text: a server gets the same response format again and
#: again, and each conversion costs a thread and up to a few hundred milliseconds.
_CONVERTED_KEPT = 32


@functools.lru_cache(maxsize=_CONVERTED_KEPT)
@_on_deep_stack
def _schema_text_grammar(text: str) -> str:
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(text, defaults=_JSON_OPTIONS)
    except ValueError as exc:
        raise GrammarError(f"json_schema is not a JSON object: {_short(exc)}") from exc
    return _validated("json_schema", grammar)


_MAX_INTEGER = 10**15 - 1
_FRACTION = 1e-10


def _closed(node: Any, *, in_all_of: bool = False) -> Any:
    """``node`` closed where an object lists its properties, with numbers of bounded digits.

    The one walk over the schema: it also refuses a ``$ref`` outside the schema (nothing is
    fetched, from a server that takes schemas from its clients).

    ``additionalProperties: false`` where none is given is what llama.cpp's converter and
    OpenAI's structured outputs do, and what a pydantic model's
    schema means: only the fields it declares (JSON Schema would allow any other). Parts of an
    ``allOf`` stay open, since each names only some of the properties the whole allows.
    """
    if isinstance(node, list):
        return [_closed(item, in_all_of=in_all_of) for item in node]
    if not isinstance(node, Mapping):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str) and not ref.startswith("#"):
        raise GrammarError(
            f"json_schema refers to {ref!r}: only local references (#/$defs/...) are "
            "allowed; inline the referenced schema"
        )
    out = {
        key: value
        if key in ("enum", "const", "default", "examples")
        else _closed(value, in_all_of=key == "allOf")
        for key, value in node.items()
    }
    open_keys = ("additionalProperties", "patternProperties", "unevaluatedProperties")
    if "properties" in out and not in_all_of and not any(k in out for k in open_keys):
        out["additionalProperties"] = False
    if out.get("type") in ("integer", "number"):
        # At most 15 digits before the point and 10 after, near what llama.cpp's converter
        # writes (15 and 16): a small model sampling an unbounded number can run on in digits
        # until max_tokens ("-0.99999..."); llguidance takes no finer multipleOf than 1e-10.
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = -_MAX_INTEGER
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = _MAX_INTEGER
        if out["type"] == "number" and "multipleOf" not in out:
            out["multipleOf"] = _FRACTION
    return out


@functools.lru_cache(maxsize=_CONVERTED_KEPT)
@_on_deep_stack
def gbnf_grammar(text: str) -> str:
    """The llguidance grammar for GBNF ``text`` (llama.cpp's grammar syntax), checked.

    Raises:
        GrammarError: the text is too large, not GBNF, or cannot be compiled.

    """
    _check_size("grammar", text)
    rules = len(_RULE.findall(text))
    if rules > MAX_GBNF_RULES:
        raise GrammarError(
            f"grammar defines {rules:,} rules, more than the {MAX_GBNF_RULES:,} accepted: "
            "merge rules, or describe JSON output with json_schema= instead"
        )
    try:
        lark = any_to_lark(text)
    except RecursionError as exc:
        raise GrammarError(
            "grammar nests too deeply to convert: flatten it into named rules"
        ) from exc
    except Exception as exc:  # the converter raises its own error types on bad syntax
        raise GrammarError(f"grammar is not valid GBNF: {_short(exc)}") from exc
    return _validated("grammar", llguidance.LLMatcher.grammar_from_lark(lark))


def _check_size(what: str, text: str) -> None:
    if len(text) > MAX_GRAMMAR_CHARS:
        raise GrammarError(
            f"{what} is {len(text):,} characters, more than the {MAX_GRAMMAR_CHARS:,} "
            "accepted: constrain less (an enum that long is better checked after parsing)"
        )


def _validated(what: str, grammar: str) -> str:
    message = llguidance.LLMatcher.validate_grammar(grammar, None, limits=LIMITS)
    if message:
        raise GrammarError(f"{what} cannot be enforced: {_short(message)}")
    return grammar


def _short(reason: object, limit: int = 400) -> str:
    text = str(reason).strip()
    return text if len(text) <= limit else text[:limit] + "..."


class _Pieces:
    """What :class:`llguidance.TokenizerWrapper` reads of a tokenizer."""

    def __init__(
        self,
        tokens: list[bytes],
        eos: int,
        bos: int | None,
        special: list[int],
        tokenize: Callable[[bytes], list[int]],
    ) -> None:
        self.tokens = tokens
        self.eos_token_id = eos
        self.bos_token_id = bos
        self.special_token_ids = special
        self._tokenize = tokenize

    def __call__(self, data: bytes) -> list[int]:
        return self._tokenize(data)


def tokenizer_from(
    n_vocab: int,
    piece: Callable[[int, bool], bytes],
    tokenize: Callable[[bytes], list[int]],
    eog: Iterable[int],
    bos: int,
) -> Any:
    r"""An ``llguidance.LLTokenizer`` for a vocabulary (about 0.2 s for 49k tokens: cache it).

    ``piece(token, special)`` is a token's bytes; a control token renders as nothing without
    ``special`` and is marked as special (llguidance's ``\xff`` prefix), so that no grammar
    can write it as text. ``tokenize`` turns bytes into ids, parsing no control tokens.
    """
    tokens: list[bytes] = []
    special: list[int] = []
    for token in range(n_vocab):
        text = piece(token, False)
        if text:
            tokens.append(text)
            continue
        control = piece(token, True)
        if control:
            special.append(token)
            tokens.append(b"\xff" + control)
        else:
            tokens.append(b"")
    ends = sorted(set(eog))
    wrapper = llguidance.TokenizerWrapper(
        _Pieces(tokens, ends[0] if ends else -1, bos if bos >= 0 else None, special, tokenize)
    )
    return llguidance.LLTokenizer(wrapper, n_vocab=n_vocab, eos_token=ends or None)


@_on_deep_stack
def _matcher(tokenizer: Any, grammar: str) -> Any:
    return llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=LIMITS)


class Constraint:
    """Where one reply stands in its grammar, and which tokens may come next.

    Made at the call, off the engine thread (compiling can take a while for a large grammar);
    then used by one thread at a time. Every token's work is bounded by :data:`LIMITS`.
    """

    def __init__(self, tokenizer: Any, grammar: str, n_vocab: int) -> None:
        """Compile ``grammar`` (from :func:`schema_grammar` or :func:`gbnf_grammar`).

        Raises:
            GrammarError: it cannot be compiled for this vocabulary.

        """
        self._matcher = _matcher(tokenizer, grammar)
        self._raise_on_error("cannot be compiled for this model")
        self._n_vocab = n_vocab
        self._mask = np.zeros((n_vocab + 31) // 32, dtype=np.int32)

    def copy(self) -> Constraint:
        """A constraint at the same point of the same grammar, without compiling again."""
        twin = Constraint.__new__(Constraint)
        twin._matcher = self._matcher.deep_copy()
        twin._n_vocab = self._n_vocab
        twin._mask = np.zeros_like(self._mask)
        return twin

    def _raise_on_error(self, what: str) -> None:
        if self._matcher.is_error():
            raise GrammarError(f"the grammar {what}: {_short(self._matcher.get_error())}")

    def restrict(self, logits: Any) -> Any:
        """``logits`` (by token id) set to ``-inf`` in place for every token refused next.

        Raises:
            GrammarError: the grammar cannot go on (its work bound ran out, or it allows no
                token of this model here).

        """
        mask = self._mask
        self._matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
        self._raise_on_error("failed at this point of the reply")
        if not mask.any():  # 1,536 words for 49k tokens: cheaper than the unpacked mask
            raise GrammarError(
                "the grammar allows none of this model's tokens at this point of the reply: "
                "check that every character it asks for can be written by the model"
            )
        allowed = np.unpackbits(mask.view(np.uint8), bitorder="little", count=self._n_vocab)
        logits[allowed == 0] = -np.inf
        return logits

    def accept(self, token: int) -> None:
        """Move past ``token`` (one :meth:`restrict` allowed).

        Raises:
            GrammarError: the grammar refuses ``token``.

        """
        if not self._matcher.consume_token(token):  # False only in an error state
            raise GrammarError(
                f"the grammar refused the sampled token: {_short(self._matcher.get_error())}"
            )
