"""The contract between the engine and everything that shows or measures it: plain dataclasses.

A ``GenerationTrace`` is what one generation did, token by token: how deep each token went, why it
stopped, the per-loop signals, and what it cost. ``to_dict()``/``from_dict()`` round-trip through
JSON, so the dashboard, the benchmarks and the CLI all read the same numbers. A written trace
carries ``schema`` (``TRACE_SCHEMA``); ``from_dict`` checks it and every field, so a file from
elsewhere either replays exactly or raises ``TraceFormatError`` saying what is wrong.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from model.errors import TraceFormatError

TRACE_SCHEMA = 2  # version of the JSON layout below; traces written before it had none (read as 1)
READABLE_SCHEMAS = (1, 2)  # 2 added ``numerics`` (dtype, threads, compiled: how this machine ran it)


@dataclass
class LoopSignal:
    """What was observed after one loop of one token."""

    loop: int  # 1-based loop index
    signal: float | None = None  # the policy's exit signal (confidence, cosine, halting, router score)
    max_prob: float | None = None  # softmax confidence, where logits were computed
    top2_gap: float | None = None
    certainty: float | None = None  # 1 - entropy / log(vocab)
    change: float | None = None  # cosine similarity of the residual stream with the previous loop's
    top_tokens: list[tuple[str, float]] | None = None  # top-5 (text, probability) where logits exist
    extra: dict | None = None  # policy-specific signals (e.g. per-recursion router scores)


@dataclass
class TokenStep:
    """One generated token."""

    index: int  # 0-based index among generated tokens
    position: int  # absolute position of the input token whose forward produced this one
    token_id: int
    text: str
    depth: int  # loops run to produce this token
    max_depth: int
    exit_reason: str  # e.g. "max_prob 0.91 >= 0.80", "fixed depth 2", "max depth"
    signal_name: str | None  # what LoopSignal.signal measures for this policy
    threshold: float | None
    loops: list[LoopSignal]
    flops: dict[str, float]  # FLOPs spent in this step, by component (catch-up and decisions included)
    flops_full: float  # FLOPs the same step costs at full depth without decisions
    kv_entries: int  # (token, layer position) KV entries the cache holds after this step
    kv_entries_full: int  # ... at full depth
    caught_up: int = 0  # "sync": earlier exited tokens whose deeper KV was computed in this step
    wall_ms: float = 0.0
    inspected_flops: float = 0.0  # logits computed only for display (not counted in ``flops``)
    time_ms: dict[str, float] = field(default_factory=dict)  # measured wall-clock by component (TIME_COMPONENTS)

    @property
    def total_flops(self) -> float:
        return float(sum(self.flops.values()))


# Measured wall-clock per token, by component: the block's loops (prelude too), "sync" catch-up rows that
# finished (their coda), exit decisions (router / halting / probes: coda + norm + head), the KV of skipped
# loops (copy mode) and FREE's bookkeeping, sampling + detokenisation. In the batching engine a token
# waits for whole shared calls: its "block" is the calls it rode in, whoever else was in them.
# block loops, FREE catch-up, exit decisions (probes, halting, cosine, router), the exited token's own coda +
# head, heads run only to show per-loop candidates, KV of skipped loops, sampling + detokenisation
TIME_COMPONENTS = ("block", "catchup", "decision", "head", "inspect", "kv", "sampling")

# FLOP components that are decoder-layer work (the rest: "head" for the emitted token, "decision")
LAYER_COMPONENTS = ("attn_proj", "attn_context", "mlp", "lora", "norm", "catchup", "kv_copy")


@dataclass
class GenerationTrace:
    """A whole generation: prompt, settings, model description and the steps."""

    prompt: str
    prompt_tokens: int
    settings: dict
    model: dict  # description: name, scheme, loops, parameter counts...
    steps: list[TokenStep] = field(default_factory=list)
    prefill: dict = field(default_factory=dict)  # {"tokens", "flops", "wall_ms"}
    finish_reason: str | None = None  # "eos", "length", "stop", "cancelled"
    notes: list[str] = field(default_factory=list)
    numerics: dict = field(default_factory=dict)  # dtype, threads, compiled, where the choice came from (schema 2)

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.steps)

    def totals(self) -> dict:
        """Aggregates over the generated tokens (prefill excluded; it runs at full depth)."""
        n = len(self.steps)
        wall_s = sum(s.wall_ms for s in self.steps) / 1000
        used = sum(s.total_flops for s in self.steps)
        full = sum(s.flops_full for s in self.steps)
        head_full = self.model.get("head_flops", 0.0) * n
        block_used = sum(s.flops.get(c, 0.0) for s in self.steps for c in LAYER_COMPONENTS)
        block_full = full - head_full
        kv = self.steps[-1].kv_entries if self.steps else 0
        kv_full = self.steps[-1].kv_entries_full if self.steps else 0
        depths = [s.depth for s in self.steps]
        max_depth = self.steps[0].max_depth if self.steps else self.model.get("num_loops", 0)
        return {
            "tokens": n,
            "avg_depth": sum(depths) / n if n else 0.0,
            "max_depth": max_depth,
            "depth_counts": [depths.count(d) for d in range(1, max_depth + 1)],  # tokens at depth 1..max
            "flops_used": used,
            "flops_full": full,
            "flops_saved_pct": 100 * (1 - used / full) if full else 0.0,
            "block_flops_used": block_used,
            "block_flops_full": block_full,
            "block_flops_saved_pct": 100 * (1 - block_used / block_full) if block_full else 0.0,
            "ideal_speedup": full / used if used else 1.0,
            "kv_entries": kv,
            "kv_entries_full": kv_full,
            "kv_saved_pct": 100 * (1 - kv / kv_full) if kv_full else 0.0,
            "kv_bytes": kv * self.model.get("kv_bytes_per_entry", 0),
            "wall_s": wall_s,
            "tokens_per_s": n / wall_s if wall_s else 0.0,
            "caught_up_tokens": sum(s.caught_up for s in self.steps),
        }

    def kv_visibility(self, loop: int) -> list[list[int]]:
        """Which earlier generated tokens' KV a generated token's query sees at ``loop``.

        Matrix [query][key] over generated tokens (the prompt, at full depth, is visible to all):
        0 = not visible (or the query did not run this loop), 1 = exact KV, 2 = approximate KV
        (state-copied, or read from loop 1 under KV sharing), per the trace's KV mode.
        """
        mode = self.settings.get("kv_mode", "sync")
        depths = [s.depth for s in self.steps]
        n = len(depths)
        grid = [[0] * n for _ in range(n)]
        for q in range(n):
            if depths[q] < loop:
                continue
            for k in range(q + 1):
                if mode == "recursion":
                    grid[q][k] = 1 if depths[k] >= loop else 0
                elif mode == "share":
                    grid[q][k] = 1 if loop == 1 else 2
                elif mode == "copy":
                    grid[q][k] = 1 if depths[k] >= loop or k == q else 2
                else:  # sync: exited tokens' deeper KV is computed exactly before anyone reads it
                    grid[q][k] = 1
        return grid

    def to_dict(self) -> dict:
        d = asdict(self)
        d["schema"] = TRACE_SCHEMA
        d["text"] = self.text
        d["totals"] = self.totals()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GenerationTrace":
        """The trace ``to_dict`` wrote; ``TraceFormatError`` names the first thing that does not fit."""
        if not isinstance(d, dict):
            raise TraceFormatError(f"a trace is a JSON object, not a {type(d).__name__}")
        if d.get("schema", 1) not in READABLE_SCHEMAS:
            raise TraceFormatError(f"trace schema {d.get('schema')!r} is not supported (this version reads "
                                   f"{', '.join(map(str, READABLE_SCHEMAS))})")
        for key, kind in (("prompt", str), ("prompt_tokens", int), ("settings", dict), ("model", dict),
                          ("steps", list)):
            if not isinstance(d.get(key), kind):
                raise TraceFormatError(f"the trace's {key!r} is missing or not a {kind.__name__}")
        steps = [_step_from_dict(i, s) for i, s in enumerate(d["steps"])]
        if not isinstance(d.get("numerics", {}), dict):
            raise TraceFormatError("the trace's 'numerics' is not an object")
        keep = {k: d[k] for k in ("prompt", "prompt_tokens", "settings", "model", "prefill",
                                  "finish_reason", "notes", "numerics") if k in d}
        return cls(**keep, steps=steps)

    @classmethod
    def from_json(cls, text: str | bytes) -> "GenerationTrace":
        """A trace from the text of a trace file (the dashboard's download, the CLI's ``--json``)."""
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise TraceFormatError(f"not JSON ({exc})") from exc
        return cls.from_dict(data)


def _step_from_dict(index: int, s) -> TokenStep:
    """One ``TokenStep`` of a trace file, with its loop signals; ``TraceFormatError`` if it does not fit."""
    known = {f.name for f in fields(TokenStep)}
    try:
        if not isinstance(s, dict) or not isinstance(s.get("loops"), list):
            raise TypeError("a step is an object with a list of loops")
        loops = [LoopSignal(**{**l, "top_tokens": [tuple(t) for t in l["top_tokens"]]
                                if l.get("top_tokens") is not None else None}) for l in s["loops"]]
        step = TokenStep(**{**{k: v for k, v in s.items() if k in known}, "loops": loops})
    except (TypeError, KeyError, ValueError) as exc:
        raise TraceFormatError(f"step {index} of the trace does not fit: {exc}") from exc
    if not isinstance(step.depth, int) or not isinstance(step.flops, dict) or not isinstance(step.text, str):
        raise TraceFormatError(f"step {index} of the trace has a wrong type (depth, flops or text)")
    return step
