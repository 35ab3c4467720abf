"""Shared fixtures: running Python code in a child process."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import pytest

RunPython = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def run_python() -> RunPython:
    """Run ``code`` in a fresh interpreter; a native abort there cannot take pytest down.

    ``GGML_NO_BACKTRACE`` stops ggml from attaching gdb to print a backtrace on abort, which
    is slow and floods the output.
    """

    def run(
        code: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, "GGML_NO_BACKTRACE": "1", **(env or {})}
        return subprocess.run(
            [sys.executable, "-c", code, *args],
            capture_output=True,
            text=True,
            env=full_env,
            timeout=timeout,
            check=False,
        )

    return run
