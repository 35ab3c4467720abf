"""What every backend offers a :class:`~seqlease.Context`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from seqlease.backends.probe import Probe
from seqlease.engine.prefixes import PrefixStats
from seqlease.model_info import ModelInfo
from seqlease.native.guidance import Constraint
from seqlease.pool.slot import Slot
from seqlease.request.job import AbortFlag, Channel, Request
from seqlease.request.params import SamplingParams

__all__ = ["Backend", "BackendInfo"]


class Backend(Protocol):
    """A way to run generations for leased sequences."""

    #: "session" or "completion".
    name: str
    #: Tokens one sequence holds: prompt and reply together.
    n_ctx: int
    #: Bytes of the KV cache llama.cpp allocated (``None`` for a model of unknown shape).
    kv_cache_bytes: int | None
    #: What a saved sequence state depends on besides the model (cache types, attention),
    #: ``None`` where sequences cannot be saved.
    memory_format: dict[str, str] | None

    #: The loaded model's tokenizer and metadata, as ``Context.model`` shows it.
    model_info: ModelInfo

    @property
    def freed(self) -> bool:
        """Whether the native memory has been freed."""
        ...

    def generate(
        self,
        seq_id: int,
        prompt: list[int],
        params: SamplingParams,
        abort: AbortFlag | None,
        channel: Channel,
        constraint: Constraint | None = None,
    ) -> Request:
        """Start one generation for ``seq_id``; its text and end go to ``channel``."""
        ...

    def clear_sequence(self, seq_id: int) -> None:
        """Stop the sequence's generation and forget what it holds (on release)."""
        ...

    def n_tokens(self, seq_id: int) -> int:
        """Tokens the sequence holds in memory."""
        ...

    def fork_sequence(self, src: int, dst: int) -> None:
        """Make the idle, empty ``dst`` hold a copy of everything ``src`` holds."""
        ...

    def cut_sequence(self, seq_id: int, prefix: Sequence[int], start: int) -> bool:
        """If the idle sequence starts with ``prefix``, drop ``prefix[start:]`` from it.

        The tokens after the prefix move down to close the gap (a context shift). ``False``,
        with nothing changed, where the sequence holds something else or cannot shift.
        """
        ...

    def save_sequence(self, seq_id: int) -> tuple[tuple[int, ...], bytes]:
        """The idle sequence's tokens and its memory (only where ``memory_format`` is set)."""
        ...

    def load_sequence(self, seq_id: int, tokens: Sequence[int], data: bytes) -> bool:
        """Replace the idle sequence's memory by ``data``; ``False`` (and empty) if refused."""
        ...

    def prefix_stats(self) -> PrefixStats:
        """Prompt tokens reused across sequences so far."""
        ...

    def make_probe(self, slots: Callable[[], tuple[Slot, ...]]) -> Probe:
        """The :class:`Probe` tests and benchmarks look inside with (``slots``: its pool's)."""
        ...

    def close(self) -> None:
        """Free everything; idempotent."""
        ...


@dataclass(frozen=True)
class BackendInfo:
    """Which backend a :class:`~seqlease.Context` runs on (read-only: generate via leases)."""

    #: ``"session"`` (batched, multi-sequence) or ``"completion"`` (``llama_cpp.Llama``).
    name: str
