"""Analytical FLOP and KV accounting for a recursive model (per token, by component).

Conventions (one multiply-add = 2 FLOPs; d = hidden, f = MLP width, h/h_kv = query/KV heads,
e = head_dim, V = vocab, c = context length the token attends to, itself included):

- ``attn_proj``    q, k, v, o projections: ``2·d·(h·e + 2·h_kv·e) + 2·(h·e)·d``
- ``attn_context`` scores and weighted sum over the context: ``4·h·e·c``
- ``mlp``          gate, up, down: ``3 · 2·d·f``
- ``lora``         per projection of rank r: ``2·r·(d_in + d_out)``
- ``norm``         two RMSNorms per layer: ``2 · 4·d`` (square, mean, rsqrt-scale, weight)
- ``head``         final RMSNorm + LM head: ``4·d + 2·d·V``
- decision cost    softmax-confidence: an extra head (+ the coda layers, if any) + ``5·V`` for the
                   softmax/top-2/entropy; saturation: a cosine between two d-vectors, ``6·d``;
                   halting head of width w: ``4·d + 2·d·w + 3·w``; router: ``2·d`` per expert-choice
                   decision, ``2·d·N_r`` once for token-choice; fixed depth: 0.
- ``kv_copy``      CALM-style state copying for one skipped position: one RMSNorm + k and v
                   projections: ``4·d + 2·2·d·h_kv·e``

A KV "entry" is one token's key and value vectors at one layer position (``2·h_kv·e`` numbers).
"""
from __future__ import annotations

from dataclasses import dataclass

from model.definition.config import PROJECTIONS


@dataclass(frozen=True)
class CostModel:
    d: int
    f: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    lora_ranks: tuple[dict, ...]  # per position: projection -> rank

    @classmethod
    def from_model(cls, model) -> "CostModel":
        from model.definition.modeling import projection_owner

        cfg = model.config
        ranks = tuple(
            {n: getattr(projection_owner(layer, n), n).rank for n in PROJECTIONS} for layer in model.model.layers
        )
        return cls(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                   cfg.head_dim, cfg.vocab_size, ranks)

    # --- shapes -----------------------------------------------------------------------------
    def _shape(self, name: str) -> tuple[int, int]:
        q, kv, d, f = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.d, self.f
        return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
                "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}[name]

    # --- per component ----------------------------------------------------------------------
    def layer(self, position: int, context: int) -> dict[str, float]:
        """FLOPs of one decoder layer at ``position`` for one token attending to ``context`` tokens."""
        d, q, kv = self.d, self.heads * self.head_dim, self.kv_heads * self.head_dim
        lora = sum(2 * r * sum(self._shape(n)) for n, r in self.lora_ranks[position].items())
        return {
            "attn_proj": 2 * d * (q + 2 * kv) + 2 * q * d,
            "attn_context": 4 * q * context,
            "mlp": 3 * 2 * d * self.f,
            "lora": float(lora),
            "norm": 2 * 4 * d,
        }

    def layers(self, positions, context: int) -> dict[str, float]:
        total: dict[str, float] = {}
        for p in positions:
            for k, v in self.layer(p, context).items():
                total[k] = total.get(k, 0.0) + v
        return total

    def head(self) -> float:
        return 4 * self.d + 2 * self.d * self.vocab

    def softmax_signals(self) -> float:
        return 5 * self.vocab

    def cosine(self) -> float:
        return 6 * self.d

    def halting(self, width: int) -> float:
        """A halting head on one token: RMSNorm + Linear(d, width) + ReLU + Linear(width, 1)."""
        return 4 * self.d + 2 * self.d * width + width + 2 * width

    def router(self, outputs: int = 1) -> float:
        """A linear router d -> outputs on one token (+ sigmoid/softmax, negligible)."""
        return 2 * self.d * outputs

    def decision(self, kind: str, probe_layers: float = 0.0, halting_width: int = 0) -> float:
        """One exit decision after a loop, by a policy's ``decision_cost``: ``softmax`` runs an exit probe
        (``probe_layers``: its coda layers; then the head) and the softmax signals; ``cosine``; ``halting``
        (a head of ``halting_width``); ``router`` (one expert-choice router); anything else is free."""
        if kind == "softmax":
            return probe_layers + self.head() + self.softmax_signals()
        if kind == "halting":
            return self.halting(halting_width) if halting_width else 0.0
        return {"cosine": self.cosine(), "router": self.router()}.get(kind, 0.0)

    def kv_copy(self) -> float:
        return 4 * self.d + 2 * 2 * self.d * self.kv_heads * self.head_dim

    def kv_numbers_per_entry(self) -> int:
        return 2 * self.kv_heads * self.head_dim

    def full_token(self, context: int) -> float:
        """All layer positions + head, no decisions: the reference cost of one token."""
        return sum(self.layers(range(len(self.lora_ranks)), context).values()) + self.head()


def add_into(total: dict[str, float], part: dict[str, float], scale: float = 1.0, key: str | None = None) -> None:
    """Accumulate ``part`` into ``total`` (all under ``key`` when given)."""
    for k, v in part.items():
        name = key or k
        total[name] = total.get(name, 0.0) + scale * v


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
