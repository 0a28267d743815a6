"""The trained default model: rebuilt offline from the embedded base plus a small committed artifact.

``assets/default/`` holds only what cannot be recomputed from SmolLM2-135M itself (see
docs/TRAINING.md): ``config.json`` (the RecursiveConfig, including the training provenance),
``conversion.json`` (the ``recursify`` arguments that recreate the frozen shared block) and
``weights.safetensors`` (the trained LoRA factors, per-position norms and halting heads; int8 with
per-row scales where noted). ``default_folder()`` rebuilds the full model once, caches it under
``cache_dir("models", "default-<artifact hash>")`` and returns that folder for ``load_model``.
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
    result = model.load_state_dict(merged, strict=False)
    missing = [k for k in result.missing_keys if k != "lm_head.weight"]
    if missing or result.unexpected_keys:
        raise ModelLoadError(f"the default artifact does not fit its config: missing {missing[:5]}, "
                             f"unexpected {result.unexpected_keys[:5]}")
    model.tie_weights()
    return model.eval(), tokenizer


# --- int8 storage with per-row scales ---------------------------------------------------------------
def quantize_state(state: dict[str, torch.Tensor], int8_keys: set[str]) -> dict[str, torch.Tensor]:
    """Store the 2-D tensors named in ``int8_keys`` as int8 + fp32 per-row scales; the rest as fp32."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        value = value.detach().float().cpu()
        if key in int8_keys and value.ndim == 2:
            scale = value.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
            out[key] = torch.round(value / scale).clamp(-127, 127).to(torch.int8).contiguous()
            out[key + _SCALE_SUFFIX] = scale.squeeze(1).contiguous()
        else:
            out[key] = value.contiguous()
    return out


def dequantize_state(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``quantize_state`` (fp32 tensors)."""
    state = {}
    for key, value in stored.items():
        if key.endswith(_SCALE_SUFFIX):
            continue
        scale = stored.get(key + _SCALE_SUFFIX)
        state[key] = value.float() * scale[:, None] if scale is not None else value.float()
    return state


# --- export ------------------------------------------------------------------------------------------
RECOMPUTED_PREFIXES = ("model.shared_layers.", "model.embed_tokens.", "lm_head.")


@torch.no_grad()
def export_artifact(source: Path, artifact: Path = ARTIFACT_DIR, int8: bool = True, check_rows: int = 2) -> dict:
    """Write ``artifact`` from a trained checkpoint whose shared block was frozen (``--train lora``).

    Stores every tensor except the shared block, embeddings and head (recomputed from the base);
    LoRA factors as int8 with per-row scales when ``int8``. Verifies that the frozen parts really
    equal a fresh conversion, then records the rebuilt model's perplexity on the first
    ``check_rows`` validation rows (``config.training["artifact"]``) for the load test.
    """
    from model.conversion.recursify import recursify

    trained, _ = load_folder(run_model_folder(source))
    cfg = trained.config
    conversion = {"base": cfg.base_model, "loops": cfg.num_loops, "sharing": cfg.sharing,
                  "init": cfg.init_method, "block_size": cfg.block_size}
    base, _ = load_base(conversion["base"])
    plain = recursify(base, num_loops=cfg.num_loops, sharing=cfg.sharing, init=cfg.init_method, lora_rank=0,
                      block_size=cfg.block_size, base_name=cfg.base_model).state_dict()
    state = trained.state_dict()
    for key, value in state.items():
        if key.startswith(RECOMPUTED_PREFIXES) and not torch.equal(value, plain[key]):
            raise ValueError(f"{key} differs from a fresh conversion: train with --train lora to export")
    kept = {k: v for k, v in state.items() if not k.startswith(RECOMPUTED_PREFIXES)}
    stored = quantize_state(kept, {k for k in kept if "lora_" in k} if int8 else set())
    artifact.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file(stored, str(artifact / "weights.safetensors"))
    (artifact / "conversion.json").write_text(json.dumps(conversion, indent=1) + "\n")
    training = dict(cfg.training or {})
    config_dict = cfg.to_dict()
    config_dict["training"] = training
    (artifact / "config.json").write_text(json.dumps(config_dict, indent=1) + "\n")
    rebuilt, _ = rebuild(artifact)
    check = {"rows": check_rows, "split": "val",
             "ppl_rebuilt": validation_ppl(rebuilt, check_rows), "ppl_fp32": validation_ppl(trained, check_rows),
             "int8": int8, "bytes": (artifact / "weights.safetensors").stat().st_size}
    training["artifact"] = check
    config_dict["training"] = training
    (artifact / "config.json").write_text(json.dumps(config_dict, indent=1) + "\n")
    write_checksums(artifact)
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

    parser = argparse.ArgumentParser(prog="python -m model.io.default", description="export / build the trained default")
    sub = parser.add_subparsers(dest="cmd", required=True)
    exp = sub.add_parser("export", help="write assets/default from a trained run (shared block frozen)")
    exp.add_argument("--from", dest="source", type=Path, required=True, help="run or checkpoint folder")
    exp.add_argument("--out", type=Path, default=ARTIFACT_DIR)
    exp.add_argument("--fp32", action="store_true", help="store LoRA factors in fp32 instead of int8")
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
        print(json.dumps(export_artifact(args.source, args.out, int8=not args.fp32), indent=1))
    elif args.cmd == "export-overlay":
        print(json.dumps(export_overlay(args.source, args.out, args.base), indent=1))
    else:
        print(default_folder())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
