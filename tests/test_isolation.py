"""One request never hurts another: a fault in one job's own work fails that job alone.

Faults are injected into seqlease's own code (never the binding), one test per stage of a
job's life on the engine thread: starting (prefix matching), building its sampler, sampling,
detokenizing and delivering text. Four generations run at once; the faulty one's caller gets
its error within a second, the other three finish with exactly the text they give without the
fault, and the Context serves on with every sequence free and empty afterwards.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import seqlease
from helpers import free_slots_are_empty, settle
from seqlease.engine import sampling
from seqlease.engine.ledger import KvLedger
from seqlease.native.sampler import SamplerChain
from seqlease.request.reply import ReplyWriter
from seqlease.request.text import TextAssembler

pytestmark = pytest.mark.timeout(120)

GOOD = ["The weather today is", "My favourite food is", "The ocean is"]
FAULTY = "Count slowly: one, two,"  # greedy: runs well past the faults below
FAULT_SEED = 4242  # marks the faulty request (greedy decoding ignores the seed)
FAULT_STOP = "\x00fault-marker"  # marks the faulty request where only the stop list is seen
GREEDY = {"temperature": 0, "max_tokens": 24}


@pytest.fixture(scope="module")
def contexts() -> Iterator[dict[str, tuple[seqlease.Context, list[str]]]]:
    """A Context per backend, with the texts the good requests give without any fault."""
    made = {}
    for backend in ("session", "completion"):
        ctx = seqlease.Context(sequences=4, n_ctx=256, n_threads=1, backend=backend)
        texts, error = _run_four(ctx)
        assert error is None
        made[backend] = (ctx, texts)
    yield made
    for ctx, _ in made.values():
        ctx.close()


def _run_four(ctx: seqlease.Context) -> tuple[list[str], tuple[BaseException, float] | None]:
    """Three good generations and the faulty one, at once; their texts and its error."""
    texts = [""] * len(GOOD)
    failure: list[tuple[BaseException, float]] = []
    barrier = threading.Barrier(len(GOOD) + 1)

    def good(i: int) -> None:
        with ctx.lease(timeout=30) as seq:
            barrier.wait(30)
            texts[i] = seq.generate(GOOD[i], **GREEDY).result().text

    def faulty() -> None:
        with ctx.lease(timeout=30) as seq:
            barrier.wait(30)
            start = time.monotonic()
            try:
                seq.generate(FAULTY, seed=FAULT_SEED, stop=[FAULT_STOP], **GREEDY).result()
            except Exception as exc:
                failure.append((exc, time.monotonic() - start))

    threads = [threading.Thread(target=good, args=(i,)) for i in range(len(GOOD))]
    threads.append(threading.Thread(target=faulty))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    return texts, (failure[0] if failure else None)


def _is_faulty(reply: ReplyWriter) -> bool:
    return reply.request.params.seed == FAULT_SEED


def _fault_when_starting(mp: pytest.MonkeyPatch, ctx: seqlease.Context) -> None:
    faulty_tokens = ctx.model.tokenize(FAULTY)
    real = KvLedger.common

    def common(self: KvLedger, seq_id: int, prompt: list[int]) -> int:
        if list(prompt) == faulty_tokens:
            raise RuntimeError("injected: prefix matching failed")
        return real(self, seq_id, prompt)

    mp.setattr(KvLedger, "common", common)


def _fault_building_the_sampler(mp: pytest.MonkeyPatch, ctx: seqlease.Context) -> None:
    real = sampling.build_sampler

    def build(lib, native, params, grammar=None):  # type: ignore[no-untyped-def]
        if params.seed == FAULT_SEED:
            raise MemoryError("injected: sampler chain could not be built")
        return real(lib, native, params, grammar)

    mp.setattr(sampling, "build_sampler", build)


def _fault_when_sampling(mp: pytest.MonkeyPatch, ctx: seqlease.Context) -> None:
    real = sampling.build_sampler

    class Faulty(SamplerChain):
        draws = 0

        def sample(self, row: int) -> int:
            self.draws += 1
            if self.draws == 3:
                raise RuntimeError("injected: sampling failed")
            return super().sample(row)

    def build(lib, native, params, grammar=None):  # type: ignore[no-untyped-def]
        chain = real(lib, native, params, grammar)
        if params.seed == FAULT_SEED:
            chain.__class__ = Faulty
        return chain

    mp.setattr(sampling, "build_sampler", build)


def _fault_when_detokenizing(mp: pytest.MonkeyPatch, ctx: seqlease.Context) -> None:
    real = TextAssembler.feed

    def feed(self: TextAssembler, piece: bytes) -> str:
        if FAULT_STOP in self.stops:
            raise UnicodeError("injected: text assembly failed")
        return real(self, piece)

    mp.setattr(TextAssembler, "feed", feed)


def _fault_when_delivering(mp: pytest.MonkeyPatch, ctx: seqlease.Context) -> None:
    real = ReplyWriter.add_token

    def add_token(self: ReplyWriter, *args: Any, **kwargs: Any) -> Any:
        if _is_faulty(self) and self.n_generated >= 2:
            raise BrokenPipeError("injected: delivering text failed")
        return real(self, *args, **kwargs)

    mp.setattr(ReplyWriter, "add_token", add_token)


STAGES: dict[str, Callable[[pytest.MonkeyPatch, seqlease.Context], None]] = {
    "starting": _fault_when_starting,
    "sampler": _fault_building_the_sampler,
    "sampling": _fault_when_sampling,
    "detokenizing": _fault_when_detokenizing,
    "delivering": _fault_when_delivering,
}
# The completion backend runs Llama.generate: it has no ledger and no sampler chain of ours.
CASES = [("session", stage) for stage in STAGES] + [
    ("completion", "detokenizing"),
    ("completion", "delivering"),
]


@pytest.mark.parametrize(("backend", "stage"), CASES)
def test_a_fault_fails_only_its_own_job(
    contexts: dict[str, tuple[seqlease.Context, list[str]]],
    backend: str,
    stage: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ctx, baseline = contexts[backend]
    STAGES[stage](monkeypatch, ctx)
    texts, failure = _run_four(ctx)
    assert failure is not None, "the fault was not hit"
    error, seconds = failure
    assert isinstance(error, seqlease.SeqleaseError)
    assert "injected" in repr(error.__cause__) or "injected" in str(error)
    print(f"{backend}/{stage}: the faulty caller had its error after {seconds * 1000:.0f} ms")
    assert seconds < 1.0, f"the faulty caller waited {seconds:.2f} s for its error"
    assert texts == baseline
    monkeypatch.undo()
    # The Context serves on: the same request now works, and nothing is left behind.
    with ctx.lease(timeout=5) as seq:
        assert seq.generate(FAULTY, **GREEDY).result().n_generated >= 1
    stats = settle(ctx)
    assert (stats.leased, stats.free) == (0, 4)
    assert free_slots_are_empty(ctx) == []


def test_a_fatal_decode_error_stops_the_engine_and_fails_every_caller_at_once() -> None:
    with seqlease.Context(sequences=2, n_ctx=256, n_threads=1, backend="session") as ctx:
        calls = 0

        def decode(entries):  # type: ignore[no-untyped-def]
            nonlocal calls
            calls += 1
            if calls == 6:  # what llama.cpp returns when its context is broken for good
                raise seqlease.DecodeError("llama_decode returned -3: fatal error", -3)

        ctx.probe.observe_decodes(decode)
        with ctx.lease() as a, ctx.lease() as b:
            ga = a.generate("Count slowly: one, two,", temperature=0, max_tokens=100)
            gb = b.generate("The ocean is", temperature=0, max_tokens=100)
            for gen in (ga, gb):
                with pytest.raises(seqlease.NativeError, match="engine stopped"):
                    gen.result()
            with pytest.raises(seqlease.NativeError, match="create a new one"):
                a.generate("again")
        assert ctx.stats().free == 2
