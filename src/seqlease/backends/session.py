"""The session backend: one llama.cpp context with ``n_seq_max`` independent sequences."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from types import ModuleType

from seqlease.backends.base import check_prompt
from seqlease.backends.lifetime import NativeLifetime
from seqlease.engine.engine import Engine
from seqlease.engine.job import Event, Job
from seqlease.engine.params import SamplingParams
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
        self._lib = lib
        self.lifetime = NativeLifetime(self.guard, self._free)
        self.engine = Engine(lib, self.native, self.guard)
        self.engine.on_exit = self.lifetime.thread_exited

    def generate(
        self,
        seq_id: int,
        prompt: list[int],
        params: SamplingParams,
        abort: threading.Event | None,
        emit: Callable[[Event], None],
    ) -> Job:
        """Submit one generation on ``seq_id`` (already validated); events go to ``emit``."""
        check_prompt(prompt, self.native.n_ctx_seq, self.model)
        job = Job(seq_id, prompt, params, emit, abort)
        self.engine.submit(job)
        return job

    def clear_sequence(self, seq_id: int) -> None:
        """Stop the sequence's generation, then remove every token from its KV memory."""
        self.engine.cancel_sequence(seq_id)
        with self.guard:
            if not self.lifetime.freed:
                self.native.seq_rm(seq_id)
                self.engine.tokens[seq_id].clear()

    def n_tokens(self, seq_id: int) -> int:
        """Tokens a sequence holds, as llama.cpp reports it (highest position + 1)."""
        with self.guard:
            return self.native.seq_pos_max(seq_id) + 1

    def close(self) -> None:
        """Stop the engine, then free the context and the model; idempotent.

        Never frees under a running step: the engine thread is joined first, or, when this
        runs on that very thread (a finalizer during garbage collection), it frees on exit.
        """
        self.engine.stop()
        self.lifetime.free_after(self.engine.thread)

    def _free(self) -> None:
        self.native.close()
        self.model.close()
