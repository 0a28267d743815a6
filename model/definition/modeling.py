"""`RecursiveForCausalLM`: a Llama-family model whose layers are shared across loops.

Built from transformers' own ``LlamaDecoderLayer``, ``LlamaRMSNorm`` and ``LlamaRotaryEmbedding``:
attention, RoPE and GQA are the library's. Layout (see ``RecursiveConfig``)::

    embed -> prelude positions -> loop 1 .. loop B (each: block_size positions) -> coda -> norm -> head

Each unrolled position is a ``LlamaDecoderLayer`` (own layer index for the KV cache, own RMSNorms)
whose seven projections are ``DepthLoRALinear`` views of one ``SharedLayer`` (tied weights) plus
that position's LoRA. A token that exits after loop ``r`` skips loops ``r+1..B`` and goes straight
to the coda, the final norm and the head.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from model.definition.config import PROJECTIONS, RecursiveConfig
from model.definition.lora import DepthLoRALinear
from model.definition.routers import ExpertRouters, TokenRouter

ATTN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class SharedLayer(nn.Module):
    """The seven projection weights of one unique layer, used by every position mapped to it."""

    def __init__(self, config: RecursiveConfig):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        q_out = config.num_attention_heads * config.head_dim
        kv_out = config.num_key_value_heads * config.head_dim
        ab, mb = config.attention_bias, config.mlp_bias
        self.q_proj = nn.Linear(d, q_out, bias=ab)
        self.k_proj = nn.Linear(d, kv_out, bias=ab)
        self.v_proj = nn.Linear(d, kv_out, bias=ab)
        self.o_proj = nn.Linear(q_out, d, bias=ab)
        self.gate_proj = nn.Linear(d, f, bias=mb)
        self.up_proj = nn.Linear(d, f, bias=mb)
        self.down_proj = nn.Linear(f, d, bias=mb)

    def projection(self, name: str) -> nn.Linear:
        return getattr(self, name)


def projection_owner(layer: LlamaDecoderLayer, name: str) -> nn.Module:
    """The submodule (attention or MLP) of a decoder layer that holds projection ``name``."""
    return layer.self_attn if name in ATTN_PROJECTIONS else layer.mlp


def lora_rank_for(config: RecursiveConfig, position: int, name: str, shared: nn.Linear) -> int:
    """LoRA rank of projection ``name`` at ``position`` (0 outside the looped block)."""
    if not config.is_looped(position) or name not in config.lora_targets:
        return 0
    if config.lora_full_rank:
        return min(shared.in_features, shared.out_features)
    return min(config.lora_rank, shared.in_features, shared.out_features)


class HaltingHead(nn.Module):
    """Predicts from the (normed) residual stream after a loop whether the token can stop there.

    ``sigmoid(head(h))`` estimates P(this loop's top-1 == the last loop's top-1), as CALM's learned
    classifier; it costs ``2·d·hidden + 2·hidden`` FLOPs instead of an LM head.
    """

    def __init__(self, hidden_size: int, width: int):
        super().__init__()
        self.up = nn.Linear(hidden_size, width)
        self.out = nn.Linear(width, 1)

    def forward(self, normed: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.up(normed))).squeeze(-1)


@dataclass
class RecursiveOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus per-loop states: the residual stream after each loop (before
    the coda) and, on request, the exit logits of every loop (the last equals ``logits``)."""

    loop_hidden_states: tuple[torch.Tensor, ...] | None = None
    loop_logits: tuple[torch.Tensor, ...] | None = None


class RecursivePreTrainedModel(PreTrainedModel):
    config_class = RecursiveConfig
    config: RecursiveConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer"]
    _supports_sdpa = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (ExpertRouters, TokenRouter)):
            return  # routers initialise themselves (N(0, 0.02), zero balancing bias)
        super()._init_weights(module)
        if isinstance(module, DepthLoRALinear) and module.rank > 0:
            # standard LoRA start (no change to the shared weight); recursify overwrites with SVD factors
            nn.init.normal_(module.lora_A, std=self.config.initializer_range)
            nn.init.zeros_(module.lora_B)


class RecursiveModel(RecursivePreTrainedModel):
    """Embeddings, the shared weights, the unrolled positions and the final norm (no head)."""

    def __init__(self, config: RecursiveConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.shared_layers = nn.ModuleList(SharedLayer(config) for _ in range(config.num_unique_layers))
        self.layers = nn.ModuleList(self._build_position(p) for p in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.post_init()

    def _build_position(self, position: int) -> LlamaDecoderLayer:
        layer = LlamaDecoderLayer(self.config, layer_idx=position)
        shared = self.shared_layers[self.config.layer_map[position]]
        for name in PROJECTIONS:
            linear = shared.projection(name)
            rank = lora_rank_for(self.config, position, name, linear)
            setattr(projection_owner(layer, name), name, DepthLoRALinear(linear, rank))
        return layer

    # --- pieces the engine and the trainer compose --------------------------------------------
    def rope(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary_emb(hidden, position_ids=position_ids)

    def run_positions(
        self,
        hidden: torch.Tensor,
        positions: range | list[int],
        rope: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """Run the decoder layers at ``positions`` in order; ``hidden`` is (B, T, d)."""
        for p in positions:
            hidden = self.layers[p](
                hidden,
                attention_mask=attention_mask,
                position_embeddings=rope,
                past_key_values=cache,
                use_cache=cache is not None,
            )
        return hidden

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        num_loops: int | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], Cache | None]:
        """Full-sequence forward at a uniform depth of ``num_loops`` (default: all loops).

        Returns ``(normed_last_hidden, loop_hidden_states, cache)``. ``attention_mask`` must be
        ``None`` (causal, unpadded) or a 4-D additive mask.
        """
        cfg = self.config
        loops = cfg.num_loops if num_loops is None else num_loops
        if not 1 <= loops <= cfg.num_loops:
            raise ValueError(f"num_loops must be in 1..{cfg.num_loops}, got {loops}")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        if position_ids is None:
            start = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(start, start + hidden.shape[1], device=hidden.device)[None]
        if attention_mask is not None and attention_mask.dim() != 4:
            attention_mask = None  # a 2-D all-ones padding mask from generate(): plain causal
        if attention_mask is None and hidden.shape[1] > 1 and past_key_values is not None:
            past = past_key_values.get_seq_length()
            attention_mask = causal_mask(hidden.shape[1], past + hidden.shape[1], hidden.dtype, hidden.device)
        rope = self.rope(hidden, position_ids)
        cache = past_key_values if use_cache or past_key_values is not None else None
        hidden = self.run_positions(hidden, cfg.prelude_positions, rope, attention_mask, cache)
        loop_states = []
        for loop in range(1, loops + 1):
            hidden = self.run_positions(hidden, cfg.loop_positions(loop), rope, attention_mask, cache)
            loop_states.append(hidden)
        hidden = self.run_positions(hidden, cfg.coda_positions, rope, attention_mask, cache)
        return self.norm(hidden), tuple(loop_states), cache


def causal_mask(q_len: int, kv_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive (1, 1, q_len, kv_len) mask: query i (the last q_len of kv_len tokens) sees keys <= its own."""
    allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(diagonal=kv_len - q_len)
    mask = torch.zeros(q_len, kv_len, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


class RecursiveForCausalLM(RecursivePreTrainedModel, GenerationMixin):
    """A recursive (looped, optionally relaxed) causal LM. ``forward`` runs at uniform depth."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: RecursiveConfig):
        super().__init__(config)
        self.model = RecursiveModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.halting_hidden > 0:  # one head per loop boundary where a token may stop
            self.halting_heads = nn.ModuleList(
                HaltingHead(config.hidden_size, config.halting_hidden) for _ in range(config.num_loops - 1)
            )
        if config.router_type == "expert":  # Mixture-of-Recursions routers (model/definition/routers.py)
            self.routers = ExpertRouters(config.hidden_size, config.num_loops)
        elif config.router_type == "token":
            self.token_router = TokenRouter(config.hidden_size, config.num_loops)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        num_loops: int | None = None,
        output_loop_logits: bool = False,
        **kwargs,
    ) -> RecursiveOutput:
        """Uniform-depth forward. ``output_loop_logits``: also the exit logits after every loop
        (full sequences without cache only; each loop's states go through the coda, norm, head)."""
        hidden, loop_states, cache = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            num_loops=num_loops,
            attention_mask=attention_mask,
        )
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        loop_logits = None
        if output_loop_logits:
            if past_key_values is not None or use_cache:
                raise ValueError("output_loop_logits needs a full sequence without a cache")
            pos = torch.arange(loop_states[0].shape[1], device=logits.device)[None] if position_ids is None \
                else position_ids
            rope = self.model.rope(loop_states[0], pos)
            loop_logits = tuple(self.exit_logits(h, rope) for h in loop_states[:-1]) + (logits,)
        return RecursiveOutput(loss=loss, logits=logits, past_key_values=cache, loop_hidden_states=loop_states,
                               loop_logits=loop_logits)

    # --- exit path and parameter accounting ----------------------------------------------------
    def exit_logits(self, hidden: torch.Tensor, rope, attention_mask=None, cache: Cache | None = None) -> torch.Tensor:
        """Logits for a residual stream taken after some loop: coda -> norm -> head."""
        hidden = self.model.run_positions(hidden, self.config.coda_positions, rope, attention_mask, cache)
        return self.lm_head(self.model.norm(hidden))

    def halting_logit(self, loop: int, hidden: torch.Tensor) -> torch.Tensor:
        """Halting-head logit after loop ``loop`` (1-based, < num_loops) for residual stream ``hidden``."""
        return self.halting_heads[loop - 1](self.model.norm(hidden))

    @property
    def has_halting_heads(self) -> bool:
        return hasattr(self, "halting_heads")

    def parameter_counts(self) -> dict[str, int]:
        """Unique parameters (stored once) vs effective (what an unshared model of this depth holds)."""
        embedding = self.model.embed_tokens.weight.numel()
        unique = sum(p.numel() for p in self.parameters())  # parameters() de-duplicates tied tensors
        lora = sum(p.numel() for n, p in self.named_parameters() if "lora_" in n)
        shared = sum(p.numel() for p in self.model.shared_layers.parameters())
        per_layer_dense = sum(p.numel() for p in self.model.shared_layers[0].parameters())
        norms = unique - embedding - lora - shared
        effective = embedding + norms + per_layer_dense * self.config.num_hidden_layers
        if not self.config.tie_word_embeddings:
            effective += self.lm_head.weight.numel()
        return {
            "unique": unique,
            "unique_non_embedding": unique - embedding - (0 if self.config.tie_word_embeddings else self.lm_head.weight.numel()),
            "effective": effective,
            "effective_non_embedding": effective - embedding - (0 if self.config.tie_word_embeddings else self.lm_head.weight.numel()),
            "layer_weights": shared,
            "lora": lora,
            "embedding": embedding,
        }


AutoConfig.register(RecursiveConfig.model_type, RecursiveConfig)
AutoModelForCausalLM.register(RecursiveConfig, RecursiveForCausalLM)
