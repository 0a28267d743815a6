"""What a conversion kept and lost, as plain data: parameters, the layer map, per position and projection
the relative reconstruction error and the captured energy vs LoRA rank, and a held-out text check.

``convert_steps(base, tokenizer, ...)`` converts and analyses step by step: it yields
``("progress", fraction, message)`` tuples and finally ``("done", 1.0, (model, report))``, so a caller
can show progress and stop between steps (closing the generator stops the work). ``analyse`` is the
same without the steps.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from model.conversion.asvd import INPUT_OF, asvd_position_, calibrate, output_error, text_batches
from model.conversion.recursify import init_position_lora_, plan_layout, recursify
from model.definition.config import PROJECTIONS
from model.definition.modeling import RecursiveForCausalLM, projection_owner
from model.evaluation.metrics import LoopTally

# A short fixed English text for the held-out check (written for this module, in no training set).
HELD_OUT_TEXT = (
    "The lighthouse keeper climbed the narrow stairs every evening at dusk. He wound the clockwork, "
    "trimmed the wick and polished the great lens until it shone. Ships passing the rocky headland "
    "relied on the steady beam to find the harbour mouth, and in forty years no vessel had been lost "
    "on his watch. When the storm came in October, the power failed across the whole coast, but the "
    "old lamp kept turning through the night."
)
ENERGY_RANKS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LORA_INITS = ("svd", "asvd")  # truncated SVD of the residual; activation-aware SVD (model/conversion/asvd.py)
CALIBRATION_ROWS, CALIBRATION_LEN = 16, 256  # the activation-aware init's calibration: 4,096 tokens


def parameter_summary(base, rec: RecursiveForCausalLM) -> dict:
    """Unique vs effective parameters of the converted model, next to the base's."""
    counts = rec.parameter_counts()
    base_total = sum(p.numel() for p in base.parameters())
    return {**counts, "base": base_total, "unique_share_of_base": counts["unique"] / base_total}


def layer_map(rec: RecursiveForCausalLM, num_base_layers: int) -> list[dict]:
    """For every unrolled position: its role, loop, the unique layer it runs, the original layer it stands for."""
    cfg = rec.config
    layout = plan_layout(num_base_layers, cfg.num_loops, cfg.sharing, cfg.block_size)
    if layout.layer_map != list(cfg.layer_map):
        raise ValueError("this recursive model is not a conversion of a base with this many layers")
    rows = []
    for p, unique in enumerate(cfg.layer_map):
        if p in cfg.prelude_positions:
            role, loop = "prelude", None
        elif p in cfg.coda_positions:
            role, loop = "coda", None
        else:
            role, loop = "loop", (p - cfg.num_prelude) // cfg.block_size + 1
        rows.append({"position": p, "role": role, "loop": loop, "unique": unique,
                     "original": layout.original_of_position[p], "sources": list(cfg.source_layers[unique])})
    return rows


def _weights(layer, name: str) -> torch.Tensor:
    return getattr(projection_owner(layer, name), name).weight.detach().float()


def energy_curve(singular_values: torch.Tensor, ranks) -> list[float]:
    """Share of ``sum σ²`` captured by the top ``r`` singular values, for each ``r`` (1.0 if all are 0)."""
    energy = singular_values.double() ** 2
    total = float(energy.sum())
    cumulative = torch.cumsum(energy, 0)
    if total <= 0:
        return [1.0 for _ in ranks]
    return [min(1.0, float(cumulative[min(r, len(energy)) - 1]) / total) if r > 0 else 0.0 for r in ranks]


@torch.no_grad()
def position_analysis(base, rec: RecursiveForCausalLM, position: int, original: int, ranks,
                      spectra: dict | None = None, covariances: dict | None = None) -> dict:
    """One position: per projection, the relative error of ``W_shared + B A`` and the energy curve of
    ``W_orig - W_shared`` (its singular values from ``spectra`` where given); with calibration
    ``covariances``, also the relative error of the projection's outputs on the calibration inputs."""
    spectra = spectra or {}
    layer = rec.model.layers[position]
    base_layer = base.model.layers[original]
    errors, curves, at_rank, ranks_used, out_errors = {}, {}, {}, {}, {}
    for name in PROJECTIONS:
        lora = getattr(projection_owner(layer, name), name)
        w_orig = _weights(base_layer, name)
        w_eff = lora.effective_weight().detach().float()
        errors[name] = float(torch.linalg.norm(w_orig - w_eff) / torch.linalg.norm(w_orig))
        if covariances is not None:
            out_errors[name] = output_error(w_orig, w_eff, covariances[(original, INPUT_OF[name])])
        sigma = spectra.get(name)
        if sigma is None:
            sigma = torch.linalg.svdvals(w_orig - lora.weight.detach().float())
        curves[name] = energy_curve(sigma, ranks)
        at_rank[name] = energy_curve(sigma, [lora.rank])[0]
        ranks_used[name] = lora.rank
    row = {"position": position, "original": original, "error": errors, "energy": curves,
           "energy_at_rank": at_rank, "rank": ranks_used}
    return {**row, "output_error": out_errors} if covariances is not None else row


@torch.no_grad()
def held_out_check(base, rec: RecursiveForCausalLM, tokenizer, text: str = HELD_OUT_TEXT,
                   max_tokens: int = 256) -> dict:
    """Perplexity of the base and of the converted model after each loop on ``text``, and the converted
    model's top-1 agreement (and KL) with the base."""
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens + 1]
    if ids.shape[1] < 2:
        raise ValueError("the held-out text needs at least two tokens")
    targets = ids[:, 1:]
    base_logits = base(input_ids=ids).logits[:, :-1]
    base_tally, rec_tally = LoopTally(), LoopTally()
    base_tally.add([base_logits], targets)
    rec_tally.add([l[:, :-1] for l in rec(input_ids=ids, output_loop_logits=True).loop_logits], targets, base_logits)
    base_r, rec_r = base_tally.result(), rec_tally.result()
    return {"tokens": rec_r["tokens"], "base_ppl": base_r["ppl"][0], "ppl": rec_r["ppl"][-1],
            "agreement": rec_r["agreement"][-1], "kl": rec_r["kl"][-1],
            "per_loop": {"ppl": rec_r["ppl"], "agreement": rec_r["agreement"], "kl": rec_r["kl"]}}


def _summary(positions: list[dict], layers: list[dict]) -> dict:
    """Per projection: mean error and mean energy curve over the looped positions."""
    looped = [p for p, row in zip(positions, layers) if row["role"] == "loop"] or positions
    mean = lambda xs: sum(xs) / len(xs)
    summary = {"mean_error": {n: mean([p["error"][n] for p in looped]) for n in PROJECTIONS},
               "mean_energy": {n: [mean(col) for col in zip(*[p["energy"][n] for p in looped])] for n in PROJECTIONS},
               "max_error": max(max(p["error"].values()) for p in positions)}
    if "output_error" in positions[0]:
        summary["mean_output_error"] = {n: mean([p["output_error"][n] for p in looped]) for n in PROJECTIONS}
    return summary


def convert_steps(base, tokenizer=None, num_loops: int = 2, sharing: str = "cycle", init: str = "average",
                  lora_rank: int | str = 0, base_name: str | None = None, ranks=ENERGY_RANKS,
                  text: str = HELD_OUT_TEXT, lora_init: str = "svd", calibration_texts=None) -> Iterator[tuple]:
    """Convert ``base`` with ``recursify`` and analyse it, yielding progress (see the module docstring).

    ``lora_init="asvd"``: activation-aware LoRA factors, calibrated on ``calibration_texts`` (plain texts,
    tokenized with ``tokenizer``; ``CALIBRATION_ROWS`` x ``CALIBRATION_LEN`` tokens of them)."""
    if lora_init not in LORA_INITS:
        raise ValueError(f"lora_init must be one of {', '.join(LORA_INITS)}, got {lora_init!r}")
    covariances = None
    if lora_init == "asvd":
        if tokenizer is None or not calibration_texts:
            raise ValueError("the activation-aware init needs a tokenizer and calibration texts")
        yield ("progress", 0.0, f"calibrating activations on {CALIBRATION_ROWS} x {CALIBRATION_LEN} tokens…")
        covariances = calibrate(base, text_batches(tokenizer, calibration_texts, CALIBRATION_ROWS, CALIBRATION_LEN))
    yield ("progress", 0.05 if covariances else 0.0, "converting: shared layers…")
    rec = recursify(base, num_loops=num_loops, sharing=sharing, init=init, lora_rank=lora_rank, base_name=base_name,
                    init_lora=False)
    yield from analysis_steps(base, rec, tokenizer, ranks, text, start=0.1 if covariances else 0.05, init_lora=True,
                              covariances=covariances)


def analysis_steps(base, rec: RecursiveForCausalLM, tokenizer=None, ranks=ENERGY_RANKS, text: str = HELD_OUT_TEXT,
                   start: float = 0.0, init_lora: bool = False, covariances: dict | None = None) -> Iterator[tuple]:
    """Analyse a conversion of ``base`` step by step (one position per step); ``init_lora``: first set each
    position's LoRA by truncated SVD (for ``recursify(..., init_lora=False)``; the SVD serves both), then,
    with calibration ``covariances``, by activation-aware SVD (and report output errors on those inputs)."""
    n_base = len(base.model.layers)
    layers = layer_map(rec, n_base)
    ranks = sorted({r for r in ranks if r <= max(rec.config.hidden_size, rec.config.intermediate_size)})
    positions = []
    whiteners: dict = {}
    span = (0.9 if tokenizer is not None else 1.0) - start
    for row in layers:
        yield ("progress", start + span * row["position"] / len(layers),
               f"{'LoRA SVD and ' if init_lora else ''}spectra of position {row['position'] + 1}/{len(layers)}…")
        spectra = init_position_lora_(rec, base, row["position"], row["original"]) if init_lora else None
        if init_lora and covariances is not None:
            asvd_position_(rec, base, row["position"], row["original"], covariances, whiteners=whiteners)
        positions.append(position_analysis(base, rec, row["position"], row["original"], ranks, spectra, covariances))
    report = {"config": {"num_loops": rec.config.num_loops, "sharing": rec.config.sharing,
                         "init": rec.config.init_method, "block_size": rec.config.block_size,
                         "lora_rank": "full" if rec.config.lora_full_rank else rec.config.lora_rank,
                         "lora_init": "asvd" if covariances is not None else "svd",
                         "base_layers": n_base, "positions": len(layers)},
              "params": parameter_summary(base, rec), "layer_map": layers, "ranks": ranks,
              "positions": positions, "summary": _summary(positions, layers), "projections": list(PROJECTIONS)}
    if tokenizer is not None:
        yield ("progress", 0.9, "held-out text: base vs converted…")
        report["held_out"] = held_out_check(base, rec, tokenizer, text)
    yield ("done", 1.0, (rec, report))


def analyse(base, rec: RecursiveForCausalLM, tokenizer=None, ranks=ENERGY_RANKS, text: str = HELD_OUT_TEXT) -> dict:
    """The whole report for an existing conversion of ``base`` (no progress)."""
    for kind, _, payload in analysis_steps(base, rec, tokenizer, ranks, text):
        if kind == "done":
            return payload[1]
    raise RuntimeError("analysis ended without a result")


__all__ = ["CALIBRATION_LEN", "CALIBRATION_ROWS", "ENERGY_RANKS", "HELD_OUT_TEXT", "LORA_INITS", "analyse", "analysis_steps", "convert_steps", "energy_curve",
           "held_out_check", "layer_map", "parameter_summary", "position_analysis"]
