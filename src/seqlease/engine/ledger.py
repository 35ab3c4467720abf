"""What each sequence holds in llama.cpp's KV memory, kept in step with it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from seqlease.native.context import NativeContext

__all__ = ["KvLedger", "common_prefix"]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists.

    Binary search over slice comparisons: prompts run to thousands of tokens and are matched
    against every sequence at each request, and a slice compare runs in C.
    """
    lo, hi = 0, min(len(a), len(b))
    if hi and a[0] != b[0]:
        return 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class KvLedger:
    """The tokens of every sequence, in position order, and the verbs that change them.

    Every change to a sequence's KV memory goes through here, so the record and llama.cpp
    never disagree. Not thread-safe: the engine calls it under its guard only.
    """

    def __init__(self, native: NativeContext) -> None:
        """An empty record for each of ``native``'s sequences (their memory must be empty)."""
        self._native = native
        self._held: list[list[int]] = [[] for _ in range(native.n_seq_max)]

    def n_tokens(self, seq_id: int) -> int:
        """Tokens the sequence holds."""
        return len(self._held[seq_id])

    def tokens(self, seq_id: int) -> tuple[int, ...]:
        """The tokens the sequence holds, in position order (a copy)."""
        return tuple(self._held[seq_id])

    def common(self, seq_id: int, prompt: Sequence[int]) -> int:
        """How many leading tokens of ``prompt`` the sequence holds."""
        return common_prefix(self._held[seq_id], prompt)

    def reuse(self, seq_id: int, n: int) -> int:
        """Keep the first ``n`` tokens the sequence holds (a prompt's prefix); drop the rest.

        Returns how many tokens were kept.
        """
        if n < len(self._held[seq_id]):
            return self.truncate(seq_id, n)
        return n

    def copy(self, src: int, dst: int, n: int) -> int:
        """Make ``dst`` hold exactly the first ``n`` tokens of ``src``; returns what it holds."""
        n = self._native.copy_prefix(src, dst, n)
        self._held[dst] = self._held[src][:n]
        return n

    def truncate(self, seq_id: int, n: int) -> int:
        """Drop everything from position ``n`` on; returns the tokens left.

        A partial removal fails on recurrent and hybrid models: then the whole sequence goes.
        """
        if not self._native.seq_rm(seq_id, n, -1):
            self._native.seq_rm(seq_id)
            n = 0
        del self._held[seq_id][n:]
        return n

    def appended(self, seq_id: int, tokens: Iterable[int]) -> None:
        """Record tokens a successful decode wrote at the end of the sequence."""
        self._held[seq_id].extend(tokens)

    def clear(self, seq_id: int) -> None:
        """Remove every token of the sequence."""
        self._native.seq_rm(seq_id)
        self._held[seq_id].clear()
