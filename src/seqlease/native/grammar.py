"""GBNF grammars and JSON Schemas through what the installed llama-cpp-python offers.

Two generations of the binding compile grammars differently:

* 0.3 and later: llama.cpp parses the text itself (``llama_sampler_init_grammar``), returning
  NULL, and logging why, for a grammar it cannot use; ``Llama`` takes a ``LlamaGrammar`` that
  only holds the text.
* 0.2: ``LlamaGrammar.from_string`` parses in Python and raises on a bad grammar.

JSON Schemas become GBNF through the binding's own converter, a port of llama.cpp's
``json_schema_to_grammar``: its output is what the llama.cpp it ships accepts.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from seqlease.errors import GrammarError
from seqlease.native.library import llama_log_lines

__all__ = ["binding_grammar", "check_grammar", "grammar_sampler", "schema_to_gbnf"]

_ROOT = b"root"


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
    convert = getattr(_grammar_module(), "json_schema_to_gbnf", None)
    if convert is None:
        raise GrammarError(
            "this llama-cpp-python has no JSON Schema converter "
            "(llama_cpp.llama_grammar.json_schema_to_gbnf): pass grammar= in GBNF, or upgrade"
        )
    try:
        return str(convert(text))
    except Exception as exc:  # the converter raises whatever its code hits on a bad schema
        raise GrammarError(f"json_schema cannot be turned into a grammar: {exc!r}") from exc


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
