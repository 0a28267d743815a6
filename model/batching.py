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

    Scheduler.schedule() -> SchedulerOutput           which (request, loop) items run, who idles
    BatchEngine._run:   embed + prelude (tokens that enter)
                        ONE call of the shared block (K layers) over every item, any loop depth
                        coda (prefill chunks that finished, "sync" catch-up rows that reached the end)
                        decisions (halting head / cosine / probe logits), coda + norm + head for
                        the items that exit (and for the probes of confidence policies)
    BatchEngine._postprocess: sample, stop rules, deeper KV of exited tokens, traces, events

Inside a layer call (``BlockRunner``) the big matmuls run once over all tokens of all items (the
shared projection weights are the very same tensors at every loop position); each position's
RMSNorm weights and LoRA pair are applied per group of consecutive items at that position;
attention runs per item against its own request's cache (sdpa with the library's interface).

Each request keeps its own ``AdaptiveDecoder`` (engine.py) for the per-sequence state: the
``DynamicCache`` keyed by unrolled layer position, the KV mode (``"copy"``/``"sync"``), the
waiting tokens of "sync" and the prefix invariant. The engine re-creates ``AdaptiveDecoder.step``
item by item, so under greedy decoding a request's tokens equal its solo run through
``model.engine.generate``. MoR's KV modes ("recursion", "share") would be further values of the
request's ``kv_mode`` handled in ``_loop_segment``/``_after_loop``/``_emit`` (what a loop writes,
what it reads); the scheduler does not care.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
from torch.nn import functional as F
from transformers.cache_utils import DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

from .compute import CostModel, add_into
from .errors import EngineFullError
from .engine import (
    KV_MODES,
    AdaptiveDecoder,
    EngineInputError,
    Sampling,
    WaitingToken,
    as_recursive,
    choose_token,
    describe_model,
    eos_token_ids,
    loop_signal,
)
from .config import PROJECTIONS
from .modeling import RecursiveForCausalLM, causal_mask, projection_owner
from .policies import DepthPolicy, FixedDepth, Observation
from .trace import GenerationTrace, TokenStep

log = logging.getLogger(__name__)

STRATEGIES = ("cdb", "ee_sequence", "csb", "static")
FULL_DEPTH_STRATEGIES = ("csb", "static")  # these ignore the request's policy: every token runs all loops
LOCKSTEP_STRATEGIES = ("ee_sequence", "csb", "static")  # next tokens enter only when the iteration ended


# --- plain data: requests, events, the scheduling decision, the log -------------------------------
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


# --- the batched layer call ---------------------------------------------------------------------
@dataclass
class Segment:
    """Consecutive tokens of one request that run the same layer positions in one call."""

    hidden: torch.Tensor  # (m, d) residual stream
    token_positions: list[int]  # (m,) absolute positions of the tokens (RoPE, causal mask)
    layer_positions: Sequence[int]  # unrolled layer positions to run, in order
    cache: DynamicCache  # the request's cache (written at every layer position run)


class BlockRunner:
    """Runs decoder layers over segments of many requests at once (one job: the batched forward).

    At layer j every segment runs its own position ``layer_positions[j]``; all those positions must
    map to the same unique layer (same shared weights). The shared projections run once over all
    N tokens; RMSNorm weights and LoRA per group of consecutive segments at one position; attention
    per segment against its own cache. Exactly ``LlamaDecoderLayer.forward`` per token.
    """

    def __init__(self, model: RecursiveForCausalLM):
        self.inner = model.model
        self.cfg = model.config
        self.attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.cfg._attn_implementation, eager_attention_forward)
        self.params = [self._position_params(layer) for layer in self.inner.layers]  # looked up once, not per call
        self.eps = self.inner.layers[0].input_layernorm.variance_epsilon
        self.act = self.inner.layers[0].mlp.act_fn
        self.model_s = 0.0  # time inside the layer maths (projections, norms, attention): not overhead

    @staticmethod
    def _position_params(layer) -> dict:
        """One position's weights (Parameters held by reference, so ``model.to`` still applies)."""
        projections = {n: getattr(projection_owner(layer, n), n) for n in PROJECTIONS}
        return {
            "input_norm": layer.input_layernorm.weight,
            "post_norm": layer.post_attention_layernorm.weight,
            "attn": layer.self_attn,
            "shared": {n: m.shared for n, m in projections.items()},
            "lora": {n: (m.lora_A, m.lora_B) if m.rank > 0 else None for n, m in projections.items()},
        }

    @torch.no_grad()
    def run(self, segments: list[Segment]) -> list[torch.Tensor]:
        """Returns the new hidden states, (m_i, d) per segment, in the order given."""
        if not segments:
            return []
        depth = len(segments[0].layer_positions)
        assert all(len(s.layer_positions) == depth for s in segments), "segments must run equally many layers"
        order = sorted(range(len(segments)), key=lambda i: segments[i].layer_positions[0] if depth else 0)
        segs = [segments[i] for i in order]
        bounds = list(itertools.accumulate([0] + [s.hidden.shape[0] for s in segs]))
        x = torch.cat([s.hidden for s in segs], dim=0)  # (N, d)
        device = x.device
        pos = torch.tensor([p for s in segs for p in s.token_positions], device=device)[None]  # (1, N)
        cos, sin = self.inner.rope(x[None], pos) if depth else (None, None)  # (1, N, head_dim) each
        t0 = time.perf_counter()
        for j in range(depth):
            x = self._layer(x, [s.layer_positions[j] for s in segs], segs, bounds, cos, sin)
        self.model_s += time.perf_counter() - t0
        outs = [x[bounds[i]:bounds[i + 1]] for i in range(len(segs))]
        result: list[torch.Tensor] = [None] * len(segs)  # type: ignore[list-item]
        for k, i in enumerate(order):
            result[i] = outs[k]
        return result

    def _groups(self, positions: list[int], bounds: list[int]) -> list[tuple[int, int, int]]:
        """(layer position, token start, token end) for runs of consecutive segments at one position."""
        groups: list[tuple[int, int, int]] = []
        for i, p in enumerate(positions):
            if groups and groups[-1][0] == p:
                groups[-1] = (p, groups[-1][1], bounds[i + 1])
            else:
                groups.append((p, bounds[i], bounds[i + 1]))
        return groups

    def _norm(self, x: torch.Tensor, groups, which: str) -> torch.Tensor:
        """LlamaRMSNorm with each group's own weight: ``w_p * (x / rms(x))`` (x: (N, d))."""
        xf = x.to(torch.float32)
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        if len(groups) == 1:
            return self.params[groups[0][0]][which] * normed
        out = torch.empty_like(normed)
        for p, a, b in groups:
            out[a:b] = self.params[p][which] * normed[a:b]
        return out

    def _project(self, x: torch.Tensor, groups, name: str) -> torch.Tensor:
        """Shared linear over all N tokens once, plus each group's LoRA: (N, d_in) -> (N, d_out)."""
        shared = self.params[groups[0][0]]["shared"][name]
        y = F.linear(x, shared.weight, shared.bias)
        for p, a, b in groups:
            params = self.params[p]
            assert params["shared"][name] is shared, f"position {p} does not share {name} with {groups[0][0]}"
            lora = params["lora"][name]
            if lora is not None:
                y[a:b] = y[a:b] + F.linear(F.linear(x[a:b], lora[0]), lora[1])
        return y

    def _layer(self, x, positions, segs, bounds, cos, sin) -> torch.Tensor:
        groups = self._groups(positions, bounds)
        n, e = x.shape[0], self.cfg.head_dim
        residual = x
        h = self._norm(x, groups, "input_norm")
        q = self._project(h, groups, "q_proj").view(n, -1, e).transpose(0, 1)[None]  # (1, H, N, e)
        k = self._project(h, groups, "k_proj").view(n, -1, e).transpose(0, 1)[None]  # (1, Hkv, N, e)
        v = self._project(h, groups, "v_proj").view(n, -1, e).transpose(0, 1)[None]
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        outs = []
        for i, seg in enumerate(segs):
            a, b = bounds[i], bounds[i + 1]
            attn = self.params[positions[i]]["attn"]
            keys, values = seg.cache.update(k[:, :, a:b], v[:, :, a:b], positions[i])
            mask = None if b - a == 1 else causal_mask(b - a, keys.shape[2], x.dtype, x.device)
            out, _ = self.attention(attn, q[:, :, a:b], keys, values, mask, dropout=0.0, scaling=attn.scaling)
            outs.append(out.reshape(b - a, -1))  # (m, H*e)
        h = self._project(torch.cat(outs, dim=0), groups, "o_proj")
        x = residual + h
        residual = x
        h = self._norm(x, groups, "post_norm")
        h = self.act(self._project(h, groups, "gate_proj")) * self._project(h, groups, "up_proj")
        return residual + self._project(h, groups, "down_proj")


# --- per-request state ------------------------------------------------------------------------------
@dataclass
class _Token:
    """The token a request is computing now (one ``AdaptiveDecoder.step`` spread over engine steps)."""

    token_id: int
    position: int
    started_s: float
    loop: int = 0  # loops done
    hidden: torch.Tensor | None = None  # (1, d) residual stream after ``loop`` loops
    entering: torch.Tensor | None = None  # (1, d) stream entering the last loop
    rows: list[WaitingToken] = field(default_factory=list)  # "sync" catch-up rows riding along this loop
    done_rows: list[WaitingToken] = field(default_factory=list)  # rows that reached the last loop in it
    caught_up: set = field(default_factory=set)
    loops: list = field(default_factory=list)  # LoopSignal per loop
    flops: dict = field(default_factory=dict)
    logits: torch.Tensor | None = None  # probe / exit logits after the current loop
    probs: torch.Tensor | None = None
    halting: float | None = None
    router_logit: float | None = None  # expert-choice: the next recursion's router logit
    planned: int | None = None  # token-choice: the depth the router chose at entry
    inspected: float = 0.0  # FLOPs of probes run only to show the candidates (``inspect``)
    stop: bool = False
    reason: str = ""


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
        self.token: _Token | None = None
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
        s = request.sampling
        settings = {**policy.describe(), "kv_mode": request.kv_mode, "max_loops": self.dec.max_loops,
                    "max_new_tokens": request.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p,
                    "repetition_penalty": s.repetition_penalty, "seed": s.seed, "stop": list(request.stop),
                    "inspect": request.inspect}
        self.trace = GenerationTrace(prompt=request.prompt, prompt_tokens=len(request.prompt_ids),
                                     settings=settings, model=model_desc)
        self.trace.prefill = {"tokens": len(self.to_prefill), "flops": 0.0, "wall_ms": 0.0}

    @property
    def prefilling(self) -> bool:
        return self.chunk is not None or self.prefilled < len(self.to_prefill)

    @property
    def busy(self) -> bool:
        """Mid-way through a token or a prompt chunk (in lockstep strategies this holds the barrier)."""
        return self.chunk is not None or self.token is not None


# --- the scheduler --------------------------------------------------------------------------------
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
        self.queue: deque[RequestState] = deque()
        self.running: list[RequestState] = []
        self.steps = 0

    def add(self, state: RequestState) -> None:
        if len(self.queue) >= self.max_queue:
            raise EngineFullError(f"the queue is full ({self.max_queue} requests waiting); retry later")
        self.queue.append(state)

    def has_work(self) -> bool:
        return bool(self.queue or self.running)

    def schedule(self) -> tuple[SchedulerOutput, list[tuple[RequestState, str, int]]]:
        """Admit, then pick at most one item per running request. Returns the decision and, for the
        runner, ``(state, action, chunk size)``: action "continue" (next loop of what is in flight),
        "new_token" (the request's next token enters) or "new_chunk" (a prompt chunk enters)."""
        admitted = []
        can_admit = self.strategy != "static" or not self.running
        lockstep = self.strategy in LOCKSTEP_STRATEGIES
        barrier_open = not any(s.busy for s in self.running)
        if lockstep and not barrier_open:
            can_admit = False  # join at iteration boundaries only
        while can_admit and self.queue and len(self.running) < self.max_requests:
            state = self.queue.popleft()
            self.running.append(state)
            admitted.append(state.id)
        work: list[tuple[RequestState, str, int]] = []
        budget = self.max_batch_tokens
        for state in self.running:  # tokens in flight first: they never wait for room
            if state.busy:
                work.append((state, "continue", 0))
                budget -= len(state.chunk.ids) if state.chunk else 1 + _rows_next(state)
            elif not state.prefilling and (not lockstep or barrier_open):
                work.append((state, "new_token", 0))
                budget -= 1
        for state in self.running:  # prompt chunks fill what is left
            if not state.busy and state.prefilling and budget > 0 and (not lockstep or barrier_open):
                size = min(self.prefill_chunk, len(state.to_prefill) - state.prefilled, budget)
                work.append((state, "new_chunk", size))
                budget -= size
        scheduled = {s.id for s, _, _ in work}
        out = SchedulerOutput(step=self.steps, items=[], admitted=admitted,
                              idle=[s.id for s in self.running if s.id not in scheduled], queued=len(self.queue))
        self.steps += 1
        return out, work


def _rows_next(state: RequestState) -> int:
    """"sync" catch-up rows that ride along the request's next loop."""
    if state.token is None or state.dec.kv_mode != "sync":
        return 0
    return sum(1 for w in state.dec.waiting if w.depth == state.token.loop)


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
                 model_name: str | None = None, keep_log: bool = True, keep_results: bool = True):
        model = as_recursive(model)
        if dtype is not None:
            model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cfg = model.config
        self.strategy = strategy
        self.scheduler = Scheduler(strategy, max_requests, max_batch_tokens, prefill_chunk, max_queue)
        self.runner = BlockRunner(model)
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
        self._validate(request)
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
        self.scheduler.add(state)
        self._states[request.request_id] = state
        return request.request_id

    def _validate(self, r: Request) -> None:
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
        if state in self.scheduler.queue:
            self.scheduler.queue.remove(state)
        self._finish(state, "cancelled")
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @property
    def pending(self) -> int:
        """Requests queued or running."""
        return len(self.scheduler.queue) + len(self.scheduler.running)

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
        decision, work = self.scheduler.schedule()
        if not work:
            return None
        emitted = self._run(work, decision)
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

    def _run(self, work: list[tuple[RequestState, str, int]], decision: SchedulerOutput) -> list[RequestState]:
        """Everything between the decision and sampling; returns the states whose token exited."""
        now = self.now()
        cfg, items = self.cfg, decision.items
        entering: list[tuple[RequestState, Segment]] = []  # embed + prelude
        for state, action, size in work:
            if action == "new_token":
                state.token = _Token(token_id=state.ids[-1], position=state.dec.length, started_s=now)
                state.dec.length += 1
                entering.append((state, self._segment(state, [state.token.token_id], [state.token.position],
                                                      cfg.prelude_positions)))
            elif action == "new_chunk":
                if state.prefill_started_s is None:
                    state.prefill_started_s = now
                start = state.prefilled
                ids = state.to_prefill[start:start + size]
                state.chunk = _Chunk(ids=ids, start=state.dec.length)
                state.prefilled += size
                entering.append((state, self._segment(state, ids, list(range(state.chunk.start,
                                                                               state.chunk.start + size)),
                                                      cfg.prelude_positions)))
            items.append(ScheduledItem(state.id, "prefill" if state.chunk else "decode", 0, 0))
        if entering:
            outs = self.runner.run([seg for _, seg in entering])
            for (state, _), h in zip(entering, outs):
                if state.chunk is not None and state.chunk.loop == 0:
                    state.chunk.hidden = h
                else:
                    state.token.hidden = h
                    add_into(state.token.flops, self.layer_costs(cfg.prelude_positions, state.token.position + 1))
                    if state.dec.policy.needs_router and cfg.router_type == "token":  # depth chosen up front
                        state.token.planned = int(self.model.token_router.depth(h[-1]))
                        add_into(state.token.flops, {"decision": state.dec.costs.router(cfg.num_loops)})
        # ONE call of the shared block for every item, whatever its loop
        segments = [self._loop_segment(state) for state, _, _ in work]
        for item, (state, _, _), seg in zip(items, work, segments):
            item.loop = (state.chunk.loop if state.chunk else state.token.loop) + 1
            item.tokens = seg.hidden.shape[0]
        outs = self.runner.run(segments)
        coda: list[tuple[RequestState, Segment]] = []  # finished chunks, "sync" rows that reached the end
        deciding: list[RequestState] = []
        for (state, _, _), h in zip(work, outs):
            if state.chunk is not None:
                state.chunk.loop += 1
                state.chunk.hidden = h
                if state.chunk.loop == cfg.num_loops:
                    positions = list(range(state.chunk.start, state.chunk.start + len(state.chunk.ids)))
                    coda.append((state, Segment(h, positions, cfg.coda_positions, state.dec.cache)))
            else:
                seg = self._after_loop(state, h)
                if seg is not None:
                    coda.append((state, seg))
                deciding.append(state)
        finals = self.runner.run([seg for _, seg in coda]) if coda and cfg.num_coda else [seg.hidden for _, seg in coda]
        for (state, _), final in zip(coda, finals):
            if state.chunk is not None:
                self._finish_chunk(state)
            else:
                self._calibrate(state, final)
        exited = self._decide(deciding)
        for item, (state, _, _) in zip(items, work):
            item.head = state in exited
        return exited

    # --- pieces of the step ----------------------------------------------------------------------
    def _segment(self, state: RequestState, ids: list[int], positions: list[int], layers) -> Segment:
        hidden = self.model.model.embed_tokens(torch.tensor(ids, device=self.device))  # (m, d)
        return Segment(hidden, positions, layers, state.dec.cache)

    def _loop_segment(self, state: RequestState) -> Segment:
        """The item's next loop: a prompt chunk, or the current token plus ("sync") the waiting
        tokens that lack this loop, in position order (``AdaptiveDecoder._run_loop``)."""
        if state.chunk is not None:
            c = state.chunk
            return Segment(c.hidden, list(range(c.start, c.start + len(c.ids))),
                           self.cfg.loop_positions(c.loop + 1), state.dec.cache)
        tok = state.token
        loop = tok.loop + 1
        tok.entering = tok.hidden
        tok.rows = [w for w in state.dec.waiting if w.depth == loop - 1] if state.dec.kv_mode == "sync" else []
        hidden = torch.cat([w.hidden.reshape(1, -1) for w in tok.rows] + [tok.hidden], dim=0)
        positions = [w.position for w in tok.rows] + [tok.position]
        return Segment(hidden, positions, self.cfg.loop_positions(loop), state.dec.cache)

    def _after_loop(self, state: RequestState, h: torch.Tensor) -> Segment | None:
        """Bookkeeping after a decode loop (``AdaptiveDecoder._advance``); returns the coda segment
        of "sync" rows that reached the last loop (their coda KV is recomputed from the full state)."""
        cfg, tok, dec = self.cfg, state.token, state.dec
        tok.loop += 1
        loop = tok.loop
        tok.hidden = h[-1:]
        add_into(tok.flops, self.layer_costs(cfg.loop_positions(loop), tok.position + 1))
        if not tok.rows:
            return None
        for i, w in enumerate(tok.rows):
            w.hidden, w.depth = h[i:i + 1][None], loop
            tok.caught_up.add(w.position)
            add_into(tok.flops, self.layer_costs(cfg.loop_positions(loop), w.position + 1), key="catchup")
            if loop == cfg.num_loops:
                add_into(tok.flops, self.layer_costs(cfg.coda_positions, w.position + 1), key="catchup")
        done = [w for w in tok.rows if w.depth == cfg.num_loops]
        dec.waiting = [w for w in dec.waiting if w.depth < cfg.num_loops]
        tok.rows = []
        tok.done_rows = done
        if not done:
            return None
        if cfg.num_coda:
            for p in cfg.coda_positions:
                dec.cache.layers[p].crop(-len(done))
        return Segment(torch.cat([w.hidden.reshape(1, -1) for w in done], dim=0), [w.position for w in done],
                       cfg.coda_positions, dec.cache)

    def _calibrate(self, state: RequestState, final: torch.Tensor) -> None:
        """FREE's adaptive threshold: caught-up tokens that reached full depth label calibration pairs
        (their exit prediction vs the full-depth one), as ``AdaptiveDecoder._advance`` does."""
        dec, done = state.dec, state.token.done_rows
        if not getattr(dec.policy, "wants_calibration", False):
            return
        deep = self.model.lm_head(self.model.model.norm(final)).argmax(-1).tolist()  # final: (len(done), d)
        dec.calibration_flops += len(done) * dec.costs.head()
        for w, a in zip(done, deep):
            if w.exit_signal is not None:
                dec.policy.calibrate(w.exit_signal, w.exit_argmax == a)

    def _finish_chunk(self, state: RequestState) -> None:
        c = state.chunk
        state.trace.prefill["flops"] += sum(self._full_token(c.start + i + 1) - state.dec.costs.head()
                                            for i in range(len(c.ids)))
        state.dec.length += len(c.ids)
        state.chunk = None
        if not state.prefilling:
            state.trace.prefill["wall_ms"] = 1000 * (self.now() - state.prefill_started_s)

    def _decide(self, deciding: list[RequestState]) -> list[RequestState]:
        """Exit decisions after this step's loop (``AdaptiveDecoder.step``): halting heads and cosines
        first, then coda + norm + head for probes (confidence policies) and exits, batched."""
        cfg = self.cfg
        headed: list[RequestState] = []
        for state in deciding:
            tok, policy = state.token, state.dec.policy
            tok.logits = tok.probs = tok.halting = tok.router_logit = None
            if policy.needs_router and cfg.router_type == "expert" and tok.loop < state.dec.max_loops:
                tok.router_logit = float(self.model.routers.logit(tok.loop + 1, tok.hidden[-1]))
                add_into(tok.flops, {"decision": state.dec.costs.router()})
            if policy.needs_halting and tok.loop < cfg.num_loops:
                tok.halting = float(torch.sigmoid(self.model.halting_logit(tok.loop, tok.hidden[None])[0, -1]))
                add_into(tok.flops, {"decision": state.dec.costs.halting(cfg.halting_hidden)})
            if policy.decision_cost == "cosine" and tok.loop < state.dec.max_loops:
                add_into(tok.flops, {"decision": state.dec.costs.cosine()})
            if policy.needs_logits:
                headed.append(state)
            else:
                tok.stop, tok.reason = policy.decide(self._observation(state))
                if tok.stop or state.dec.inspect:
                    headed.append(state)
        if headed:
            segs = [Segment(s.token.hidden, [s.token.position], cfg.coda_positions, s.dec.cache) for s in headed]
            hidden = torch.cat(self.runner.run(segs), dim=0)  # (n, d)
            t0 = time.perf_counter()
            logits = self.model.lm_head(self.model.model.norm(hidden))  # (n, V)
            self.head_s += time.perf_counter() - t0
            for i, state in enumerate(headed):
                state.token.logits = logits[i]
        exited = []
        for state in deciding:
            tok, dec = state.token, state.dec
            probe_cost = sum(self.layer_costs(cfg.coda_positions, tok.position + 1).values()) + dec.costs.head()
            if dec.policy.needs_logits:
                tok.probs = torch.softmax(tok.logits.float(), -1)
                add_into(tok.flops, {"decision": probe_cost + dec.costs.softmax_signals()})
                tok.stop, tok.reason = dec.policy.decide(self._observation(state))
            elif dec.inspect:  # candidates to show; the policy decided without them
                tok.probs = torch.softmax(tok.logits.float(), -1)
                tok.inspected += probe_cost
            tok.loops.append(loop_signal(tok.loop, dec.policy, self._observation(state), tok.probs,
                                          dec.top_tokens))
            if tok.stop:
                exited.append(state)
            elif tok.logits is not None and cfg.num_coda:
                for p in cfg.coda_positions:  # the probe's coda KV: undone, the token goes on
                    dec.cache.layers[p].crop(-1)
        return exited

    def _full_token(self, context: int) -> float:
        """``CostModel.full_token`` (all positions + head), from the cached affine layer costs."""
        return sum(self.layer_costs(range(self.cfg.num_hidden_layers), context).values()) + self.layer_costs.costs.head()

    @staticmethod
    def _observation(state: RequestState) -> Observation:
        tok = state.token
        obs = Observation(tok.loop, state.dec.max_loops, tok.hidden[0], tok.entering[0], tok.probs)
        obs.halting, obs.router_logit, obs.planned_depth = tok.halting, tok.router_logit, tok.planned
        return obs

    # --- postprocess -------------------------------------------------------------------------------
    def _emit(self, state: RequestState) -> None:
        """Sample the exited token, apply the stop rules, store deeper KV, trace and notify."""
        cfg, tok, dec = self.cfg, state.token, state.dec
        ctx = tok.position + 1
        if dec.policy.needs_logits:  # the last probe is the emitted path: move it out of "decision"
            tok.flops["decision"] -= sum(self.layer_costs(cfg.coda_positions, ctx).values()) + dec.costs.head()
        add_into(tok.flops, self.layer_costs(cfg.coda_positions, ctx))
        add_into(tok.flops, {"head": dec.costs.head()})
        cos, sin = self.model.model.rope(tok.hidden[None], torch.tensor([[tok.position]], device=self.device))
        dec.store_deeper_kv(tok.hidden[None], tok.position, tok.loop, (cos, sin), tok.flops)
        if dec.waiting and dec.waiting[-1].position == tok.position:  # FREE calibration needs these
            dec.waiting[-1].exit_signal = tok.loops[-1].signal
            dec.waiting[-1].exit_argmax = int(tok.logits.argmax())
        if dec.calibration_flops:
            add_into(tok.flops, {"decision": dec.calibration_flops})
            dec.calibration_flops = 0.0
        token = choose_token(tok.logits.cpu(), state.ids, state.processors, state.request.sampling.temperature,
                        state.generator)
        now = self.now()
        state.token = None
        if token in state.eos_ids:
            self._finish(state, "eos")
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
        kv, kv_full = dec.kv_entries()
        step = TokenStep(index=len(state.generated) - 1, position=dec.length - 1, token_id=token, text=piece,
                         depth=tok.loop, max_depth=dec.max_loops, exit_reason=tok.reason,
                         signal_name=dec.policy.signal_name, threshold=dec.policy.threshold, loops=tok.loops,
                         flops=tok.flops, flops_full=self._full_token(dec.length), kv_entries=kv,
                         kv_entries_full=kv_full, caught_up=len(tok.caught_up),
                         wall_ms=1000 * (now - tok.started_s), inspected_flops=tok.inspected)
        state.trace.steps.append(step)
        if state.request.on_event:
            state.request.on_event(RequestEvent(state.id, step=step))
        if any(s in state.text_so_far for s in state.request.stop):
            self._finish(state, "stop")
        elif len(state.generated) >= state.request.max_new_tokens:
            self._finish(state, "length")

    def _finish(self, state: RequestState, reason: str) -> None:
        if state.finish_reason is not None:
            return
        state.finish_reason = reason
        state.trace.finish_reason = reason
        if state in self.scheduler.running:
            self.scheduler.running.remove(state)
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



class LayerCosts:
    """``CostModel.layers(positions, context)`` without recomputing it per token: every component
    is affine in the context length (only ``attn_context`` grows), so two evaluations give all."""

    def __init__(self, costs: CostModel):
        self.costs = costs
        self._cache: dict[tuple, tuple[dict, dict]] = {}

    def __call__(self, positions, context: int) -> dict[str, float]:
        key = tuple(positions)
        if key not in self._cache:
            a, b = self.costs.layers(positions, 0), self.costs.layers(positions, 1)
            self._cache[key] = (a, {k: b[k] - a[k] for k in a})
        a, slope = self._cache[key]
        return {k: a[k] + slope[k] * context for k in a}


# --- a background thread for servers and dashboards -------------------------------------------------
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
            self.engine._validate(request)
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
            self.engine._finish(state, "error")
            return
        if request.on_event:
            request.on_event(RequestEvent(request.request_id, finished=True, finish_reason="error"))

    def _fail_everything(self) -> None:
        """Fail every request the worker holds (inbox, queue, running). Holds the lock."""
        inbox, self._inbox = list(self._inbox), deque()
        self._cancels.clear()
        for state in [*self.engine.scheduler.queue, *self.engine.scheduler.running]:
            self._fail(state.request, state)
        self.engine.scheduler.queue.clear()
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


# --- workloads: run one, measure it, compare strategies ---------------------------------------------
@dataclass
class WorkloadItem:
    """One request of a workload: its prompt, output budget and arrival time (seconds from start)."""

    prompt_ids: list[int]
    max_new_tokens: int
    arrival_s: float = 0.0
    prompt: str = ""


@dataclass
class WorkloadResult:
    """One strategy's run of a workload: per-request results, the schedule log, the metrics."""

    strategy: str
    metrics: dict
    results: list[RequestResult]
    arrivals: list[float]
    schedule: list[StepRecord]

    def to_dict(self) -> dict:
        """Plain JSON data (the dashboard's Batching lab draws ``schedule`` as a Gantt chart)."""
        return {
            "strategy": self.strategy,
            "metrics": self.metrics,
            "schedule": [asdict(r) for r in self.schedule],
            "requests": [{"request_id": r.request_id, "arrival_s": a, "first_token_s": r.first_token_s,
                          "finished_s": r.finished_s, "finish_reason": r.finish_reason, "token_ids": r.token_ids,
                          "depths": [s.depth for s in r.trace.steps], "text": r.text}
                         for r, a in zip(self.results, self.arrivals)],
        }


def run_workload(model, items: list[WorkloadItem], strategy: str = "cdb", tokenizer=None,
                 policy_factory: Callable[[], DepthPolicy | None] = lambda: None, kv_mode: str = "sync",
                 max_requests: int = 16, max_batch_tokens: int = 512, prefill_chunk: int = 64,
                 device=None, dtype=None, sampling: Sampling | None = None) -> WorkloadResult:
    """Run ``items`` through a fresh engine in real time (each request submitted at its arrival time).

    ``policy_factory`` makes each request's depth policy (ignored by the full-depth strategies).
    Request ``i`` gets id ``"r{i}"``.
    """
    engine = BatchEngine(model, tokenizer, strategy=strategy, max_requests=max_requests,
                         max_batch_tokens=max_batch_tokens, prefill_chunk=prefill_chunk,
                         max_queue=max(len(items), 1), device=device, dtype=dtype)
    order = sorted(range(len(items)), key=lambda i: items[i].arrival_s)
    next_i = 0
    engine.reset_clock()
    while next_i < len(order) or engine.has_work():
        now = engine.now()
        while next_i < len(order) and items[order[next_i]].arrival_s <= now:
            it = items[order[next_i]]
            engine.submit(Request(prompt_ids=list(it.prompt_ids), max_new_tokens=it.max_new_tokens,
                                  policy=policy_factory(), kv_mode=kv_mode, sampling=sampling or Sampling(),
                                  request_id=f"r{order[next_i]}", prompt=it.prompt))
            next_i += 1
        if engine.has_work():
            engine.step()
        elif next_i < len(order):
            time.sleep(max(0.0, items[order[next_i]].arrival_s - engine.now()))
    results = [engine.results[f"r{i}"] for i in range(len(items))]
    arrivals = [it.arrival_s for it in items]
    return WorkloadResult(strategy, workload_metrics(engine, results, arrivals), results, arrivals, engine.log)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q))


def workload_metrics(engine: BatchEngine, results: list[RequestResult], arrivals: list[float]) -> dict:
    """Throughput, latency percentiles, depth, block calls, occupancy and overhead of one run."""
    tokens = sum(len(r.token_ids) for r in results)
    start = min(arrivals) if arrivals else 0.0
    makespan = max((r.finished_s for r in results), default=0.0) - start
    ttft = [r.first_token_s - a for r, a in zip(results, arrivals) if r.first_token_s is not None]
    tpot = [(r.token_times_s[-1] - r.token_times_s[0]) / (len(r.token_times_s) - 1)
            for r in results if len(r.token_times_s) > 1]
    depths = [s.depth for r in results for s in r.trace.steps]
    calls = engine.log
    items_per_call = [len(rec.items) for rec in calls]
    return {
        "strategy": engine.strategy,
        "requests": len(results),
        "tokens": tokens,
        "makespan_s": makespan,
        "tokens_per_s": tokens / makespan if makespan > 0 else 0.0,
        "requests_per_s": len(results) / makespan if makespan > 0 else 0.0,
        "ttft_p50_ms": 1000 * _pct(ttft, 0.5) if ttft else None,
        "ttft_p95_ms": 1000 * _pct(ttft, 0.95) if ttft else None,
        "tpot_p50_ms": 1000 * _pct(tpot, 0.5) if tpot else None,
        "tpot_p95_ms": 1000 * _pct(tpot, 0.95) if tpot else None,
        "avg_depth": sum(depths) / len(depths) if depths else 0.0,
        "block_calls": engine.block_calls,
        "mean_items_per_call": sum(items_per_call) / len(items_per_call) if items_per_call else 0.0,
        "occupancy": (sum(items_per_call) / len(items_per_call) / engine.scheduler.max_requests) if items_per_call else 0.0,
        "mean_tokens_per_call": sum(r.batch_tokens for r in calls) / len(calls) if calls else 0.0,
        "step_ms_mean": 1000 * engine.step_s / engine.block_calls if engine.block_calls else 0.0,
        "overhead_share": engine.overhead_s / engine.step_s if engine.step_s else 0.0,
        "finish_reasons": {k: sum(r.finish_reason == k for r in results) for k in ("eos", "length", "stop", "cancelled", "error")},
    }


def compare_strategies(model, items: list[WorkloadItem], strategies: Sequence[str] = STRATEGIES,
                       **kwargs) -> dict[str, WorkloadResult]:
    """Run the same workload under each strategy (same engine code, same run) and add ratios to
    static batching and, for adaptive strategies, greedy agreement with a full-depth strategy."""
    runs = {s: run_workload(model, items, strategy=s, **kwargs) for s in strategies}
    base = runs.get("static")
    full = runs.get("csb") or runs.get("static")
    for name, run in runs.items():
        m = run.metrics
        if base is not None and base.metrics["tokens_per_s"]:
            m["speedup_vs_static"] = m["tokens_per_s"] / base.metrics["tokens_per_s"]
        if full is not None:
            same = total = 0
            for a, b in zip(run.results, full.results):
                n = min(len(a.token_ids), len(b.token_ids))
                same += sum(x == y for x, y in zip(a.token_ids[:n], b.token_ids[:n]))
                total += n
            m["agreement_with_full_depth"] = same / total if total else None
    return runs


def gantt_cells(schedule: Sequence[StepRecord] | Sequence[dict]) -> list[dict]:
    """The schedule log as flat Gantt cells, one per (request, step) where the request was in flight.

    Each cell: ``request_id``, ``step``, ``start_s``, ``end_s``, ``state`` ("decode" | "prefill" |
    "idle"), ``loop`` (None when idle), ``tokens``, ``head`` (the token exited in this step). Rows are
    requests, x is ``step`` (or time), colour is ``loop``; idle cells show the synchronisation waits.
    """
    cells = []
    for rec in schedule:
        rec = asdict(rec) if isinstance(rec, StepRecord) else rec
        start, end = rec["start_s"], rec["start_s"] + rec["wall_ms"] / 1000
        for item in rec["items"]:
            cells.append({"request_id": item["request_id"], "step": rec["step"], "start_s": start, "end_s": end,
                          "state": item["kind"], "loop": item["loop"], "tokens": item["tokens"], "head": item["head"]})
        for rid in rec["idle"]:
            cells.append({"request_id": rid, "step": rec["step"], "start_s": start, "end_s": end, "state": "idle",
                          "loop": None, "tokens": 0, "head": False})
    return cells
