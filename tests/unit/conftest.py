"""The unit suite loads no model: a test here that tries fails at once, saying so.

These tests cover policy (pool, job table, engine on a fake seam, scheduling, parameters,
text) and must stay fast on a busy 2-core box; everything that needs llama.cpp's answers
lives one folder up and is marked ``model``.
"""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(autouse=True)
def _no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a unit test loaded a model: move it out of tests/unit")

    from seqlease.native.model import NativeModel

    monkeypatch.setattr(NativeModel, "__init__", refuse)
    try:
        import llama_cpp
    except ImportError:  # pragma: no cover - the test extra installs it
        return
    monkeypatch.setattr(llama_cpp.Llama, "__init__", refuse)
