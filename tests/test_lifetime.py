"""NativeLifetime: native memory is freed once, and never under a running worker thread."""

from __future__ import annotations

import threading

from seqlease.backends.lifetime import NativeLifetime


def _worker(lifetime: NativeLifetime, body) -> threading.Thread:
    def run() -> None:
        try:
            body()
        finally:
            lifetime.thread_exited()

    return threading.Thread(target=run)


def test_free_after_joins_the_worker_first():
    events: list[str] = []
    stop = threading.Event()
    lifetime = NativeLifetime(threading.RLock(), lambda: events.append("freed"))
    thread = _worker(lifetime, lambda: (stop.wait(), events.append("worker done")))
    thread.start()
    stop.set()
    lifetime.free_after(thread)
    assert events == ["worker done", "freed"]
    assert lifetime.freed
    lifetime.free()  # idempotent
    assert events == ["worker done", "freed"]


def test_free_after_on_the_worker_itself_frees_as_it_exits():
    events: list[str] = []
    lifetime = NativeLifetime(threading.RLock(), lambda: events.append("freed"))
    holder: list[threading.Thread] = []

    def body() -> None:
        lifetime.free_after(holder[0])  # e.g. a finalizer that ran on the worker thread
        events.append("still running")

    holder.append(_worker(lifetime, body))
    holder[0].start()
    holder[0].join()
    assert events == ["still running", "freed"]


def test_a_worker_that_exits_without_close_frees_nothing():
    events: list[str] = []
    lifetime = NativeLifetime(threading.RLock(), lambda: events.append("freed"))
    thread = _worker(lifetime, lambda: None)
    thread.start()
    thread.join()
    assert events == [] and not lifetime.freed
