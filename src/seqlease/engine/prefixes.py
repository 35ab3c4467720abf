"""Prompt prefixes shared across the sequences of one context, and the cache that keeps them.

A prompt's leading tokens that another sequence holds (a live lease, or a cache entry) are
copied into the leased sequence with llama.cpp's ``seq_cp`` instead of being evaluated again.
Only exact token prefixes of the new prompt are ever copied: a sequence receives the memory of
tokens its own prompt contains, never anything beyond them, so no lease sees another's turns.

When a lease ends, what its sequence held is kept as a cache entry in a reserved sequence id
(see :mod:`seqlease.engine.layout`), within a token budget, least recently used out first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from seqlease.engine.layout import KvLayout
from seqlease.engine.ledger import KvLedger
from seqlease.request.prompt import common_prefix

__all__ = ["MIN_SHARED", "PrefixStats", "Prefixes"]

#: Shorter common prefixes are evaluated, not copied (nor waited for): with one KV stream per
#: sequence a copy moves the whole stream (3 ms for 2,048 cells of SmolLM2-135M here, more
#: for bigger models and contexts), and a wait delays the first token. Evaluating a prompt
#: token costs about 4 ms on one CPU thread here, so copying pays from a dozen tokens: a chat
#: template's default system prompt (30 tokens for SmolLM2) is shared.
MIN_SHARED = 16


@dataclass(frozen=True)
class PrefixStats:
    """How often a prompt started from a prefix another sequence (or the cache) held."""

    #: Generations that copied part of their prompt instead of evaluating it.
    hits: int
    #: Prompt tokens copied instead of evaluated.
    tokens_reused: int
    #: Tokens the prefix cache holds now.
    cached: int


class Prefixes:
    """Finds the best held prefix for a prompt, copies it, and keeps released ones cached.

    Not thread-safe: the engine calls it under its guard only.
    """

    def __init__(self, ledger: KvLedger, layout: KvLayout, *, enabled: bool = True) -> None:
        """Share prefixes among ``layout``'s sequences (``enabled=False``: never)."""
        self._ledger = ledger
        self._enabled = enabled
        self._budget = layout.cache_tokens
        self._spare = list(layout.cache_ids)
        self._entries: OrderedDict[int, None] = OrderedDict()  # cache ids, oldest use first
        self._sources = range(layout.n_seq_max)
        # Counters read by stats() from any thread without the guard: plain ints only.
        self._hits = 0
        self._reused = 0
        self._cached = 0

    def stats(self) -> PrefixStats:
        """Copies made so far and the tokens they saved."""
        return PrefixStats(hits=self._hits, tokens_reused=self._reused, cached=self._cached)

    def choose(
        self,
        prompt: Sequence[int],
        dst: int,
        *,
        own: int,
        limit: int,
        reading: Iterable[Sequence[int]],
    ) -> tuple[int, int] | None:
        """Where ``dst`` gets the first tokens of ``prompt`` from, and how many.

        ``own``: tokens of it ``dst`` holds already; ``limit``: most it may take;
        ``reading``: prompts still being evaluated elsewhere. Returns ``(source, n)`` to copy
        from another sequence, ``(-1, own)`` to keep its own, ``None`` to wait for a reader
        that will soon hold at least :data:`MIN_SHARED` tokens more than anyone does now.
        """
        if not self._enabled:
            return -1, own
        source, held = self._best(prompt, dst)
        held = min(held, limit)
        ahead = max((min(common_prefix(p, prompt), limit) for p in reading), default=0)
        if ahead - max(own, held) >= MIN_SHARED:
            return None
        if held - own >= MIN_SHARED:
            return source, held
        return -1, own

    def _best(self, prompt: Sequence[int], dst: int) -> tuple[int, int]:
        """The sequence other than ``dst`` holding most of ``prompt``'s start, and how much."""
        found, length = -1, 0
        for source in self._sources:
            if source != dst and self._ledger.shareable(source) > length:
                n = self._ledger.common_shareable(source, prompt)
                if n > length:
                    found, length = source, n
        return found, length

    def copy(self, src: int, dst: int, n: int, *, own: int) -> int:
        """Give ``dst`` the first ``n`` tokens of ``src``; ``own`` of them it held already.

        Returns the tokens ``dst`` holds now (0 where the model cannot cut a sequence).
        """
        held = self._ledger.copy(src, dst, n)
        if held > own:
            self._hits += 1
            self._reused += held - own
        if src in self._entries:
            self._entries.move_to_end(src)
        return held

    def keep(self, seq_id: int) -> None:
        """Cache what ``seq_id`` holds before it is cleared, evicting the least recently used.

        An entry that is a prefix of the new one is replaced by it; one the new one is a
        prefix of is only marked used. Nothing is kept when the budget cannot hold it, nor
        when it is shorter than :data:`MIN_SHARED` (no prompt would ever copy from it).
        """
        n = self._ledger.shareable(seq_id)
        tokens = self._ledger.tokens(seq_id)[:n]
        if n < MIN_SHARED or n > self._budget:  # too short to be copied from, or too long
            return
        for entry in list(self._entries):
            common = self._ledger.common(entry, tokens)
            if common == n:
                self._entries.move_to_end(entry)
                return
            if common == self._ledger.n_tokens(entry):
                self._evict(entry)
        while self._entries and (not self._spare or self._cached + n > self._budget):
            self._evict(next(iter(self._entries)))
        if not self._spare:
            return
        entry = self._spare.pop()
        if self._ledger.copy(seq_id, entry, n):
            self._entries[entry] = None
            self._cached += n
        else:
            self._spare.append(entry)

    def _evict(self, entry: int) -> None:
        self._cached -= self._ledger.n_tokens(entry)
        self._ledger.clear(entry)
        del self._entries[entry]
        self._spare.append(entry)
