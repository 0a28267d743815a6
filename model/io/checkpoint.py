"""Resolve a model name or path to ``(model, tokenizer)``; save checkpoints.

Names:
- ``"smollm2-135m"``: SmolLM2-135M-Instruct, the embedded base (``model.io.folders``);
- ``"default"`` / ``"default-mor"``: the trained default (and its MoR routers), rebuilt from the
  committed artifact in ``assets/`` on first use (``model.io.default``);
- a local checkpoint folder (``recursive_llama`` or any Hugging Face Llama folder);
- a Hub id such as ``HuggingFaceTB/SmolLM2-135M-Instruct`` when the network allows.

Every failure raises ``ModelLoadError`` with a message that says what to do; folders load strictly
(``model.io.folders``).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from model.io.default import ARTIFACT_NAMES, default_folder
from model.errors import ModelLoadError
from model.io.folders import (
    EMBEDDED_NAME,
    atomic_write_folder,
    check_loaded,
    embedded_base_folder,
    load_folder,
    quiet_transformers,
    recover_folder,
    require_finite,
    tokenizer_for,
)
from model.paths import ASSETS_DIR

__all__ = ["EMBEDDED_NAME", "ModelLoadError", "atomic_write_folder", "default_device", "load_model",
           "load_tokenizer", "looks_like_hub_id", "recover_folder", "save_checkpoint"]


def load_model(
    name_or_path: str | os.PathLike = EMBEDDED_NAME,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
):
    """Return ``(model, tokenizer)`` for a name, a local folder or a Hub id, in eval mode."""
    name = str(name_or_path)
    if name == EMBEDDED_NAME:
        model, tokenizer = load_folder(embedded_base_folder(), name)
    elif name in ARTIFACT_NAMES:
        model, tokenizer = load_folder(default_folder(ASSETS_DIR / name), name)
    elif recover_folder(Path(name).expanduser()).exists():
        model, tokenizer = load_folder(Path(name).expanduser(), name)
    elif looks_like_hub_id(name):
        model = _hub_weights(name)
        tokenizer = tokenizer_for(name, model, name)
    else:
        raise ModelLoadError(
            f"no model called {name!r}: give {EMBEDDED_NAME!r}, 'default', a local checkpoint folder, "
            "or a Hugging Face Hub id (online only)"
        )
    if dtype is not None:
        model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer


def looks_like_hub_id(name: str) -> bool:
    """``owner/name`` (not a path): what ``load_model`` tries on the Hugging Face Hub."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def _hub_weights(name: str) -> PreTrainedModel:
    """A model from the Hugging Face Hub (online only), checked like a folder."""
    try:
        with quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(name, output_loading_info=True)
    except Exception as exc:  # network, auth, missing repo
        raise ModelLoadError(
            f"could not load {name!r} from the Hugging Face Hub ({type(exc).__name__}: {exc}). "
            "Offline? Use a local folder or the embedded 'smollm2-135m'."
        ) from exc
    return check_loaded(model, info, name)


def save_checkpoint(model: PreTrainedModel, tokenizer, folder: str | os.PathLike) -> Path:
    """Save model (+ tokenizer) as safetensors atomically; ``load_model(folder)`` reads it back.
    Non-finite weights are refused (``ModelSaveError``)."""
    require_finite(model, str(folder))

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return atomic_write_folder(Path(folder), write)


def default_device() -> str:
    """"cuda" when a GPU is visible (e.g. a Space with a GPU), else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_tokenizer(name_or_path: str | os.PathLike = EMBEDDED_NAME):
    """Just the tokenizer (cheap): for the embedded name or a folder that has one."""
    folder = embedded_base_folder() if str(name_or_path) == EMBEDDED_NAME else Path(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:
        raise ModelLoadError(f"no tokenizer in {folder} ({exc})") from exc
