"""The job table both backends share: submit, one live job per sequence, cancel, stop, die.

Callers submit from any thread; one worker thread takes jobs in arrival order. A sequence is
busy while it has a job that was not cancelled: a cancelled job still ending (dropped stream,
``break`` out of a loop) does not make the next generation wait or fail, it only runs after.

Invariants, under the one lock:

* every job the table knows is either queued or taken by the worker, never both;
* ``done`` is set on every request that leaves the table, by whoever removed it;
* after :meth:`stop` or :meth:`die` nothing new is accepted, and nothing is left queued.
"""

from __future__ import annotations

import functools
import threading
from collections import deque

from seqlease.errors import ContextClosedError, NativeError, SequenceBusyError
from seqlease.request.job import Request
from seqlease.request.reply import cancel_request

__all__ = ["JobTable"]


class JobTable:
    """Requests (jobs) queued for, and taken by, one worker thread."""

    def __init__(self) -> None:
        """An empty table that accepts jobs."""
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[Request] = deque()
        self._live: dict[int, list[Request]] = {}  # queued or taken, by sequence
        self._stopping = False
        self._dead: BaseException | None = None

    # -- caller side ------------------------------------------------------------------------

    def submit(self, job: Request) -> None:
        """Queue ``job``; raises at once when its sequence is busy or no worker will run it."""
        with self._cond:
            if self._dead is not None:
                raise NativeError(
                    f"the engine stopped after an error ({self._dead!r}): close this Context "
                    "and create a new one"
                )
            if self._stopping:
                raise ContextClosedError("the context is closed: create a new Context")
            jobs = self._live.setdefault(job.seq_id, [])
            if any(not other.channel.cancelled.is_set() for other in jobs):
                raise SequenceBusyError(
                    f"sequence {job.seq_id} is already generating: read that reply to its end "
                    "or close() it before starting another on the same sequence"
                )
            jobs.append(job)
            job.channel.on_cancel(functools.partial(self._withdraw, job))
            self._queue.append(job)
            self._cond.notify_all()

    def _withdraw(self, job: Request) -> None:
        """On cancel: a job still queued ends at once; a taken one, at the worker's next step."""
        with self._cond:
            queued = job in self._queue
            if queued:
                self._queue.remove(job)
                self._forget(job)
            self._cond.notify_all()
        if queued:
            cancel_request(job)

    def jobs_of(self, seq_id: int) -> list[Request]:
        """The jobs of ``seq_id`` queued or taken (cancelled ones still ending included)."""
        with self._cond:
            return list(self._live.get(seq_id, ()))

    def cancel_sequence(self, seq_id: int) -> list[Request]:
        """Cancel every job of ``seq_id``; returns those the worker holds (wait on ``done``)."""
        jobs = self.jobs_of(seq_id)
        for job in jobs:
            job.cancel()
        return [job for job in jobs if not job.channel.done.is_set()]

    # -- worker side ------------------------------------------------------------------------

    def take(self, *, wait: bool, limit: int | None = None) -> list[Request] | None:
        """Queued jobs in arrival order (at most ``limit``); ``None`` once stopping.

        With ``wait``, blocks until there is at least one job or the table stops.
        """
        with self._cond:
            while wait and not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            n = len(self._queue) if limit is None else min(limit, len(self._queue))
            return [self._queue.popleft() for _ in range(n)]

    def forget(self, job: Request) -> None:
        """The worker let go of ``job``: its sequence may take the next one."""
        with self._cond:
            self._forget(job)

    def _forget(self, job: Request) -> None:
        jobs = self._live.get(job.seq_id)
        if jobs is not None and job in jobs:
            jobs.remove(job)
            if not jobs:
                del self._live[job.seq_id]

    def wake(self) -> None:
        """Wake a worker waiting in :meth:`take`."""
        with self._cond:
            self._cond.notify_all()

    def stop(self) -> list[Request]:
        """Accept nothing more and cancel what runs; returns the queued jobs, to be ended."""
        with self._cond:
            self._stopping = True
            for jobs in self._live.values():
                for job in jobs:
                    job.channel.cancelled.set()  # the flag only: cancel() would take this lock
            return self._drain()

    def die(self, error: BaseException) -> list[Request]:
        """The worker cannot go on: refuse new jobs; returns every job it knows, to be failed."""
        with self._cond:
            self._dead = error
            self._stopping = True
            victims = [job for jobs in self._live.values() for job in jobs]
            self._queue.clear()
            self._live.clear()
            self._cond.notify_all()
        return victims

    def _drain(self) -> list[Request]:
        queued = list(self._queue)
        self._queue.clear()
        for job in queued:
            self._forget(job)
        self._cond.notify_all()
        return queued
