"""The scheduler: from request states alone (no torch), the complete decision of one engine step.

As in nano-vllm / vLLM v1: ``schedule()`` returns a ``SchedulerOutput`` naming, for every request
that runs, which loop of the shared block it runs and on how many query tokens (a generated token
plus its "sync" catch-up rows, or a prompt chunk); the model runner executes exactly that, and
``update(finished)`` retires what ended. The scheduler reads a request only through the
``Schedulable`` fields below, so it is tested with plain Python objects (tests/test_scheduler.py).
"""
from __future__ import annotations

from collections import deque
from typing import Protocol

from model.errors import EngineFullError, EngineInputError
from model.serving.requests import RequestStatus, ScheduledItem, SchedulerOutput

STRATEGIES = ("cdb", "ee_sequence", "csb", "static")
FULL_DEPTH_STRATEGIES = ("csb", "static")  # these ignore the request's policy: every token runs all loops
LOCKSTEP_STRATEGIES = ("ee_sequence", "csb", "static")  # next tokens enter only when the iteration ended


class Schedulable(Protocol):
    """What the scheduler reads of a request (``RequestState`` in the engine; plain objects in tests)."""

    id: str
    status: RequestStatus
    busy: bool  # mid-way through a token or a prompt chunk: its next loop must run
    kind_in_flight: str  # "decode" (a generated token) or "prefill" (a prompt chunk), when busy
    in_flight_tokens: int  # query tokens of that next loop (1 + catch-up rows, or the chunk's size)
    next_loop: int  # the loop it runs next (1 when something enters)
    prefill_left: int  # prompt tokens not yet sent into a chunk


class Scheduler:
    """Holds the queue and the running set; decides each step's items (one job: the decision).

    Bounds: at most ``max_requests`` running; ``max_batch_tokens`` query tokens per block call
    (tokens already mid-flight always run, "sync" catch-up rows included; new prompt chunks get
    what is left, at most ``prefill_chunk`` each); at most ``max_queue`` queued (beyond: refusal).
    """

    def __init__(self, strategy: str, max_requests: int, max_batch_tokens: int, prefill_chunk: int, max_queue: int):
        if strategy not in STRATEGIES:
            raise EngineInputError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        for name, value in (("max_requests", max_requests), ("max_batch_tokens", max_batch_tokens),
                            ("prefill_chunk", prefill_chunk), ("max_queue", max_queue)):
            if value < 1:
                raise EngineInputError(f"{name} must be >= 1, got {value}")
        if max_batch_tokens < max_requests:
            raise EngineInputError(f"max_batch_tokens ({max_batch_tokens}) must be >= max_requests ({max_requests})")
        self.strategy = strategy
        self.max_requests, self.max_batch_tokens = max_requests, max_batch_tokens
        self.prefill_chunk, self.max_queue = prefill_chunk, max_queue
        self.queue: deque[Schedulable] = deque()
        self.running: list[Schedulable] = []
        self.steps = 0

    # --- requests in and out -------------------------------------------------------------------
    def add(self, request: Schedulable) -> None:
        """Queue a request (``EngineFullError`` when ``max_queue`` are already waiting)."""
        if len(self.queue) >= self.max_queue:
            raise EngineFullError(f"the queue is full ({self.max_queue} requests waiting); retry later")
        request.status = RequestStatus.WAITING
        self.queue.append(request)

    def finish(self, request: Schedulable) -> None:
        """Retire a request wherever it is (it ended, was cancelled or failed)."""
        if request in self.queue:
            self.queue.remove(request)
        if request in self.running:
            self.running.remove(request)
        request.status = RequestStatus.FINISHED

    def update(self, finished: list[Schedulable]) -> None:
        """After the runner: retire the requests that ended in this step."""
        for request in finished:
            self.finish(request)

    def clear(self) -> list[Schedulable]:
        """Retire everything (the engine thread failed); returns what was queued or running."""
        dropped = [*self.queue, *self.running]
        for request in dropped:
            self.finish(request)
        return dropped

    def has_work(self) -> bool:
        return bool(self.queue or self.running)

    @property
    def pending(self) -> int:
        """Requests queued or running."""
        return len(self.queue) + len(self.running)

    # --- the decision ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Admit, then pick at most one item per running request: what is in flight runs its next
        loop; an idle request's next token enters (loop 1); prompt chunks fill the token budget."""
        admitted = []
        lockstep = self.strategy in LOCKSTEP_STRATEGIES
        barrier_open = not any(r.busy for r in self.running)
        can_admit = (self.strategy != "static" or not self.running) and (not lockstep or barrier_open)
        while can_admit and self.queue and len(self.running) < self.max_requests:
            request = self.queue.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            admitted.append(request.id)
        items: list[ScheduledItem] = []
        budget = self.max_batch_tokens
        for r in self.running:  # work in flight first: it never waits for room
            if r.busy:
                items.append(ScheduledItem(r.id, r.kind_in_flight, r.next_loop, r.in_flight_tokens))
                budget -= r.in_flight_tokens
            elif not r.prefill_left and (not lockstep or barrier_open):
                items.append(ScheduledItem(r.id, "decode", 1, 1))  # the request's next token enters
                budget -= 1
        for r in self.running:  # prompt chunks fill what is left
            if not r.busy and r.prefill_left and budget > 0 and (not lockstep or barrier_open):
                size = min(self.prefill_chunk, r.prefill_left, budget)
                items.append(ScheduledItem(r.id, "prefill", 1, size))
                budget -= size
        scheduled = {item.request_id for item in items}
        out = SchedulerOutput(step=self.steps, items=items, admitted=admitted,
                              idle=[r.id for r in self.running if r.id not in scheduled], queued=len(self.queue))
        self.steps += 1
        return out
