"""Activation-aware initialisation of the depth-wise LoRA factors (METHODS.md §3.8).

Plain SVD init (the paper's) picks ``B A`` that best approximates the residual
``R = W_original(position) - W_shared`` in Frobenius norm. What matters is the error on the
projection's *outputs for real inputs*: ``||(R - B A) X^T||``. With ``C = X^T X / n = S S^T``
(Cholesky), that error is ``||(R - B A) S||_F``, minimised at rank r by the truncated SVD of the
whitened residual ``R S = U Σ V^T``:  ``B = U_r Σ_r^{1/2}``, ``A = Σ_r^{1/2} V_r^T S^{-1}``.
At full rank ``B A = R`` exactly.

1. ``calibrate(teacher, batches)`` accumulates the input second moment of every projection of every
   teacher layer with forward pre-hooks (four distinct inputs per layer: q/k/v share the attention
   input, gate/up the MLP input; o and down have their own).
2. ``apply_asvd_(rec, teacher, covariances)`` overwrites every looped position's LoRA factors.
``cached_covariances`` stores the calibration under the cache folder, keyed by its settings.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from model.definition.config import PROJECTIONS
from model.definition.modeling import RecursiveForCausalLM, projection_owner
from model.paths import cache_dir
from model.conversion.recursify import plan_layout

log = logging.getLogger(__name__)

# which projections see the same input (one covariance each)
INPUT_OF = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "o_in",
            "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down_in"}
_HOOKED = {"attn_in": "q_proj", "o_in": "o_proj", "mlp_in": "gate_proj", "down_in": "down_proj"}

Covariances = dict[tuple[int, str], torch.Tensor]  # (original layer, input kind) -> C = X^T X / n


class _Accumulator:
    """Running ``sum x x^T`` (fp64) and token count for one input."""

    def __init__(self):
        self.sum: torch.Tensor | None = None
        self.count = 0

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        gram = (x.T @ x).double()
        self.sum = gram if self.sum is None else self.sum + gram
        self.count += x.shape[0]

    def covariance(self) -> torch.Tensor:
        return (self.sum / max(self.count, 1)).float()


@torch.no_grad()
def calibrate(teacher: nn.Module, batches: Iterable[torch.Tensor]) -> Covariances:
    """Input second moments of every projection input of every teacher layer over ``batches``."""
    accumulators: dict[tuple[int, str], _Accumulator] = {}
    handles = []
    for i, layer in enumerate(teacher.model.layers):
        for kind, name in _HOOKED.items():
            acc = accumulators[(i, kind)] = _Accumulator()
            handles.append(getattr(projection_owner(layer, name), name).register_forward_pre_hook(acc))
    try:
        device = next(teacher.parameters()).device
        body = getattr(teacher, "model", teacher)  # the decoder stack: the LM head feeds no projection
        for batch in batches:
            body(input_ids=batch.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return {key: acc.covariance() for key, acc in accumulators.items()}


def whitening(cov: torch.Tensor, damping: float = 1e-3) -> torch.Tensor:
    """Lower-triangular ``S`` with ``S S^T = C + damping * mean(diag C) * I`` (eigen fallback)."""
    cov = cov.double()
    eye = torch.eye(cov.shape[0], dtype=cov.dtype)
    damped = cov + damping * cov.diagonal().mean().clamp_min(1e-12) * eye
    chol, info = torch.linalg.cholesky_ex(damped)
    if int(info) == 0:
        return chol
    log.warning("Cholesky failed (info=%d); using a clipped eigen-decomposition", int(info))
    vals, vecs = torch.linalg.eigh((damped + damped.T) / 2)
    vals = vals.clamp_min(damping * vals.abs().max() + 1e-12)
    # any square root works for whitening; QR of (V sqrt(L))^T gives a triangular one
    _, r = torch.linalg.qr((vecs * vals.sqrt()).T)
    return r.T * torch.sign(r.diagonal())[None, :]


def asvd_factors(residual: torch.Tensor, cov: torch.Tensor | None, rank: int, damping: float = 1e-3,
                 whitener: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` ``(A, B)`` minimising ``||(residual - B A) S||_F`` with ``S S^T = cov`` (damped).

    ``whitener``: a precomputed ``whitening(cov, damping)`` (shared by projections with one input).
    The SVD runs in float32 (the whitener is computed in float64).
    """
    s = whitening(cov, damping) if whitener is None else whitener
    u, sigma, vh = torch.linalg.svd((residual.double() @ s).float(), full_matrices=False)
    u, sigma, vh = u.double(), sigma.double(), vh.double()
    root = sigma[:rank].sqrt()
    b = u[:, :rank] * root
    # A S = root * V_r^T  ->  solve for A without forming S^{-1}
    a = torch.linalg.solve_triangular(s, root[:, None] * vh[:rank], upper=False, left=False)
    return a.to(residual.dtype).contiguous(), b.to(residual.dtype).contiguous()


def original_positions(rec: RecursiveForCausalLM, num_base_layers: int) -> list[int]:
    """For every unrolled position of ``rec``, the teacher layer it replaces."""
    cfg = rec.config
    layout = plan_layout(num_base_layers, cfg.num_loops, cfg.sharing, cfg.block_size)
    if layout.layer_map != list(cfg.layer_map):
        raise ValueError("the recursive model's layout does not match a conversion of this teacher")
    return layout.original_of_position


@torch.no_grad()
def asvd_position_(rec: RecursiveForCausalLM, teacher: nn.Module, position: int, original: int,
                   covariances: Covariances, damping: float = 1e-3,
                   whiteners: dict[tuple[int, str], torch.Tensor] | None = None) -> None:
    """Overwrite the LoRA pairs of one position with activation-aware factors of its residual (in place).
    ``whiteners``: a cache shared across positions (one whitening per teacher layer and input)."""
    whiteners = {} if whiteners is None else whiteners
    layer, source = rec.model.layers[position], teacher.model.layers[original]
    for name in PROJECTIONS:
        lora = getattr(projection_owner(layer, name), name)
        if lora.rank == 0:
            continue
        residual = getattr(projection_owner(source, name), name).weight.float() - lora.weight.float()
        key = (original, INPUT_OF[name])
        if key not in whiteners:
            whiteners[key] = whitening(covariances[key], damping)
        a, b = asvd_factors(residual, None, lora.rank, whitener=whiteners[key])
        lora.lora_A.copy_(a.to(lora.lora_A.dtype))
        lora.lora_B.copy_(b.to(lora.lora_B.dtype))


@torch.no_grad()
def apply_asvd_(rec: RecursiveForCausalLM, teacher: nn.Module, covariances: Covariances,
                damping: float = 1e-3) -> RecursiveForCausalLM:
    """Overwrite every LoRA pair of ``rec`` with activation-aware factors of its residual (in place)."""
    originals = original_positions(rec, len(teacher.model.layers))
    whiteners: dict[tuple[int, str], torch.Tensor] = {}
    for p in range(len(rec.model.layers)):
        asvd_position_(rec, teacher, p, originals[p], covariances, damping, whiteners)
    return rec


def text_batches(tokenizer, texts: Iterable[str], num_rows: int, seq_len: int,
                 batch_size: int = 4) -> Iterable[torch.Tensor]:
    """Calibration rows from plain texts: tokenized with ``tokenizer``, joined (EOS between texts) and cut
    into ``num_rows`` rows of ``seq_len`` tokens (fewer if the texts run out), ``batch_size`` rows at a time."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    rows: list[list[int]] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False).input_ids + eos
        while len(stream) >= seq_len and len(rows) < num_rows:
            rows.append(stream[:seq_len])
            stream = stream[seq_len:]
        if len(rows) >= num_rows:
            break
    if not rows:
        raise ValueError(f"the calibration texts hold fewer than {seq_len} tokens")
    for i in range(0, len(rows), batch_size):
        yield torch.tensor(rows[i:i + batch_size])


def output_error(weight: torch.Tensor, approx: torch.Tensor, cov: torch.Tensor) -> float:
    """Relative output error on calibration inputs: ``sqrt(tr(D C D^T) / tr(W C W^T))``, ``D = W - approx``."""
    weight, approx = weight.detach(), approx.detach()
    diff = (weight - approx).double()
    cov = cov.double()
    num = torch.einsum("oi,ij,oj->", diff, cov, diff)
    den = torch.einsum("oi,ij,oj->", weight.double(), cov, weight.double())
    return float((num / den).clamp_min(0).sqrt())


def cached_covariances(teacher: nn.Module, base_name: str, num_sequences: int = 64, seq_len: int = 512,
                       seed: int = 1234, batch_size: int = 4, split: str = "train") -> Covariances:
    """Calibrate on ``num_sequences`` rows of ``split`` (seeded), cached under ``.cache/asvd``."""
    from model.data import iter_batches

    key = hashlib.sha256(f"{base_name}:{split}:{num_sequences}:{seq_len}:{seed}".encode()).hexdigest()[:16]
    path: Path = cache_dir("asvd") / f"cov-{key}.pt"
    if path.exists():
        log.info("calibration covariances from %s", path)
        return torch.load(path)

    def batches():
        seen = 0
        for batch in iter_batches(split, batch_size, seq_len, seed=seed):
            batch = batch[: num_sequences - seen]
            yield batch
            seen += len(batch)
            if seen >= num_sequences:
                return

    log.info("calibrating on %d x %d tokens of %s", num_sequences, seq_len, split)
    covariances = calibrate(teacher, batches())
    tmp = path.with_suffix(".tmp")
    torch.save(covariances, tmp)
    tmp.replace(path)
    return covariances
