"""Depth-wise LoRA around a shared linear layer, and its SVD initialisation.

Every unrolled layer position owns a ``DepthLoRALinear``: the shared ``nn.Linear`` (the very same
module, hence the same weight tensor, at every position that maps to one unique layer) plus that
position's own low-rank pair ``B @ A``:  ``y = x W_shared^T + b + (x A^T) B^T`` (scale 1).
The shared linear is held by reference and *not* registered as a submodule here, so a checkpoint
stores it once, under ``model.shared_layers``.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class DepthLoRALinear(nn.Module):
    """A position's view of a shared linear layer, with an optional rank-``r`` correction."""

    def __init__(self, shared: nn.Linear, rank: int = 0):
        super().__init__()
        self._shared = (shared,)  # a tuple: held, not registered (stored once in shared_layers)
        self.rank = rank
        if rank > 0:
            self.lora_A = nn.Parameter(torch.zeros(rank, shared.in_features, dtype=shared.weight.dtype))
            self.lora_B = nn.Parameter(torch.zeros(shared.out_features, rank, dtype=shared.weight.dtype))

    @property
    def shared(self) -> nn.Linear:
        return self._shared[0]

    @property
    def weight(self) -> torch.Tensor:
        """The shared weight (same storage at every tied position)."""
        return self.shared.weight

    @property
    def in_features(self) -> int:
        return self.shared.in_features

    @property
    def out_features(self) -> int:
        return self.shared.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.shared.weight, self.shared.bias)
        if self.rank > 0:
            y = y + F.linear(F.linear(x, self.lora_A), self.lora_B)
        return y

    def effective_weight(self) -> torch.Tensor:
        """``W_shared + B A``: the dense matrix this position applies (for analysis and tests)."""
        w = self.shared.weight
        if self.rank > 0:
            w = w + self.lora_B @ self.lora_A
        return w

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}"


def svd_factors(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of ``residual`` (out x in): ``(A, B)`` with ``B @ A ≈ residual``.

    Truncated SVD in float32: ``B = U_r diag(S_r)``, ``A = V_r^T`` (on this CPU the exact SVD was
    faster than ``torch.svd_lowrank`` for SmolLM2's shapes: 15 s vs 46 s for 210 matrices).
    """
    u, s, vh = torch.linalg.svd(residual.float(), full_matrices=False)
    a = vh[:rank]
    b = u[:, :rank] * s[:rank]
    return a.to(residual.dtype).contiguous(), b.to(residual.dtype).contiguous()


def relative_error(original: torch.Tensor, approx: torch.Tensor) -> float:
    """Frobenius ``||W - W_hat|| / ||W||``."""
    original, approx = original.detach(), approx.detach()
    return float(torch.linalg.norm(original - approx) / torch.linalg.norm(original))
