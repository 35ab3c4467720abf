"""Runs every Python code block of the README and of docs/ as a test, with Sybil.

The blocks of one page share a namespace and run in order against the real default model. A
block that cannot run in a test is preceded by ``<!-- skip: next "why" -->``; a block that is
not Python (a shell command, an error message) is fenced as ``bash`` or ``text``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sybil import Sybil
from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser


def _close_contexts(namespace: dict[str, Any]) -> None:
    """After a page: close any Context a failed block left open, so its memory is freed."""
    from seqlease import Context

    for value in list(namespace.values()):
        if isinstance(value, Context):
            value.close(timeout=5)


pytest_collect_file = Sybil(
    parsers=[PythonCodeBlockParser(), SkipParser()],
    # Path.match() anchors at the right and "**" is not recursive before Python 3.13: one
    # pattern per depth of docs/.
    patterns=["README.md", "docs/*.md", "docs/*/*.md"],
    teardown=_close_contexts,
).pytest()


_UNIT = Path(__file__).parent / "tests" / "unit"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test outside ``tests/unit`` as ``model``: it may load one through llama.cpp.

    ``python -m pytest -m "not model"`` runs the unit suite alone, in seconds.
    """
    for item in items:
        if _UNIT not in item.path.parents:
            item.add_marker(pytest.mark.model)
