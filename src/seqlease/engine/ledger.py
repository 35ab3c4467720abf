"""What each sequence holds in llama.cpp's KV memory, kept in step with it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from seqlease.engine.seam import Seam
from seqlease.request.prompt import common_prefix

__all__ = ["KvLedger"]


class KvLedger:
    """The tokens of every sequence, in position order, and the verbs that change them.

    Every change to a sequence's KV memory goes through here, so the record and llama.cpp
    never disagree. Not thread-safe: the engine calls it under its guard only.

    Only a sequence's *shareable* prefix may be copied to another: memory this context
    evaluated from exactly those tokens. After a cut, the tokens moved down still carry what
    they attended to before (turns another lease never sent), and loaded memory is only the
    caller's word; neither is ever given to a different lease.
    """

    def __init__(self, native: Seam) -> None:
        """An empty record for each of ``native``'s sequences (their memory must be empty)."""
        self._native = native
        self._held: list[list[int]] = [[] for _ in range(native.n_seq_max)]
        self._shareable: list[int] = [0] * native.n_seq_max

    def n_tokens(self, seq_id: int) -> int:
        """Tokens the sequence holds."""
        return len(self._held[seq_id])

    def tokens(self, seq_id: int) -> tuple[int, ...]:
        """The tokens the sequence holds, in position order (a copy)."""
        return tuple(self._held[seq_id])

    def common(self, seq_id: int, prompt: Sequence[int]) -> int:
        """How many leading tokens of ``prompt`` the sequence holds."""
        return common_prefix(self._held[seq_id], prompt)

    def shareable(self, seq_id: int) -> int:
        """Leading tokens of the sequence whose memory another sequence may copy."""
        return self._shareable[seq_id]

    def common_shareable(self, seq_id: int, prompt: Sequence[int]) -> int:
        """How many leading tokens of ``prompt`` the sequence holds and may share."""
        return min(self.common(seq_id, prompt), self._shareable[seq_id])

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
        self._shareable[dst] = min(self._shareable[src], n)
        return n

    def truncate(self, seq_id: int, n: int) -> int:
        """Drop everything from position ``n`` on; returns the tokens left.

        A partial removal fails on recurrent and hybrid models: then the whole sequence goes.
        """
        if not self._native.seq_rm(seq_id, n, -1):
            self._native.seq_rm(seq_id)
            n = 0
        del self._held[seq_id][n:]
        self._shareable[seq_id] = min(self._shareable[seq_id], n)
        return n

    def cut(self, seq_id: int, start: int, stop: int) -> bool:
        """Remove tokens ``[start, stop)`` and move the later ones down (a context shift).

        Returns ``False``, with nothing changed, where the memory cannot move positions.
        """
        if not 0 <= start <= stop <= len(self._held[seq_id]):
            raise ValueError(
                f"cannot cut tokens [{start}, {stop}) of sequence {seq_id}: it holds "
                f"{len(self._held[seq_id])}"
            )
        if not self._native.cut(seq_id, start, stop):
            return False
        del self._held[seq_id][start:stop]
        self._shareable[seq_id] = min(self._shareable[seq_id], start)
        return True

    def appended(self, seq_id: int, tokens: Iterable[int]) -> None:
        """Record tokens a successful decode wrote at the end of the sequence."""
        held = self._held[seq_id]
        pure = self._shareable[seq_id] == len(held)
        held.extend(tokens)
        if pure:
            self._shareable[seq_id] = len(held)

    def save(self, seq_id: int) -> tuple[tuple[int, ...], bytes]:
        """The sequence's tokens and its memory as llama.cpp writes it."""
        return tuple(self._held[seq_id]), self._native.save_state(seq_id)

    def load(self, seq_id: int, tokens: Sequence[int], data: bytes) -> bool:
        """Replace the sequence's memory by ``data``, which holds ``tokens``.

        Returns ``False``, with the sequence empty, when llama.cpp refuses ``data``.
        """
        self._held[seq_id] = []
        self._shareable[seq_id] = 0
        if not self._native.load_state(seq_id, data, len(tokens)):
            return False
        self._held[seq_id] = list(tokens)
        return True

    def clear(self, seq_id: int) -> None:
        """Remove every token of the sequence."""
        self._native.seq_rm(seq_id)
        self._held[seq_id].clear()
        self._shareable[seq_id] = 0
