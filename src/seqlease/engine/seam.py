"""The narrow seam between engine policy and llama.cpp: exactly what the engine calls.

:class:`~seqlease.native.context.NativeContext` is the real one; engine, ledger, scheduling,
cancellation and prefix policy are unit-tested against a small deterministic fake of these
protocols, in milliseconds, while llama.cpp itself is tested for real.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from seqlease.native.context import BatchEntry
from seqlease.native.guidance import Constraint
from seqlease.request.job import Vocabulary
from seqlease.request.params import SamplingParams

__all__ = ["BatchEntry", "Sampler", "Samplers", "Seam"]


class Seam(Protocol):
    """One llama.cpp context as the engine and its ledger use it (one thread at a time)."""

    #: Sequence ids the context knows: ``[0, n_seq_max)``.
    n_seq_max: int
    #: Most tokens one decode call takes, and llama.cpp's micro-batch size.
    n_batch: int
    n_ubatch: int
    #: Tokens each sequence may hold.
    n_ctx_seq: int
    #: One KV buffer for all sequences (else one stream per sequence).
    kv_unified: bool

    @property
    def model(self) -> Vocabulary:
        """The vocabulary replies are written with."""
        ...

    def check_batch(self, entries: Sequence[BatchEntry]) -> None:
        """Raise ``ValueError`` for entries llama.cpp would reject or abort on."""
        ...

    def decode(self, entries: Sequence[BatchEntry]) -> None:
        """Evaluate one batch (raises :class:`~seqlease.DecodeError` with llama.cpp's code)."""
        ...

    def logit_row(self, index: int) -> Any:
        """The logits of batch row ``index`` of the last decode (a float array)."""
        ...

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        """Remove positions ``[p0, p1)`` of a sequence (``-1, -1``: all of it)."""
        ...

    def copy_prefix(self, src: int, dst: int, n: int) -> int:
        """Make ``dst`` hold exactly the first ``n`` positions of ``src``; what it holds."""
        ...

    def cut(self, seq_id: int, start: int, stop: int) -> bool:
        """Remove positions ``[start, stop)`` and move the later ones down."""
        ...

    def seq_pos_max(self, seq_id: int) -> int:
        """Highest position a sequence holds, -1 when empty."""
        ...

    def save_state(self, seq_id: int) -> bytes:
        """A sequence's memory as llama.cpp writes it."""
        ...

    def load_state(self, seq_id: int, data: bytes, n_tokens: int) -> bool:
        """Replace a sequence's memory by ``data``; ``False`` (and empty) when refused."""
        ...


class Sampler(Protocol):
    """One reply's sampler chain, bound to the context it samples from."""

    def sample(self, row: int) -> int:
        """The next token from batch row ``row`` of the last decode."""
        ...

    def accept(self, token: int) -> None:
        """Tell the chain (penalties, grammar) about a token of the sequence."""
        ...

    def close(self) -> None:
        """Free the chain; idempotent."""
        ...


#: Builds a reply's sampler from its parameters and its grammar (compiled at the call).
Samplers = Callable[[SamplingParams, Constraint | None], Sampler]
