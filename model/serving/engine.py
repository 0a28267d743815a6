"""Continuous depth-wise batching (CDB): many requests, ONE call of the shared block per engine step.

A recursive model runs the same block at every loop, so tokens at different loop depths, from
different requests, can share one call of it (RRT §3.6, MoR §4.7). ``BatchEngine`` is that engine,
and the baselines in the same code (``strategy=``):

- ``"cdb"``: continuous depth-wise batching. Every in-flight request contributes one item per step
  at whatever loop it is at; a token that exits frees its slot at once and the request's next token
  enters the next step; new requests are admitted as soon as there is room.
- ``"ee_sequence"``: early exit under sequence batching. Items run in lockstep: the next tokens of
  the batch enter together only when every item of the current iteration has exited, so exited
  tokens wait (idle) for the deepest one: the synchronisation problem.
- ``"csb"``: continuous sequence batching at full depth (iteration-level scheduling, Orca/vLLM):
  lockstep, every token runs all loops, requests join and leave at iteration boundaries.
- ``"static"``: static batching at full depth: a batch is admitted only when the previous one has
  completely finished, and runs until its longest request ends.

One step (nano-vllm's ``LLMEngine.step``: schedule, run, postprocess)::

    Scheduler.schedule() -> SchedulerOutput   the complete decision: which request runs which loop on
                                              how many tokens, who is admitted, who idles (no torch)
    BatchEngine._run (the model runner):      embed + prelude (tokens and prompt chunks that enter)
                        ONE call of the shared block (K layers) over every item, any loop depth
                        coda (prefill chunks that finished, "sync" catch-up rows that reached the end)
                        decisions (halting head / cosine / router / probe logits), coda + norm + head
                        for the items that exit (and for probes: confidence policies, ``inspect``)
    BatchEngine._emit:  sample, stop rules, deeper KV of exited tokens, traces, events;
                        ``Scheduler.finish`` retires what ended

Inside a layer call (``runner.BlockRunner``) the big matmuls run once over all tokens of all items;
each position's RMSNorm weights and LoRA pair apply per group of consecutive items at that
position; attention runs per item against its own request's cache (sdpa, the library's interface).

Each request keeps its own ``AdaptiveDecoder`` (``model.inference.decoder``) for the per-sequence state: the
cache keyed by unrolled layer position, the KV mode (every one of ``KV_MODES``), the waiting tokens
of "sync" and the prefix invariant. The engine runs ``AdaptiveDecoder.step`` loop by loop across
engine steps, so under greedy decoding a request's tokens, depths and counters equal its solo run
through ``model.inference.generation.generate`` (tests/test_batching.py).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass

import torch

from model.inference.compute import CostModel, LayerCosts
from model.inference.decoder import KV_MODES, AdaptiveDecoder, Segment, as_recursive
from model.errors import EngineInputError
from model.inference.generation import choose_token, describe_model, eos_token_ids
from model.inference.numerics import model_in, resolve
from model.definition.modeling import RecursiveForCausalLM
from model.inference.policies import DepthPolicy, FixedDepth
from model.inference.trace import GenerationTrace, TokenStep
from model.serving.requests import Request, RequestEvent, RequestResult, RequestStatus, SchedulerOutput, StepRecord
from model.serving.runner import BlockRunner
from model.serving.scheduler import FULL_DEPTH_STRATEGIES, Scheduler


# --- per-request state ------------------------------------------------------------------------------
@dataclass
class _Chunk:
    """A prompt chunk being prefilled loop by loop."""

    ids: list[int]
    start: int  # position of its first token
    loop: int = 0
    hidden: torch.Tensor | None = None  # (m, d)


class RequestState:
    """A request in the engine: its decoder (cache, KV mode, waiting tokens), trace and progress."""

    def __init__(self, request: Request, model: RecursiveForCausalLM, tokenizer, policy: DepthPolicy,
                 submitted_s: float, model_desc: dict):
        self.request = request
        self.id = request.request_id
        self.dec = AdaptiveDecoder(model, policy, request.kv_mode, request.max_loops, request.inspect, tokenizer)
        self.tokenizer = tokenizer
        self.ids = list(request.prompt_ids)
        self.to_prefill = list(request.prompt_ids[:-1])
        self.prefilled = 0
        self.chunk: _Chunk | None = None
        self.token_started_s = 0.0  # when the token in flight entered (engine clock)
        self.generated: list[int] = []
        self.text_so_far = ""
        self.generator = torch.Generator().manual_seed(request.sampling.seed)
        self.processors = request.sampling.processors()
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.prefill_started_s: float | None = None
        self.submitted_s = submitted_s
        self.first_token_s: float | None = None
        self.token_times: list[float] = []
        self.finish_reason: str | None = None
        self.status = RequestStatus.WAITING
        s = request.sampling
        settings = {**policy.describe(), "kv_mode": request.kv_mode, "max_loops": self.dec.max_loops,
                    "max_new_tokens": request.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p,
                    "repetition_penalty": s.repetition_penalty, "seed": s.seed, "stop": list(request.stop),
                    "inspect": request.inspect}
        self.trace = GenerationTrace(prompt=request.prompt, prompt_tokens=len(request.prompt_ids),
                                     settings=settings, model=model_desc)
        self.trace.prefill = {"tokens": len(self.to_prefill), "flops": 0.0, "wall_ms": 0.0}

    @property
    def token(self):
        """The decoder's token in flight (``engine.TokenInFlight``), or None."""
        return self.dec.token

    # --- what the scheduler reads (``scheduler.Schedulable``) ------------------------------------
    @property
    def busy(self) -> bool:
        """Mid-way through a token or a prompt chunk (in lockstep strategies this holds the barrier)."""
        return self.chunk is not None or self.token is not None

    @property
    def kind_in_flight(self) -> str:
        return "prefill" if self.chunk is not None else "decode"

    @property
    def next_loop(self) -> int:
        return 1 + (self.chunk.loop if self.chunk is not None else self.token.loop if self.token is not None else 0)

    @property
    def in_flight_tokens(self) -> int:
        """Query tokens of the next loop: the chunk, or the token plus its "sync" catch-up rows."""
        if self.chunk is not None:
            return len(self.chunk.ids)
        if self.token is None:
            return 0
        rows = self.dec.waiting if self.dec.kv_mode == "sync" else []
        return 1 + sum(1 for w in rows if w.depth == self.token.loop)

    @property
    def prefill_left(self) -> int:
        return len(self.to_prefill) - self.prefilled


# --- the engine ------------------------------------------------------------------------------------
class BatchEngine:
    """In-flight requests, one shared-block call per ``step()``. Not thread-safe: drive it from one
    thread (``EngineWorker`` does that for servers). ``device``/``dtype`` move the model given (in
    place, as ``nn.Module.to`` does).

    >>> engine = BatchEngine(model, tokenizer, strategy="cdb", max_requests=16)
    >>> rid = engine.submit(Request(prompt_ids=tokenizer("Hi").input_ids, policy=Confidence(0.8)))
    >>> results = engine.run()              # {request_id: RequestResult}
    >>> engine.schedule_log()               # [{step, items: [{request_id, loop, kind, tokens, head}], ...}]
    """

    def __init__(self, model, tokenizer=None, strategy: str = "cdb", max_requests: int = 16,
                 max_batch_tokens: int = 512, prefill_chunk: int = 64, max_queue: int = 256,
                 device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
                 model_name: str | None = None, keep_log: bool = True, keep_results: bool = True,
                 numerics=None):
        model = as_recursive(model)
        if dtype is not None:
            model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        if device is not None:
            model = model.to(device)
        # an fp32 model runs in the dtype this machine runs batched calls fastest in (``numerics``, on a
        # copy of the weights: the caller's model is not changed); "fp32" forces today's path
        self.numerics = resolve(model, numerics) if dtype is None else None
        if self.numerics is not None:
            model = model_in(model, self.numerics.dtype_for(max_requests))
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cfg = model.config
        self.strategy = strategy
        self.scheduler = Scheduler(strategy, max_requests, max_batch_tokens, prefill_chunk, max_queue)
        self.runner = BlockRunner(model, compile=self.numerics is not None and self.numerics.compiled)
        self.numerics_header = self.numerics.header(model.dtype, "engine") if self.numerics is not None else {}
        self.layer_costs = LayerCosts(CostModel.from_model(model))
        self.model_desc = describe_model(model, model_name)
        self.keep_log = keep_log  # a server turns both off: they grow with every step / request
        self.keep_results = keep_results
        self.log: list[StepRecord] = []
        self.results: dict[str, RequestResult] = {}
        self._states: dict[str, RequestState] = {}
        self._ids = itertools.count()
        self._t0 = time.perf_counter()
        self._started = False
        self.block_calls = 0
        self.head_s = 0.0  # time in the final norm + LM head (and halting heads)
        self.overhead_s = 0.0
        self.step_s = 0.0

    @property
    def device(self) -> torch.device:
        return self.model.model.embed_tokens.weight.device

    def now(self) -> float:
        """Seconds on the engine's clock (since construction or ``reset_clock``)."""
        return time.perf_counter() - self._t0

    def reset_clock(self) -> None:
        self._t0 = time.perf_counter()

    # --- requests in and out ------------------------------------------------------------------
    def submit(self, request: Request) -> str:
        """Validate and queue a request; returns its id. Raises ``EngineInputError`` (bad request)
        or ``EngineFullError`` (queue full)."""
        self.validate(request)
        if request.request_id is None:
            request.request_id = f"req-{next(self._ids)}"
        if request.request_id in self._states or request.request_id in self.results:
            raise EngineInputError(f"request id {request.request_id!r} is already in use")
        policy = request.policy or FixedDepth(self.cfg.num_loops)
        if self.strategy in FULL_DEPTH_STRATEGIES:
            policy = FixedDepth(self.cfg.num_loops)
        state = RequestState(request, self.model, self.tokenizer, policy, self.now(), self.model_desc)
        if self.cfg.training is None and self.cfg.num_loops > 1:
            state.trace.notes.append("untrained conversion: early exits of a converted model are poor until it "
                                     "is trained")
        state.trace.settings["strategy"] = self.strategy
        state.trace.numerics = dict(self.numerics_header)
        self.scheduler.add(state)
        self._states[request.request_id] = state
        return request.request_id

    def validate(self, r: Request) -> None:
        """Refuse a bad request with ``EngineInputError`` before it is queued."""
        if not isinstance(r.prompt_ids, (list, tuple)) or not r.prompt_ids:
            raise EngineInputError("the prompt is empty: give at least one token")
        if not all(isinstance(t, int) and 0 <= t < self.cfg.vocab_size for t in r.prompt_ids):
            raise EngineInputError(f"prompt token ids must be integers in 0..{self.cfg.vocab_size - 1}")
        if not 1 <= r.max_new_tokens <= 4096:
            raise EngineInputError(f"max_new_tokens must be in 1..4096, got {r.max_new_tokens}")
        limit = self.cfg.max_position_embeddings
        if len(r.prompt_ids) + r.max_new_tokens > limit:
            raise EngineInputError(f"the prompt has {len(r.prompt_ids)} tokens; with max_new_tokens="
                                   f"{r.max_new_tokens} at most {limit - r.max_new_tokens} fit")
        r.sampling.validate()
        if r.kv_mode not in KV_MODES:
            raise EngineInputError(f"kv_mode must be one of {KV_MODES}, got {r.kv_mode!r}")
        if r.policy is not None and getattr(r.policy, "needs_router", False) and self.cfg.router_type is None:
            raise EngineInputError("the router policy needs a Mixture-of-Recursions model with trained routers")
        if r.policy is not None and r.policy.needs_halting and not self.model.has_halting_heads:
            raise EngineInputError("the halting policy needs a model trained with halting heads; pick another policy")
        r.stop = [s for s in (r.stop or []) if s]

    def cancel(self, request_id: str) -> bool:
        """Stop a request (e.g. its client went away); True if it was still queued or running."""
        state = self._states.get(request_id)
        if state is None:
            return False
        self.finish(state, "cancelled")
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @property
    def pending(self) -> int:
        """Requests queued or running."""
        return self.scheduler.pending

    def run(self, max_steps: int | None = None) -> dict[str, RequestResult]:
        """Step until every submitted request has finished; returns all results so far."""
        n = 0
        while self.has_work() and (max_steps is None or n < max_steps):
            self.step()
            n += 1
        return self.results

    def schedule_log(self) -> list[dict]:
        """The schedule log as plain JSON-serialisable dicts, one per step."""
        return [asdict(r) for r in self.log]

    # --- one step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> StepRecord | None:
        """Schedule, run one block call, postprocess. Returns the step's record (None if idle)."""
        t_start = time.perf_counter()
        model0 = self.runner.model_s + self.head_s
        decision = self.scheduler.schedule()
        if not decision.items:
            return None
        emitted = self._run(decision)
        for state in emitted:
            self._emit(state)
        if self.device.type == "cuda":  # kernels run asynchronously: make the step's wall time true
            torch.cuda.synchronize(self.device)
        t_end = time.perf_counter()
        # everything but the layer maths and the head: scheduling, gathering/scattering, per-item
        # bookkeeping (FLOP counters, traces), sampling, stop rules, detokenisation
        overhead = (t_end - t_start) - (self.runner.model_s + self.head_s - model0)
        record = StepRecord(step=decision.step, start_s=t_start - self._t0, wall_ms=1000 * (t_end - t_start),
                            overhead_ms=1000 * overhead, batch_tokens=sum(i.tokens for i in decision.items),
                            items=decision.items, idle=decision.idle, admitted=decision.admitted,
                            queued=decision.queued)
        self.block_calls += 1
        self.step_s += t_end - t_start
        self.overhead_s += overhead
        if self.keep_log:
            self.log.append(record)
        return record

    def _run(self, decision: SchedulerOutput) -> list[RequestState]:
        """The model runner: executes the decision as given; returns the states whose token exited."""
        now = self.now()
        cfg, items = self.cfg, decision.items
        work = [self._states[item.request_id] for item in items]
        entering: list[tuple[RequestState, Segment]] = []  # embed + prelude
        for state, item in zip(work, items):
            if item.loop > 1:
                continue  # in flight: only its next loop runs
            size = item.tokens
            if item.kind == "decode":
                state.token_started_s = now
                entering.append((state, state.dec.enter(state.ids[-1])))
            else:  # a prompt chunk enters
                if state.prefill_started_s is None:
                    state.prefill_started_s = now
                start = state.prefilled
                ids = state.to_prefill[start:start + size]
                state.chunk = _Chunk(ids=ids, start=state.dec.length)
                state.prefilled += size
                entering.append((state, self._segment(state, ids, list(range(state.chunk.start,
                                                                               state.chunk.start + size)),
                                                      cfg.prelude_positions)))
        started = time.perf_counter()  # each token is charged the whole shared calls it waits for
        if entering:
            outs = self.runner.run([seg for _, seg in entering])
            for (state, _), h in zip(entering, outs):
                if state.chunk is not None and state.chunk.loop == 0:
                    state.chunk.hidden = h
                else:
                    state.dec.entered(h)
        # ONE call of the shared block for every item, whatever its loop
        segments = [self._chunk_segment(state) if state.chunk is not None else state.dec.next_loop() for state in work]
        for item, seg in zip(items, segments):
            assert item.tokens == seg.hidden.shape[0], "the scheduler's decision and the runner disagree"
        outs = self.runner.run(segments)
        for state in work:
            if state.token is not None:
                state.token.timed("block", started)
        coda: list[tuple[RequestState, Segment]] = []  # finished chunks, "sync" rows that reached the end
        deciding: list[RequestState] = []
        for state, h in zip(work, outs):
            if state.chunk is not None:
                state.chunk.loop += 1
                state.chunk.hidden = h
                if state.chunk.loop == cfg.num_loops:
                    positions = list(range(state.chunk.start, state.chunk.start + len(state.chunk.ids)))
                    coda.append((state, Segment(h, positions, cfg.coda_positions, state.dec.cache)))
            else:
                seg = state.dec.after_loop(h)
                if seg is not None:
                    coda.append((state, seg))
                deciding.append(state)
        started = time.perf_counter()
        finals = self.runner.run([seg for _, seg in coda]) if coda and cfg.num_coda else [seg.hidden for _, seg in coda]
        for (state, _), final in zip(coda, finals):
            if state.chunk is not None:
                self._finish_chunk(state)
            else:
                state.dec.calibrate(final)
        for state in deciding:
            if coda:
                state.token.timed("catchup", started)
        started = time.perf_counter()
        exited, headed = self._decide(deciding)
        for state in deciding:
            state.token.timed(state.dec.head_time_component(state in headed, state in exited), started)
        for item, state in zip(items, work):
            item.head = state in exited
        return exited

    # --- pieces of the step ----------------------------------------------------------------------
    def _segment(self, state: RequestState, ids: list[int], positions: list[int], layers) -> Segment:
        hidden = self.model.model.embed_tokens(torch.tensor(ids, device=self.device))  # (m, d)
        return Segment(hidden, positions, layers, state.dec.cache)

    def _chunk_segment(self, state: RequestState) -> Segment:
        """A prompt chunk's next loop."""
        c = state.chunk
        return Segment(c.hidden, list(range(c.start, c.start + len(c.ids))), self.cfg.loop_positions(c.loop + 1),
                       state.dec.cache)

    def _finish_chunk(self, state: RequestState) -> None:
        c = state.chunk
        state.trace.prefill["flops"] += sum(self._full_token(c.start + i + 1) - state.dec.costs.head()
                                            for i in range(len(c.ids)))
        state.dec.length += len(c.ids)
        state.chunk = None
        if not state.prefill_left:
            state.trace.prefill["wall_ms"] = 1000 * (self.now() - state.prefill_started_s)

    def _decide(self, deciding: list[RequestState]) -> tuple[list[RequestState], list[RequestState]]:
        """Exit decisions after this step's loop: each decoder observes its token; coda + norm + head
        run batched for the ones that asked for logits (probes, ``inspect``, exits); then each decides.
        Returns the states that exit and the states that ran the head."""
        headed = [state for state in deciding if state.dec.observe()]
        logits: dict[str, torch.Tensor] = {}
        if headed:
            hidden = torch.cat(self.runner.run([state.dec.head_segment() for state in headed]), dim=0)  # (n, d)
            t0 = time.perf_counter()
            rows = self.model.lm_head(self.model.model.norm(hidden))  # (n, V)
            self.head_s += time.perf_counter() - t0
            logits = {state.id: rows[i] for i, state in enumerate(headed)}
        return [state for state in deciding if state.dec.decide(logits.get(state.id))], headed

    def _full_token(self, context: int) -> float:
        """``CostModel.full_token`` (all positions + head), from the cached affine layer costs."""
        return sum(self.layer_costs(range(self.cfg.num_hidden_layers), context).values()) + self.layer_costs.costs.head()

    # --- postprocess -------------------------------------------------------------------------------
    def _emit(self, state: RequestState) -> None:
        """Sample the exited token, apply the stop rules, store deeper KV, trace and notify."""
        dec = state.dec
        started = time.perf_counter()
        tok = dec.finish_token()
        tok.timed("kv", started)
        started = time.perf_counter()
        token = choose_token(tok.logits.cpu(), state.ids, state.processors, state.request.sampling.temperature,
                             state.generator)
        now = self.now()
        if token in state.eos_ids:
            self.finish(state, "eos")
            return
        state.generated.append(token)
        state.ids.append(token)
        if state.first_token_s is None:
            state.first_token_s = now
        state.token_times.append(now)
        if self.tokenizer is not None:
            full = self.tokenizer.decode(state.generated, skip_special_tokens=True)
            piece, state.text_so_far = full[len(state.text_so_far):], full
        else:
            piece = ""
        tok.timed("sampling", started)
        kv, kv_full = dec.kv_entries()
        step = TokenStep(index=len(state.generated) - 1, position=dec.length - 1, token_id=token, text=piece,
                         depth=tok.loop, max_depth=dec.max_loops, exit_reason=tok.reason,
                         signal_name=dec.policy.signal_name, threshold=dec.policy.threshold, loops=tok.loops,
                         flops=tok.flops, flops_full=self._full_token(dec.length), kv_entries=kv,
                         kv_entries_full=kv_full, caught_up=len(tok.caught_up),
                         wall_ms=1000 * (now - state.token_started_s), inspected_flops=tok.inspected,
                         time_ms=tok.time_ms)
        state.trace.steps.append(step)
        if state.request.on_event:
            state.request.on_event(RequestEvent(state.id, step=step))
        if any(s in state.text_so_far for s in state.request.stop):
            self.finish(state, "stop")
        elif len(state.generated) >= state.request.max_new_tokens:
            self.finish(state, "length")

    def finish(self, state: RequestState, reason: str) -> None:
        """End a request: retire it from the scheduler, keep its result, tell its listener."""
        if state.finish_reason is not None:
            return
        state.finish_reason = reason
        state.trace.finish_reason = reason
        self.scheduler.finish(state)
        self._states.pop(state.id, None)
        now = self.now()
        if not self.keep_results:
            if state.request.on_event:
                state.request.on_event(RequestEvent(state.id, finished=True, finish_reason=reason))
            return
        self.results[state.id] = RequestResult(
            request_id=state.id, token_ids=list(state.generated), text=state.text_so_far, finish_reason=reason,
            trace=state.trace, submitted_s=state.submitted_s, first_token_s=state.first_token_s, finished_s=now,
            token_times_s=list(state.token_times))
        if state.request.on_event:
            state.request.on_event(RequestEvent(state.id, finished=True, finish_reason=reason))
