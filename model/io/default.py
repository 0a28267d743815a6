"""The trained default model: rebuilt offline from the embedded base plus a small committed artifact.

``assets/default/`` holds only what cannot be recomputed from SmolLM2-135M itself (see
docs/TRAINING.md): ``config.json`` (the RecursiveConfig, including the training provenance),
``conversion.json`` (the ``recursify`` arguments that recreate the frozen shared block) and
``weights.safetensors`` (the trained LoRA factors, per-position norms and halting heads; int8 with
per-row scales where noted). ``default_folder()`` rebuilds the full model once, caches it under
``cache_dir("models", "default-<artifact hash>")`` and returns that folder for ``load_model``.

A run that trained the shared block (or the embeddings) too is exported with ``--block-rank R``: each
such weight is stored as a truncated-SVD delta to the fresh conversion, ``W = W_fresh + B @ A`` (``B``:
out x R, ``A``: R x in; int8 or int4 with per-row scales), so the artifact still rebuilds from the
embedded base; ``export`` refuses an artifact over ``MAX_ARTIFACT_BYTES``.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from model.errors import ModelLoadError
from model.io.folders import (
    CHECKSUMS,
    atomic_write_folder,
    load_base,
    load_folder,
    require_finite,
    run_model_folder,
    verify_checksums,
    write_checksums,
)
from model.paths import ASSETS_DIR, cache_dir

log = logging.getLogger(__name__)

ARTIFACT_DIR = ASSETS_DIR / "default"
ARTIFACT_NAMES = ("default", "default-mor")  # load_model names of the committed artifacts (folders in assets/)
# What the server and the dashboard show when a checkout has no trained default: the embedded base
# converted to 3 loops with full-rank LoRA, untrained but exact at full depth (the same answers as the base).
FALLBACK_CONVERSION = dict(num_loops=3, sharing="cycle", init="average", lora_rank="full")
ARTIFACT_FILES = ("config.json", "conversion.json", "weights.safetensors")  # + SHA256SUMS, checked before use
_SCALE_SUFFIX = ".int8_scale"
_INT4_SCALE, _INT4_COLS = ".int4_scale", ".int4_cols"
DELTA_B, DELTA_A = ".delta_B", ".delta_A"  # a recomputed weight's low-rank delta: W = W_fresh + B @ A
MAX_ARTIFACT_BYTES = 50 * 2**20  # issue 13: the committed default stays <= 50 MB


def artifact_hash(folder: Path = ARTIFACT_DIR) -> str:
    """Short sha256 over the artifact files (names the cache folder, so a new artifact rebuilds);
    an overlay artifact's hash covers the artifact it extends too."""
    digest = hashlib.sha256()
    for name in ARTIFACT_FILES:
        digest.update(name.encode())
        digest.update((folder / name).read_bytes())
    base = _overlay_base(folder)
    if base is not None:
        digest.update(artifact_hash(base).encode())
    return digest.hexdigest()[:16]


def _overlay_base(folder: Path) -> Path | None:
    """The artifact an overlay extends (``conversion.json: "overlay_of": "<sibling folder>"``), if any."""
    conversion = json.loads((folder / "conversion.json").read_text())
    return folder.parent / conversion["overlay_of"] if conversion.get("overlay_of") else None


def _overlay_chain(folder: Path) -> list[Path]:
    """The artifacts an overlay extends, nearest first."""
    chain, base = [], _overlay_base(folder)
    while base is not None:
        chain.append(base)
        base = _overlay_base(base)
    return chain


def default_folder(artifact: Path = ARTIFACT_DIR) -> Path:
    """Folder with the trained default as a loadable checkpoint (built from the artifact on first use)."""
    missing = [name for name in ARTIFACT_FILES if not (artifact / name).exists()]
    if missing:
        raise ModelLoadError(
            f"no trained default artifact in {artifact} (missing {', '.join(missing)}); train one with "
            "`python -m model.training uptrain ...` and export it (docs/TRAINING.md), or load the untrained "
            "conversion / the teacher 'smollm2-135m' instead"
        )
    if not (artifact / CHECKSUMS).exists():
        raise ModelLoadError(f"{artifact} has no {CHECKSUMS}; re-export it (`python -m model.io.default export`)")
    verify_checksums(artifact)  # a truncated clone or an LFS pointer fails here, not as a strange model
    for base in _overlay_chain(artifact):
        verify_checksums(base)
    target = cache_dir("models") / f"default-{artifact_hash(artifact)}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    log.info("rebuilding the trained default from %s (once)", artifact)
    model, tokenizer = rebuild(artifact)
    require_finite(model, f"the default rebuilt from {artifact}")

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    atomic_write_folder(target, write)
    return target


def rebuild(artifact: Path = ARTIFACT_DIR):
    """``(RecursiveForCausalLM, tokenizer)``: the base's plain conversion + the artifact's tensors."""
    from model.definition.config import RecursiveConfig
    from model.definition.modeling import RecursiveForCausalLM
    from model.conversion.recursify import recursify

    conversion = json.loads((artifact / "conversion.json").read_text())
    config = RecursiveConfig.from_dict(json.loads((artifact / "config.json").read_text()))
    base, tokenizer = load_base(conversion["base"])
    plain = recursify(base, num_loops=conversion["loops"], sharing=conversion["sharing"],
                      init=conversion["init"], lora_rank=0, block_size=conversion.get("block_size"),
                      base_name=conversion["base"])
    model = RecursiveForCausalLM(config).to(torch.float32)
    state = dequantize_state(load_file(str(artifact / "weights.safetensors")))
    base_artifact = _overlay_base(artifact)
    if base_artifact is not None:  # e.g. default-mor = the default's tensors + its routers
        state = {**dequantize_state(load_file(str(base_artifact / "weights.safetensors"))), **state}
    recomputed = {k: v for k, v in plain.state_dict().items() if k not in state}
    merged = {**recomputed, **state}
    apply_deltas_(merged, config.tie_word_embeddings)
    result = model.load_state_dict(merged, strict=False)
    missing = [k for k in result.missing_keys if k != "lm_head.weight"]
    if missing or result.unexpected_keys:
        raise ModelLoadError(f"the default artifact does not fit its config: missing {missing[:5]}, "
                             f"unexpected {result.unexpected_keys[:5]}")
    model.tie_weights()
    return model.eval(), tokenizer


# --- int8 / int4 storage with per-row scales --------------------------------------------------------
def quantize_state(state: dict[str, torch.Tensor], int8_keys: set[str],
                   int4_keys: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Store the 2-D tensors named in ``int8_keys`` as int8 + fp32 per-row scales, those in ``int4_keys``
    as int4 (two per byte, symmetric -7..7) + fp32 per-row scales + their column count; the rest as fp32."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        value = value.detach().float().cpu()
        if key in int8_keys and value.ndim == 2:
            scale = value.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
            out[key] = torch.round(value / scale).clamp(-127, 127).to(torch.int8).contiguous()
            out[key + _SCALE_SUFFIX] = scale.squeeze(1).contiguous()
        elif key in int4_keys and value.ndim == 2:
            scale = value.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 7.0
            nibbles = (torch.round(value / scale).clamp(-7, 7) + 8).to(torch.uint8)
            if nibbles.shape[1] % 2:  # pad to whole bytes with a zero (8)
                nibbles = torch.cat([nibbles, torch.full((nibbles.shape[0], 1), 8, dtype=torch.uint8)], 1)
            out[key] = (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).contiguous()
            out[key + _INT4_SCALE] = scale.squeeze(1).contiguous()
            out[key + _INT4_COLS] = torch.tensor([value.shape[1]], dtype=torch.int64)
        else:
            out[key] = value.contiguous()
    return out


def dequantize_state(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``quantize_state`` (fp32 tensors)."""
    state = {}
    for key, value in stored.items():
        if key.endswith((_SCALE_SUFFIX, _INT4_SCALE, _INT4_COLS)):
            continue
        if key + _INT4_SCALE in stored:
            nibbles = torch.stack([value & 15, value >> 4], dim=2).reshape(value.shape[0], -1)
            columns = int(stored[key + _INT4_COLS][0])
            state[key] = (nibbles[:, :columns].float() - 8) * stored[key + _INT4_SCALE][:, None]
            continue
        scale = stored.get(key + _SCALE_SUFFIX)
        state[key] = value.float() * scale[:, None] if scale is not None else value.float()
    return state


# --- low-rank deltas of recomputed weights (a trained shared block) ---------------------------------
def low_rank_delta(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``B @ A`` the best rank-``rank`` approximation of ``delta`` (truncated SVD;
    ``B = U_r S_r^1/2``, ``A = S_r^1/2 V_r^T``, so both factors have rows of similar scale for int8)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    return (u[:, :r] * root).float(), (root[:, None] * vh[:r]).float()


def apply_deltas_(state: dict[str, torch.Tensor], tied_embeddings: bool) -> None:
    """Replace every ``<key>.delta_B`` / ``<key>.delta_A`` pair in ``state`` by ``state[key] += B @ A``
    (in place); with tied embeddings a changed embedding also is the head."""
    keys = [k[: -len(DELTA_B)] for k in state if k.endswith(DELTA_B)]
    for key in keys:
        b, a = state.pop(key + DELTA_B), state.pop(key + DELTA_A)
        state[key] = state[key].float() + b.double().matmul(a.double()).float()
    if keys and tied_embeddings:
        state.pop("lm_head.weight", None)  # re-tied to the (changed) embedding after loading


# --- export ------------------------------------------------------------------------------------------
RECOMPUTED_PREFIXES = ("model.shared_layers.", "model.embed_tokens.", "lm_head.")


@torch.no_grad()
def export_artifact(source: Path, artifact: Path = ARTIFACT_DIR, int8: bool = True, check_rows: int = 2,
                    block_rank: int | None = None, block_bits: int = 8, max_bytes: int = MAX_ARTIFACT_BYTES) -> dict:
    """Write ``artifact`` from a trained checkpoint.

    Stores every tensor except the shared block, embeddings and head (recomputed from the base);
    LoRA factors as int8 with per-row scales when ``int8``. The recomputed parts must equal a fresh
    conversion (``--train lora``), unless ``block_rank``: then each 2-D weight among them that training
    changed (shared projections; the embedding, which is also the head when tied) is stored as a rank-
    ``block_rank`` truncated-SVD delta to the fresh conversion, its factors as int8 (``block_bits`` 8) or
    int4 (4) with per-row scales, and any other changed tensor whole (fp32). Refuses an artifact over
    ``max_bytes``. Records the rebuilt model's perplexity on the first ``check_rows`` validation rows
    beside the run's own (``config.training["artifact"]``): the cost of the compression.
    """
    from safetensors.torch import save as save_bytes
    from model.conversion.recursify import recursify

    if block_bits not in (4, 8):
        raise ValueError(f"--block-bits must be 8 or 4, got {block_bits}")
    trained, _ = load_folder(run_model_folder(source))
    cfg = trained.config
    conversion = {"base": cfg.base_model, "loops": cfg.num_loops, "sharing": cfg.sharing,
                  "init": cfg.init_method, "block_size": cfg.block_size}
    base, _ = load_base(conversion["base"])
    plain = recursify(base, num_loops=cfg.num_loops, sharing=cfg.sharing, init=cfg.init_method, lora_rank=0,
                      block_size=cfg.block_size, base_name=cfg.base_model).state_dict()
    state = trained.state_dict()
    changed = [k for k, v in state.items() if k.startswith(RECOMPUTED_PREFIXES) and not torch.equal(v, plain[k])
               and not (k == "lm_head.weight" and cfg.tie_word_embeddings)]  # a tied head is the embedding
    if changed and block_rank is None:
        raise ValueError(f"{changed[0]} (and {len(changed) - 1} more) differ from a fresh conversion: train with "
                         "--train lora, or export the trained block as a low-rank delta with --block-rank R")
    kept = {k: v for k, v in state.items() if not k.startswith(RECOMPUTED_PREFIXES)}
    factor_keys, errors = set(), []
    for key in changed:
        if state[key].ndim != 2:
            kept[key] = state[key]
            continue
        delta = state[key].float() - plain[key].float()
        b, a = low_rank_delta(delta, block_rank)
        kept[key + DELTA_B], kept[key + DELTA_A] = b, a
        factor_keys |= {key + DELTA_B, key + DELTA_A}
        errors.append(float(torch.linalg.norm(delta - b @ a) / torch.linalg.norm(delta).clamp_min(1e-30)))
    lora = {k for k in kept if "lora_" in k} if int8 else set()
    stored = quantize_state(kept, lora | (factor_keys if block_bits == 8 else set()),
                            factor_keys if block_bits == 4 else set())
    weights = save_bytes(stored)
    training = dict(cfg.training or {})
    config_dict = cfg.to_dict()
    config_dict["training"] = training
    texts = {"conversion.json": json.dumps(conversion, indent=1) + "\n",
             "config.json": json.dumps(config_dict, indent=1) + "\n"}
    size = len(weights) + sum(len(t.encode()) for t in texts.values())
    if size > max_bytes:
        raise ValueError(f"the artifact would take {size / 2**20:.1f} MiB, over the {max_bytes / 2**20:.1f} MiB limit"
                         + (f" ({len(changed)} trained recomputed weights at --block-rank {block_rank}, "
                            f"{block_bits}-bit): lower --block-rank" + (" or use --block-bits 4" if block_bits == 8
                                                                         else "") if changed else ""))
    artifact.mkdir(parents=True, exist_ok=True)
    (artifact / "weights.safetensors").write_bytes(weights)
    for name, text in texts.items():
        (artifact / name).write_text(text)
    rebuilt, _ = rebuild(artifact)
    check = {"rows": check_rows, "split": "val",
             "ppl_rebuilt": validation_ppl(rebuilt, check_rows), "ppl_fp32": validation_ppl(trained, check_rows),
             "int8": int8, "bytes": len(weights)}
    if changed:
        check["block_delta"] = {
            "rank": block_rank, "bits": block_bits, "tensors": len(changed),
            "embedding": any(k.startswith(("model.embed_tokens.", "lm_head.")) for k in changed),
            "bytes": sum(stored[k].numel() * stored[k].element_size() for k in stored
                         if k.startswith(tuple(factor_keys))),
            "svd_relative_error": {"mean": sum(errors) / max(1, len(errors)), "max": max(errors, default=0.0)}}
        check["ppl_change"] = check["ppl_rebuilt"] / check["ppl_fp32"] - 1
    training["artifact"] = check
    config_dict["training"] = training
    (artifact / "config.json").write_text(json.dumps(config_dict, indent=1) + "\n")
    write_checksums(artifact)
    check["artifact_bytes"] = sum((artifact / name).stat().st_size for name in ARTIFACT_FILES)
    log.info("artifact %s: %s", artifact, check)
    return check


@torch.no_grad()
def export_overlay(source: Path, target: Path, base: Path = ARTIFACT_DIR) -> dict:
    """Write ``target`` as an overlay on the artifact ``base``: only the tensors of the trained run at
    ``source`` that differ from ``base``'s rebuilt model (e.g. the routers of ``default-mor``)."""
    from safetensors.torch import save_file

    trained, _ = load_folder(run_model_folder(source))
    reference, _ = rebuild(base)
    ref_state = reference.state_dict()
    def unchanged(key: str, value: torch.Tensor) -> bool:
        if torch.equal(value, ref_state[key]):
            return True  # a tensor the base stores as int8 counts as unchanged if it quantizes the same
        roundtrip = dequantize_state(quantize_state({key: value}, {key}))[key]
        return torch.allclose(roundtrip, ref_state[key], rtol=0, atol=1e-7)

    changed = {k: v for k, v in trained.state_dict().items() if k not in ref_state or not unchanged(k, v)}
    target.mkdir(parents=True, exist_ok=True)
    save_file(quantize_state(changed, set()), str(target / "weights.safetensors"))
    conversion = json.loads((base / "conversion.json").read_text())
    (target / "conversion.json").write_text(json.dumps({**conversion, "overlay_of": base.name}, indent=1) + "\n")
    (target / "config.json").write_text(json.dumps(trained.config.to_dict(), indent=1) + "\n")
    write_checksums(target)
    log.info("overlay %s on %s: %d tensors (%s)", target, base, len(changed), sorted(changed)[:6])
    return {"tensors": sorted(changed), "bytes": (target / "weights.safetensors").stat().st_size}


@torch.no_grad()
def validation_ppl(model, rows: int = 2, seq_len: int = 512, ids: torch.Tensor | None = None) -> float:
    """Perplexity (full depth) on the first ``rows`` rows of the ``val`` split (or on ``ids``)."""
    from model.data import load_split
    from model.evaluation.metrics import LoopTally

    if ids is None:
        ids = load_split("val", seq_len)[:rows]
    tally = LoopTally()
    for batch in ids.split(1):
        tally.add([model(input_ids=batch).logits[:, :-1]], batch[:, 1:])
    return tally.result()["ppl"][0]


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m model.io.default", description="export / build the trained default")
    sub = parser.add_subparsers(dest="cmd", required=True)
    exp = sub.add_parser("export", help="write assets/default from a trained run (shared block frozen, or "
                                        "trained and stored as a low-rank delta: --block-rank)")
    exp.add_argument("--from", dest="source", type=Path, required=True, help="run or checkpoint folder")
    exp.add_argument("--out", type=Path, default=ARTIFACT_DIR)
    exp.add_argument("--fp32", action="store_true", help="store LoRA factors in fp32 instead of int8")
    exp.add_argument("--block-rank", type=int, default=None, metavar="R",
                     help="a run that trained the shared block / embeddings (--train all): store each changed weight "
                          "as a rank-R truncated-SVD delta to the fresh conversion (default: refuse such a run)")
    exp.add_argument("--block-bits", type=int, default=8, choices=[8, 4],
                     help="storage of the delta factors: int8 or int4, per-row scales")
    exp.add_argument("--max-mb", type=float, default=MAX_ARTIFACT_BYTES / 2**20,
                     help="refuse an artifact larger than this many MiB (default 50)")
    ovl = sub.add_parser("export-overlay", help="write an artifact holding only what a run adds to the default "
                                                  "(e.g. assets/default-mor: the routers)")
    ovl.add_argument("--from", dest="source", type=Path, required=True, help="run or checkpoint folder")
    ovl.add_argument("--out", type=Path, required=True)
    ovl.add_argument("--base", type=Path, default=ARTIFACT_DIR,
                     help="the artifact the run was trained on (default: assets/default); the overlay records "
                          "its folder name, so keep the two side by side")
    sub.add_parser("build", help="rebuild the default into the cache and print its folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.cmd == "export":
        try:
            check = export_artifact(args.source, args.out, int8=not args.fp32, block_rank=args.block_rank,
                                    block_bits=args.block_bits, max_bytes=int(args.max_mb * 2**20))
        except ValueError as err:  # a trained block without --block-rank, or over the size limit
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(json.dumps(check, indent=1))
    elif args.cmd == "export-overlay":
        print(json.dumps(export_overlay(args.source, args.out, args.base), indent=1))
    else:
        print(default_folder())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
