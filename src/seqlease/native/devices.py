"""The compute devices llama.cpp sees (CPU, GPUs), read from ggml's device registry.

llama-cpp-python binds none of ggml's device functions, so they are called from the ``ggml``
library it ships (0.3.x; older releases have no device registry and report none).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Device", "gpu_count", "list_devices"]

# enum ggml_backend_dev_type: the first two never moved; later ones were renumbered.
_KINDS = {0: "CPU", 1: "GPU"}
_NEEDED = (
    "ggml_backend_dev_count",
    "ggml_backend_dev_get",
    "ggml_backend_dev_name",
    "ggml_backend_dev_description",
    "ggml_backend_dev_type",
    "ggml_backend_dev_memory",
)


@dataclass(frozen=True)
class Device:
    """One device of ggml's registry, as llama.cpp sees it."""

    #: ggml's name for it (``"CPU"``, ``"CUDA0"``, ``"Metal"``, ...).
    name: str
    #: The hardware (``"NVIDIA GeForce RTX 4090"``, the CPU's model name, ...).
    description: str
    #: ``"CPU"``, ``"GPU"`` or ``"other"`` (an accelerator or an integrated GPU).
    kind: str
    #: Memory in bytes: free and total (0 when the backend does not say).
    memory_free: int
    memory_total: int

    def __str__(self) -> str:
        memory = f", {self.memory_total / 2**30:.1f} GiB" if self.memory_total else ""
        return f"{self.name} ({self.kind}: {self.description}{memory})"


def _ggml() -> Any | None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "lib"
    names = {"win32": "ggml.dll", "darwin": "libggml.dylib"}
    path = folder / names.get(sys.platform, "libggml.so")
    if not path.exists():
        return None
    try:
        ggml = ctypes.CDLL(str(path))  # already loaded by llama.cpp: this finds the same copy
    except OSError:
        return None
    if not all(hasattr(ggml, name) for name in _NEEDED):
        return None
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    for name in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
        getattr(ggml, name).argtypes = [ctypes.c_void_p]
        getattr(ggml, name).restype = ctypes.c_char_p
    ggml.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_dev_type.restype = ctypes.c_int
    size_p = ctypes.POINTER(ctypes.c_size_t)
    ggml.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, size_p, size_p]
    ggml.ggml_backend_dev_memory.restype = None
    return ggml


@functools.lru_cache(maxsize=1)
def list_devices() -> tuple[Device, ...] | None:
    """Every device llama.cpp can run on, ``None`` when this build cannot say.

    Call after :func:`seqlease.native.library.load_library` (which loads the backends).
    """
    ggml = _ggml()
    if ggml is None:
        return None
    devices = []
    for i in range(int(ggml.ggml_backend_dev_count())):
        dev = ggml.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        ggml.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        devices.append(
            Device(
                name=(ggml.ggml_backend_dev_name(dev) or b"?").decode("utf-8", "replace"),
                description=(ggml.ggml_backend_dev_description(dev) or b"").decode(
                    "utf-8", "replace"
                ),
                kind=_KINDS.get(int(ggml.ggml_backend_dev_type(dev)), "other"),
                memory_free=int(free.value),
                memory_total=int(total.value),
            )
        )
    return tuple(devices)


def gpu_count() -> int | None:
    """Devices other than the CPU, ``None`` when this build cannot list its devices."""
    devices = list_devices()
    return None if devices is None else sum(d.kind != "CPU" for d in devices)
