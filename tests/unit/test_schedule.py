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
