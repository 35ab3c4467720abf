"""The batch planner: a pure function of the active jobs."""

from __future__ import annotations

from seqlease.engine.schedule import plan_batch


class _J:
    def __init__(self, decoding: bool, pending: int) -> None:
        self.decoding = decoding
        self.pending = list(range(pending))


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
