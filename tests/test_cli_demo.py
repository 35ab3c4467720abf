"""``python -m seqlease demo`` and ``chat`` end to end, on the real default model.

Each runs in a child process: that is how users run them, and a native abort there cannot take
pytest down.
"""

from __future__ import annotations

import subprocess

import pytest

from helpers import run_cli
from seqlease.cli import build_parser


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, stdin=stdin)


@pytest.mark.timeout(150)
@pytest.mark.parametrize(
    ("backend", "shown"),
    [("auto", "session (auto-selected)"), ("completion", "completion (forced")],
)
def test_demo_races_clicks_and_leaks_nothing(backend, shown):
    proc = _run(
        "demo",
        "--backend",
        backend,
        "--clicks",
        "6",
        "--max-tokens",
        "16",
        "--no-color",
        "--n-threads",
        "1",
        "--seed",
        "1",
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "\x1b[" not in out  # not a terminal, and --no-color
    # What llama.cpp was given: the app's 2 sequences, the defaults settled for the CPU.
    backend_name = shown.split()[0]
    assert "\nllama.cpp 2 sequences x 2048 tokens, KV f16/f16 (" in out
    assert f"flash attention off, 0 GPU layers, 1 thread, backend {backend_name}\n" in out
    # The impatient timeout=0 click while both sequences stream gets the friendly busy answer.
    assert "busy, try again" in out
    assert "[click 2 · seq " in out and "[click 3 · seq " in out  # the double click's halves
    summary = out[out.index("\nsummary\n") :]
    assert "no-wait" in summary and "busy" in summary
    assert shown in summary
    assert "llama-cpp-python " in summary
    assert "leased 0 · free 2" in summary and "leaked 0" in summary
    assert "no sequence leaked" in summary
    assert "6 fired:" in summary and "0 failed" in summary


@pytest.mark.timeout(150)
def test_chat_with_piped_input_replies_and_shows_stats():
    proc = _run("chat", "--max-tokens", "24", "--temperature", "0", stdin="hello\n/stats\n/quit\n")
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    reply = out.split("bot> ", 1)[1].split("\n", 1)[0]
    assert reply.strip(), out
    assert "\nllama.cpp: 1 sequence x 2048 tokens, KV f16/f16 (" in out
    assert "size 1 · leased 1 · free 0" in out  # /stats while the conversation holds the lease
    assert "last reply" in out and "generated" in out
    assert "released; bye" in out


@pytest.mark.timeout(150)
def test_a_context_that_cannot_start_fails_cleanly(tmp_path):
    # Whichever is refused first, the backend or the missing model, no model is loaded.
    missing = str(tmp_path / "missing.gguf")
    proc = _run("demo", "--backend", "completion", "--model", missing, "--no-color")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "cannot start:" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_commands_are_registered():
    parser = build_parser()
    args = parser.parse_args(["demo", "--clicks", "3", "--backend", "session"])
    assert args.clicks == 3 and args.backend == "session" and args.max_tokens == 48
    assert args.sequences == 2 and args.n_ctx == 2048 and args.n_threads == 1
    args = parser.parse_args(["chat", "--system", "be brief"])
    assert args.system == "be brief" and args.max_tokens == 256
    assert args.sequences == 1 and args.n_ctx == 2048 and args.n_threads == 1
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--clicks", "0"])
