"""Property-based model of the sequence pool, run against the real Context and llama.cpp.

The prefix cache is on, with a budget of two cache entries: generations from shared token
prefixes run between pool operations, so every pool invariant is checked with sequences
copying from each other and from the cache, and entries being evicted.
"""

from __future__ import annotations

import gc
import threading
import warnings

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

import seqlease
from helpers import (
    fill,
    free_slots_are_empty,
    held_tokens,
    native_pos_max,
    settle,
    wait_for,
)
from seqlease.pool import SlotState
from tiny_model import tiny_model_path


class _Boom(Exception):
    pass


# Token prompts over the tiny model's vocabulary: three 80-token prefixes (two share 40), each
# long enough to be copied rather than evaluated (MIN_SHARED tokens or more).
_PREFIXES = (
    [10 + i % 50 for i in range(80)],
    [10 + i % 50 for i in range(40)] + [70 + i % 30 for i in range(40)],
    [200 + i % 60 for i in range(80)],
)
_BUDGET = 512


def _forget(ctx: seqlease.Context, cyclic: bool) -> int:
    seq = ctx.acquire(timeout=0)
    fill(seq)
    if cyclic:  # only the cycle collector can find it
        box: list[object] = [seq]
        box.append(box)
    return seq.id  # the handle dies here, unreleased


class PoolMachine(RuleBasedStateMachine):
    """Model: which handles are live, which are released, and what the counters must say."""

    held = Bundle("held")
    released = Bundle("released")

    @initialize(size=st.integers(1, 4))
    def start(self, size: int) -> None:
        # A fresh context per example: state carried between examples would make hypothesis'
        # replays diverge from the runs they replay.
        self.ctx = seqlease.Context(
            tiny_model_path(),
            n_threads=1,
            sequences=size,
            n_ctx=256,
            n_batch=32,
            prefix_cache_tokens=_BUDGET,
        )
        self.size = size
        base = settle(self.ctx)
        assert base.leased == 0
        self.base = base
        self.live: dict[int, seqlease.Sequence] = {}
        # Every handle ever handed out, so teardown can release them even when an example
        # failed half-way (the next example reuses this context).
        self.handed_out: list[seqlease.Sequence] = []
        self.expect = {"acquires": 0, "releases": 0, "timeouts": 0, "leaked": 0, "double": 0}
        self.lease_numbers = [s.lease_number for s in self.ctx.probe.slots()]

    def teardown(self) -> None:
        for seq in getattr(self, "handed_out", ()):
            seq.release()
        if hasattr(self, "ctx"):
            self.ctx.close()

    @property
    def free(self) -> int:
        return self.size - len(self.live)

    def _took(self, seq: seqlease.Sequence) -> seqlease.Sequence:
        self.handed_out.append(seq)
        assert seq.id not in self.live, f"sequence {seq.id} leased twice"
        assert seq.n_tokens == 0, "a fresh lease must start with empty memory"
        self.live[seq.id] = seq
        self.expect["acquires"] += 1
        return seq

    def _gave_back(self, seq: seqlease.Sequence) -> None:
        del self.live[seq.id]
        self.expect["releases"] += 1

    @precondition(lambda self: self.free > 0)
    @rule(target=held, tokens=st.integers(0, 5))
    def acquire(self, tokens: int) -> seqlease.Sequence:
        # The model says a sequence is free: a short timeout turns a pool bug into a failure,
        # not a hang.
        seq = self._took(self.ctx.acquire(timeout=5))
        if tokens:
            fill(seq, tokens)
            assert seq.n_tokens == tokens
        return seq

    @precondition(lambda self: self.free == 0)
    @rule()
    def acquire_when_full_fails_at_once(self) -> None:
        with pytest.raises(seqlease.PoolExhausted, match=f"all {self.size} sequences are busy"):
            self.ctx.acquire(timeout=0)
        self.expect["timeouts"] += 1

    @precondition(lambda self: self.free == 0)
    @rule(target=held, data=st.data())
    def queued_acquire_from_threads(self, data: st.DataObject) -> object:
        n = data.draw(st.integers(1, min(2, len(self.live))), label="waiters")
        order = data.draw(st.permutations(sorted(self.live)), label="release order")[:n]
        got: list[seqlease.Sequence | None] = [None] * n

        def wait(i: int) -> None:
            got[i] = self.ctx.acquire(timeout=10)

        threads = [threading.Thread(target=wait, args=(i,)) for i in range(n)]
        for i, thread in enumerate(threads):
            thread.start()
            wait_for(lambda i=i: self.ctx.stats().waiting == i + 1)
        for seq_id in order:
            self._gave_back_live(seq_id)
        for thread in threads:
            thread.join(10)
        self.handed_out.extend(g for g in got if g)
        # FIFO: the i-th waiter to queue gets the i-th sequence to be released.
        assert [g.id for g in got if g] == list(order)
        for seq in got:
            assert seq is not None
            self._took(seq)
        return multiple(*got)

    def _gave_back_live(self, seq_id: int) -> None:
        seq = self.live[seq_id]
        seq.release()
        self._gave_back(seq)

    @rule(target=released, seq=consumes(held))
    def release(self, seq: seqlease.Sequence) -> seqlease.Sequence:
        if seq.released:  # already given back through queued_acquire_from_threads
            return seq
        seq.release()
        self._gave_back(seq)
        assert seq.released
        return seq

    @rule(seq=held, which=st.integers(0, len(_PREFIXES) - 1), tail=st.integers(2, 6))
    def generate_from_a_shared_prefix(self, seq: seqlease.Sequence, which: int, tail: int) -> None:
        if seq.released:
            return
        prompt = _PREFIXES[which] + [300 + i for i in range(tail)]
        result = seq.generate(prompt, temperature=0, max_tokens=3).result()
        assert result.finish_reason in ("length", "eog")
        assert 2 <= result.n_evaluated <= len(prompt)
        event("prompt started from held tokens" if result.n_evaluated < len(prompt) else "cold")
        # The sequence holds its prompt (and reply) in order, whatever was copied into it.
        assert held_tokens(self.ctx, seq.id)[: len(prompt)] == tuple(prompt)

    @rule(seq=released)
    def double_release_is_a_counted_noop(self, seq: seqlease.Sequence) -> None:
        seq.release()
        self.expect["double"] += 1

    @rule(seq=released)
    def stale_handle_cannot_touch_new_owner(self, seq: seqlease.Sequence) -> None:
        owner = self.live.get(seq.id)
        before = owner.n_tokens if owner else None
        with pytest.raises(seqlease.SequenceReleasedError):
            _ = seq.n_tokens
        with pytest.raises(seqlease.SequenceReleasedError):
            fill(seq)
        if owner:
            assert owner.n_tokens == before

    @precondition(lambda self: self.free > 0)
    @rule()
    def exception_inside_with(self) -> None:
        with pytest.raises(_Boom), self.ctx.lease(timeout=0) as seq:
            fill(seq)
            raise _Boom
        self.expect["acquires"] += 1
        self.expect["releases"] += 1
        assert seq.released

    @precondition(lambda self: self.free > 0)
    @rule(cyclic=st.booleans())
    def forgotten_handle_is_reclaimed(self, cyclic: bool) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # The youngest generation holds the fresh cycle as long as no automatic collection
            # promotes it first: a full collection would find it anyway, but costs ~50 ms with
            # hypothesis' heap, and this rule runs hundreds of times.
            gc.disable()
            try:
                seq_id = _forget(self.ctx, cyclic)
                gc.collect(0)
            finally:
                gc.enable()
        leaks = [w for w in caught if issubclass(w.category, seqlease.LeaseLeakWarning)]
        assert len(leaks) == 1
        assert "_forget" in str(leaks[0].message)
        settle(self.ctx)
        assert native_pos_max(self.ctx, seq_id) == -1
        self.expect["acquires"] += 1
        self.expect["releases"] += 1
        self.expect["leaked"] += 1

    @invariant()
    def slots_add_up(self) -> None:
        stats = settle(self.ctx)
        assert stats.leased + stats.free + stats.clearing + stats.quarantined == stats.size
        assert stats.size == self.size
        assert stats.quarantined == 0

    @invariant()
    def no_slot_leased_twice(self) -> None:
        stats = self.ctx.stats()
        holders = [h.seq_id for h in stats.holders]
        assert sorted(holders) == sorted(self.live)
        assert len(set(holders)) == len(holders)

    @invariant()
    def no_idle_slot_while_someone_waits(self) -> None:
        stats = self.ctx.stats()
        assert stats.free == 0 or stats.waiting == 0

    @invariant()
    def lease_numbers_only_grow(self) -> None:
        now = [s.lease_number for s in self.ctx.probe.slots()]
        assert all(a <= b for a, b in zip(self.lease_numbers, now, strict=True))
        self.lease_numbers = now

    @invariant()
    def free_slots_have_empty_native_memory(self) -> None:
        assert free_slots_are_empty(self.ctx) == []
        assert all(
            s.state is SlotState.FREE or s.seq_id in self.live for s in self.ctx.probe.slots()
        )

    @invariant()
    def memory_agrees_with_the_record(self) -> None:
        # Every sequence id, leased ones and the cache's: llama.cpp holds what seqlease records.
        probe = self.ctx.probe
        with probe.paused():
            for seq_id in probe.sequence_ids:
                held = len(probe.held(seq_id))
                assert probe.native_pos_max(seq_id) == held - 1, seq_id

    @invariant()
    def cache_within_budget(self) -> None:
        assert self.ctx.stats().prefix_cached_tokens <= _BUDGET

    @invariant()
    def stats_agree_with_model(self) -> None:
        s, b = self.ctx.stats(), self.base
        assert s.acquires - b.acquires == self.expect["acquires"]
        assert s.releases - b.releases == self.expect["releases"]
        assert s.timeouts - b.timeouts == self.expect["timeouts"]
        assert s.leaked - b.leaked == self.expect["leaked"]
        assert s.double_releases - b.double_releases == self.expect["double"]
        assert s.leased == len(self.live)
        assert s.waiting == 0


PoolMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestPoolMachine = PoolMachine.TestCase
