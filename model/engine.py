"""Adaptive generation: prefill at full depth, then every new token loop by loop under a policy.

``stream(model, tokenizer, prompt, policy=...)`` yields one ``TokenStep`` per generated token
(its ``.trace`` grows as it goes); ``generate(...)`` runs it to the end and returns the trace.

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

import re
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .compute import CostModel, LayerCosts, add_into
from .errors import EngineInputError
from .modeling import RecursiveForCausalLM, causal_mask
from .policies import DepthPolicy, FixedDepth, Observation
from .routers import RecursionShareCache, share_slots
from .trace import GenerationTrace, LoopSignal, TokenStep

# The one list of KV modes. Both engines run every mode: solo decoding (``AdaptiveDecoder``, ``stream``) and
# the batching engine (``model.serving.BatchEngine``, the server, the dashboard's shared engine).
KV_MODES = ("copy", "sync", "recursion", "share")
TOP_K_SHOWN = 5


MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes 64 bits; JSON clients mostly send int64


@dataclass
class Sampling:
    """Decoding settings. ``temperature == 0`` means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        if not 0.0 <= self.temperature <= 5.0:
            raise EngineInputError(f"temperature must be in [0, 5], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise EngineInputError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 1.0 <= self.repetition_penalty <= 3.0:
            raise EngineInputError(f"repetition_penalty must be in [1, 3], got {self.repetition_penalty}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise EngineInputError(f"seed must be an integer in 0..{MAX_SEED}, got {self.seed!r}")

    def processors(self) -> LogitsProcessorList:
        procs = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.temperature > 0:
            procs.append(TemperatureLogitsWarper(self.temperature))
            if self.top_p < 1.0:
                procs.append(TopPLogitsWarper(self.top_p))
        return procs


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

    @classmethod
    def of(cls, tok: TokenInFlight) -> "StepResult":
        return cls(tok.logits, tok.loop, tok.reason, tok.loops, tok.flops, tok.inspected, len(tok.caught_up))


def as_recursive(model: PreTrainedModel) -> RecursiveForCausalLM:
    """A recursive model as is; a plain Llama model as a 1-loop recursive model (exactly the same)."""
    if isinstance(model, RecursiveForCausalLM):
        return model
    from .recursify import recursify

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
                                   "(python -m model.train routers); pick another policy")
        if policy.needs_halting and not model.has_halting_heads:
            raise EngineInputError("the halting policy needs a model trained with halting heads "
                                   "(python -m model.train exits); pick another policy")
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
        self.entered(self.run(self.enter(token_id)))
        while True:
            coda = self.after_loop(self.run(self.next_loop()))
            if coda is not None:
                self.calibrate(self.run(coda))
            logits = self.head_logits(self.run(self.head_segment()))[-1] if self.observe() else None
            if self.decide(logits):
                return StepResult.of(self.finish_token())

    def run(self, seg: Segment) -> torch.Tensor:
        """Run one segment through its layer positions with the library's decoder layers: (m, d)."""
        if not seg.layer_positions:
            return seg.hidden
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
            add_into(tok.flops, {"decision": self.costs.router()})
        if policy.needs_halting and tok.loop < cfg.num_loops:
            tok.halting = float(torch.sigmoid(self.model.halting_logit(tok.loop, tok.hidden[None])[0, -1]))
            add_into(tok.flops, {"decision": self.costs.halting(cfg.halting_hidden)})
        if policy.decision_cost == "cosine" and tok.loop < self.max_loops:
            add_into(tok.flops, {"decision": self.costs.cosine()})
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
        probe_cost = sum(self.layer_costs(cfg.coda_positions, tok.position + 1).values()) + self.costs.head()
        if policy.needs_logits:
            tok.probs = torch.softmax(logits.float(), -1)
            add_into(tok.flops, {"decision": probe_cost + self.costs.softmax_signals()})
            tok.stop, tok.reason = policy.decide(self.observation())
        elif self.inspect:  # candidates to show; the policy decided without them
            tok.probs = torch.softmax(logits.float(), -1)
            tok.inspected += probe_cost
        tok.loops.append(loop_signal(tok.loop, policy, self.observation(), tok.probs, self.top_tokens))
        if not tok.stop and logits is not None and cfg.num_coda:
            for p in cfg.coda_positions:  # the probe's coda KV: undone, the token goes on
                self.cache.layers[p].crop(-1)
        return tok.stop

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


# --- the public API ----------------------------------------------------------------------------
def encode_prompt(tokenizer, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
    """Token ids for ``prompt`` (rendered with the chat template when ``chat``)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise EngineInputError("the prompt is empty: type some text")
    if chat:
        if getattr(tokenizer, "chat_template", None) is None:
            raise EngineInputError("this tokenizer has no chat template: turn the chat option off")
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return encode_chat(tokenizer, messages)
    return tokenizer(prompt).input_ids


def encode_chat(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of ``messages`` rendered with the chat template, where only the template makes control
    tokens: a ``<|im_start|>`` typed inside a message is encoded as the plain text it is.

    The template is rendered around a placeholder per message. As the tokenizer itself does, the text
    is cut at the template's special tokens and each piece between them (template text plus message
    text) is tokenized on its own, here with ``split_special_tokens`` so that nothing in a message is
    read as a control token. For ordinary text the ids equal tokenizing the rendered string (tested)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise EngineInputError("this tokenizer has no chat template: turn the chat option off")
    marks = [f"\u0000msg{i}\u0000" for i in range(len(messages))]
    rendered = tokenizer.apply_chat_template([{**m, "content": mark} for m, mark in zip(messages, marks)],
                                             tokenize=False, add_generation_prompt=add_generation_prompt)
    template, rest = [], rendered
    for mark in marks:
        before, found, rest = rest.partition(mark)
        if not found:  # a template that rewrites contents: render for real, control tokens removed from the text
            return _encode_chat_stripped(tokenizer, messages, add_generation_prompt)
        template.append(before)
    template.append(rest)
    specials = sorted(tokenizer.all_special_tokens, key=len, reverse=True)
    cut = re.compile("(" + "|".join(re.escape(t) for t in specials) + ")")
    ids: list[int] = []
    segment = ""
    for i, part in enumerate(template):
        for j, piece in enumerate(cut.split(part)):
            if j % 2:  # a control token written by the template
                if segment:
                    ids += tokenizer(segment, add_special_tokens=False, split_special_tokens=True).input_ids
                segment = ""
                ids.append(tokenizer.convert_tokens_to_ids(piece))
            else:
                segment += piece
        if i < len(messages):
            segment += messages[i]["content"]
    if segment:
        ids += tokenizer(segment, add_special_tokens=False, split_special_tokens=True).input_ids
    return ids


def _encode_chat_stripped(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    """Fallback of ``encode_chat``: the special-token strings are deleted from the messages' text."""
    def strip(text: str) -> str:
        for special in tokenizer.all_special_tokens:
            text = text.replace(special, "")
        return text

    text = tokenizer.apply_chat_template([{**m, "content": strip(m["content"])} for m in messages], tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False).input_ids


class Stream:
    """Iterate to get ``TokenStep``s as they are produced; ``.trace`` holds everything so far."""

    def __init__(self, model, tokenizer, prompt: str, policy: DepthPolicy | None = None,
                 max_new_tokens: int = 64, kv_mode: str = "sync", max_loops: int | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 seed: int = 0, chat: bool = False, stop: list[str] | None = None, inspect: bool = False,
                 model_name: str | None = None, max_prompt_tokens: int | None = None):
        model = as_recursive(model)
        policy = policy or FixedDepth(model.config.num_loops)
        self.sampling = Sampling(temperature, top_p, repetition_penalty, seed)
        self.sampling.validate()
        if not 1 <= max_new_tokens <= 4096:
            raise EngineInputError(f"max_new_tokens must be in 1..4096, got {max_new_tokens}")
        self.model, self.tokenizer = model, tokenizer
        self.prompt_ids = encode_prompt(tokenizer, prompt, chat)
        limit = max_prompt_tokens or (model.config.max_position_embeddings - max_new_tokens)
        if len(self.prompt_ids) > limit:
            raise EngineInputError(f"the prompt has {len(self.prompt_ids)} tokens; at most {limit} fit")
        self.decoder = AdaptiveDecoder(model, policy, kv_mode, max_loops, inspect, tokenizer)
        self.max_new_tokens = max_new_tokens
        self.stop = [s for s in (stop or []) if s]
        self.eos_ids = eos_token_ids(model, tokenizer)
        settings = {**policy.describe(), "kv_mode": kv_mode, "max_loops": self.decoder.max_loops,
                    "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                    "repetition_penalty": repetition_penalty, "seed": seed, "chat": chat,
                    "inspect": inspect, "stop": self.stop}
        self.trace = GenerationTrace(prompt=prompt, prompt_tokens=len(self.prompt_ids), settings=settings,
                                     model=describe_model(model, model_name))
        if model.config.training is None and model.config.num_loops > 1:
            self.trace.notes.append("untrained conversion: early exits of a converted model are poor until it is "
                                    "trained (intermediate loops disagree with the last one for most tokens)")
        self._gen = self._run()

    def __iter__(self):
        return self

    def __next__(self) -> TokenStep:
        return next(self._gen)

    def close(self) -> None:
        """Stop generating (e.g. the client went away)."""
        if self.trace.finish_reason is None:
            self.trace.finish_reason = "cancelled"
        self._gen.close()

    def _run(self):
        dec, trace = self.decoder, self.trace
        start = time.perf_counter()
        trace.prefill = {"tokens": len(self.prompt_ids) - 1, "flops": dec.prefill(self.prompt_ids[:-1])}
        trace.prefill["wall_ms"] = 1000 * (time.perf_counter() - start)
        generator = torch.Generator().manual_seed(self.sampling.seed)
        processors = self.sampling.processors()
        ids = list(self.prompt_ids)
        generated: list[int] = []
        text_so_far = ""
        for index in range(self.max_new_tokens):
            t0 = time.perf_counter()
            result = dec.step(ids[-1])
            token = choose_token(result.logits, ids, processors, self.sampling.temperature, generator)
            wall_ms = 1000 * (time.perf_counter() - t0)
            if token in self.eos_ids:
                trace.finish_reason = "eos"
                return
            generated.append(token)
            ids.append(token)
            full_text = self.tokenizer.decode(generated, skip_special_tokens=True)
            piece, text_so_far = full_text[len(text_so_far):], full_text
            kv, kv_full = dec.kv_entries()
            step = TokenStep(
                index=index, position=dec.length - 1, token_id=token, text=piece, depth=result.depth,
                max_depth=dec.max_loops, exit_reason=result.reason, signal_name=dec.policy.signal_name,
                threshold=dec.policy.threshold, loops=result.loops, flops=result.flops,
                flops_full=dec.costs.full_token(dec.length), kv_entries=kv, kv_entries_full=kv_full,
                caught_up=result.caught_up, wall_ms=wall_ms, inspected_flops=result.inspected_flops,
            )
            trace.steps.append(step)
            yield step
            if any(s in text_so_far for s in self.stop):
                trace.finish_reason = "stop"
                return
        trace.finish_reason = "length"


def stream(model, tokenizer, prompt: str, policy: DepthPolicy | None = None, **settings) -> Stream:
    """Start an adaptive generation; iterate the result for ``TokenStep``s (see ``Stream``)."""
    return Stream(model, tokenizer, prompt, policy, **settings)


def generate(model, tokenizer, prompt: str, policy: DepthPolicy | None = None, **settings) -> GenerationTrace:
    """Run an adaptive generation to the end and return its ``GenerationTrace``."""
    s = stream(model, tokenizer, prompt, policy, **settings)
    for _ in s:
        pass
    return s.trace


def choose_token(logits: torch.Tensor, ids: list[int], processors, temperature: float, generator) -> int:
    """The next token: processors (repetition penalty, temperature, top-p), then argmax or a seeded draw."""
    scores = processors(torch.tensor([ids]), logits.float()[None])
    if temperature == 0:
        return int(scores.argmax(-1))
    probs = torch.softmax(scores, -1)
    return int(torch.multinomial(probs, 1, generator=generator))


def eos_token_ids(model, tokenizer) -> set[int]:
    """Every id that ends a generation (the tokenizer's and the config's)."""
    ids = set()
    for value in (getattr(tokenizer, "eos_token_id", None), model.config.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(value)
    return ids


def describe_model(model: RecursiveForCausalLM, name: str | None = None) -> dict:
    """What the trace says about the model (the dashboard's Model tab reads this)."""
    cfg = model.config
    costs = CostModel.from_model(model)
    return {
        "name": name or cfg.base_model or "recursive model",
        "base_model": cfg.base_model,
        "sharing": cfg.sharing if cfg.num_loops > 1 else "none",
        "num_loops": cfg.num_loops,
        "block_size": cfg.block_size,
        "num_prelude": cfg.num_prelude,
        "num_coda": cfg.num_coda,
        "num_positions": cfg.num_hidden_layers,
        "layer_map": list(cfg.layer_map),
        "source_layers": cfg.source_layers,
        "init_method": cfg.init_method,
        "lora_rank": "full" if cfg.lora_full_rank else cfg.lora_rank,
        "parameters": model.parameter_counts(),
        "head_flops": costs.head(),
        "kv_bytes_per_entry": costs.kv_numbers_per_entry() * model.dtype.itemsize,
        "router_type": cfg.router_type,
        "halting_heads": model.has_halting_heads,
        "training": cfg.training,
    }
