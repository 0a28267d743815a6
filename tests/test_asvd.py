"""Activation-aware LoRA init: exact at full rank, better than plain SVD on anisotropic inputs."""
from __future__ import annotations

import torch

from model.conversion.asvd import apply_asvd_, asvd_factors, calibrate, output_error, whitening
from model.definition.config import PROJECTIONS
from model.definition.lora import svd_factors
from model.definition.modeling import projection_owner
from model.conversion.recursify import recursify
from tests.conftest import tiny_llama


def anisotropic_cov(dim: int, seed: int = 0) -> torch.Tensor:
    """A covariance with a few massive channels, like an LLM's hidden states."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4096, dim, generator=g)
    x[:, :3] *= 30.0
    x = x @ torch.linalg.qr(torch.randn(dim, dim, generator=g))[0] * 0.2 + x * 0.8
    return x.T @ x / len(x)


def test_asvd_exact_at_full_rank():
    g = torch.Generator().manual_seed(1)
    residual = torch.randn(48, 32, generator=g)
    a, b = asvd_factors(residual, anisotropic_cov(32), rank=32)
    assert torch.allclose(b @ a, residual, atol=1e-4)


def test_asvd_beats_plain_svd_on_calibration_outputs():
    g = torch.Generator().manual_seed(2)
    cov = anisotropic_cov(64)
    residual = torch.randn(64, 64, generator=g)
    for rank in (4, 16):
        a_p, b_p = svd_factors(residual, rank)
        a_w, b_w = asvd_factors(residual, cov, rank, damping=1e-6)
        plain, aware = output_error(residual, b_p @ a_p, cov), output_error(residual, b_w @ a_w, cov)
        assert aware < 0.8 * plain, (rank, aware, plain)


def test_whitening_fallback_handles_singular_covariance():
    v = torch.randn(16, 2)
    cov = v @ v.T  # rank 2: Cholesky of the undamped matrix fails
    s = whitening(cov, damping=0.0)
    assert torch.isfinite(s).all() and torch.allclose(s @ s.T, cov.double(), atol=1e-3 * float(cov.abs().max()))


def test_apply_asvd_on_tiny_model_reduces_output_error():
    teacher = tiny_llama(layers=6)
    with torch.no_grad():  # massive channels in the embeddings -> anisotropic projection inputs
        teacher.model.embed_tokens.weight[:, :4] *= 20
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    covs = calibrate(teacher, [ids[:2], ids[2:]])
    assert covs[(0, "attn_in")].shape == (64, 64) and covs[(0, "down_in")].shape == (128, 128)
    rec = recursify(teacher, num_loops=2, sharing="cycle", init="average", lora_rank=8)
    plain_err = _mean_output_error(rec, teacher, covs)
    apply_asvd_(rec, teacher, covs, damping=1e-6)
    assert _mean_output_error(rec, teacher, covs) < plain_err
    # full rank through apply_asvd_ reproduces the teacher
    full = recursify(teacher, num_loops=2, sharing="cycle", init="average", lora_rank="full")
    apply_asvd_(full, teacher, covs)
    with torch.no_grad():
        assert torch.allclose(full(ids).logits, teacher(ids).logits, atol=1e-3)


def _mean_output_error(rec, teacher, covs) -> float:
    from model.conversion.asvd import INPUT_OF

    errors = []
    for p, layer in enumerate(rec.model.layers):
        src = teacher.model.layers[p]
        for name in PROJECTIONS:
            lora = getattr(projection_owner(layer, name), name)
            w = getattr(projection_owner(src, name), name).weight
            errors.append(output_error(w, lora.effective_weight().detach(), covs[(p, INPUT_OF[name])]))
    return sum(errors) / len(errors)
