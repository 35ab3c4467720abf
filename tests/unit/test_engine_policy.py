"""Engine policy on the fake seam: batching, pieces, prefixes, cancellation, faults, death.

Each test builds an :class:`~seqlease.engine.engine.Engine` on :class:`fakes.FakeSeam` (whose
"model" says ``t + 1`` after ``t``) and steps it by hand with ``advance``: no thread, no model,
milliseconds. What llama.cpp itself does is tested elsewhere, on the real library.
"""

from __future__ import annotations

import pytest
from fakes import FakeSeam, Samplers, layout

from seqlease.engine.engine import Engine
from seqlease.engine.prefixes import MIN_SHARED
from seqlease.errors import DecodeError, NativeError
from seqlease.request.job import Channel, Request, Result
from seqlease.request.params import sanitize

pytestmark = pytest.mark.timeout(10)


class Bench:
    """An engine on a fake seam, the requests it released, and helpers to drive it."""

    def __init__(self, sequences: int = 4, *, cache_slots: int = 0, **seam: object) -> None:
        self.seam = FakeSeam(sequences + cache_slots, **seam)  # type: ignore[arg-type]
        self.samplers = Samplers(self.seam)
        self.released: list[Request] = []
        self.engine = Engine(
            self.seam,
            self.samplers,
            layout(self.seam, sequences, cache_tokens=cache_slots * self.seam.n_ctx_seq),
            release=self.released.append,
        )

    def request(self, seq_id: int, prompt: list[int], **params: object) -> Request:
        return Request(seq_id, prompt, sanitize(temperature=0, **params), Channel())  # type: ignore[arg-type]

    def run(self, *requests: Request, steps: int = 1000) -> None:
        """Admit ``requests`` and step until the engine is idle."""
        self.engine.advance(requests)
        for _ in range(steps):
            if not self.engine.busy:
                return
            self.engine.advance()
        raise AssertionError("the engine never went idle")


def end(request: Request) -> Result | BaseException | None:
    return request.channel.wait_end(0)


def result(request: Request) -> Result:
    outcome = end(request)
    assert isinstance(outcome, Result), outcome
    return outcome


def counting(start: int, n: int) -> str:
    """The fake model's reply after a prompt ending in ``start``, ``n`` tokens long."""
    return "".join(f"{start + i} " for i in range(1, n + 1))


# -- batching and pieces ----------------------------------------------------------------------


def test_every_running_reply_shares_each_decode_and_replies_follow_the_model():
    bench = Bench()
    a = bench.request(0, [5, 6, 7], max_tokens=3)
    b = bench.request(1, [40, 41], max_tokens=3)
    bench.run(a, b)
    assert result(a).text == counting(7, 3) and result(a).finish_reason == "length"
    assert result(b).text == counting(41, 3)
    assert {entry[2] for entry in bench.seam.calls[0]} == {0, 1}  # one batch, both prompts
    # Reply tokens are fed back one per step, together: each later call holds both.
    assert all({e[2] for e in call} == {0, 1} for call in bench.seam.calls[1:])
    assert bench.released == [a, b] or bench.released == [b, a]
    assert bench.engine.completed == 2 and not bench.engine.busy
    assert all(s.closed for s in bench.samplers.made)


def test_a_long_prompt_goes_in_pieces_within_the_batch_size():
    bench = Bench(n_batch=32, n_ubatch=32)
    long = bench.request(0, list(range(1, 201)), max_tokens=2)
    bench.run(long)
    assert all(len(call) <= 32 for call in bench.seam.calls)
    assert bench.seam.held[0][:200] == list(range(1, 201))  # in order, every position once
    assert result(long).n_evaluated == 200


def test_with_kv_streams_each_call_holds_pieces_of_one_size():
    # One KV stream per sequence: llama.cpp splits a batch equally, so mixed piece sizes
    # would change a reply with its neighbour's prompt (see plan_batch).
    bench = Bench(kv_unified=False)
    short = bench.request(0, [1, 2, 3], max_tokens=4)
    long = bench.request(1, list(range(10, 60)), max_tokens=4)
    bench.run(short, long)
    for call in bench.seam.calls:
        sizes = {sum(1 for e in call if e[2] == s) for s in {e[2] for e in call}}
        assert len(sizes) == 1, call
    assert result(short).text == counting(3, 4)
    assert result(long).text == counting(59, 4)


def test_a_reply_stops_where_the_sequence_is_full():
    bench = Bench(n_ctx_seq=10)
    full = bench.request(0, list(range(1, 8)), max_tokens=100)
    bench.run(full)
    assert result(full).finish_reason == "length"
    assert result(full).n_generated == 3  # 7 prompt + 3 reply tokens fill n_ctx_seq
    assert len(bench.seam.held[0]) <= 10


def test_no_kv_slot_halves_the_batch_and_loses_nothing():
    bench = Bench()
    refused: list[int] = []

    def no_slot_once(entries: list) -> None:
        if not refused and len(entries) > 8:
            refused.append(len(entries))
            raise DecodeError("llama_decode returned 1: no KV-cache slot", 1)

    bench.seam.on_decode = no_slot_once
    big = bench.request(0, list(range(1, 41)), max_tokens=2)
    bench.run(big)
    assert refused and len(bench.seam.calls[0]) <= refused[0] // 2
    assert result(big).text == counting(40, 2)


# -- prefixes -----------------------------------------------------------------------------------


def test_a_prompt_starts_from_the_longest_prefix_another_sequence_holds():
    bench = Bench()
    shared = list(range(100, 100 + 2 * MIN_SHARED))
    first = bench.request(0, [*shared, 1], max_tokens=1)
    bench.run(first)
    second = bench.request(1, [*shared, 2, 3], max_tokens=1)
    bench.run(second)
    assert bench.seam.copies == [(0, 1, len(shared))]
    assert result(second).n_evaluated == 2
    assert bench.seam.tokens_decoded(1) == 2  # only what no one held
    assert result(second).text == counting(3, 1)


def test_a_short_common_prefix_is_not_worth_a_copy():
    bench = Bench()
    first = bench.request(0, [*range(1, MIN_SHARED), 500], max_tokens=1)
    bench.run(first)
    second = bench.request(1, [*range(1, MIN_SHARED), 600, 601], max_tokens=1)
    bench.run(second)
    assert bench.seam.copies == []


def test_requests_that_arrive_together_evaluate_a_shared_prompt_once():
    bench = Bench()
    system = list(range(200, 200 + 3 * MIN_SHARED))
    replies = [bench.request(i, [*system, 900 + i, 950 + i], max_tokens=2) for i in range(4)]
    bench.run(*replies)
    decoded = sum(bench.seam.tokens_decoded(i) for i in range(4))
    # Once the system prompt, plus each reply's own two tokens and its fed-back token.
    assert decoded == len(system) + 4 * 2 + 4 * 1
    assert [result(r).text for r in replies] == [counting(950 + i, 2) for i in range(4)]


def test_released_sequences_leave_their_prompt_in_the_cache_for_the_next():
    bench = Bench(2, cache_slots=2)
    shared = list(range(300, 300 + 2 * MIN_SHARED))
    first = bench.request(0, [*shared, 1], max_tokens=1)
    bench.run(first)
    bench.engine.clear(0)  # what a release does
    assert bench.seam.held[0] == []
    cached = [i for i in (2, 3) if bench.seam.held[i]]
    assert len(cached) == 1 and bench.seam.held[cached[0]][: len(shared)] == shared
    second = bench.request(1, [*shared, 7, 8], max_tokens=1)
    bench.run(second)
    assert bench.seam.copies[-1][:2] == (cached[0], 1)
    assert result(second).n_evaluated == 2
    assert bench.engine.prefix_stats().tokens_reused >= len(shared)


def test_without_sharing_nothing_is_copied():
    bench = Bench()
    bench.engine = Engine(
        bench.seam,
        bench.samplers,
        layout(bench.seam, 4),
        release=bench.released.append,
        share_prefixes=False,
    )
    shared = list(range(100, 100 + 2 * MIN_SHARED))
    bench.run(bench.request(0, [*shared, 1], max_tokens=1))
    second = bench.request(1, [*shared, 2], max_tokens=1)
    bench.run(second)
    assert bench.seam.copies == [] and result(second).n_evaluated == len(shared) + 1


# -- cancellation in every state ---------------------------------------------------------------


def test_cancelled_before_it_starts_no_sampler_is_made():
    bench = Bench()
    gone = bench.request(0, [1, 2, 3])
    gone.cancel()
    bench.run(gone)
    assert result(gone).finish_reason == "cancelled" and result(gone).n_generated == 0
    assert bench.samplers.made == [] and bench.released == [gone]
    assert gone.channel.done.is_set()


def test_cancelled_while_waiting_for_a_reader():
    bench = Bench()
    system = list(range(200, 200 + 3 * MIN_SHARED))
    reader = bench.request(0, [*system, 1, 2], max_tokens=2)
    waiter = bench.request(1, [*system, 3, 4], max_tokens=2)
    bench.engine.advance([reader, waiter])
    assert bench.engine.running(1) and bench.seam.tokens_decoded(1) == 0  # it waits
    waiter.cancel()
    bench.run()
    assert result(waiter).finish_reason == "cancelled"
    assert result(reader).text == counting(2, 2)
    assert all(s.closed for s in bench.samplers.made)


def test_cancelled_in_the_middle_of_its_prompt():
    bench = Bench(n_batch=16, n_ubatch=16)
    long = bench.request(0, list(range(1, 101)))
    other = bench.request(1, [7, 8], max_tokens=3)
    bench.engine.advance([long, other])
    assert 0 < len(bench.seam.held[0]) < 100
    long.cancel()
    bench.run()
    assert result(long).finish_reason == "cancelled"
    assert result(other).text == counting(8, 3)


def test_cancelled_while_generating_keeps_what_it_said():
    bench = Bench()
    talker = bench.request(0, [1, 2], max_tokens=50)
    bench.engine.advance([talker])
    bench.engine.advance()
    bench.engine.advance()
    talker.cancel()
    bench.run()
    done = result(talker)
    assert done.finish_reason == "cancelled" and 0 < done.n_generated < 50
    assert done.text == counting(2, done.n_generated)
    assert bench.samplers.made[0].closed


def test_an_abort_flag_that_raises_counts_as_set():
    class Broken:
        def is_set(self) -> bool:
            raise RuntimeError("broken flag")

    bench = Bench()
    request = Request(0, [1, 2], sanitize(temperature=0), Channel(), Broken())
    bench.run(request)
    assert result(request).finish_reason == "cancelled"


# -- a fault in each of a reply's own stages fails that reply alone ----------------------------


def _faulty_beside_a_good_one(bench: Bench, **faulty: object) -> tuple[Request, Request]:
    bad = bench.request(0, [1, 2, 3], max_tokens=4, seed=666, **faulty)
    good = bench.request(1, [50, 51], max_tokens=4)
    bench.run(bad, good)
    assert result(good).text == counting(51, 4)  # as it would be alone
    assert bench.released.count(bad) == 1 and bench.released.count(good) == 1
    assert all(s.closed for s in bench.samplers.made)
    assert not bench.engine.busy
    return bad, good


@pytest.mark.parametrize(
    ("stage", "inject"),
    [
        ("starting", lambda bench: bench.samplers.refuse.add(666)),
        ("sampling", lambda bench: bench.samplers.fail_at.update({666: 2})),
        ("writing the reply", lambda bench: bench.seam.vocab.broken.add(4)),
        (
            "checking its batch",
            lambda bench: setattr(
                bench.seam, "on_check", lambda entries: _raise_for(entries, 0, ValueError)
            ),
        ),
    ],
)
def test_a_fault_fails_only_its_own_reply(stage, inject):
    bench = Bench()
    inject(bench)
    bad, _ = _faulty_beside_a_good_one(bench)
    error = end(bad)
    assert isinstance(error, NativeError) and f"while {stage}" in str(error), error
    assert bad.channel.done.is_set()


def _raise_for(entries: list, seq_id: int, kind: type[Exception]) -> None:
    if any(entry[2] == seq_id for entry in entries):
        raise kind(f"simulated fault for sequence {seq_id}")


def test_an_exception_inside_the_shared_decode_fails_that_call_and_the_engine_serves_on():
    bench = Bench(kv_unified=False)  # pieces of different sizes: the two go in separate calls
    bench.seam.on_decode = lambda entries: _raise_for(entries, 0, ValueError)
    bad = bench.request(0, [1, 2, 3, 4, 5, 6], max_tokens=3)
    good = bench.request(1, [50, 51], max_tokens=3)
    bench.run(bad, good)
    assert isinstance(end(bad), NativeError) and "while decoding" in str(end(bad))
    assert result(good).text == counting(51, 3)
    assert bench.seam.held[0] == []  # nothing of the failed call is recorded as held
    assert bench.engine.ledger.n_tokens(0) == 0
    bench.seam.on_decode = None
    again = bench.request(0, [1, 2], max_tokens=2)
    bench.run(again)
    assert result(again).text == counting(2, 2)


def test_a_fatal_decode_error_stops_the_step_and_abandon_frees_every_sampler():
    bench = Bench()

    def fatal(entries: list) -> None:
        raise DecodeError("llama_decode returned -3: compute failed", -3)

    a, b = bench.request(0, [1, 2]), bench.request(1, [3, 4])
    bench.seam.on_decode = fatal
    with pytest.raises(DecodeError, match="compute failed"):
        bench.engine.advance([a, b])
    assert len(bench.samplers.made) == 2 and not any(s.closed for s in bench.samplers.made)
    bench.engine.abandon()  # what the worker does before failing every caller
    assert all(s.closed for s in bench.samplers.made)
    assert not bench.engine.busy


def test_a_repeat_penalty_sees_the_prompt_before_the_reply():
    bench = Bench()
    request = bench.request(0, [5, 6, 7], max_tokens=2, repeat_penalty=1.3)
    bench.run(request)
    assert bench.samplers.made[0].accepted[:3] == [5, 6, 7]
