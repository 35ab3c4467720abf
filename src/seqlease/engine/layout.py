"""How one context's KV memory is shared between leased sequences and the prefix cache."""

from __future__ import annotations

from dataclasses import dataclass

from seqlease.native.params import KvCells

__all__ = ["MAX_CACHE_ENTRIES", "KvLayout", "plan_layout"]

#: Most prefixes the cache keeps at once (each in a sequence id of its own).
MAX_CACHE_ENTRIES = 16


@dataclass(frozen=True)
class KvLayout:
    """Sequence ids and KV cells of one context.

    Ids ``[0, sequences)`` are leased; ids ``[sequences, n_seq_max)`` hold cached prefixes.
    With one unified KV buffer, sequences that hold the same prefix share its cells, so the
    cache costs ``cache_tokens`` cells however many leases use it. With one stream per sequence,
    every cache entry is a whole stream of ``n_ctx_seq`` cells, copied whole.
    """

    #: Leased sequences.
    sequences: int
    #: Tokens each sequence may hold.
    n_ctx_seq: int
    #: Sequence ids reserved for cached prefixes.
    cache_slots: int
    #: Tokens the cache may hold in all, on top of the leased sequences' memory.
    cache_tokens: int
    #: One KV buffer for all sequences (partial copies between them work).
    unified: bool

    @property
    def n_seq_max(self) -> int:
        """Sequence ids llama.cpp must know: leased and cache ones."""
        return self.sequences + self.cache_slots

    @property
    def n_ctx_total(self) -> int:
        """KV cells of the whole context: every lease full, and the cache at its budget."""
        if self.unified:
            return self.sequences * self.n_ctx_seq + self.cache_tokens
        return self.n_seq_max * self.n_ctx_seq

    @property
    def cells(self) -> KvCells:
        """What llama.cpp is told: every sequence id and cell of this layout."""
        return KvCells(self.n_seq_max, self.n_ctx_total, self.n_ctx_seq, self.unified)

    @property
    def cache_ids(self) -> range:
        """The sequence ids of the cache."""
        return range(self.sequences, self.n_seq_max)


def plan_layout(
    *,
    sequences: int,
    n_ctx_seq: int,
    cache_tokens: int,
    unified: bool,
    max_seq: int,
    n_batch: int,
) -> KvLayout:
    """Fit the cache into the ids ``max_seq`` and ``n_batch`` leave, and into the budget.

    A lease never waits for room the cache took: the leases' cells are counted in full first.
    Split streams round the budget down to whole streams (an entry there is one sequence).
    llama.cpp aborts the process at context creation where ``n_seq_max > n_batch``
    (``GGML_ASSERT(n_outputs_max <= cparams.n_outputs_max)``, 0.3.36): the cache takes only
    the ids above ``sequences`` that ``n_batch`` leaves (none at ``n_batch == sequences``);
    :class:`~seqlease.options.ContextOptions` refuses an ``n_batch`` below ``sequences``.
    """
    spare_ids = max(0, min(max_seq, n_batch) - sequences)
    if unified:
        slots = min(spare_ids, MAX_CACHE_ENTRIES) if cache_tokens > 0 else 0
        budget = cache_tokens if slots else 0
    else:
        slots = min(spare_ids, MAX_CACHE_ENTRIES, cache_tokens // n_ctx_seq)
        budget = slots * n_ctx_seq
    return KvLayout(sequences, n_ctx_seq, slots, budget, unified)
