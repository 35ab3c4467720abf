"""A server under test: a real child process on a free port of 127.0.0.1, stopped by SIGINT.

Shared by the tests of ``examples/web_app.py`` and of ``python -m seqlease serve``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 90.0
SHUTDOWN_TIMEOUT = 30.0
#: Greedy decoding of this prompt runs far past the first chunk: a reply to hang up on.
LONG_PROMPT = "Write the numbers from 1 to 300 separated by commas."


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGINT, as Ctrl-C: uvicorn shuts down gracefully and runs the lifespan's exit."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(SHUTDOWN_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def assert_shut_down_cleanly(srv: Server) -> None:
    """The server ran its shutdown, with no traceback and no leaked lease on the way."""
    output = srv.output()
    assert "Application shutdown complete" in output, output
    assert "Traceback" not in output, output
    assert "LeaseLeakWarning" not in output, output


@contextmanager
def serving(
    command: Callable[[int], list[str]], log: Path, *, ready: str, env: dict[str, str]
) -> Iterator[Server]:
    """``command(port)`` answering 200 on ``ready``; stopped (if still running) on exit.

    ``env`` adds to (and overrides) the environment.
    """
    port = free_port()
    env = {**os.environ, "GGML_NO_BACKTRACE": "1", **env}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command(port), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    srv = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{srv.output()}")
            try:
                if httpx.get(f"{srv.url}{ready}", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer in {STARTUP_TIMEOUT} s:\n{srv.output()}")
            time.sleep(0.1)
        yield srv
    finally:
        if proc.poll() is None:
            stop(proc)
