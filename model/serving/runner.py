"""The batched layer call: decoder layers over segments of many requests at once."""
from __future__ import annotations

import itertools
import time

import torch
from torch.nn import functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

from model.definition.config import PROJECTIONS
from model.inference.decoder import Segment
from model.definition.modeling import RecursiveForCausalLM, causal_mask, projection_owner


class BlockRunner:
    """Runs decoder layers over segments of many requests at once (one job: the batched forward).

    At layer j every segment runs its own position ``layer_positions[j]``; all those positions must
    map to the same unique layer (same shared weights). The shared projections run once over all
    N tokens; RMSNorm weights and LoRA per group of consecutive segments at one position; attention
    per segment against its own cache. Exactly ``LlamaDecoderLayer.forward`` per token.

    Grouped LoRA (``grouped_lora``): when a call mixes loop positions, every row's LoRA pair is applied
    in one pair of matmuls over the positions' factors side by side, ``((x @ [A_1..A_G]^T) * M) @
    [B_1..B_G]^T`` with ``M`` selecting each row's own block, instead of two small matmuls per
    position. It reads the same weights and costs G times the LoRA FLOPs, so it is used up to
    ``grouped_max_rows`` rows, where the per-position matmuls are dominated by call overhead. Off by
    default: on the 2-core CPU it was not faster (benchmarks/mixed_loops.py, docs/RESULTS.md).

    ``compile``: a call whose segments all run one position per layer runs the layer's dense parts (norm +
    q/k/v projections; o projection + norm + MLP) as ``torch.compile``d functions of the weights, dynamic
    in the row count, so all positions share one graph; attention and the caches stay eager (a compiled
    ``DynamicCache`` update recompiles for every cache size). Chosen per machine (``numerics``); not exact.
    """

    def __init__(self, model: RecursiveForCausalLM, grouped_lora: bool = False, grouped_max_rows: int = 64,
                 compile: bool = False):
        self.inner = model.model
        self.cfg = model.config
        self.attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.cfg._attn_implementation, eager_attention_forward)
        self.params = [self._position_params(layer) for layer in self.inner.layers]  # looked up once, not per call
        self.eps = self.inner.layers[0].input_layernorm.variance_epsilon
        self.act = self.inner.layers[0].mlp.act_fn
        self.model_s = 0.0  # time inside the layer maths (projections, norms, attention): not overhead
        self.grouped_lora, self.grouped_max_rows = grouped_lora, grouped_max_rows
        self._stacks: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (positions, projection) -> [A..], [B..]
        self.compiled = compile
        if compile:
            self._qkv_c = torch.compile(self._qkv_dense, dynamic=True)
            self._out_c = torch.compile(self._out_dense, dynamic=True)

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

    def _project(self, x: torch.Tensor, groups, name: str, masks: dict | None = None) -> torch.Tensor:
        """Shared linear over all N tokens once, plus each group's LoRA: (N, d_in) -> (N, d_out).
        ``masks``: this call's grouped-LoRA block masks by rank (None: a small matmul pair per group)."""
        shared = self.params[groups[0][0]]["shared"][name]
        y = F.linear(x, shared.weight, shared.bias)
        if masks is not None and all(self.params[p]["lora"][name] is not None for p, _, _ in groups):
            stacked_a, stacked_b = self._stacked(tuple(p for p, _, _ in groups), name)
            rank = stacked_a.shape[0] // len(groups)
            if rank not in masks:
                masks[rank] = self._select(groups, x.shape[0], rank, x.device, x.dtype)
            return y + F.linear(F.linear(x, stacked_a) * masks[rank], stacked_b)
        for p, a, b in groups:
            params = self.params[p]
            assert params["shared"][name] is shared, f"position {p} does not share {name} with {groups[0][0]}"
            lora = params["lora"][name]
            if lora is not None:
                y[a:b] = y[a:b] + F.linear(F.linear(x[a:b], lora[0]), lora[1])
        return y

    def _grouped(self, groups, n: int) -> bool:
        """Whether this call applies LoRA grouped: several positions and few rows."""
        return self.grouped_lora and len(groups) > 1 and n <= self.grouped_max_rows

    @staticmethod
    def _select(groups, n: int, rank: int, device, dtype) -> torch.Tensor:
        """(N, G·rank) block mask: row i keeps the block of its own group's LoRA factors."""
        select = torch.zeros(n, len(groups) * rank, device=device, dtype=dtype)
        for g, (_, a, b) in enumerate(groups):
            select[a:b, g * rank:(g + 1) * rank] = 1.0
        return select

    def _stacked(self, positions: tuple[int, ...], name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The LoRA factors of ``positions`` side by side: A (G·r, d_in), B (d_out, G·r); built once."""
        key = (positions, name)
        if key not in self._stacks:
            shared = self.params[positions[0]]["shared"][name]
            assert all(self.params[p]["shared"][name] is shared for p in positions), \
                f"positions {positions} do not share {name}"
            factors = [self.params[p]["lora"][name] for p in positions]
            self._stacks[key] = (torch.cat([a for a, _ in factors], dim=0).detach(),
                                 torch.cat([b for _, b in factors], dim=1).detach())
        return self._stacks[key]

    # --- compiled dense parts (one position for all rows): pure functions of the weights ---------------
    def _weights(self, p: int, names) -> tuple:
        params = self.params[p]
        return tuple((params["shared"][n].weight, params["shared"][n].bias) + (params["lora"][n] or (None, None))
                     for n in names)

    @staticmethod
    def _linear(x, w) -> torch.Tensor:
        weight, bias, a, b = w
        y = F.linear(x, weight, bias)
        return y if a is None else y + F.linear(F.linear(x, a), b)

    def _rms(self, x, weight) -> torch.Tensor:
        xf = x.to(torch.float32)
        return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def _qkv_dense(self, x, norm, wq, wk, wv):
        h = self._rms(x, norm)
        return self._linear(h, wq), self._linear(h, wk), self._linear(h, wv)

    def _out_dense(self, attn, residual, norm, wo, wg, wu, wd):
        x = residual + self._linear(attn, wo)
        h = self._rms(x, norm)
        return x + self._linear(self.act(self._linear(h, wg)) * self._linear(h, wu), wd)

    def _layer(self, x, positions, segs, bounds, cos, sin) -> torch.Tensor:
        groups = self._groups(positions, bounds)
        n, e = x.shape[0], self.cfg.head_dim
        select = {} if self._grouped(groups, n) else None  # grouped-LoRA masks by rank, built on first use
        dense = self.compiled and len(groups) == 1
        residual = x
        if dense:
            p = groups[0][0]
            q, k, v = self._qkv_c(x, self.params[p]["input_norm"], *self._weights(p, ("q_proj", "k_proj", "v_proj")))
        else:
            h = self._norm(x, groups, "input_norm")
            q, k, v = (self._project(h, groups, name, select) for name in ("q_proj", "k_proj", "v_proj"))
        q = q.view(n, -1, e).transpose(0, 1)[None]  # (1, H, N, e)
        k = k.view(n, -1, e).transpose(0, 1)[None]  # (1, Hkv, N, e)
        v = v.view(n, -1, e).transpose(0, 1)[None]
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        outs = []
        for i, seg in enumerate(segs):
            a, b = bounds[i], bounds[i + 1]
            attn = self.params[positions[i]]["attn"]
            keys, values = seg.cache.update(k[:, :, a:b], v[:, :, a:b], positions[i])
            mask = None if b - a == 1 else causal_mask(b - a, keys.shape[2], x.dtype, x.device)
            out, _ = self.attention(attn, q[:, :, a:b], keys, values, mask, dropout=0.0, scaling=attn.scaling)
            outs.append(out.reshape(b - a, -1))  # (m, H*e)
        if dense:
            return self._out_c(torch.cat(outs, dim=0), residual, self.params[p]["post_norm"],
                               *self._weights(p, ("o_proj", "gate_proj", "up_proj", "down_proj")))
        h = self._project(torch.cat(outs, dim=0), groups, "o_proj", select)
        x = residual + h
        residual = x
        h = self._norm(x, groups, "post_norm")
        h = self.act(self._project(h, groups, "gate_proj", select)) * self._project(h, groups, "up_proj", select)
        return residual + self._project(h, groups, "down_proj", select)
