"""The batch planner: a pure function of the active jobs."""

from __future__ import annotations

from seqlease.engine.schedule import decode_calls, plan_batch


class _J:
    def __init__(self, decoding: bool, pending: int, seq_id: int = 0) -> None:
        self.decoding = decoding
        self.pending = list(range(pending))
        self.seq_id = seq_id


def test_plan_batch_decoders_first_then_fair_prefill():
    d1, d2, p1, p2 = _J(True, 0), _J(True, 0), _J(False, 1000), _J(False, 10)
    plan = dict((id(j), n) for j, n in plan_batch([p1, d1, p2, d2], 512, 128))
    assert plan[id(d1)] == plan[id(d2)] == 1
    # Prefill capped while someone decodes; the short prompt finishes, the long one gets the rest.
    assert plan[id(p2)] == 10
    assert plan[id(p1)] == 118
    alone = plan_batch([p1], 512, 128)
    assert alone == [(p1, 512)]  # nobody decoding: the whole batch goes to the prompt
    assert plan_batch([d1, d2], 1, 128) == [(d1, 1)]


def test_plan_batch_never_cuts_a_single_token_off_a_prompt():
    # A one-token piece is computed by other llama.cpp kernels than a longer one: the reply
    # would then depend on where the prompt was cut.
    a, b = _J(False, 513), _J(False, 3)
    assert plan_batch([a], 512, 128) == [(a, 511)]  # leaves 2, not 1
    assert plan_batch([b], 3, 128) == [(b, 3)]
    d = _J(True, 0)
    plan = dict((id(j), n) for j, n in plan_batch([d, a, b], 4, 128))
    assert plan[id(d)] == 1
    assert plan.get(id(a), 0) != 1 and plan.get(id(b), 0) != 1
    for job, n in plan_batch([a, b, _J(False, 7)], 9, 128):
        assert n != 1 and len(job.pending) - n != 1
    # Where the batch has no room for a longer piece, the prompt still moves on.
    assert plan_batch([a], 1, 128) == [(a, 1)]
    assert plan_batch([b], 2, 128) == [(b, 2)]


def test_decode_calls_keep_every_piece_whole_on_sequence_streams():
    # llama.cpp would cut the 4-token piece beside the 3-token one as 3 + 1 (or 1 + 2 + 1
    # beside a decoder): one call per piece size, decoders first, sequence ids ascending.
    d0, d5 = _J(True, 0, seq_id=0), _J(True, 0, seq_id=5)
    a, b, c = _J(False, 3, seq_id=2), _J(False, 4, seq_id=3), _J(False, 4, seq_id=1)
    plan = [(b, 4), (d5, 1), (a, 3), (c, 4), (d0, 1)]
    calls = decode_calls(plan, streams=True)
    assert calls == [[(d0, 1), (d5, 1)], [(a, 3)], [(c, 4), (b, 4)]]
    # One unified KV buffer is split by order only: one call, as before.
    assert decode_calls(plan, streams=False) == [[(d0, 1), (c, 4), (a, 3), (b, 4), (d5, 1)]]
    assert decode_calls([], streams=True) == []
