"""Pretrained Llama-family model -> Relaxed Recursive Transformer.

``recursify(base, num_loops=3, sharing="cycle", init="average", lora_rank=64)``:

1. choose the layout: which original layer each unrolled position stands for, which unique layer
   it runs (CYCLE ``i mod K``, SEQUENCE ``i // B``, MIDDLE-CYCLE: first and last layer unique);
2. initialise each unique layer from the original layers tied to it (Stepwise / Average / Lower);
3. give every looped position a LoRA initialised by truncated SVD of ``W_original - W_shared``
   (scale 1, so full rank reproduces the original weights exactly).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from model.definition.config import INIT_METHODS, PROJECTIONS, SHARING_SCHEMES, RecursiveConfig
from model.definition.modeling import RecursiveForCausalLM, projection_owner

log = logging.getLogger(__name__)

# config keys of the base that make no sense on the converted model
_DROP_KEYS = {"model_type", "architectures", "quantization_config", "_name_or_path", "transformers_version",
              "auto_map", "num_hidden_layers", "dtype", "torch_dtype"}


@dataclass(frozen=True)
class Layout:
    """Where every unrolled position comes from and what it shares."""

    num_prelude: int
    num_coda: int
    block_size: int  # K
    num_loops: int  # B
    original_of_position: list[int]  # position -> original layer index it replaces
    layer_map: list[int]  # position -> unique layer index

    @property
    def num_positions(self) -> int:
        return len(self.layer_map)

    def positions_of(self, unique: int) -> list[int]:
        return [p for p, u in enumerate(self.layer_map) if u == unique]


def evenly_spaced(n: int, k: int) -> list[int]:
    """``k`` indices from ``range(n)``, spread with fixed ends (rounded linspace)."""
    if k == 1:
        return [0]
    return [round(i * (n - 1) / (k - 1)) for i in range(k)]


def plan_layout(num_layers: int, num_loops: int, sharing: str, block_size: int | None = None) -> Layout:
    """The unrolled layout for a ``num_layers``-layer base (see module docstring)."""
    if sharing not in SHARING_SCHEMES:
        raise ValueError(f"sharing must be one of {SHARING_SCHEMES}, got {sharing!r}")
    if num_loops < 1:
        raise ValueError(f"num_loops must be >= 1, got {num_loops}")
    edge = 1 if sharing == "middle_cycle" and num_loops > 1 else 0
    middle = num_layers - 2 * edge
    k = block_size or middle // num_loops
    if k < 1 or k * num_loops > middle:
        raise ValueError(f"cannot loop {num_loops} x {k} layers out of {middle} available")
    # when middle is not divisible, keep an evenly spread subset of the original layers
    kept = [edge + i for i in evenly_spaced(middle, k * num_loops)] if k * num_loops < middle else \
        list(range(edge, edge + middle))
    if sharing == "sequence":
        middle_map = [i // num_loops for i in range(k * num_loops)]
    else:
        middle_map = [i % k for i in range(k * num_loops)]
    originals = ([0] if edge else []) + kept + ([num_layers - 1] if edge else [])
    layer_map = ([0] if edge else []) + [edge + u for u in middle_map] + ([edge + k] if edge else [])
    return Layout(edge, edge, k, num_loops, originals, layer_map)


def source_layers(layout: Layout, init: str) -> list[list[int]]:
    """For every unique layer, the original layers whose weights initialise it (averaged)."""
    if init not in INIT_METHODS:
        raise ValueError(f"init must be one of {INIT_METHODS}, got {init!r}")
    num_unique = max(layout.layer_map) + 1
    looped = [layout.original_of_position[p] for p in range(layout.num_prelude,
                                                             layout.num_positions - layout.num_coda)]
    sources = []
    for u in range(num_unique):
        tied = [layout.original_of_position[p] for p in layout.positions_of(u)]
        is_edge = all(p < layout.num_prelude or p >= layout.num_positions - layout.num_coda
                      for p in layout.positions_of(u))
        if is_edge or len(tied) == 1 or init == "average":
            sources.append(sorted(set(tied)))
            continue
        k = u - layout.num_prelude
        if init == "stepwise":
            sources.append([looped[evenly_spaced(len(looped), layout.block_size)[k]]])
        else:  # lower: the first K looped layers
            sources.append([looped[k]])
    return sources


def recursify(
    base: PreTrainedModel,
    num_loops: int = 2,
    sharing: str = "cycle",
    init: str = "average",
    lora_rank: int | str = 0,
    block_size: int | None = None,
    base_name: str | None = None,
    init_lora: bool = True,
) -> RecursiveForCausalLM:
    """Convert a pretrained Llama-family causal LM into a ``RecursiveForCausalLM``.

    ``lora_rank``: 0 (pure sharing), a positive int, or ``"full"`` (exact reconstruction).
    ``num_loops=1`` keeps every layer unique (the original model, exactly).
    ``init_lora=False`` leaves the LoRA pairs at zero; ``init_position_lora_`` then sets them one position
    at a time (the Convert tab does, to show progress).
    """
    if lora_rank != "full" and (not isinstance(lora_rank, int) or lora_rank < 0):
        raise ValueError(f"lora_rank must be a non-negative int or 'full', got {lora_rank!r}")
    base_layers = base.model.layers
    layout = plan_layout(len(base_layers), num_loops, sharing, block_size)
    sources = source_layers(layout, init)
    fields = {k: v for k, v in base.config.to_dict().items() if k not in _DROP_KEYS}
    config = RecursiveConfig(
        **fields,
        num_hidden_layers=layout.num_positions,
        num_loops=num_loops,
        sharing=sharing,
        block_size=layout.block_size,
        num_prelude=layout.num_prelude,
        num_coda=layout.num_coda,
        layer_map=layout.layer_map,
        source_layers=sources,
        init_method=init,
        lora_rank=0 if lora_rank == "full" else lora_rank,
        lora_full_rank=lora_rank == "full",
        base_model=base_name or getattr(base.config, "_name_or_path", None),
    )
    dtype = base.model.embed_tokens.weight.dtype
    rec = RecursiveForCausalLM(config).to(dtype)
    with torch.no_grad():
        _copy_weights(base, rec, layout, sources)
        for p in range(layout.num_positions) if init_lora else ():
            init_position_lora_(rec, base, p, layout.original_of_position[p])
    rec.tie_weights()
    rec.eval()
    log.info("recursified: %s", rec.parameter_counts())
    return rec


def _copy_weights(base: PreTrainedModel, rec: RecursiveForCausalLM, layout: Layout, sources: list[list[int]]) -> None:
    src_layers = base.model.layers
    rec.model.embed_tokens.weight.copy_(base.model.embed_tokens.weight)
    rec.model.norm.weight.copy_(base.model.norm.weight)
    if not rec.config.tie_word_embeddings:
        rec.lm_head.weight.copy_(base.lm_head.weight)
    for u, shared in enumerate(rec.model.shared_layers):
        for name in PROJECTIONS:
            weights = [_projection(src_layers[i], name) for i in sources[u]]
            shared.projection(name).weight.copy_(torch.stack([w.weight for w in weights]).mean(0))
            if shared.projection(name).bias is not None:
                shared.projection(name).bias.copy_(torch.stack([w.bias for w in weights]).mean(0))
    for p, layer in enumerate(rec.model.layers):
        original = src_layers[layout.original_of_position[p]]
        layer.input_layernorm.weight.copy_(original.input_layernorm.weight)
        layer.post_attention_layernorm.weight.copy_(original.post_attention_layernorm.weight)


@torch.no_grad()
def init_position_lora_(rec: RecursiveForCausalLM, base: PreTrainedModel, position: int,
                        original: int) -> dict[str, torch.Tensor]:
    """Set the LoRA pairs of one position by truncated SVD of ``W_original - W_shared``; returns the singular
    values of each projection's residual that carries a LoRA (computed anyway)."""
    layer, source = rec.model.layers[position], base.model.layers[original]
    spectra = {}
    for name in PROJECTIONS:
        lora = getattr(projection_owner(layer, name), name)
        if lora.rank == 0:
            continue
        residual = _projection(source, name).weight.float() - lora.weight.float()
        u, sigma, vh = torch.linalg.svd(residual, full_matrices=False)
        lora.lora_A.copy_(vh[:lora.rank].to(lora.lora_A.dtype))
        lora.lora_B.copy_((u[:, :lora.rank] * sigma[:lora.rank]).to(lora.lora_B.dtype))
        spectra[name] = sigma
    return spectra


def _projection(layer: nn.Module, name: str) -> nn.Linear:
    return getattr(projection_owner(layer, name), name)


def add_routers(model, router_type: str, capacity: list[float] | None = None, alpha: float = 0.1):
    """A copy of a recursive model with freshly initialised routers (weights shared by value)."""
    cfg = model.config.__class__.from_dict(model.config.to_dict())
    cfg.router_type = router_type
    cfg.router_alpha = alpha
    if router_type == "expert":
        n = cfg.num_loops
        cfg.router_capacity = capacity or [(n - r) / n for r in range(n)]  # 1, (n-1)/n, ...
    routed = RecursiveForCausalLM(cfg).to(model.dtype)
    missing, unexpected = routed.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("router" in k for k in missing), (missing, unexpected)
    return routed.eval()
