"""The job table and the channel, without a worker thread or a model."""

from __future__ import annotations

import threading

import pytest

from seqlease.errors import ContextClosedError, NativeError, SequenceBusyError
from seqlease.request.job import Channel, Request, Result
from seqlease.request.jobs import JobTable
from seqlease.request.params import sanitize

pytestmark = pytest.mark.timeout(30)


def _job(seq_id: int = 0) -> Request:
    return Request(seq_id, [1, 2, 3], sanitize(), Channel())


def test_one_live_job_per_sequence_but_a_cancelled_one_does_not_block():
    table = JobTable()
    first = _job()
    table.submit(first)
    with pytest.raises(SequenceBusyError, match="close"):
        table.submit(_job())
    other = _job(seq_id=1)
    table.submit(other)  # another sequence is independent
    assert table.take(wait=False) == [first, other]
    first.channel.cancelled.set()  # what a dropped stream does: the flag only
    table.submit(_job())  # accepted at once


def test_cancelling_a_queued_job_ends_it_at_once():
    table = JobTable()
    job = _job()
    table.submit(job)
    job.cancel()
    assert job.channel.done.is_set()
    end = job.channel.wait_end(0)
    assert isinstance(end, Result) and end.finish_reason == "cancelled"
    assert table.take(wait=False) == []
    table.submit(_job())  # the sequence is free again


def test_cancel_sequence_returns_only_what_the_worker_holds():
    table = JobTable()
    taken, queued = _job(), _job(seq_id=1)
    table.submit(taken)
    assert table.take(wait=False) == [taken]
    table.submit(queued)
    assert table.cancel_sequence(0) == [taken]
    assert taken.channel.cancelled.is_set()
    assert table.cancel_sequence(1) == []  # queued: ended on the spot
    assert queued.channel.done.is_set()


def test_stop_refuses_new_jobs_and_returns_the_queued_ones():
    table = JobTable()
    taken, queued = _job(), _job(seq_id=1)
    table.submit(taken)
    table.take(wait=False)
    table.submit(queued)
    assert table.stop() == [queued]
    assert taken.channel.cancelled.is_set()  # the worker stops it at its next step
    assert table.take(wait=True) is None  # never blocks once stopping
    with pytest.raises(ContextClosedError):
        table.submit(_job(seq_id=2))


def test_die_returns_every_job_and_refuses_more():
    table = JobTable()
    jobs = [_job(seq_id=i) for i in range(3)]
    for job in jobs:
        table.submit(job)
    table.take(wait=False, limit=1)
    assert sorted(j.seq_id for j in table.die(RuntimeError("x"))) == [0, 1, 2]
    with pytest.raises(NativeError, match="create a new one"):
        table.submit(_job())


def test_a_waiting_worker_wakes_for_a_submission():
    table = JobTable()
    got: list[list[Request] | None] = []
    worker = threading.Thread(target=lambda: got.append(table.take(wait=True)))
    worker.start()
    job = _job()
    table.submit(job)
    worker.join(5)
    assert got == [[job]]


def test_channel_delivers_chunks_then_the_end_and_raises_errors_after_the_chunks():
    channel = Channel()
    channel.put("a")
    channel.end(ValueError("boom"))
    channel.put("ignored after the end")
    assert channel.take() == "a"
    with pytest.raises(ValueError, match="boom"):
        channel.take()
    assert channel.ended


def test_a_broken_notifier_is_dropped_not_raised():
    calls = 0

    def notify() -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("event loop is closed")

    channel = Channel(notify)
    channel.put("a")
    channel.put("b")
    assert calls == 1
    assert channel.take_ready() == "a"
