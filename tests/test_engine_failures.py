"""Engine failure paths, with faults injected into seqlease's own native adapter.

llama.cpp cannot be made to answer "no KV slot" or "invalid batch" on demand, so these tests
make ``NativeContext.decode`` (seqlease's code, not the binding) fail the way llama.cpp reports
failures, through the probe's decode observer; every other call, and every successful decode,
is the real llama.cpp.
"""

from __future__ import annotations

import threading

import pytest

import seqlease
from helpers import held_tokens
from seqlease.errors import DecodeError
from tiny_model import tiny_model_path


@pytest.fixture
def ctx():
    with seqlease.Context(tiny_model_path(), sequences=4, n_ctx=128, n_threads=1) as ctx:
        yield ctx


def _inject(ctx: seqlease.Context, fail) -> list[int]:
    """Make ``fail(n_tokens)`` decide, per decode, whether to raise; returns the batch sizes."""
    sizes: list[int] = []

    def decode(entries):
        sizes.append(len(entries))
        error = fail(entries)
        if error is not None:
            raise error

    ctx.probe.observe_decodes(decode)
    return sizes


def test_no_kv_slot_retries_with_a_smaller_batch(ctx):
    failed = threading.Event()

    def fail(entries):
        if len(entries) > 4 and not failed.is_set():
            failed.set()
            return DecodeError("llama_decode returned 1: no KV-cache slot", 1)
        return None

    sizes = _inject(ctx, fail)
    with ctx.lease() as seq:
        result = seq.generate("hello world the hello world", temperature=0, max_tokens=4).result()
    assert failed.is_set()
    assert result.finish_reason in ("length", "eog")
    first = sizes[0]
    assert sizes[1] <= first // 2  # retried with half the batch


def test_a_failed_decode_reaches_only_its_callers_and_the_engine_lives_on(ctx):
    poisoned: set[int] = set()

    def fail(entries):
        if any(seq_id in poisoned for _, _, seq_id, _ in entries):
            return DecodeError("llama_decode returned -1: invalid batch", -1)
        return None

    _inject(ctx, fail)
    with ctx.lease() as bad, ctx.lease() as good:
        poisoned.add(bad.id)
        with pytest.raises(DecodeError, match=f"sequence {bad.id}"):
            bad.generate("hello world", max_tokens=4).result()
        assert bad.n_tokens == len(held_tokens(ctx, bad.id)) == 0
        poisoned.clear()
        assert good.generate("hello", temperature=0, max_tokens=3).result().n_generated >= 1
        assert bad.generate("hello", temperature=0, max_tokens=3).result().n_generated >= 1


def test_an_exception_inside_the_decode_fails_only_that_calls_replies(ctx):
    # A validation ValueError (or any bug) in the shared decode used to kill the engine.
    broken = threading.Event()
    broken.set()

    def fail(entries):
        return ValueError("simulated bad batch") if broken.is_set() else None

    _inject(ctx, fail)
    with ctx.lease() as seq:
        with pytest.raises(seqlease.NativeError, match="simulated bad batch"):
            seq.generate("hello", max_tokens=4).result()
        assert seq.n_tokens == len(held_tokens(ctx, seq.id)) == 0
        broken.clear()
        assert seq.generate("hello", temperature=0, max_tokens=3).result().n_generated >= 1


def test_a_dead_engine_fails_callers_instead_of_hanging(ctx):
    def fail(entries):  # llama.cpp's "compute failed": the context is unusable
        return DecodeError("llama_decode returned -3: compute failed", -3)

    _inject(ctx, fail)
    with ctx.lease() as seq:
        with pytest.raises(seqlease.NativeError, match="engine stopped"):
            seq.generate("hello", max_tokens=4).result()
        with pytest.raises(seqlease.NativeError, match="engine stopped"):
            seq.generate("hello", max_tokens=4)
    stats = ctx.stats()
    assert stats.leased == 0
    assert stats.free == 4
