"""A background thread for servers and dashboards: one engine, thread-safe submit and cancel."""
from __future__ import annotations

import itertools
import logging
import threading
from collections import deque

from model.errors import EngineFullError
from model.serving.engine import BatchEngine, RequestState
from model.serving.requests import Request, RequestEvent

log = logging.getLogger(__name__)


class EngineWorker:
    """Drives one ``BatchEngine`` from one background thread; ``submit``/``cancel`` are thread-safe.

    Events reach each request's ``on_event`` from the worker thread (a server hands them to its
    event loop with ``loop.call_soon_threadsafe``); ``stream()`` is a blocking iterator for sync code.
    One admission limit: ``max_pending`` bounds queued + running requests (default: the engine's
    ``max_queue + max_requests``); beyond it ``submit`` raises ``EngineFullError``. Requests wait in
    the worker's inbox until the engine's queue has room, so an admitted request is never refused later.
    A failure while handling one request fails that request only; ``healthy`` says whether the thread
    runs, and ``restart()`` starts a new one after failing whatever was in flight.
    """

    def __init__(self, engine: BatchEngine, max_pending: int | None = None):
        self.engine = engine
        self.max_pending = max_pending or engine.scheduler.max_queue + engine.scheduler.max_requests
        self._cond = threading.Condition()
        self._inbox: deque[Request] = deque()
        self._cancels: list[str] = []
        self._stopped = False
        self._thread = self._new_thread()
        self._ids = itertools.count()
        self.failures = 0  # requests failed by an exception (see the log)

    def _new_thread(self) -> threading.Thread:
        return threading.Thread(target=self._loop, name="batch-engine", daemon=True)

    def start(self) -> "EngineWorker":
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout)

    @property
    def healthy(self) -> bool:
        """False once the engine thread died (or the worker was stopped); true before ``start``."""
        return not self._stopped and (self._thread.ident is None or self._thread.is_alive())

    def restart(self) -> None:
        """Fail every request in flight and start a fresh engine thread (after the old one died)."""
        with self._cond:
            if self.healthy or self._stopped:
                return
            self._fail_everything()
            self._thread = self._new_thread()
            self._thread.start()
        log.warning("engine thread restarted")

    @property
    def pending(self) -> int:
        return self.engine.pending + len(self._inbox)

    def submit(self, request: Request) -> str:
        """Validate now (raises ``EngineInputError``/``EngineFullError``), run later; returns the id."""
        with self._cond:
            if not self.healthy:
                raise EngineFullError("the engine is not running; retry later")
            self.engine.validate(request)
            if self.pending >= self.max_pending:
                raise EngineFullError(f"the server is busy ({self.pending} requests in flight or queued); retry later")
            if request.request_id is None:
                request.request_id = f"w{next(self._ids)}"
            self._inbox.append(request)
            self._cond.notify()
        return request.request_id

    def cancel(self, request_id: str) -> None:
        with self._cond:
            self._cancels.append(request_id)
            self._cond.notify()

    def stream(self, request: Request, timeout: float | None = None):
        """Submit and yield ``RequestEvent``s until the request ends; closing the iterator cancels it."""
        import queue

        events: queue.Queue = queue.Queue()
        request.on_event = events.put
        rid = self.submit(request)
        try:
            while True:
                event = events.get(timeout=timeout)
                yield event
                if event.finished:
                    return
        finally:
            self.cancel(rid)  # no-op if it already finished

    def _admit(self) -> list[Request]:
        """Inbox requests the engine's queue has room for now (the rest wait their turn). Holds the lock."""
        room = self.engine.scheduler.max_queue - len(self.engine.scheduler.queue)
        taken = []
        while self._inbox and room > 0:
            taken.append(self._inbox.popleft())
            room -= 1
        return taken

    def _fail(self, request: Request, state: RequestState | None = None) -> None:
        """End one request with ``finish_reason="error"`` whatever state it is in."""
        self.failures += 1
        if state is not None and state.finish_reason is None:
            self.engine.finish(state, "error")
            return
        if request.on_event:
            request.on_event(RequestEvent(request.request_id, finished=True, finish_reason="error"))

    def _fail_everything(self) -> None:
        """Fail every request the worker holds (inbox, queue, running). Holds the lock."""
        inbox, self._inbox = list(self._inbox), deque()
        self._cancels.clear()
        for state in [*self.engine.scheduler.queue, *self.engine.scheduler.running]:
            self._fail(state.request, state)  # the engine retires each from the scheduler
        for request in inbox:
            self._fail(request)

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException:  # the thread dies (a bug, or an interpreter shutdown): nobody may hang on it
            log.critical("the engine thread died; failing every request it held")
            with self._cond:
                self._fail_everything()
            raise

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not (self._stopped or self._inbox or self._cancels or self.engine.has_work()):
                    self._cond.wait()
                if self._stopped:
                    return
                inbox = self._admit()
                cancels, self._cancels = self._cancels, []
            for request in inbox:
                try:
                    self.engine.submit(request)
                except Exception as exc:  # a bad request fails alone
                    log.warning("request %s failed at admission: %s", request.request_id, exc)
                    self._fail(request)
            for rid in cancels:
                try:
                    self.engine.cancel(rid)
                except Exception:
                    log.exception("cancelling %s failed", rid)
            try:
                self.engine.step()
            except Exception:  # never kill the thread: fail the requests in flight, keep serving
                log.exception("engine step failed; failing the requests in flight")
                for state in list(self.engine.scheduler.running):
                    self._fail(state.request, state)
