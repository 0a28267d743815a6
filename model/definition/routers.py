"""Mixture-of-Recursions routers and routed forward passes.

- **Expert-choice**: one linear router (d -> 1) per recursion r. In training, recursion r keeps the
  top ``capacity[r]·T`` tokens among those kept at r-1 (hierarchical, causal order, original RoPE
  positions); an auxiliary BCE teaches ``sigmoid(logit) >= 0.5`` to mean "selected", which is the
  causal rule used at decode time.
- **Token-choice**: one router (d -> N_r) on the block input picks each token's depth up front;
  Switch-style balancing loss, z-loss and a loss-free bias option.

The gate enters in straight-through form, ``h + Δ·(1 + α(g − sg(g)))``: the forward value is the
distilled model's (this project adds routers to a pretrained relaxed model instead of training from
scratch as MoR does), while the gradient still reaches the router through the gate.

``routed_forward`` also defines the KV semantics used by the engine: ``"recursion"`` (recursion r's
attention sees only tokens that reached r) and ``"share"`` (deeper recursions read recursion 1's KV).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from transformers.cache_utils import DynamicCache

ROUTED_KV_MODES = ("recursion", "share")


class ExpertRouters(nn.Module):
    """One linear d -> 1 router per recursion (no bias, N(0, 0.02) init as in MoR)."""

    def __init__(self, hidden_size: int, num_loops: int):
        super().__init__()
        self.routers = nn.ModuleList(nn.Linear(hidden_size, 1, bias=False) for _ in range(num_loops))
        for r in self.routers:
            nn.init.normal_(r.weight, std=0.02)

    def logit(self, recursion: int, hidden: torch.Tensor) -> torch.Tensor:
        """Router logit for entering ``recursion`` (1-based); hidden (..., d) -> (...)."""
        return self.routers[recursion - 1](hidden).squeeze(-1)


class TokenRouter(nn.Module):
    """One linear d -> N_r router on the block input; a non-trainable loss-free balancing bias."""

    def __init__(self, hidden_size: int, num_loops: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, num_loops, bias=False)
        nn.init.normal_(self.proj.weight, std=0.02)
        self.register_buffer("balance_bias", torch.zeros(num_loops))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)

    def depth(self, hidden: torch.Tensor) -> torch.Tensor:
        """Chosen depth (1-based) per token: argmax of probabilities + balancing bias."""
        return (torch.softmax(self.logits(hidden).float(), -1) + self.balance_bias).argmax(-1) + 1


def straight_through(gate: torch.Tensor, alpha: float) -> torch.Tensor:
    """1 in the forward pass, ``α·∂gate`` in the backward pass."""
    return 1 + alpha * (gate - gate.detach())


# --- KV caches for routed depth -----------------------------------------------------------------
class RecursionShareCache(DynamicCache):
    """Recursive KV sharing: positions of loops > 1 read the KV of the same block layer in loop 1.

    ``slot_of[p]`` maps a deeper position to its loop-1 position; those positions never store.
    """

    def __init__(self, slot_of: dict[int, int]):
        super().__init__()
        self.slot_of = slot_of

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx in self.slot_of:
            layer = self.layers[self.slot_of[layer_idx]]
            return layer.keys, layer.values
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def share_slots(config) -> dict[int, int]:
    """Deeper-loop position -> the loop-1 position of the same unique layer."""
    k = config.block_size
    return {p: p - (r - 1) * k for r in range(2, config.num_loops + 1) for p in config.loop_positions(r)}


# --- routed forward (training and reference semantics) --------------------------------------------
@dataclass
class RoutedOutput:
    logits: torch.Tensor  # (B, T, V)
    depths: torch.Tensor  # (B, T) loops run per token
    aux_loss: torch.Tensor  # router auxiliary losses (already weighted)
    stats: dict = field(default_factory=dict)


def routed_forward(model, input_ids: torch.Tensor, depths: torch.Tensor, kv_mode: str = "recursion") -> torch.Tensor:
    """Logits when token t runs exactly ``depths[t]`` loops, with routed KV semantics (batch 1).

    ``recursion``: at loop r the tokens with depth >= r attend only to each other (compacted,
    causal, original positions). ``share``: at loop r > 1 they attend to every earlier token's
    loop-1 KV. Every token then runs the coda from its own exit state.
    """
    assert input_ids.shape[0] == 1 and depths.shape == input_ids.shape, "batch 1, one depth per token"
    assert kv_mode in ROUTED_KV_MODES, kv_mode
    inner, cfg = model.model, model.config
    T = input_ids.shape[1]
    pos = torch.arange(T, device=input_ids.device)[None]
    h = inner.embed_tokens(input_ids)
    rope = inner.rope(h, pos)
    h = inner.run_positions(h, cfg.prelude_positions, rope)
    cache = RecursionShareCache(share_slots(cfg)) if kv_mode == "share" else None
    for r in range(1, cfg.num_loops + 1):
        active = (depths[0] >= r).nonzero().squeeze(-1)
        if active.numel() == 0:
            break
        if kv_mode == "share" and r == 1:  # loop 1 runs every token and fills the shared slots
            h = inner.run_positions(h, cfg.loop_positions(1), rope, None, cache)
            continue
        x = h[:, active]
        sub_rope = inner.rope(x, pos[:, active])
        if kv_mode == "share":  # queries: active tokens; keys: loop-1 KV of all tokens <= the query
            mask = share_mask(pos[0], active, h.dtype)
            x = inner.run_positions(x, cfg.loop_positions(r), sub_rope, mask[None, None], cache)
        else:
            x = inner.run_positions(x, cfg.loop_positions(r), sub_rope)
        h = h.clone()
        h[:, active] = x
    h = inner.run_positions(h, cfg.coda_positions, rope)
    return model.lm_head(inner.norm(h))


def share_mask(positions: torch.Tensor, active: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (len(active), len(positions)): a query at position ``active[i]`` sees every token at
    or before it; on the device of ``positions`` (the tokens' device, so it works on CUDA too)."""
    allowed = positions[None, :] <= active[:, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=positions.device).masked_fill(~allowed,
                                                                                        torch.finfo(dtype).min)


def expert_choice_forward(model, input_ids: torch.Tensor, capacity: list[float], aux_coeff: float = 1e-3) -> RoutedOutput:
    """Training forward with expert-choice routing (hierarchical top-k, recursion-wise attention).

    Returns logits, per-token depths, the weighted BCE auxiliary loss and router statistics
    (sampling accuracy of the causal rule vs top-k labels, dead-token ratio, tokens per depth).
    """
    inner, cfg = model.model, model.config
    B, T = input_ids.shape
    pos = torch.arange(T, device=input_ids.device)[None].expand(B, T)
    h = inner.embed_tokens(input_ids)
    rope = inner.rope(h, pos)
    h = inner.run_positions(h, cfg.prelude_positions, rope)
    candidates = torch.arange(T, device=h.device)[None].expand(B, T)  # (B, n) indices still running
    depths = torch.zeros(B, T, dtype=torch.long, device=h.device)
    bce, correct, counted = h.new_zeros(()), 0, 0
    for r in range(1, cfg.num_loops + 1):
        k = max(1, int(capacity[r - 1] * T))
        k = min(k, candidates.shape[1])
        states = h.gather(1, candidates[..., None].expand(-1, -1, h.shape[-1]))
        logits = model.routers.logit(r, states)  # (B, n)
        top = logits.topk(k, dim=-1).indices.sort(dim=-1).values  # causal order
        labels = torch.zeros_like(logits).scatter(1, top, 1.0)
        bce = bce + F.binary_cross_entropy_with_logits(logits.float(), labels)
        correct += int(((logits >= 0) == labels.bool()).sum())
        counted += labels.numel()
        chosen = candidates.gather(1, top)  # (B, k) original positions
        x = h.gather(1, chosen[..., None].expand(-1, -1, h.shape[-1]))
        y = inner.run_positions(x, cfg.loop_positions(r), inner.rope(x, chosen))
        gate = torch.sigmoid(logits.gather(1, top))[..., None]
        y = x + (y - x) * straight_through(gate, cfg.router_alpha)
        h = h.scatter(1, chosen[..., None].expand(-1, -1, h.shape[-1]), y)
        depths.scatter_(1, chosen, r)
        candidates = chosen
    h = inner.run_positions(h, cfg.coda_positions, rope)
    per_depth = [int((depths == d).sum()) for d in range(1, cfg.num_loops + 1)]
    stats = {"sampling_accuracy": correct / max(counted, 1), "tokens_per_depth": per_depth,
             "dead_token_ratio": float((depths == 0).float().mean())}
    return RoutedOutput(model.lm_head(inner.norm(h)), depths, aux_coeff * bce, stats)


def token_choice_forward(model, input_ids: torch.Tensor, balance_coeff: float = 0.1, z_coeff: float = 1e-5,
                         warmup: bool = False) -> RoutedOutput:
    """Training forward with token-choice routing: depth chosen once on the block input (batch of any size,
    processed per sample). Balancing loss ``N_r Σ_i P_i f_i``, z-loss, MaxVio in the stats."""
    inner, cfg = model.model, model.config
    R = cfg.num_loops
    outs, depths_all, probs_all, z_all = [], [], [], []
    for b in range(input_ids.shape[0]):
        ids = input_ids[b : b + 1]
        T = ids.shape[1]
        pos = torch.arange(T, device=ids.device)[None]
        h = inner.embed_tokens(ids)
        rope = inner.rope(h, pos)
        h = inner.run_positions(h, cfg.prelude_positions, rope)
        logits = model.token_router.logits(h[0])  # (T, R)
        probs = torch.softmax(logits.float(), -1)
        depth = torch.full((T,), R, device=h.device) if warmup else model.token_router.depth(h[0])
        gate = probs.gather(1, (depth - 1)[:, None])  # (T, 1)
        start = h
        for r in range(1, R + 1):
            active = (depth >= r).nonzero().squeeze(-1)
            if active.numel() == 0:
                break
            x = h[:, active]
            y = inner.run_positions(x, cfg.loop_positions(r), inner.rope(x, pos[:, active]))
            h = h.clone()
            h[:, active] = y
        h = start + (h - start) * straight_through(gate, cfg.router_alpha)[None]
        h = inner.run_positions(h, cfg.coda_positions, rope)
        outs.append(model.lm_head(inner.norm(h)))
        depths_all.append(depth)
        probs_all.append(probs)
        z_all.append(torch.logsumexp(logits.float(), -1).pow(2))  # (T,) per sample
    z = torch.cat(z_all).mean()  # over every token of every sample
    probs = torch.cat(probs_all)
    depths = torch.stack(depths_all)
    load = torch.stack([(depths == d).float().mean() for d in range(1, R + 1)])
    balance = R * (probs.mean(0) * load).sum()
    aux = balance_coeff * balance + z_coeff * z
    stats = {"tokens_per_depth": [int((depths == d).sum()) for d in range(1, R + 1)],
             "max_vio": float((load.max() - 1 / R) / (1 / R)), "load": load.tolist()}
    return RoutedOutput(torch.cat(outs), depths, aux, stats)


def update_balance_bias(router: TokenRouter, depths: torch.Tensor, rate: float = 1e-3) -> None:
    """Loss-free balancing: nudge the selection bias towards under-loaded depths (after a step)."""
    R = router.balance_bias.numel()
    load = torch.stack([(depths == d).float().mean() for d in range(1, R + 1)])
    router.balance_bias += rate * torch.sign(load.mean() - load)
