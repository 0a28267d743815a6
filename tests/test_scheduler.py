"""The scheduler alone, in pure Python: hand-built request states in, complete decisions out (no model)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from model.errors import EngineFullError, EngineInputError
from model.serving.requests import RequestStatus
from model.serving.scheduler import Scheduler


@dataclass(eq=False)
class Fake:
    """What the scheduler reads of a request, and nothing else."""

    id: str
    prefill_left: int = 0
    busy: bool = False
    kind_in_flight: str = "decode"
    in_flight_tokens: int = 0
    next_loop: int = 1
    status: RequestStatus = RequestStatus.WAITING

    def enter_token(self, rows: int = 0) -> None:
        """As after a step in which the request's token ran loop 1 and goes on (with catch-up rows)."""
        self.busy, self.kind_in_flight, self.in_flight_tokens, self.next_loop = True, "decode", 1 + rows, 2


def decision(s: Scheduler):
    out = s.schedule()
    return [(i.request_id, i.kind, i.loop, i.tokens) for i in out.items], out


def test_the_scheduler_module_imports_no_torch():
    import model.serving.scheduler as scheduler
    from tests.test_imports import imports_of

    roots = {module.split(".")[0] for module, _ in imports_of("model.serving.scheduler", Path(scheduler.__file__))}
    assert "torch" not in roots and "transformers" not in roots


def test_cdb_admits_fills_the_budget_and_runs_in_flight_work_first():
    s = Scheduler("cdb", max_requests=3, max_batch_tokens=8, prefill_chunk=4, max_queue=10)
    a, b, c, d = Fake("a"), Fake("b", prefill_left=10), Fake("c", prefill_left=3), Fake("d")
    for r in (a, b, c, d):
        s.add(r)
    items, out = decision(s)
    assert out.admitted == ["a", "b", "c"] and out.queued == 1 and d.status is RequestStatus.WAITING
    assert a.status is RequestStatus.RUNNING
    # a's next token enters (1 token); chunks fill the remaining 7: b gets 4 (its chunk size), c gets 3
    assert items == [("a", "decode", 1, 1), ("b", "prefill", 1, 4), ("c", "prefill", 1, 3)]
    # next step: a's token is at loop 2 with 2 catch-up rows, b's chunk at loop 3; c is done prefilling
    a.enter_token(rows=2)
    b.busy, b.kind_in_flight, b.in_flight_tokens, b.next_loop, b.prefill_left = True, "prefill", 4, 3, 6
    c.prefill_left = 0
    items, out = decision(s)
    assert items == [("a", "decode", 2, 3), ("b", "prefill", 3, 4), ("c", "decode", 1, 1)]
    assert out.admitted == [] and out.idle == []


def test_finished_requests_free_their_slot_for_the_queue():
    s = Scheduler("cdb", max_requests=1, max_batch_tokens=4, prefill_chunk=4, max_queue=4)
    a, b = Fake("a"), Fake("b")
    s.add(a)
    s.add(b)
    assert decision(s)[1].admitted == ["a"]
    s.update([a])
    assert a.status is RequestStatus.FINISHED and s.pending == 1
    items, out = decision(s)
    assert out.admitted == ["b"] and items == [("b", "decode", 1, 1)]


def test_lockstep_strategies_wait_for_the_barrier():
    s = Scheduler("ee_sequence", max_requests=4, max_batch_tokens=16, prefill_chunk=8, max_queue=4)
    a, b = Fake("a"), Fake("b")
    s.add(a)
    s.add(b)
    decision(s)
    a.enter_token()  # a is still in flight; b's token exited after loop 1
    late = Fake("late")
    s.add(late)
    items, out = decision(s)
    assert items == [("a", "decode", 2, 1)] and out.idle == ["b"] and out.admitted == []  # b idles, no admission
    a.busy = False
    items, out = decision(s)
    assert out.admitted == ["late"] and {i[0] for i in items} == {"a", "b", "late"}


def test_static_batching_admits_only_into_an_empty_batch():
    s = Scheduler("static", max_requests=2, max_batch_tokens=8, prefill_chunk=8, max_queue=4)
    a, b, c = Fake("a"), Fake("b"), Fake("c")
    for r in (a, b, c):
        s.add(r)
    assert decision(s)[1].admitted == ["a", "b"]
    s.update([a])
    assert decision(s)[1].admitted == []  # b still runs: c waits for the whole batch
    s.update([b])
    assert decision(s)[1].admitted == ["c"]


def test_bounds():
    s = Scheduler("cdb", max_requests=1, max_batch_tokens=2, prefill_chunk=2, max_queue=1)
    s.add(Fake("a"))
    with pytest.raises(EngineFullError):
        s.add(Fake("b"))
    with pytest.raises(EngineInputError):
        Scheduler("cdb", max_requests=4, max_batch_tokens=2, prefill_chunk=2, max_queue=1)
    with pytest.raises(EngineInputError):
        Scheduler("fastest", 1, 1, 1, 1)
    dropped = s.clear()
    assert [r.id for r in dropped] == ["a"] and not s.has_work()
