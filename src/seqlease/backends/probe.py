"""``ctx.probe``: the sanctioned way for tests and benchmarks to look inside a Context.

Applications have no use for it: it shows what the engine holds, lets a test hold the engine
between steps, and decodes straight into a sequence, all under the backend's guard, so that a
test never reaches into private attributes (which would break on every refactoring).
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from seqlease.backends.guard import Guard
from seqlease.native.context import BatchEntry
from seqlease.pool.slot import Slot

__all__ = ["DecodeObserver", "Probe"]

#: Called with each ``llama_decode`` call's entries, before it runs.
DecodeObserver = Callable[[list[BatchEntry]], None]


class Probe(abc.ABC):
    """What tests and benchmarks may see and do inside one Context's backend."""

    def __init__(self, guard: Guard, slots: Callable[[], tuple[Slot, ...]]) -> None:
        """Internal: the backend makes its probe (``guard``: the one around native calls)."""
        self._guard = guard
        self._slots = slots

    def slots(self) -> tuple[Slot, ...]:
        """The pool's slots (state, lease number), as they are now."""
        return self._slots()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the backend between steps for the block: nothing decodes meanwhile."""
        with self._guard:
            yield

    @property
    @abc.abstractmethod
    def steps(self) -> int:
        """Decode steps so far (session); generations run so far (completion)."""

    @property
    @abc.abstractmethod
    def evaluated(self) -> int:
        """Tokens evaluated so far (session; the completion backend does not count them)."""

    @property
    @abc.abstractmethod
    def completed(self) -> int:
        """Generations that ended so far, however they ended."""

    @property
    @abc.abstractmethod
    def kv_unified(self) -> bool:
        """Whether all sequences share one KV buffer."""

    @property
    @abc.abstractmethod
    def freed(self) -> bool:
        """Whether the native memory has been freed."""

    @property
    @abc.abstractmethod
    def sequence_ids(self) -> range:
        """Every sequence id of the native context: the leases' and the prefix cache's."""

    @abc.abstractmethod
    def held(self, seq_id: int) -> tuple[int, ...]:
        """The tokens seqlease records for a sequence (llama.cpp should hold the same)."""

    @abc.abstractmethod
    def native_pos_max(self, seq_id: int) -> int:
        """llama.cpp's own highest position of a sequence (-1: empty)."""

    @abc.abstractmethod
    def context_ptr(self) -> Any:
        """The raw ``llama_context *`` (use it only inside :meth:`paused`)."""

    @abc.abstractmethod
    def append(self, seq_id: int, tokens: Sequence[int]) -> None:
        """Decode ``tokens`` at the end of an idle sequence, recorded as the engine's own."""

    @abc.abstractmethod
    def observe_decodes(self, observer: DecodeObserver | None) -> None:
        """Call ``observer`` with every decode call's entries from now on (``None``: stop)."""
