"""GBNF grammars and JSON Schemas through what the installed llama-cpp-python offers.

Two generations of the binding compile grammars differently:

* 0.3 and later: llama.cpp parses the text itself (``llama_sampler_init_grammar``), returning
  NULL, and logging why, for a grammar it cannot use; ``Llama`` takes a ``LlamaGrammar`` that
  only holds the text.
* 0.2: ``LlamaGrammar.from_string`` parses in Python and raises on a bad grammar.

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
from collections.abc import Callable, Iterator, Mapping
from types import ModuleType
from typing import Any

from seqlease.errors import GrammarError
from seqlease.native.library import llama_log_lines

__all__ = ["binding_grammar", "check_grammar", "grammar_sampler", "schema_to_gbnf"]

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
        text = json.dumps(schema, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise GrammarError(f"json_schema is not JSON-serialisable: {exc}") from exc
    if getattr(_grammar_module(), "json_schema_to_gbnf", None) is None:
        raise GrammarError(
            "this llama-cpp-python has no JSON Schema converter "
            "(llama_cpp.llama_grammar.json_schema_to_gbnf): pass grammar= in GBNF, or upgrade"
        )
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
    return json.dumps(probe, sort_keys=True)


def _ignores(with_key: str, without: str) -> bool:
    """Whether the converter gives the same grammar for both schemas."""
    try:
        return _convert(with_key) == _convert(without)
    except GrammarError:
        return False  # the converter refuses the keyword: converting the schema will say so


def grammar_sampler(lib: ModuleType, vocab: Any, text: str) -> Any:
    """A new llama.cpp grammar sampler for ``text`` (free it with ``llama_sampler_free``).

    Raises:
        GrammarError: llama.cpp cannot parse the grammar; the message gives its reason.

    """
    with llama_log_lines() as lines:
        sampler = lib.llama_sampler_init_grammar(vocab, text.encode("utf-8"), _ROOT)
    if not sampler:
        reason = next((line.strip() for line in lines if line.strip()), "no reason logged")
        raise GrammarError(
            f"llama.cpp cannot use this grammar ({reason}); check its syntax and that it "
            "defines `root` and every rule it uses (GBNF: see llama.cpp's grammars/README.md)"
        )
    return sampler


def check_grammar(lib: ModuleType, vocab: Any, text: str) -> None:
    """Raise :class:`GrammarError` unless the installed binding can compile ``text``."""
    if hasattr(lib, "llama_sampler_init_grammar"):
        lib.llama_sampler_free(grammar_sampler(lib, vocab, text))
    else:
        binding_grammar(text)


def binding_grammar(text: str) -> Any:
    """``text`` as the ``LlamaGrammar`` that ``Llama.generate`` takes.

    Raises:
        GrammarError: the binding's own parser (0.2.x) rejects the grammar.

    """
    cls = _grammar_module().LlamaGrammar
    try:
        return cls.from_string(text, verbose=False)
    except Exception as exc:  # 0.2.x's parser raises ValueError, KeyError or IndexError
        raise GrammarError(
            f"llama-cpp-python cannot parse this grammar ({exc!r}); check its syntax and "
            "that it defines `root` and every rule it uses"
        ) from exc
