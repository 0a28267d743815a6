"""Plain data of the serving engine: requests and their status, events, the scheduling decision, the log."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

from model.inference.generation import Sampling
from model.inference.policies import DepthPolicy
from model.inference.trace import GenerationTrace, TokenStep


class RequestStatus(Enum):
    """Where a request is: queued, admitted to the running batch, or done."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """One generation request. ``policy=None`` means full depth. A policy object carries state
    (e.g. a seeded random policy): give every request its own instance."""

    prompt_ids: list[int]
    max_new_tokens: int = 64
    policy: DepthPolicy | None = None
    kv_mode: str = "sync"  # one of engine.KV_MODES: "copy", "sync", "recursion", "share"
    max_loops: int | None = None
    inspect: bool = False  # probe coda + head after every loop for the top-5 candidates (not charged as decision)
    sampling: Sampling = field(default_factory=Sampling)
    stop: list[str] = field(default_factory=list)
    request_id: str | None = None  # assigned by the engine when None
    prompt: str = ""  # the text, for the trace only
    on_event: Callable[["RequestEvent"], None] | None = None  # called from the engine's thread


@dataclass
class RequestEvent:
    """What a request's listener receives: a new token, or the end (``finished``)."""

    request_id: str
    step: TokenStep | None = None
    finished: bool = False
    finish_reason: str | None = None  # "eos" | "length" | "stop" | "cancelled"


@dataclass
class ScheduledItem:
    """One request's share of one engine step."""

    request_id: str
    kind: str  # "decode" (a generated token's loop) | "prefill" (a prompt chunk's loop)
    loop: int  # loop of the shared block run this step, 1..num_loops
    tokens: int  # query tokens in the block call (decode: 1 + "sync" catch-up rows; prefill: chunk size)
    head: bool = False  # the token exited after this loop: coda + norm + head ran for it this step


@dataclass
class SchedulerOutput:
    """The scheduling decision of one step (what the runner consumes; vLLM's ``SchedulerOutput``)."""

    step: int  # engine step index
    items: list[ScheduledItem]  # what runs in this step's single block call
    admitted: list[str]  # requests moved from the queue into the running set this step
    idle: list[str]  # running requests with nothing scheduled (waiting for the iteration barrier)
    queued: int  # requests still in the queue after admission


@dataclass
class StepRecord:
    """One row of the schedule log (JSON-serialisable via ``asdict``)."""

    step: int
    start_s: float  # seconds since the engine's first step
    wall_ms: float  # whole step: schedule + run + postprocess
    overhead_ms: float  # scheduling, gathering/scattering, bookkeeping (not model kernels)
    batch_tokens: int  # query tokens in the block call
    items: list[ScheduledItem]
    idle: list[str]
    admitted: list[str]
    queued: int


@dataclass
class RequestResult:
    """A finished request: tokens, trace and timings (seconds on the engine's clock)."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str
    trace: GenerationTrace
    submitted_s: float
    first_token_s: float | None
    finished_s: float
    token_times_s: list[float]  # when each token was emitted
