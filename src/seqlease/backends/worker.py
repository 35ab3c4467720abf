"""The worker thread both backends run on: jobs in, native memory freed once it has stopped."""

from __future__ import annotations

import abc
import logging
import threading

from seqlease.backends.guard import Guard
from seqlease.backends.lifetime import NativeLifetime
from seqlease.errors import InvalidSequenceError, NativeError
from seqlease.native.guidance import Constraint
from seqlease.request.job import AbortFlag, Channel, Request
from seqlease.request.jobs import JobTable
from seqlease.request.params import SamplingParams
from seqlease.request.prompt import check_prompt
from seqlease.request.reply import cancel_request, fail_request

__all__ = ["JobWorker"]

logger = logging.getLogger("seqlease.engine")


class JobWorker(abc.ABC):
    """One thread that runs the jobs of a :class:`JobTable` and owns native memory.

    Every native call holds ``_guard``. A job's failure fails that job only; a failure of the
    thread itself fails every job it knows at once, and later submissions raise, so no caller
    ever waits for a thread that is gone. The memory is freed once, after the thread stopped.
    """

    def __init__(self, thread_name: str, *, sequences: int, n_ctx: int) -> None:
        """Serve ``sequences`` ids of ``n_ctx`` tokens; a subclass then calls :meth:`_start`."""
        #: Sequence ids this worker serves: ``[0, sequences)``.
        self.sequences = sequences
        #: Tokens one sequence holds, prompt and reply together.
        self.n_ctx = n_ctx
        self._guard = Guard()
        self._jobs = JobTable()
        self._lifetime = NativeLifetime(self._guard, self._free)
        self._thread = threading.Thread(target=self._main, name=thread_name, daemon=True)

    def _start(self) -> None:
        self._thread.start()

    @property
    def serving(self) -> bool:
        """Whether the worker thread is running (it stops after close, or when it dies)."""
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for the worker thread to stop; whether it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- caller side ------------------------------------------------------------------------

    def generate(
        self,
        seq_id: int,
        prompt: list[int],
        params: SamplingParams,
        abort: AbortFlag | None,
        channel: Channel,
        constraint: Constraint | None = None,
    ) -> Request:
        """Queue one generation for ``seq_id``; its text and end go to ``channel``.

        ``constraint``: the reply's grammar, compiled by the caller (never on this thread).

        Raises at once, before anything runs: :class:`InvalidSequenceError` for an id outside
        the pool, :class:`ContextOverflowError` when the prompt leaves no room for a reply,
        :class:`SequenceBusyError` when ``seq_id`` is already generating, and
        :class:`ContextClosedError` after :meth:`close`.
        """
        if not 0 <= seq_id < self.sequences:
            raise InvalidSequenceError(
                f"sequence id {seq_id} is outside [0, {self.sequences}): lease a sequence "
                "from the context instead of making up an id"
            )
        check_prompt(prompt, self.n_ctx)
        request = Request(seq_id, prompt, params, channel, abort, constraint)
        self._jobs.submit(request)
        return request

    def stop_sequence(self, seq_id: int) -> None:
        """Cancel the sequence's jobs and wait until the worker has let go of them."""
        for request in self._jobs.cancel_sequence(seq_id):
            if threading.current_thread() is not self._thread:
                request.channel.done.wait()

    @property
    def freed(self) -> bool:
        """Whether the native memory has been freed."""
        return self._lifetime.freed

    def close(self) -> None:
        """Cancel every job, stop the thread, then free the native memory; idempotent.

        On the worker thread itself (a finalizer during garbage collection) the memory is
        freed as the thread exits instead.
        """
        for request in self._jobs.stop():
            cancel_request(request)
        self._lifetime.free_after(self._thread)

    # -- worker thread ----------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # a bug or a broken native state: fail all, hang none
            logger.exception("the %s thread stopped", self._thread.name)
            error = NativeError(
                f"the engine stopped after an error ({exc!r}): close this Context and create "
                "a new one"
            )
            victims = self._jobs.die(exc)
            try:
                with self._guard:
                    self._abandon()
            finally:
                for request in victims:
                    fail_request(request, error)
        finally:
            self._lifetime.thread_exited()

    @abc.abstractmethod
    def _serve(self) -> None:
        """Run jobs until the table stops (returns) or the native state breaks (raises)."""

    @abc.abstractmethod
    def _free(self) -> None:
        """Free the native memory (under the guard, after the thread stopped)."""

    @abc.abstractmethod
    def _abandon(self) -> None:
        """The thread died: free what it held per reply (under the guard; the table fails them)."""
