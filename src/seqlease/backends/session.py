"""The session backend: one llama.cpp context with ``n_seq_max`` independent sequences."""

from __future__ import annotations

import os
import threading
from types import ModuleType

from seqlease.engine.engine import Engine
from seqlease.errors import BackendUnavailableError
from seqlease.native.context import NativeContext
from seqlease.native.memory import resolve_memory_api
from seqlease.native.model import NativeModel
from seqlease.request.job import Channel, Job
from seqlease.request.params import SamplingParams

__all__ = ["SessionBackend"]


class SessionBackend:
    """Loads the model and the context, and hands both to the :class:`Engine` that owns them."""

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
        self.model = NativeModel(lib, model_path)
        try:
            native = NativeContext(
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
        self.n_ctx = native.n_ctx_seq
        self.engine = Engine(lib, native)

    def generate(
        self,
        seq_id: int,
        prompt: list[int],
        params: SamplingParams,
        abort: threading.Event | None,
        channel: Channel,
    ) -> Job:
        """Queue one generation on ``seq_id``; its text and end go to ``channel``."""
        return self.engine.generate(seq_id, prompt, params, abort, channel)

    def clear_sequence(self, seq_id: int) -> None:
        """Stop the sequence's generation, then remove every token from its KV memory."""
        self.engine.clear_sequence(seq_id)

    def n_tokens(self, seq_id: int) -> int:
        """Tokens a sequence holds, as llama.cpp reports it (highest position + 1)."""
        return self.engine.n_tokens(seq_id)

    @property
    def freed(self) -> bool:
        """Whether the native memory has been freed."""
        return self.engine.freed

    def close(self) -> None:
        """Stop the engine, then free the context and the model; idempotent."""
        self.engine.close()
