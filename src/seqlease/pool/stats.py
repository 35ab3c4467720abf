"""Frozen snapshots of a pool's state: what ``Context.stats()`` returns."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Holder", "PoolStats"]


@dataclass(frozen=True)
class Holder:
    """Who holds one leased sequence, and for how long."""

    #: The llama.cpp ``seq_id``.
    seq_id: int
    #: Where the lease was taken: ``file:line in function`` of the caller.
    origin: str
    #: Seconds since the lease was taken.
    held_for: float
    #: Name of the thread that took the lease.
    thread: str

    def describe(self) -> str:
        """One line for error messages: ``seq 0 by app.py:12 in handler for 1.25 s``."""
        return f"seq {self.seq_id} by {self.origin} ({self.thread}) for {self.held_for:.2f} s"


@dataclass(frozen=True)
class PoolStats:
    """A consistent snapshot of a sequence pool, taken under its lock."""

    #: Number of sequences in the pool.
    size: int
    #: Sequences currently leased.
    leased: int
    #: Sequences free to lease now.
    free: int
    #: Sequences out of service for good: their memory could not be cleared after a failure.
    quarantined: int
    #: Callers waiting for a sequence.
    waiting: int
    #: Successful acquisitions so far.
    acquires: int
    #: Releases so far (explicit and reclaimed).
    releases: int
    #: Acquisitions that gave up because the timeout passed (``timeout=0`` included).
    timeouts: int
    #: Acquisitions refused at once: the waiting queue was full or the context closed.
    rejected: int
    #: Leases reclaimed from handles that were dropped without release.
    leaked: int
    #: ``release()`` calls on a handle that was already released (no-ops).
    double_releases: int
    #: The longest time a successful acquisition waited, in seconds.
    longest_wait: float
    #: Who holds each leased sequence, by ``seq_id``.
    holders: tuple[Holder, ...]
    #: Sequences released and being cleared, about to be free (or quarantined) again.
    clearing: int = 0
    #: Generations whose prompt started from a prefix copied from another sequence or the
    #: prefix cache (``Context.stats()`` fills these in; the pool alone knows no prompts).
    prefix_hits: int = 0
    #: Prompt tokens copied that way instead of evaluated.
    prefix_tokens_reused: int = 0
    #: Tokens the prefix cache holds now.
    prefix_cached_tokens: int = 0
