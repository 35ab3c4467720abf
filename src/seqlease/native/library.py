"""Import of the low-level binding, one-time backend set-up, and llama.cpp log routing."""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import logging
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import Any

__all__ = ["LLAMA_LOGGER", "binding_version", "holding_the_gil", "llama_log_lines", "load_library"]

#: llama.cpp's own log lines go here. Quiet by default: the ``seqlease`` logger has a NullHandler.
LLAMA_LOGGER = logging.getLogger("seqlease.llama")

# ggml_log_level: NONE, DEBUG, INFO, WARN, ERROR, CONT (continues the previous line).
_LEVELS = {
    0: logging.DEBUG,
    1: logging.DEBUG,
    2: logging.INFO,
    3: logging.WARNING,
    4: logging.ERROR,
}
_CONT = 5
# The numbering before ggml renumbered its levels in 2024 (llama-cpp-python 0.2.x): no CONT.
_OLD_LEVELS = {2: logging.ERROR, 3: logging.WARNING, 4: logging.INFO, 5: logging.DEBUG}

_lock = threading.Lock()
_lib: ModuleType | None = None
# ctypes frees a callback's trampoline when the Python object dies, and llama.cpp keeps calling
# it: keeping it in a module global for the life of the process prevents a segfault.
_log_callback: Any = None


class _LineAssembler:
    """Joins llama.cpp's log fragments into whole lines before they reach ``logging``."""

    def __init__(self, levels: dict[int, int], cont: int | None) -> None:
        self._levels = levels
        self._cont = cont
        self._parts: list[str] = []
        self._level = logging.DEBUG

    def feed(self, level: int, text: bytes | None) -> None:
        if level != self._cont and not self._parts:
            self._level = self._levels.get(level, logging.DEBUG)
        self._parts.append((text or b"").decode("utf-8", errors="replace"))
        joined = "".join(self._parts)
        if "\n" not in joined:
            return
        *lines, rest = joined.split("\n")
        self._parts = [rest] if rest else []
        if LLAMA_LOGGER.isEnabledFor(self._level):
            for line in lines:
                if line.strip():
                    LLAMA_LOGGER.log(self._level, "%s", line)


def load_library() -> ModuleType:
    """Import ``llama_cpp.llama_cpp``, initialise the backend once, and route its logs.

    Raises:
        ImportError: llama-cpp-python is not installed or its shared library does not load.

    """
    global _lib, _log_callback
    with _lock:
        if _lib is not None:
            return _lib
        lib = importlib.import_module("llama_cpp.llama_cpp")
        lib.llama_backend_init()
        callback_type = getattr(lib, "ggml_log_callback", None) or getattr(
            lib, "llama_log_callback", None
        )
        if callback_type is not None and hasattr(lib, "llama_log_set"):
            assembler = _LineAssembler(*_level_numbering())

            def _on_log(level: int, text: bytes | None, _user_data: Any) -> None:
                assembler.feed(level, text)

            _log_callback = callback_type(_on_log)
            # Older bindings declare the parameter as a void pointer, newer ones as the type.
            argtypes = getattr(lib.llama_log_set, "argtypes", None) or [ctypes.c_void_p]
            if argtypes[0] is ctypes.c_void_p:
                lib.llama_log_set(ctypes.cast(_log_callback, ctypes.c_void_p), None)
            else:
                lib.llama_log_set(_log_callback, None)
        _lib = lib
        return lib


_held: dict[str, Any] = {}


def holding_the_gil(lib: ModuleType, fn: Any) -> Any:
    """``fn`` (a function of ``lib``) called without letting go of the GIL.

    For the calls the engine makes per token, which return in microseconds. ctypes releases
    the GIL around every call, and taking it back waits for whichever Python thread holds it,
    up to the 5 ms switch interval: with seven leases' few dozen such calls a step, one busy
    Python thread (a caller compiling a large schema, the server parsing a body) doubled the
    step (49 to 99 ms, measured). ``llama_decode`` keeps letting go: other threads run while
    it works. A binding without its ``CDLL`` in reach gets ``fn`` back as it is.
    """
    name = getattr(fn, "__name__", None)
    cdll = getattr(lib, "_lib", None)
    if not isinstance(name, str) or not isinstance(cdll, ctypes.CDLL):
        return fn
    with _lock:
        held = _held.get(name)
        if held is None:
            held = getattr(ctypes.PyDLL(cdll._name, handle=cdll._handle), name)
            held.argtypes = fn.argtypes
            held.restype = fn.restype
            _held[name] = held
    return held


class _ThreadLines(logging.Handler):
    """Keeps the messages one thread logs (llama.cpp logs on the thread that called it)."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.lines.append(record.getMessage())


@contextlib.contextmanager
def llama_log_lines() -> Iterator[list[str]]:
    """The llama.cpp log lines this thread causes inside the block, for an error message.

    llama.cpp reports why a call failed (a grammar's syntax error, say) only in its log.
    """
    handler = _ThreadLines()
    LLAMA_LOGGER.addHandler(handler)
    try:
        yield handler.lines
    finally:
        LLAMA_LOGGER.removeHandler(handler)


def _level_numbering() -> tuple[dict[int, int], int | None]:
    """Which ggml log level numbering the installed llama.cpp uses, and its CONT level.

    The binding's own level table (in its private ``_logger`` module) is written for the
    llama.cpp it ships; the new numbering starts at NONE = 0.
    """
    try:
        table = importlib.import_module("llama_cpp._logger").GGML_LOG_LEVEL_TO_LOGGING_LEVEL
    except (ImportError, AttributeError):
        return _LEVELS, _CONT
    return (_LEVELS, _CONT) if 0 in table else (_OLD_LEVELS, None)


def binding_version() -> str | None:
    """Installed llama-cpp-python version, read without loading the shared library."""
    from importlib import metadata

    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        return None
