"""The adaptive decoder: one sequence's cache and the loop-by-loop steps of each new token.

``AdaptiveDecoder`` prefills at full depth, then runs each new token loop by loop until its policy
stops it. Solo generation (``model.inference.generation``) and the batching engine (``model.serving``) drive
the same public steps.

KV for tokens that stop early (``kv_mode``):

- ``"copy"``: CALM's state copying. The exited hidden state stands in for the deeper loops: its
  keys and values are computed from it at every skipped position (approximate, cheap).
- ``"sync"``: FREE's synchronised parallel decoding. Exited tokens wait in a stack; when a later
  token runs loop r, the waiting tokens that lack loop r run it too, in the same batched call, at
  their own positions. The cache then equals a full-depth forward pass over the same tokens.
- ``"recursion"`` (Mixture-of-Recursions): a token that stops at depth r writes KV only into loops
  <= r; at loop r a query sees only the tokens that reached r. Nothing is copied or caught up.
- ``"share"`` (MoR recursive KV sharing): loops > 1 read loop 1's KV of all tokens and store none.

A sequence keeps this invariant: at every layer position the tokens holding KV form a prefix, so
waiting tokens are always a contiguous suffix and a plain causal mask is exact.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from model.inference.compute import CostModel, LayerCosts, add_into
from model.errors import EngineInputError
from model.definition.modeling import RecursiveForCausalLM, causal_mask
from model.inference.policies import DepthPolicy, Observation
from model.definition.routers import RecursionShareCache, share_slots
from model.inference.trace import LoopSignal

# The one list of KV modes. Both engines run every mode: solo decoding (``AdaptiveDecoder``, ``stream``) and
# the batching engine (``model.serving.BatchEngine``, the server, the dashboard's shared engine).
KV_MODES = ("copy", "sync", "recursion", "share")
KV_MODE_SAVINGS = {  # what each mode saves when a token exits early (the dashboard's counters say it)
    "copy": "CALM: the skipped loops' KV is copied from the exit state, so those loops are never computed: "
            "block FLOPs fall, at the price of approximate KV for later tokens.",
    "sync": "FREE: the skipped loops still run later, batched into the next token's call, so FLOPs are not "
            "saved; what sync saves is latency (a token is out after its exit loop) and the KV stays exact.",
    "recursion": "MoR: an exited token stores no KV in deeper loops: FLOPs and KV memory saved.",
    "share": "MoR: deeper loops read loop 1's KV and store none: FLOPs and KV memory saved.",
}
TOP_K_SHOWN = 5


@dataclass
class WaitingToken:
    """An exited token whose deeper loops are not computed yet ("sync" mode)."""

    position: int
    hidden: torch.Tensor  # (1, 1, d) residual stream after ``depth`` loops
    depth: int
    exit_signal: float | None = None  # the policy's signal when it left (FREE calibration)
    exit_argmax: int | None = None  # its emitted-distribution argmax (FREE calibration)


@dataclass
class Segment:
    """Consecutive tokens of one sequence that run the same layer positions in one call."""

    hidden: torch.Tensor  # (m, d) residual stream
    token_positions: list[int]  # (m,) absolute positions of the tokens (RoPE, causal mask)
    layer_positions: Sequence[int]  # unrolled layer positions to run, in order
    cache: DynamicCache  # the sequence's cache (written at every layer position run)


@dataclass
class TokenInFlight:
    """The token a decoder is computing: what its loops so far produced and cost."""

    token_id: int
    position: int
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
    time_ms: dict = field(default_factory=dict)  # measured wall-clock by component (trace.TIME_COMPONENTS)

    def timed(self, component: str, started: float) -> None:
        """Add the milliseconds since ``started`` (``time.perf_counter()``) to ``component``."""
        self.time_ms[component] = self.time_ms.get(component, 0.0) + 1000 * (time.perf_counter() - started)


@dataclass
class StepResult:
    """What solo ``AdaptiveDecoder.step`` returns for one token."""

    logits: torch.Tensor  # (V,) exit logits
    depth: int
    reason: str
    loops: list[LoopSignal]
    flops: dict[str, float]
    inspected_flops: float
    caught_up: int  # waiting tokens that caught up alongside it
    time_ms: dict[str, float]  # measured wall-clock by component

    @classmethod
    def of(cls, tok: TokenInFlight) -> "StepResult":
        return cls(tok.logits, tok.loop, tok.reason, tok.loops, tok.flops, tok.inspected, len(tok.caught_up),
                   tok.time_ms)


def as_recursive(model: PreTrainedModel) -> RecursiveForCausalLM:
    """A recursive model as is; a plain Llama model as a 1-loop recursive model (exactly the same)."""
    if isinstance(model, RecursiveForCausalLM):
        return model
    from model.conversion.recursify import recursify

    return recursify(model, num_loops=1, base_name=getattr(model.config, "_name_or_path", None))


class AdaptiveDecoder:
    """One sequence: its KV cache, its waiting tokens ("sync") and the steps of one token.

    The steps are public, so that the solo ``step`` and the batching engine's model runner
    (``model.serving``) run the very same code: ``enter`` a token, run ``next_loop`` (the token plus
    its catch-up rows), ``after_loop``, ``calibrate`` caught-up rows, ``observe`` (signals without
    the head), ``decide`` (with the head's logits when asked for), ``finish_token``. A step hands
    out ``Segment``s; whoever runs them (``run`` here, ``BlockRunner`` there) passes the outputs back.
    """

    def __init__(self, model: RecursiveForCausalLM, policy: DepthPolicy, kv_mode: str = "sync",
                 max_loops: int | None = None, inspect: bool = False, tokenizer=None):
        if kv_mode not in KV_MODES:
            raise EngineInputError(f"kv_mode must be one of {KV_MODES}, got {kv_mode!r}")
        if policy.needs_router and model.config.router_type is None:
            raise EngineInputError("the router policy needs a Mixture-of-Recursions model with trained routers "
                                   "(python -m model.training routers); pick another policy")
        if policy.needs_halting and not model.has_halting_heads:
            raise EngineInputError("the halting policy needs a model trained with halting heads "
                                   "(python -m model.training exits); pick another policy")
        self.model = model
        self.inner = model.model
        self.cfg = model.config
        self.policy = policy
        self.kv_mode = kv_mode
        self.max_loops = self.cfg.num_loops if max_loops is None else max_loops
        if not 1 <= self.max_loops <= self.cfg.num_loops:
            raise EngineInputError(f"max_loops must be in 1..{self.cfg.num_loops}, got {max_loops}")
        self.inspect = inspect
        self.tokenizer = tokenizer  # only to show the top-5 candidates as text
        self.costs = CostModel.from_model(model)
        self.layer_costs = LayerCosts(self.costs)
        self.cache = RecursionShareCache(share_slots(self.cfg)) if kv_mode == "share" else DynamicCache()
        self.length = 0  # tokens fed so far == next position
        self.waiting: list[WaitingToken] = []
        self.token: TokenInFlight | None = None
        self.calibration_flops = 0.0  # FREE: heads run on caught-up tokens to label calibration pairs
        self.runner = None  # a ``BlockRunner`` that runs the segments instead of the library's layers (compiled)
        if hasattr(policy, "begin_sequence"):
            policy.begin_sequence()

    @property
    def device(self) -> torch.device:
        return self.inner.embed_tokens.weight.device

    # --- prefill ------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, ids: list[int]) -> float:
        """Run ``ids`` at full depth into the cache; returns the FLOPs spent."""
        if not ids:
            return 0.0
        x = torch.tensor([ids], device=self.device)
        self.inner(input_ids=x, past_key_values=self.cache, use_cache=True)
        flops = sum(self.costs.full_token(self.length + i + 1) - self.costs.head() for i in range(len(ids)))
        self.length += len(ids)
        return flops

    # --- one token, solo ------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, token_id: int) -> StepResult:
        """Feed one token; run loops until the policy stops it; its exit logits, depth and record."""
        t = time.perf_counter()
        self.entered(self.run(self.enter(token_id)))
        tok = self.token
        while True:
            h = self.run(self.next_loop())
            tok.timed("block", t)
            t = time.perf_counter()
            coda = self.after_loop(h)
            if coda is not None:
                self.calibrate(self.run(coda))
                tok.timed("catchup", t)
                t = time.perf_counter()
            headed = self.observe()
            logits = self.head_logits(self.run(self.head_segment()))[-1] if headed else None
            stop = self.decide(logits)
            tok.timed(self.head_time_component(headed, stop), t)
            t = time.perf_counter()
            if stop:
                self.finish_token()
                tok.timed("kv", t)
                return StepResult.of(tok)

    def run(self, seg: Segment) -> torch.Tensor:
        """Run one segment through its layer positions with the library's decoder layers: (m, d)."""
        if not seg.layer_positions:
            return seg.hidden
        if self.runner is not None:
            return self.runner.run([seg])[0]
        x = seg.hidden[None]
        pos_ids = torch.tensor([seg.token_positions], device=self.device)
        mask = None
        if x.shape[1] > 1:
            past = self.cache.get_seq_length(seg.layer_positions[0])
            mask = causal_mask(x.shape[1], past + x.shape[1], x.dtype, x.device)
        return self.inner.run_positions(x, seg.layer_positions, self.inner.rope(x, pos_ids), mask, self.cache)[0]

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head over residual streams that ran the coda: (m, V)."""
        return self.model.lm_head(self.inner.norm(hidden))

    # --- the steps (public: the batching engine calls them too) ---------------------------------
    def enter(self, token_id: int) -> Segment:
        """A new token enters at the next position: its embedding, to run through the prelude."""
        self.token = TokenInFlight(token_id, self.length)
        self.length += 1
        hidden = self.inner.embed_tokens(torch.tensor([token_id], device=self.device))  # (1, d)
        return Segment(hidden, [self.token.position], self.cfg.prelude_positions, self.cache)

    def entered(self, h: torch.Tensor) -> None:
        """The prelude's output (1, d); a token-choice router fixes the depth here."""
        tok, cfg = self.token, self.cfg
        tok.hidden = h
        add_into(tok.flops, self.layer_costs(cfg.prelude_positions, tok.position + 1))
        if self.policy.needs_router and cfg.router_type == "token":  # depth chosen once, up front
            tok.planned = int(self.model.token_router.depth(h[-1]))
            add_into(tok.flops, {"decision": self.costs.router(cfg.num_loops)})

    def next_loop(self) -> Segment:
        """The token's next loop, with ("sync") the waiting tokens that lack it, in position order."""
        tok = self.token
        loop = tok.loop + 1
        tok.entering = tok.hidden
        tok.rows = [w for w in self.waiting if w.depth == loop - 1] if self.kv_mode == "sync" else []
        hidden = torch.cat([w.hidden.reshape(1, -1) for w in tok.rows] + [tok.hidden], dim=0)
        positions = [w.position for w in tok.rows] + [tok.position]
        return Segment(hidden, positions, self.cfg.loop_positions(loop), self.cache)

    def after_loop(self, h: torch.Tensor) -> Segment | None:
        """Take the loop's output (rows + token, (m, d)); returns the coda segment of catch-up rows
        that reached the last loop (their coda KV is recomputed from the full-depth state), if any."""
        cfg, tok = self.cfg, self.token
        tok.loop += 1
        loop = tok.loop
        tok.hidden = h[-1:]
        add_into(tok.flops, self.layer_costs(cfg.loop_positions(loop), tok.position + 1))
        if not tok.rows:
            return None
        for w in tok.rows:
            tok.caught_up.add(w.position)
            add_into(tok.flops, self.layer_costs(cfg.loop_positions(loop), w.position + 1), key="catchup")
            if loop == cfg.num_loops:
                add_into(tok.flops, self.layer_costs(cfg.coda_positions, w.position + 1), key="catchup")
        rows, tok.rows = tok.rows, []
        tok.done_rows = self._advanced(rows, h[: len(rows)], loop)
        return self._coda_of(tok.done_rows)

    def calibrate(self, final: torch.Tensor) -> None:
        """FREE's adaptive threshold: caught-up tokens that reached full depth (``final``: their
        coda output) label calibration pairs: their exit prediction vs the full-depth one."""
        self._label(self.token.done_rows, final)

    def observe(self) -> bool:
        """The loop's signals that need no LM head (router, halting head, cosine); a policy that
        needs no logits decides here. True when coda + head must run now (``head_segment``)."""
        tok, cfg, policy = self.token, self.cfg, self.policy
        tok.logits = tok.probs = tok.halting = tok.router_logit = None
        if policy.needs_router and cfg.router_type == "expert" and tok.loop < self.max_loops:
            tok.router_logit = float(self.model.routers.logit(tok.loop + 1, tok.hidden[-1]))
            add_into(tok.flops, {"decision": self.costs.decision("router")})
        if policy.needs_halting and tok.loop < cfg.num_loops:
            tok.halting = float(torch.sigmoid(self.model.halting_logit(tok.loop, tok.hidden[None])[0, -1]))
            add_into(tok.flops, {"decision": self.costs.decision("halting", halting_width=cfg.halting_hidden)})
        if policy.decision_cost == "cosine" and tok.loop < self.max_loops:
            add_into(tok.flops, {"decision": self.costs.decision("cosine")})
        if policy.needs_logits:
            return True
        tok.stop, tok.reason = policy.decide(self.observation())
        return tok.stop or self.inspect

    def head_segment(self) -> Segment:
        """The token's coda (it writes KV; ``decide`` undoes it if the token goes on)."""
        return Segment(self.token.hidden, [self.token.position], self.cfg.coda_positions, self.cache)

    def decide(self, logits: torch.Tensor | None) -> bool:
        """With the head's logits (V,) if ``observe`` asked for them: decide, record the loop's
        signals; True when the token exits now."""
        tok, cfg, policy = self.token, self.cfg, self.policy
        tok.logits = logits
        coda = sum(self.layer_costs(cfg.coda_positions, tok.position + 1).values())
        if policy.needs_logits:
            tok.probs = torch.softmax(logits.float(), -1)
            add_into(tok.flops, {"decision": self.costs.decision("softmax", probe_layers=coda)})
            tok.stop, tok.reason = policy.decide(self.observation())
        elif self.inspect:  # candidates to show; the policy decided without them
            tok.probs = torch.softmax(logits.float(), -1)
            tok.inspected += coda + self.costs.head()
        tok.loops.append(loop_signal(tok.loop, policy, self.observation(), tok.probs, self.top_tokens))
        if not tok.stop and logits is not None and cfg.num_coda:
            for p in cfg.coda_positions:  # the probe's coda KV: undone, the token goes on
                self.cache.layers[p].crop(-1)
        return tok.stop

    def head_time_component(self, headed: bool, stop: bool) -> str:
        """Where the wall-clock of ``observe`` + coda/head + ``decide`` goes (as the FLOP ledger counts it):
        an exit probe or a cheap signal is "decision"; the head of the token that exits is its emitted path
        ("head"); a head run only to show the per-loop candidates (``inspect``) is "inspect"."""
        if not headed:
            return "decision"
        if stop:
            return "head"
        return "decision" if self.policy.needs_logits else "inspect"

    def finish_token(self) -> TokenInFlight:
        """The exited token: its emitted path's cost, the KV of the loops it skipped, FREE's labels."""
        tok, cfg = self.token, self.cfg
        ctx = tok.position + 1
        if self.policy.needs_logits:  # the last probe is the emitted path: move it out of "decision"
            tok.flops["decision"] -= sum(self.layer_costs(cfg.coda_positions, ctx).values()) + self.costs.head()
        add_into(tok.flops, self.layer_costs(cfg.coda_positions, ctx))
        add_into(tok.flops, {"head": self.costs.head()})
        rope = self.inner.rope(tok.hidden[None], torch.tensor([[tok.position]], device=self.device))
        self.store_deeper_kv(tok.hidden[None], tok.position, tok.loop, rope, tok.flops)
        if self.waiting and self.waiting[-1].position == tok.position:  # FREE calibration needs these
            self.waiting[-1].exit_signal = tok.loops[-1].signal
            self.waiting[-1].exit_argmax = int(tok.logits.argmax())
        if self.calibration_flops:
            add_into(tok.flops, {"decision": self.calibration_flops})
            self.calibration_flops = 0.0
        self.token = None
        return tok

    def observation(self) -> Observation:
        tok = self.token
        obs = Observation(tok.loop, self.max_loops, tok.hidden[0], tok.entering[0], tok.probs)
        obs.halting, obs.router_logit, obs.planned_depth = tok.halting, tok.router_logit, tok.planned
        return obs

    # --- catch-up ("sync") ----------------------------------------------------------------------
    def _advanced(self, rows: list[WaitingToken], h: torch.Tensor, loop: int) -> list[WaitingToken]:
        """Waiting ``rows`` ran ``loop`` (outputs ``h``, (len(rows), d)); returns those now at full
        depth, whose coda KV (written from their exit state) is cropped for recomputation."""
        for i, w in enumerate(rows):
            w.hidden, w.depth = h[i:i + 1][None], loop
        done = [w for w in rows if w.depth == self.cfg.num_loops]
        self.waiting = [w for w in self.waiting if w.depth < self.cfg.num_loops]
        if done and self.cfg.num_coda:
            for p in self.cfg.coda_positions:
                self.cache.layers[p].crop(-len(done))
        return done

    def _coda_of(self, done: list[WaitingToken]) -> Segment | None:
        if not done:
            return None
        return Segment(torch.cat([w.hidden.reshape(1, -1) for w in done], dim=0), [w.position for w in done],
                       self.cfg.coda_positions, self.cache)

    def _label(self, done: list[WaitingToken], final: torch.Tensor) -> None:
        if not done or not getattr(self.policy, "wants_calibration", False):
            return
        deep = self.head_logits(final).argmax(-1).tolist()  # final: (len(done), d)
        self.calibration_flops += len(done) * self.costs.head()
        for w, a in zip(done, deep):
            if w.exit_signal is not None:
                self.policy.calibrate(w.exit_signal, w.exit_argmax == a)

    @torch.no_grad()
    def flush(self) -> int:
        """("sync") Compute the deeper loops of every waiting token now; returns how many there were.

        Afterwards the cache equals a full-depth forward pass over all fed tokens.
        """
        count = len(self.waiting)
        while self.waiting:
            # the shallowest waiting tokens are the latest ones; earlier tokens already hold their next loop
            depth = min(w.depth for w in self.waiting)
            rows = [w for w in self.waiting if w.depth == depth]
            seg = Segment(torch.cat([w.hidden.reshape(1, -1) for w in rows], dim=0), [w.position for w in rows],
                          self.cfg.loop_positions(depth + 1), self.cache)
            done = self._advanced(rows, self.run(seg), depth + 1)
            coda = self._coda_of(done)
            if coda is not None:
                self._label(done, self.run(coda))
        return count

    def store_deeper_kv(self, h: torch.Tensor, pos: int, depth: int, rope, flops: dict) -> None:
        """Give the loops this token skipped their KV: now (copy) or later (sync)."""
        if depth >= self.cfg.num_loops or self.kv_mode in ("recursion", "share"):
            return  # routed KV modes: deeper loops simply hold no entry for this token
        if self.kv_mode == "sync":
            self.waiting.append(WaitingToken(pos, h, depth))
            return
        for loop in range(depth + 1, self.cfg.num_loops + 1):
            for p in self.cfg.loop_positions(loop):
                layer = self.inner.layers[p]
                x = layer.input_layernorm(h)
                shape = (1, 1, -1, self.cfg.head_dim)
                k = layer.self_attn.k_proj(x).view(shape).transpose(1, 2)
                v = layer.self_attn.v_proj(x).view(shape).transpose(1, 2)
                _, k = apply_rotary_pos_emb(k, k, *rope)
                self.cache.update(k, v, p)
                add_into(flops, {"kv_copy": self.costs.kv_copy()})

    def kv_entries(self) -> tuple[int, int]:
        """(entries held, entries a full-depth cache would hold) over all layer positions."""
        stored = range(len(self.cache.layers))
        held = sum(self.cache.layers[p].get_seq_length() for p in stored
                   if p not in getattr(self.cache, "slot_of", {}))
        return held, self.length * self.cfg.num_hidden_layers

    def top_tokens(self, probs: torch.Tensor) -> list[tuple[str, float]]:
        """Top-5 (text, probability); token ids as text when the decoder has no tokenizer."""
        top = torch.topk(probs, TOP_K_SHOWN)
        text = (lambda i: self.tokenizer.decode([i])) if self.tokenizer is not None else str
        return [(text(int(i)), float(p)) for p, i in zip(top.values, top.indices)]


def loop_signal(loop: int, policy: DepthPolicy, obs: Observation, probs, top_tokens) -> LoopSignal:
    """What a trace records about one loop of one token: the policy's signal, softmax signals, top-5."""
    soft = obs.softmax_signals()
    return LoopSignal(
        loop=loop,
        signal=policy.signal(obs),
        max_prob=soft.get("max_prob"),
        top2_gap=soft.get("top2_gap"),
        certainty=soft.get("certainty"),
        change=obs.cosine(),
        extra={k: v for k, v in (("halting", obs.halting), ("router_logit", obs.router_logit),
                                 ("planned_depth", obs.planned_depth)) if v is not None} or None,
        top_tokens=top_tokens(probs) if probs is not None else None,
    )
