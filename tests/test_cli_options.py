"""The llama.cpp options of ``python -m seqlease demo`` and ``chat``: parsed, passed, shown.

Parsing and the shown line's format are checked in this process; what reaches llama.cpp is
checked in child processes, as users run the commands, on the tiny model where it can be and
on the default model (SmolLM2, head size 64) for a quantized KV cache, which the tiny model's
head size of 16 cannot hold.
"""

from __future__ import annotations

import argparse
import subprocess
from types import SimpleNamespace

import pytest

from helpers import run_cli
from seqlease.cli import build_parser
from seqlease.cli.common import context_kwargs, describe_llama
from seqlease.options import ContextOptions, ModelOptions
from tiny_model import tiny_model_path


def _run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return run_cli(*args, "--no-color", stdin=stdin, timeout=60)


def _on_tiny(command: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return _run(command, "--model", str(tiny_model_path()), *args, stdin=stdin)


def _shown(out: str) -> str:
    """The text of the ``llama.cpp`` line (demo puts it in a column, chat after a colon)."""
    for line in out.splitlines():
        if line.startswith("llama.cpp"):
            return line.removeprefix("llama.cpp").lstrip(": ")
    pytest.fail(f"no llama.cpp line in:\n{out}")


# -- parsing --------------------------------------------------------------------------------


@pytest.mark.parametrize(("command", "sequences"), [("demo", 2), ("chat", 1)])
def test_defaults_keep_each_commands_pool_and_leave_the_rest_to_llama_cpp(command, sequences):
    args = build_parser().parse_args([command])
    assert context_kwargs(args) == {
        "sequences": sequences,
        "n_ctx": 2048,
        "n_threads": 1,
        "n_gpu_layers": "auto",
        "flash_attn": "auto",
        "type_k": "f16",
        "type_v": "f16",
    }


@pytest.mark.parametrize("command", ["demo", "chat"])
@pytest.mark.parametrize(
    ("flags", "option", "value"),
    [
        (["--n-gpu-layers", "auto"], "n_gpu_layers", "auto"),
        (["--n-gpu-layers", "AUTO"], "n_gpu_layers", "auto"),
        (["--n-gpu-layers", "0"], "n_gpu_layers", 0),
        (["--n-gpu-layers", "12"], "n_gpu_layers", 12),
        (["--n-gpu-layers", "-1"], "n_gpu_layers", -1),
        (["--flash-attn", "on"], "flash_attn", True),
        (["--flash-attn", "off"], "flash_attn", False),
        (["--flash-attn", "auto"], "flash_attn", "auto"),
        (["--cache-type-k", "q8_0"], "type_k", "q8_0"),
        (["--cache-type-k", "bf16"], "type_k", "bf16"),
        (["--cache-type-v", "q4_0"], "type_v", "q4_0"),
        (["--cache-type-v", "iq4_nl"], "type_v", "iq4_nl"),
        (["--n-ctx", "512"], "n_ctx", 512),
        (["--sequences", "4"], "sequences", 4),
        (["--n-threads", "2"], "n_threads", 2),
    ],
)
def test_each_flag_becomes_its_context_keyword(command, flags, option, value):
    kwargs = context_kwargs(build_parser().parse_args([command, *flags]))
    assert kwargs[option] == value
    assert type(kwargs[option]) is type(value)  # True, not 1; "auto", not a number


@pytest.mark.parametrize(
    ("flags", "complaint"),
    [
        (["--n-gpu-layers", "-2"], "-1 (all) or more"),
        (["--n-gpu-layers", "some"], "'auto' or a number of layers"),
        (["--n-gpu-layers", "1.5"], "'auto' or a number of layers"),
        (["--flash-attn", "yes"], "invalid choice"),
        (["--cache-type-k", "q3_k"], "invalid choice"),
        (["--cache-type-v", "F16"], "invalid choice"),
        (["--n-ctx", "0"], "at least 1"),
        (["--n-ctx", "lots"], "invalid positive_int value"),
        (["--sequences", "0"], "at least 1"),
    ],
)
def test_a_bad_flag_is_a_usage_error_naming_it(capsys, flags, complaint):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["demo", *flags])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flags[0]}: " in err
    assert complaint in err


def test_help_lists_the_llama_cpp_options(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["chat", "--help"])
    out = capsys.readouterr().out
    assert "llama.cpp options" in out
    for flag in ("--n-gpu-layers", "--flash-attn", "--cache-type-k", "--cache-type-v"):
        assert flag in out
    assert "q8_0" in out
    assert "(default: 1; a conversation uses one)" in " ".join(out.split())


# -- the shown line -------------------------------------------------------------------------


def _context(
    kv_bytes: int | None = 50_135_040, *, backend: str = "session", **options: object
) -> SimpleNamespace:
    model = ModelOptions(n_gpu_layers=options.pop("n_gpu_layers", 0))
    context = ContextOptions(**{"n_threads": 1, "flash_attn": False, **options})
    return SimpleNamespace(
        model_options=model,
        context_options=context,
        kv_cache_bytes=kv_bytes,
        backend=SimpleNamespace(name=backend),
    )


def test_the_shown_line_says_what_llama_cpp_was_given():
    ctx = _context(sequences=4)
    assert describe_llama(ctx) == (
        "4 sequences x 2048 tokens, KV f16/f16 (47.8 MiB), flash attention off, "
        "0 GPU layers, 1 thread, backend session"
    )


def test_the_shown_line_in_the_singular_on_a_gpu_and_without_a_known_size():
    ctx = _context(
        None,
        backend="completion",
        sequences=1,
        n_ctx=512,
        n_threads=1,
        flash_attn=True,
        type_k="q8_0",
        type_v="q4_0",
        n_gpu_layers=1,
    )
    assert describe_llama(ctx) == (
        "1 sequence x 512 tokens, KV q8_0/q4_0, flash attention on, 1 GPU layer, 1 thread, "
        "backend completion"
    )
    ctx = _context(3 << 30, n_gpu_layers=-1, n_threads=4)
    assert "KV f16/f16 (3.00 GiB)" in describe_llama(ctx)
    assert "all layers on the GPU, 4 threads" in describe_llama(ctx)


# -- what reaches llama.cpp -----------------------------------------------------------------


@pytest.mark.timeout(90)
def test_a_quantized_kv_cache_on_the_default_model_turns_flash_attention_on():
    proc = _run(
        "demo",
        "--cache-type-k",
        "q8_0",
        "--cache-type-v",
        "q8_0",
        "--clicks",
        "1",
        "--max-tokens",
        "4",
        "--seed",
        "1",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    shown = _shown(proc.stdout)
    assert shown.startswith("2 sequences x 2048 tokens, KV q8_0/q8_0 (")
    assert " MiB), flash attention on, " in shown  # "auto" resolved on for a quantized V
    assert "no sequence leaked" in proc.stdout


@pytest.mark.timeout(90)
@pytest.mark.parametrize("command", ["demo", "chat"])
def test_n_ctx_and_sequences_reach_the_context(command):
    proc = _on_tiny(
        command,
        "--sequences",
        "3",
        "--n-ctx",
        "256",
        "--n-threads",
        "1",
        *(["--clicks", "1", "--max-tokens", "2"] if command == "demo" else []),
        stdin="/stats\n/quit\n",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    shown = _shown(proc.stdout)
    assert shown.startswith("3 sequences x 256 tokens, KV f16/f16 ("), shown
    # On the CPU "auto" leaves flash attention off (no quantized V, no GPU layers).
    assert shown.endswith(" MiB), flash attention off, 0 GPU layers, 1 thread, backend session")
    if command == "chat":
        assert "size 3 · leased 1 · free 2" in proc.stdout
        assert "0 tokens in memory of 256" in proc.stdout
    else:
        assert "size 3 · leased 0 · free 3" in proc.stdout


def _assert_clean_failure(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    [line] = [line for line in proc.stdout.splitlines() if line.startswith("cannot start:")]
    for needle in needles:
        assert needle in line, line
    assert "llama.cpp" not in proc.stdout.replace(line, "")  # no context, so no shown line
    return line


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", ["demo", "chat"])
def test_a_quantized_v_cache_without_flash_attention_fails_in_one_line(command):
    proc = _on_tiny(
        command,
        "--flash-attn",
        "off",
        "--cache-type-v",
        "q8_0",
    )
    _assert_clean_failure(
        proc,
        "cannot start: ValueError: type_v='q8_0' needs flash attention",
        "--flash-attn",
        "--cache-type-v",
    )


@pytest.mark.timeout(60)
def test_a_kv_type_the_models_heads_cannot_hold_fails_in_one_line():
    # The tiny model's heads hold 16 values; a q8_0 block is 32.
    proc = _run("chat", "--model", str(tiny_model_path()), "--cache-type-k", "q8_0")
    _assert_clean_failure(
        proc, "type_k='q8_0' cannot hold this model's KV cache", "type_k is --cache-type-k"
    )


def _gpu_offload() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


@pytest.mark.timeout(60)
@pytest.mark.skipif(_gpu_offload(), reason="this build offloads to a GPU: 5 layers would load")
@pytest.mark.parametrize("backend", ["auto", "completion"])
def test_gpu_layers_on_a_cpu_only_build_fail_in_one_line(backend):
    proc = _run(
        "demo", "--model", str(tiny_model_path()), "--backend", backend, "--n-gpu-layers", "5"
    )
    _assert_clean_failure(
        proc,
        "BackendUnavailableError: n_gpu_layers=5 cannot be honoured",
        "no GPU offload",
        "n_gpu_layers is --n-gpu-layers",
    )
    # The backend was not what was refused: no advice to change it.
    assert "--backend auto" not in proc.stdout


def test_context_kwargs_takes_any_namespace_with_the_flags():
    args = argparse.Namespace(
        sequences=1,
        n_ctx=64,
        n_threads=None,
        n_gpu_layers=0,
        flash_attn="on",
        cache_type_k="f32",
        cache_type_v="bf16",
    )
    assert context_kwargs(args)["flash_attn"] is True
    assert context_kwargs(args)["n_threads"] is None
