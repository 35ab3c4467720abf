"""Which tokens go into the next batch: a pure function of the active jobs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

__all__ = ["Schedulable", "decode_calls", "plan_batch"]


class Schedulable(Protocol):
    """What the scheduler needs to know of a job."""

    @property
    def decoding(self) -> bool:
        """Whether the prompt is done (one token per step from now on)."""
        ...

    #: Prompt tokens still to evaluate.
    pending: list[int]

    @property
    def seq_id(self) -> int:
        """The sequence the job evaluates on."""
        ...


J = TypeVar("J", bound=Schedulable)


def plan_batch(jobs: Sequence[J], n_batch: int, prefill_chunk: int) -> list[tuple[J, int]]:
    """Give each job a number of tokens for the next step, in the order of ``jobs``.

    Every decoding job gets its one token first: generation never waits behind a prompt. The
    rest of the batch goes to jobs still reading their prompt, shared equally (water-filling),
    and capped at ``prefill_chunk`` while anyone is decoding, so a long prompt costs the others
    only a short step at a time instead of one long stall.
    """
    plan: list[tuple[J, int]] = []
    budget = n_batch
    for job in jobs:
        if job.decoding and budget:
            plan.append((job, 1))
            budget -= 1
    if plan:
        budget = min(budget, prefill_chunk)
    given: dict[int, int] = {}
    readers = [job for job in jobs if not job.decoding and job.pending]
    while budget and readers:
        share = max(1, budget // len(readers))
        for job in list(readers):
            got = given.get(id(job), 0)
            n = min(share, len(job.pending) - got, budget)
            given[id(job)] = got + n
            budget -= n
            if got + n == len(job.pending):
                readers.remove(job)
            if not budget:
                break
    pieces = [(job, given[id(job)]) for job in jobs if given.get(id(job))]
    whole = [(job, _piece(n, len(job.pending))) for job, n in pieces]
    if plan or any(n for _, n in whole):  # else (a batch of one token) keep progressing
        pieces = [(job, n) for job, n in whole if n]
    plan.extend(pieces)
    return plan


def decode_calls(plan: Sequence[tuple[J, int]], *, streams: bool) -> list[list[tuple[J, int]]]:
    """Split a step's plan into ``llama_decode`` calls, each in sequence-id order.

    With a KV stream per sequence (``streams``), llama.cpp cuts a batch into micro-batches that
    take as many tokens from each of a run of consecutive sequence ids as the shortest has: a
    4-token prompt beside a 3-token one is evaluated as 3 + 1, and a lone token rounds
    differently (see :func:`_piece`), so one request's reply would depend on its neighbour's
    length. One call per piece size keeps every piece whole, decoders' single tokens first.
    Within a call, sequence-id order makes each run of consecutive ids one forward pass
    (measured: 2 to 5 passes per step in arrival order, one when sorted).
    """
    if not streams:
        return [sorted(plan, key=_seq_id)]
    sizes = sorted({n for _, n in plan})
    return [sorted((item for item in plan if item[1] == n), key=_seq_id) for n in sizes]


def _seq_id(item: tuple[Schedulable, int]) -> int:
    return item[0].seq_id


def _piece(n: int, left: int) -> int:
    """``n`` of ``left`` prompt tokens, trimmed so that neither part is one token alone.

    llama.cpp computes a sequence's one-token batch with other kernels than a longer one
    (rounding differently), so a reply would depend on where its prompt was cut: alone or
    beside others, fresh or after a copied prefix. Never cut a single token off, and it is
    the same every way. 0 means: wait for a step with more room.
    """
    if n >= left or left < 2:
        return min(n, left)
    if left - n == 1:
        n -= 1
    return n if n >= 2 else 0
