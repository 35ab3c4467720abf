"""What each sequence holds in llama.cpp's KV memory, kept in step with it."""

from __future__ import annotations

from collections.abc import Iterable

from seqlease.native.context import NativeContext

__all__ = ["KvLedger"]


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

    def reuse(self, seq_id: int, prompt: list[int]) -> int:
        """Keep the longest prefix of ``prompt`` the sequence holds, drop the rest.

        Returns how many tokens were kept. The last prompt token is never kept: it is
        evaluated again for the logits the reply starts from.
        """
        held = self._held[seq_id]
        keep = 0
        for a, b in zip(held, prompt, strict=False):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(prompt) - 1)
        if keep < len(held):
            keep = self.truncate(seq_id, keep)
        return keep

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
