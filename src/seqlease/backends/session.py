"""The session backend: one llama.cpp context with ``n_seq_max`` independent sequences."""

from __future__ import annotations

import os
import threading
from types import ModuleType

from seqlease.errors import BackendUnavailableError
from seqlease.native.context import NativeContext
from seqlease.native.memory import resolve_memory_api
from seqlease.native.model import NativeModel

__all__ = ["SessionBackend"]


class SessionBackend:
    """Owns the native model and context; every native call on the context holds ``guard``.

    llama.cpp allows one thread per context at a time, so the guard is what makes it safe to
    clear one sequence from a releasing thread while another sequence is in use.
    """

    name = "session"

    def __init__(
        self,
        lib: ModuleType,
        model_path: str | os.PathLike[str],
        *,
        sequences: int,
        n_ctx: int,
        n_batch: int,
        n_threads: int,
    ) -> None:
        """Load the model and create the context (the model is freed again if that fails)."""
        memory, reasons = resolve_memory_api(lib)
        if memory is None:
            raise BackendUnavailableError("; ".join(reasons))
        self.guard = threading.RLock()
        self.model = NativeModel(lib, model_path)
        try:
            self.native = NativeContext(
                lib,
                self.model,
                memory,
                n_seq_max=sequences,
                n_ctx_seq=n_ctx,
                n_batch=n_batch,
                n_threads=n_threads,
            )
        except BaseException:
            self.model.close()
            raise
        self._closed = False

    def clear_sequence(self, seq_id: int) -> None:
        """Remove every token of one sequence from the KV memory."""
        with self.guard:
            if not self._closed:
                self.native.seq_rm(seq_id)

    def n_tokens(self, seq_id: int) -> int:
        """Tokens a sequence holds, as llama.cpp reports it (highest position + 1)."""
        with self.guard:
            return self.native.seq_pos_max(seq_id) + 1

    def close(self) -> None:
        """Free the context, then the model; idempotent, never under a running call."""
        with self.guard:
            if self._closed:
                return
            self._closed = True
            self.native.close()
            self.model.close()
