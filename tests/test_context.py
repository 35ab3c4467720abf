"""Context lifecycle, argument checks, stats, release order and closing."""

from __future__ import annotations

import gc
import threading
import time
import warnings

import pytest

import seqlease
from helpers import fill, native_pos_max, settle, wait_for
from tiny_model import tiny_model_path


@pytest.fixture
def ctx():
    with seqlease.Context(tiny_model_path(), n_threads=1, sequences=2, n_ctx=64, n_batch=32) as ctx:
        yield ctx


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sequences": 0}, "sequences must be an int in"),
        ({"sequences": 257}, "sequences must be an int in"),
        ({"sequences": 2.0}, "sequences must be an int in"),
        ({"n_ctx": 0}, "n_ctx must be"),
        ({"max_waiting": -1}, "max_waiting must be"),
        ({"n_threads": 0}, "n_threads must be"),
        ({"backend": "gpu"}, "backend must be one of"),
    ],
)
def test_bad_arguments_raise_before_loading(kwargs, match):
    with pytest.raises(ValueError, match=match):
        seqlease.Context(tiny_model_path(), **kwargs)


def test_missing_model_is_a_model_load_error(tmp_path):
    with pytest.raises(seqlease.ModelLoadError, match="does not exist"):
        seqlease.Context(tmp_path / "nope.gguf")


def test_lease_gives_back_a_cleared_sequence(ctx):
    with ctx.lease() as seq:
        fill(seq, 4)
        assert seq.n_tokens == 4
        assert native_pos_max(ctx, seq.id) == 3
    assert native_pos_max(ctx, seq.id) == -1
    assert seq.released
    with pytest.raises(seqlease.SequenceReleasedError, match="lease a new one"):
        _ = seq.n_tokens


def test_release_order_session_then_memory_then_handoff(ctx):
    events: list[str] = []
    seq = ctx.acquire()
    fill(seq)

    def close_session() -> None:
        events.append(f"session closed, memory max pos {native_pos_max(ctx, seq.id)}")
        events.append(f"slot still out: free={ctx.stats().free}")

    seq.add_closer(close_session)
    seq.release()
    assert events == ["session closed, memory max pos 2", "slot still out: free=1"]
    assert native_pos_max(ctx, seq.id) == -1
    assert ctx.stats().free == 2


def test_failing_closer_still_releases(ctx, caplog):
    seq = ctx.acquire()

    def bad() -> None:
        raise RuntimeError("session close failed")

    seq.add_closer(bad)
    seq.release()
    assert "closing a session of sequence" in caplog.text
    assert ctx.stats().free == 2


def test_timeout_zero_message_names_holders(ctx):
    a, b = ctx.acquire(), ctx.acquire()
    with pytest.raises(seqlease.PoolExhausted) as info:
        ctx.acquire(timeout=0)
    message = str(info.value)
    assert "right now (timeout=0)" in message
    assert "all 2 sequences are busy" in message
    assert "test_context.py" in message and "test_timeout_zero_message_names_holders" in message
    assert isinstance(info.value, TimeoutError)
    a.release()
    b.release()


def test_timeout_waits_then_fails(ctx):
    held = [ctx.acquire(), ctx.acquire()]
    start = time.monotonic()
    with pytest.raises(seqlease.PoolExhausted, match=r"within 0\.05 s"):
        ctx.acquire(timeout=0.05)
    assert time.monotonic() - start >= 0.05
    assert ctx.stats().timeouts == 1
    assert ctx.stats().waiting == 0
    for seq in held:
        seq.release()


@pytest.mark.parametrize("timeout", [-1, float("nan"), float("inf")])
def test_bad_timeout_raises_at_once(ctx, timeout):
    with pytest.raises(ValueError, match="timeout must be"):
        ctx.acquire(timeout=timeout)
    assert ctx.stats().acquires == 0


def test_max_waiting_rejects_extra_waiters():
    with seqlease.Context(
        tiny_model_path(), n_threads=1, sequences=1, n_ctx=64, max_waiting=1
    ) as ctx:
        held = ctx.acquire()
        waiter = threading.Thread(target=lambda: ctx.acquire(timeout=5).release())
        waiter.start()
        wait_for(lambda: ctx.stats().waiting == 1)
        with pytest.raises(seqlease.TooManyWaiters, match=r"max_waiting=1"):
            ctx.acquire(timeout=5)
        assert ctx.stats().rejected == 1
        held.release()
        waiter.join(5)
        assert ctx.stats().free == 1


def test_close_fails_waiters_and_refuses_new_leases():
    ctx = seqlease.Context(tiny_model_path(), n_threads=1, sequences=1, n_ctx=64)
    errors: list[BaseException] = []
    held = ctx.acquire()

    def wait() -> None:
        try:
            ctx.acquire(timeout=10)
        except seqlease.SeqleaseError as exc:
            errors.append(exc)

    t = threading.Thread(target=wait)
    t.start()
    wait_for(lambda: ctx.stats().waiting == 1)
    ctx.close()  # the only lease is ours: close does not wait for it
    t.join(5)
    assert [type(e) for e in errors] == [seqlease.ContextClosedError]
    with pytest.raises(seqlease.ContextClosedError):
        ctx.acquire()
    # Native memory stays until the last lease is back: the held handle still works.
    fill(held)
    assert held.n_tokens == 3
    assert not ctx.probe.freed
    held.release()
    assert ctx.probe.freed
    assert ctx.stats().rejected == 1


def test_close_waits_for_leases_of_other_threads():
    ctx = seqlease.Context(tiny_model_path(), n_threads=1, sequences=2, n_ctx=64)
    leased = threading.Event()

    def hold() -> None:
        with ctx.lease():
            leased.set()
            time.sleep(0.2)

    t = threading.Thread(target=hold)
    t.start()
    leased.wait(5)
    start = time.monotonic()
    ctx.close()
    assert time.monotonic() - start >= 0.1
    assert ctx.probe.freed
    t.join()


def test_close_timeout_defers_native_free():
    ctx = seqlease.Context(tiny_model_path(), n_threads=1, sequences=2, n_ctx=64)
    release = threading.Event()

    def hold() -> None:
        with ctx.lease():
            release.wait(5)

    t = threading.Thread(target=hold)
    t.start()
    wait_for(lambda: ctx.stats().leased == 1)
    ctx.close(timeout=0.05)
    assert not ctx.probe.freed
    release.set()
    t.join(5)
    assert ctx.probe.freed
    ctx.close()  # idempotent


def test_stats_are_frozen_and_name_holders(ctx):
    with ctx.lease() as seq:
        stats = ctx.stats()
        with pytest.raises(AttributeError):
            stats.leased = 5  # type: ignore[misc]
        (holder,) = stats.holders
        assert holder.seq_id == seq.id
        assert holder.thread == threading.current_thread().name
        assert "test_stats_are_frozen_and_name_holders" in holder.origin


def test_forgotten_handle_warns_with_origin_and_is_reclaimed(ctx):
    def forget() -> None:
        seq = ctx.acquire()
        fill(seq)

    with pytest.warns(seqlease.LeaseLeakWarning, match=r"test_context.py:\d+ in forget"):
        forget()
        gc.collect()
    stats = settle(ctx)
    assert stats.leaked == 1
    assert stats.free == 2
    assert native_pos_max(ctx, 0) == -1


# The warning turned error is raised inside the finalizer, where Python can only report it.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_forgotten_handle_is_reclaimed_when_warnings_are_errors(ctx):
    # Under -W error the warning raises inside the finalizer; the reclaim must not depend on it.
    def forget() -> None:
        fill(ctx.acquire())

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        forget()
        gc.collect()
    stats = settle(ctx)
    assert (stats.leaked, stats.free) == (1, 2)
    with ctx.lease(timeout=0), ctx.lease(timeout=0):
        pass


def test_forgotten_handle_wakes_a_waiter():
    with seqlease.Context(tiny_model_path(), n_threads=1, sequences=1, n_ctx=64) as ctx:
        got: list[int] = []

        def wait() -> None:
            with ctx.lease(timeout=10) as seq:
                got.append(seq.n_tokens)

        holder = [ctx.acquire()]
        fill(holder[0])
        t = threading.Thread(target=wait)
        t.start()
        wait_for(lambda: ctx.stats().waiting == 1)
        with pytest.warns(seqlease.LeaseLeakWarning):
            holder.clear()
            gc.collect()
        t.join(5)
        assert got == [0]  # the waiter got the reclaimed sequence, cleared


def test_logging_one_line_per_acquire_and_release(ctx, caplog):
    caplog.set_level("INFO", logger="seqlease.pool")
    with ctx.lease() as seq:
        pass
    lines = [r.getMessage() for r in caplog.records if r.name == "seqlease.pool"]
    assert lines[0].startswith(f"acquired sequence {seq.id} after waiting ")
    assert lines[1].startswith(f"released sequence {seq.id} after ")
    assert len(lines) == 2


def test_context_repr_and_capabilities(ctx):
    assert ctx.backend.name == "session"
    assert ctx.capabilities.backend == "session"
    assert "sequences=2" in repr(ctx)


def test_lowest_free_id_is_leased_first(ctx):
    # Keeps the ids in use together, so the engine's sorted rows are one forward pass.
    a, b = ctx.acquire(), ctx.acquire()
    assert (a.id, b.id) == (0, 1)
    b.release()
    a.release()
    with ctx.lease() as seq:
        assert seq.id == 0


_SMALL_BATCH = """
import sys
sys.path.insert(0, "tests")
import seqlease
from tiny_model import tiny_model_path
b, s = int(sys.argv[1]), int(sys.argv[2])
try:
    seqlease.Context(tiny_model_path(), sequences=s, n_batch=b, n_threads=1)
except ValueError as exc:
    print("refused:", exc)
"""

_SMALL_BATCH_NATIVE = """
import sys
sys.path.insert(0, "tests")
from helpers import native_context
from seqlease.native.library import load_library
from seqlease.native.memory import resolve_memory_api
from seqlease.native.model import NativeModel
from tiny_model import tiny_model_path
lib = load_library()
model = NativeModel(lib, tiny_model_path())
ctx = native_context(lib, model, resolve_memory_api(lib)[0], n_seq_max=4, n_ctx_seq=64,
                     n_batch=1, unified=True)
print("created")
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("n_batch", "sequences"), [(1, 2), (3, 4), (7, 8), (100, 256)])
def test_n_batch_below_sequences_is_refused_not_an_abort(run_python, n_batch, sequences):
    done = run_python(_SMALL_BATCH, str(n_batch), str(sequences))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused: n_batch must be >= sequences" in done.stdout
    assert f"n_batch={n_batch}" in done.stdout


@pytest.mark.timeout(120)
def test_without_the_check_llama_cpp_aborts(run_python):
    # The control: the same context built below seqlease's check aborts the whole process on
    # the llama-cpp-python this suite runs on (0.3.36); 0.3.12 and 0.3.8 accepted it.
    done = run_python(_SMALL_BATCH_NATIVE)
    assert done.returncode == -6, (done.returncode, done.stdout)
    assert "GGML_ASSERT(n_outputs_max" in done.stderr
