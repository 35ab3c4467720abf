"""Which tokens go into the next batch: a pure function of the active jobs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

__all__ = ["Schedulable", "plan_batch"]


class Schedulable(Protocol):
    """What the scheduler needs to know of a job."""

    @property
    def decoding(self) -> bool:
        """Whether the prompt is done (one token per step from now on)."""
        ...

    #: Prompt tokens still to evaluate.
    pending: list[int]


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
    plan.extend((job, given[id(job)]) for job in jobs if given.get(id(job)))
    return plan
