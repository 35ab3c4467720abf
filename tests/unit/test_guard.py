"""The backends' guard: reentrant, and handed to waiting threads in arrival order."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from seqlease.backends.guard import Guard

pytestmark = pytest.mark.timeout(30)


def _queued(guard: Guard, n: int) -> None:
    deadline = time.monotonic() + 10
    while guard.waiting < n:
        assert time.monotonic() < deadline, "the waiter never queued"
        time.sleep(0.001)


def test_a_release_hands_the_guard_to_the_waiters_before_the_releaser_takes_it_again() -> None:
    guard = Guard()
    order: list[str] = []

    def waiter(name: str) -> None:
        with guard:
            order.append(name)

    guard.acquire()
    threads = []
    for i, name in enumerate(["first", "second"]):
        threads.append(threading.Thread(target=waiter, args=(name,)))
        threads[-1].start()
        _queued(guard, i + 1)
    guard.release()
    with guard:  # what a worker thread does between two steps: it waits its turn
        order.append("releaser")
    for thread in threads:
        thread.join(10)
    assert order == ["first", "second", "releaser"]


def test_the_guard_is_reentrant_and_refuses_a_release_by_another_thread() -> None:
    guard = Guard()
    with guard, guard:
        errors: list[BaseException] = []

        def release() -> None:
            try:
                guard.release()
            except RuntimeError as exc:
                errors.append(exc)

        thread = threading.Thread(target=release)
        thread.start()
        thread.join(10)
        assert "does not hold it" in str(errors[0])
    with guard:  # free again after the two releases
        pass
    with pytest.raises(RuntimeError):
        guard.release()


def test_ctrl_c_while_waiting_leaves_the_queue() -> None:
    guard = Guard()
    held, done = threading.Event(), threading.Event()

    def holder() -> None:
        with guard:
            held.set()
            done.wait(10)

    def interrupt_the_waiter() -> None:
        _queued(guard, 1)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(10)
    threading.Thread(target=interrupt_the_waiter).start()
    with pytest.raises(KeyboardInterrupt):
        guard.acquire()  # this test runs on the main thread, where Ctrl-C arrives
    assert guard.waiting == 0  # else the holder's release would hand the guard to nobody
    done.set()
    thread.join(10)
    with guard:  # free, not handed to a thread that left
        pass
