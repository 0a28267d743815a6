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

from .checkpoint import ModelLoadError, atomic_write_folder
from .paths import ASSETS_DIR, cache_dir

log = logging.getLogger(__name__)

ARTIFACT_DIR = ASSETS_DIR / "default"
ARTIFACT_FILES = ("config.json", "conversion.json", "weights.safetensors")
_SCALE_SUFFIX = ".int8_scale"


def artifact_hash(folder: Path = ARTIFACT_DIR) -> str:
    """Short sha256 over the artifact files (names the cache folder, so a new artifact rebuilds)."""
    digest = hashlib.sha256()
    for name in ARTIFACT_FILES:
        digest.update(name.encode())
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()[:16]


def default_folder(artifact: Path = ARTIFACT_DIR) -> Path:
    """Folder with the trained default as a loadable checkpoint (built from the artifact on first use)."""
    missing = [name for name in ARTIFACT_FILES if not (artifact / name).exists()]
    if missing:
        raise ModelLoadError(
            f"no trained default artifact in {artifact} (missing {', '.join(missing)}); train one with "
            "`python -m model.train uptrain ...` and export it (docs/TRAINING.md), or load the untrained "
            "conversion / the teacher 'smollm2-135m' instead"
        )
    target = cache_dir("models") / f"default-{artifact_hash(artifact)}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    log.info("rebuilding the trained default from %s (once)", artifact)
    model, tokenizer = rebuild(artifact)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    atomic_write_folder(target, write)
    return target


def rebuild(artifact: Path = ARTIFACT_DIR):
    """``(RecursiveForCausalLM, tokenizer)``: the base's plain conversion + the artifact's tensors."""
    from .checkpoint import load_model
    from .config import RecursiveConfig
    from .modeling import RecursiveForCausalLM
    from .recursify import recursify

    conversion = json.loads((artifact / "conversion.json").read_text())
    config = RecursiveConfig.from_dict(json.loads((artifact / "config.json").read_text()))
    base, tokenizer = load_model(conversion["base"])
    plain = recursify(base, num_loops=conversion["loops"], sharing=conversion["sharing"],
                      init=conversion["init"], lora_rank=0, block_size=conversion.get("block_size"),
                      base_name=conversion["base"])
    model = RecursiveForCausalLM(config).to(torch.float32)
    state = dequantize_state(load_file(str(artifact / "weights.safetensors")))
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
