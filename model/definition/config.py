"""`RecursiveConfig`: a Llama config plus how its layers are shared, relaxed and exited.

The unrolled model has ``num_prelude + num_loops * block_size + num_coda`` layer positions.
``layer_map[p]`` names the unique layer that position ``p`` runs; positions that map to the same
unique layer share its projection weights (the very same tensors). ``source_layers[u]`` records
which original layer(s) unique layer ``u`` was initialised from.
"""
from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

SHARING_SCHEMES = ("cycle", "sequence", "middle_cycle")
INIT_METHODS = ("stepwise", "average", "lower")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@strict
class RecursiveConfig(LlamaConfig):
    """Llama architecture fields (inherited) plus the recursion layout.

    ``num_hidden_layers`` is the number of *unrolled* positions (the effective depth).
    """

    model_type = "recursive_llama"

    num_loops: int = 1  # B: how many times the shared block runs at full depth
    sharing: str = "cycle"  # one of SHARING_SCHEMES
    block_size: int | None = None  # K: unique layers in the looped block
    num_prelude: int = 0  # unique layers before the loops (middle_cycle: 1)
    num_coda: int = 0  # unique layers after the loops, run by every token at its exit (middle_cycle: 1)
    layer_map: list[int] | None = None  # position -> unique layer index
    source_layers: list[list[int]] | None = None  # unique layer -> original layers it came from
    init_method: str = "average"  # how the shared block was initialised (one of INIT_METHODS)
    lora_rank: int = 0  # per-position LoRA rank on the looped positions; 0 = none
    lora_full_rank: bool = False  # True: each projection uses min(d_in, d_out) (exact relaxation)
    lora_targets: list[str] | None = None  # which projections carry LoRA (default: all seven)
    halting_hidden: int = 0  # > 0: a learned halting head per loop boundary with this hidden width
    router_type: str | None = None  # Mixture-of-Recursions routing: None, "expert" or "token"
    router_alpha: float = 0.1  # gate scale of the router (straight-through in the forward pass)
    router_capacity: list[float] | None = None  # expert-choice: share of tokens kept at each recursion
    base_model: str | None = None  # name or path of the model this was converted from
    training: dict | None = None  # how it was trained: command, data, tokens seen, evaluation

    def __post_init__(self, **kwargs):
        if self.lora_targets is None:
            self.lora_targets = list(PROJECTIONS)
        if self.layer_map is None:
            self.layer_map = list(range(self.num_hidden_layers))
        if self.block_size is None:
            self.block_size = self.num_hidden_layers - self.num_prelude - self.num_coda
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        super().validate_architecture()
        if self.sharing not in SHARING_SCHEMES:
            raise ValueError(f"sharing must be one of {SHARING_SCHEMES}, got {self.sharing!r}")
        if self.num_loops < 1:
            raise ValueError(f"num_loops must be >= 1, got {self.num_loops}")
        expected = self.num_prelude + self.num_loops * self.block_size + self.num_coda
        if expected != self.num_hidden_layers or len(self.layer_map) != self.num_hidden_layers:
            raise ValueError(
                f"inconsistent layout: {self.num_prelude} + {self.num_loops} x {self.block_size} + "
                f"{self.num_coda} positions vs num_hidden_layers={self.num_hidden_layers}, "
                f"layer_map of length {len(self.layer_map)}"
            )
        if self.router_type not in (None, "expert", "token"):
            raise ValueError(f"router_type must be None, 'expert' or 'token', got {self.router_type!r}")
        if self.router_capacity is not None and len(self.router_capacity) != self.num_loops:
            raise ValueError(f"router_capacity needs one value per loop ({self.num_loops})")
        unknown = set(self.lora_targets) - set(PROJECTIONS)
        if unknown:
            raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {PROJECTIONS}")

    # --- derived layout -------------------------------------------------------------------
    @property
    def num_unique_layers(self) -> int:
        return max(self.layer_map) + 1

    def loop_positions(self, loop: int) -> range:
        """Unrolled positions run in loop ``loop`` (1-based)."""
        start = self.num_prelude + (loop - 1) * self.block_size
        return range(start, start + self.block_size)

    @property
    def prelude_positions(self) -> range:
        return range(self.num_prelude)

    @property
    def coda_positions(self) -> range:
        return range(self.num_hidden_layers - self.num_coda, self.num_hidden_layers)

    def is_looped(self, position: int) -> bool:
        return self.num_prelude <= position < self.num_hidden_layers - self.num_coda
