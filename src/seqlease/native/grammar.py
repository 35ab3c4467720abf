"""GBNF grammars and JSON Schemas through what the installed llama-cpp-python offers.

llama.cpp parses a grammar itself (``llama_sampler_init_grammar``), returning NULL, and logging
why, for one it cannot use (trusted from llama-cpp-python 0.3.9: see
:func:`grammars_unsupported`). Both backends keep a reply's grammar in a :class:`Grammar` of
their own, never in ``Llama``'s sampler: llama.cpp aborts the process when a grammar is made to
accept a token it refuses, which happens when it allows no token at all, so every token is
checked before it is accepted.

JSON Schemas become GBNF through the binding's own converter, a port of llama.cpp's
``json_schema_to_grammar``: its output is what the llama.cpp it ships accepts. The port lags
the original (0.3.36 still ignores an integer's ``minimum``/``maximum``), and a keyword it
ignores lets replies through that break the schema. So each constraint is probed first: does
its node convert to another grammar without it? If not, the schema is refused, naming the
keyword, rather than answered with a reply that may not validate.
"""

from __future__ import annotations

import functools
import importlib
import json
import re
from collections.abc import Callable, Iterator, Mapping
from types import ModuleType
from typing import Any

import numpy as np

from seqlease.errors import GrammarError
from seqlease.native.candidates import Candidates
from seqlease.native.library import binding_version, llama_log_lines

__all__ = [
    "Grammar",
    "check_grammar",
    "grammar_sampler",
    "grammars_unsupported",
    "schema_to_gbnf",
]

_ROOT = b"root"

# The port's JSON string character lets raw control characters through (a newline inside a
# string), which no JSON parser accepts; llama.cpp's own converter has excluded them since 2024.
_PORT_CHAR = r'char ::= [^"\\] |'
_JSON_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] |'

#: Keywords that restrict what validates (``format`` is only an annotation by default).
_CONSTRAINTS = (
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "uniqueItems",
    "contains",
    "minProperties",
    "maxProperties",
    "propertyNames",
    "patternProperties",
    "dependentRequired",
    "not",
)
#: Keywords whose value maps names to schemas (a property called "maximum" is no keyword).
_NAMED_SCHEMAS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def _grammar_module() -> ModuleType:
    return importlib.import_module("llama_cpp.llama_grammar")


def schema_to_gbnf(schema: Mapping[str, Any]) -> str:
    """GBNF for a JSON Schema, from the binding's converter.

    Raises:
        GrammarError: the schema is not JSON, or the converter cannot handle it.

    """
    try:
        text = json.dumps(schema)
    except (TypeError, ValueError) as exc:
        raise GrammarError(f"json_schema is not JSON-serialisable: {exc}") from exc
    if getattr(_grammar_module(), "json_schema_to_gbnf", None) is None:
        raise GrammarError(
            "this llama-cpp-python has no JSON Schema converter "
            "(llama_cpp.llama_grammar.json_schema_to_gbnf): pass grammar= in GBNF, or upgrade"
        )
    return _schema_grammar(text)


@functools.lru_cache(maxsize=256)
def _schema_grammar(text: str) -> str:
    """:func:`schema_to_gbnf` of a schema as JSON (a server sends the same one again and again)."""
    schema = json.loads(text)
    defs = {key: schema[key] for key in ("$defs", "definitions") if key in schema}
    ignored = [
        f"{key} at {path}"
        for path, node in _nodes(schema, "#")
        for key in _CONSTRAINTS
        if key in node and _ignores(_probe(node, defs), _probe(node, defs, drop=key))
    ]
    if ignored:
        raise GrammarError(
            f"json_schema uses {', '.join(ignored)}, which this llama-cpp-python's JSON Schema "
            "converter does not enforce, so a reply could break the schema: remove it and "
            "check the value after parsing, or write the grammar= in GBNF"
        )
    return _convert(text)


@functools.lru_cache(maxsize=256)
def _convert(text: str) -> str:
    convert: Callable[[str], str] = _grammar_module().json_schema_to_gbnf
    try:
        grammar = str(convert(text))
    except Exception as exc:  # the converter raises whatever its code hits on a bad schema
        raise GrammarError(f"json_schema cannot be turned into a grammar: {exc!r}") from exc
    return grammar.replace(_PORT_CHAR, _JSON_CHAR)


def _nodes(node: object, path: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    if isinstance(node, Mapping):
        yield path, node
        for key, value in node.items():
            if key in _NAMED_SCHEMAS and isinstance(value, Mapping):
                for name, sub in value.items():
                    yield from _nodes(sub, f"{path}/{key}/{name}")
            elif key not in ("enum", "const", "default", "examples"):
                yield from _nodes(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _nodes(item, f"{path}/{i}")


def _probe(node: Mapping[str, Any], defs: Mapping[str, Any], drop: str | None = None) -> str:
    """``node`` as a schema of its own (with the root's definitions), less ``drop``, as JSON."""
    probe = {**defs, **{key: value for key, value in node.items() if key != drop}}
    return json.dumps(probe)


def _ignores(with_key: str, without: str) -> bool:
    """Whether the converter gives the same grammar for both schemas."""
    try:
        return _convert(with_key) == _convert(without)
    except GrammarError:
        return False  # the converter refuses the keyword: converting the schema will say so


def grammar_sampler(lib: ModuleType, vocab: Any, text: str) -> Any:
    """A new llama.cpp grammar sampler for ``text`` (free it with ``llama_sampler_free``).

    Raises:
        GrammarError: llama.cpp cannot parse the grammar (the message gives its reason), or
            the binding cannot be trusted with grammars (:func:`grammars_unsupported`).

    """
    unsupported = grammars_unsupported(lib, binding_version())
    if unsupported is not None:
        raise GrammarError(f"grammars need llama-cpp-python 0.3.9 or later: {unsupported}")
    with llama_log_lines() as lines:
        sampler = lib.llama_sampler_init_grammar(vocab, text.encode("utf-8"), _ROOT)
    if not sampler:
        reason = next((line.strip() for line in lines if line.strip()), "no reason logged")
        raise GrammarError(
            f"llama.cpp cannot use this grammar ({reason}; its parser's own message is on "
            "stderr); check the syntax, and that it defines `root` and every rule it uses"
        )
    return sampler


def grammars_unsupported(lib: Any, version: str | None) -> str | None:
    """Why binding ``lib`` (release ``version``) cannot run grammars safely, or ``None``."""
    if not hasattr(lib, "llama_sampler_init_grammar"):
        return f"{version} predates llama.cpp's grammar sampler"
    release = tuple(int(part) for part in re.findall(r"\d+", version or "")[:3])
    if release and release < (0, 3, 9):
        # Measured on 0.3.8: an undefined rule, a missing root, left recursion all give a
        # sampler whose grammar is empty, so the reply would not be constrained at all.
        return f"{version} turns a grammar it cannot parse into one that constrains nothing"
    return None


def check_grammar(lib: ModuleType, vocab: Any, text: str) -> None:
    """Raise :class:`GrammarError` unless llama.cpp can compile ``text``."""
    sampler = grammar_sampler(lib, vocab, text)
    lib.llama_sampler_free(sampler)


class Grammar:
    """Where one reply stands in its grammar, and the tokens that may come next.

    Owns a llama.cpp grammar sampler; used by one worker thread. A token is accepted only
    after the grammar was asked whether it allows it.
    """

    def __init__(self, lib: ModuleType, sampler: Any, n_vocab: int) -> None:
        """Take ownership of ``sampler`` (from :func:`grammar_sampler`)."""
        self._lib = lib
        self._ptr: Any = sampler
        try:
            self._candidates = Candidates(lib, n_vocab)
        except BaseException:
            self.close()
            raise

    def allows(self, token: int) -> bool:
        """Whether the grammar allows ``token`` next."""
        return self._candidates.allows(self._ptr, token)

    def pick(self, logits: Any, chain: Any) -> int:
        """The token ``chain`` chooses from ``logits`` (by token id); the grammar moves past it.

        As llama.cpp's own ``common_sampler``: the chain picks from all tokens and the grammar
        checks only that pick; only when it refuses are all 49k tokens filtered (about 3 ms)
        and the chain run again on what is left.

        Raises:
            GrammarError: the grammar allows none of the model's tokens here.

        """
        candidates = self._candidates
        candidates.load(logits)
        candidates.apply(chain)
        token = candidates.selected()
        if self.allows(token):  # checked once: the common case costs one small apply
            self._lib.llama_sampler_accept(self._ptr, token)
            return token
        candidates.load(logits)
        candidates.apply(self._ptr)
        candidates.apply(chain)
        token = candidates.selected()
        self.accept(token)  # where the grammar allows no token, the chain drew a refused one
        return token

    def restrict(self, logits: Any) -> Any:
        """``logits`` (by token id), set to ``-inf`` in place for every token refused."""
        candidates = self._candidates
        candidates.load(logits)
        candidates.apply(self._ptr)
        logits[candidates.ruled_out()] = -np.inf
        return logits

    def accept(self, token: int) -> None:
        """Move past ``token``, checked first: llama.cpp aborts on a token its grammar refuses.

        Raises:
            GrammarError: the grammar refuses ``token``: it allowed none of the model's tokens
                here, and the sampler had to draw one anyway.

        """
        if not self.allows(token):
            raise GrammarError(
                "the grammar allows none of this model's tokens at this point of the reply: "
                "check that every character it asks for can be written by the model"
            )
        self._lib.llama_sampler_accept(self._ptr, token)

    def close(self) -> None:
        """Free the grammar sampler; idempotent."""
        if self._ptr is not None:
            self._lib.llama_sampler_free(self._ptr)
            self._ptr = None
