"""What the dashboard asks of the model package: load a model, start a stream, score a sweep.

One ``ModelService`` per app. Models are loaded by label; conversions of the embedded base are built
on demand and kept in memory (at most two). Every failure surfaces as ``ServiceError``/``SettingsError``
with a message for the user.

What a visitor may load: the built-in labels, and checkpoint folders under the checkpoint roots (the
runs and cache folders by default). Anything else gets one message, whether it exists or not, so the
picker is no probe of the server's files. On Hugging Face Spaces (``SPACE_ID`` set) local folders are
off unless ``LAB_ALLOW_LOCAL_CHECKPOINTS=1`` (or ``app.py --allow-local-checkpoints``).
"""
from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from model import LabError, ModelLoadError, load_model
from model import recursify
from model.io.checkpoint import default_device
from model.io.default import FALLBACK_CONVERSION
from model.inference.generation import describe_model, stream
from model.inference.numerics import resolve as resolve_numerics
from model.inference.prompts import encode_prompt
from model.errors import TraceFormatError
from model.paths import REPO_ROOT, cache_dir
from model.inference.policies import make_policy
from model.conversion.analysis import LORA_INITS, convert_steps
from model.data.answer_store import calibration_texts
from model.definition.config import INIT_METHODS, SHARING_SCHEMES
from model.io.checkpoint import EMBEDDED_NAME, load_tokenizer, looks_like_hub_id, save_checkpoint
from model.evaluation.sweep import evaluate_depths, fixed_depth_points, replay, score_ids, sweep
from model.inference.trace import GenerationTrace

from .settings import MAX_PROMPT_CHARS, MAX_PROMPT_TOKENS, Settings

log = logging.getLogger(__name__)

TRAINED_DEFAULT = "Trained default (recursive SmolLM2)"
TRAINED_MOR = "Trained default + Mixture-of-Recursions routers (default-mor)"
EXACT_3x10 = "SmolLM2 → 3 loops × 10 · full-rank LoRA (untrained; exact at full depth)"
RANK64_3x10 = "SmolLM2 → 3 loops × 10 · LoRA r64 (untrained conversion)"
TEACHER = "SmolLM2-135M-Instruct teacher (no sharing, 1 loop)"
BUILTIN_CONVERSIONS = {
    EXACT_3x10: FALLBACK_CONVERSION,  # what load_best falls back to (the server's fallback too)
    RANK64_3x10: dict(num_loops=3, sharing="cycle", init="average", lora_rank=64),
    TEACHER: dict(num_loops=1),
}


NOT_ALLOWED = ("This model is not available here: pick one from the list (checkpoint folders load only from "
               "the configured checkpoint roots).")


class ServiceError(RuntimeError):
    """A user-facing failure (model cannot load, bad input)."""


def default_checkpoint_roots() -> list[Path]:
    """Where training runs land: ``runs/`` in the repo and the cache's ``runs/``."""
    return [REPO_ROOT / "runs", cache_dir("runs")]


def hub_allowed() -> bool:
    """Hub ids are tried only where the Hub is reachable: on Spaces, or with ``LAB_ALLOW_HUB=1``."""
    if os.environ.get("LAB_ALLOW_HUB"):
        return os.environ["LAB_ALLOW_HUB"] not in ("0", "false", "no")
    return bool(os.environ.get("SPACE_ID"))


def local_checkpoints_allowed() -> bool:
    """Local folders are on, except on Spaces unless ``LAB_ALLOW_LOCAL_CHECKPOINTS=1``."""
    if os.environ.get("LAB_ALLOW_LOCAL_CHECKPOINTS"):
        return os.environ["LAB_ALLOW_LOCAL_CHECKPOINTS"] not in ("0", "false", "no")
    return not os.environ.get("SPACE_ID")


@dataclass
class Loaded:
    label: str
    model: object
    tokenizer: object
    note: str = ""
    description: dict = field(default_factory=dict)

    @property
    def num_loops(self) -> int:
        return self.model.config.num_loops

    def opening_setting(self) -> tuple[str, float, str]:
        """The first click's policy, threshold and KV mode. With halting heads (the trained default):
        halting 0.7 in copy mode. Measured in free generation on held-out chat prompts
        (benchmarks/opening_setting.py, docs/RESULTS.md): it saves 10 % of block FLOPs at 0.94x the
        full-depth time per token, with the same agreement with full depth as halting 0.7 in sync mode
        (which saves nothing: sync runs the skipped loops later); lower thresholds save more but change
        the answer from its first tokens, and no setting keeps >= 0.90 agreement while saving compute.
        Else the router, or a cautious confidence threshold, in sync mode."""
        if self.model.config.router_type:
            return "router", 0.0, "sync"
        if self.model.has_halting_heads:
            return "halting", 0.7, "copy"
        return "confidence", 0.9, "sync"


def _training_summary(training: dict | None) -> str:
    """One line from a checkpoint's provenance: tokens seen, where, and measured perplexity."""
    if not training:
        return ""
    stages = training.get("stages") or []
    per_stage: dict[str, int] = {}  # a resumed stage records its running total: keep the largest
    for s in stages:
        per_stage[s.get("stage", "?")] = max(per_stage.get(s.get("stage", "?"), 0), s.get("tokens_seen", 0))
    tokens = sum(per_stage.values())
    devices = sorted({s.get("device", "CPU") for s in stages})
    where = "this project's 2-core CPU" if devices == ["CPU"] else " + ".join(devices)
    check = training.get("artifact") or {}
    ppl = f", validation perplexity {check['ppl_rebuilt']:.0f} on its check rows" if "ppl_rebuilt" in check else ""
    amount = f"{tokens / 1e6:.1f}M" if tokens >= 1e6 else f"{tokens / 1000:.0f}k"
    return (f"Distilled on {where}: {amount} tokens{ppl}, far from the papers' billions; "
            "the teacher and an exact conversion are in the Model tab.")


def checkpoint_folders(roots: list[Path]) -> list[Path]:
    """Local recursive checkpoints: folders with a recursive_llama config.json under ``roots``."""
    found = []
    for root in roots:
        if root.exists():
            for cfg in sorted(root.glob("**/config.json")):
                if '"recursive_llama"' in cfg.read_text(errors="ignore") and any(cfg.parent.glob("*.safetensors")):
                    found.append(cfg.parent)
    return found


def llama_folders(roots: list[Path]) -> list[Path]:
    """Plain Llama checkpoints (``"model_type": "llama"`` + safetensors) under ``roots``: bases to convert."""
    found = []
    for root in roots:
        if root.exists():
            for cfg in sorted(root.glob("**/config.json")):
                text = cfg.read_text(errors="ignore")
                if '"model_type": "llama"' in text and any(cfg.parent.glob("*.safetensors")):
                    found.append(cfg.parent)
    return found


class ModelService:
    def __init__(self, preload: Loaded | None = None, max_cached: int = 2,
                 checkpoint_roots: list[Path] | None = None, allow_local: bool | None = None):
        self.checkpoint_roots = [Path(r) for r in (checkpoint_roots or default_checkpoint_roots())]
        self.allow_local = local_checkpoints_allowed() if allow_local is None else allow_local
        self._cache: dict[str, Loaded] = {}
        self._order: list[str] = []
        self.max_cached = max_cached
        self.lock = threading.Lock()  # one model computation at a time (2 CPU cores)
        self.current: Loaded | None = None
        self.last_finish_reason: str | None = None
        self._adaptive: dict = {}  # FREE's adaptive threshold learns across sequences: one per model/measure
        self._worker = None  # the shared continuous depth-wise batching engine (one per loaded model)
        self._worker_label: str | None = None
        self._teacher: Loaded | None = None
        self.generations_started = 0
        self._converter = None
        if preload is not None:
            self._remember(preload)
            self.current = preload

    # --- models -----------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model, tokenizer, label: str = "custom model") -> "ModelService":
        """Serve an already-built model (tests use a tiny random one)."""
        from model.inference.decoder import as_recursive

        model = as_recursive(model)
        return cls(Loaded(label, model, tokenizer, "", describe_model(model, label)))

    def choices(self) -> list[str]:
        local = [str(p) for p in checkpoint_folders(self.checkpoint_roots)] if self.allow_local else []
        return list(dict.fromkeys([*(self._order), TRAINED_DEFAULT, TRAINED_MOR, *BUILTIN_CONVERSIONS, *local]))

    def allowed_folder(self, label: str) -> Path | None:
        """The checkpoint folder ``label`` names if a visitor may load it (under a root, symlinks
        resolved), else None. Existence is checked only inside the roots, so refusals say nothing."""
        if not self.allow_local or not label or "\x00" in label:
            return None
        try:
            path = Path(label).expanduser().resolve()
        except (OSError, RuntimeError, ValueError):
            return None
        inside = any(path.is_relative_to(root.expanduser().resolve()) for root in self.checkpoint_roots)
        return path if inside and (path / "config.json").is_file() else None

    def load_best(self) -> Loaded:
        """The trained default if it can be built, else the exact full-rank conversion."""
        try:
            return self.load(TRAINED_DEFAULT)
        except ServiceError as exc:
            log.warning("trained default unavailable (%s); falling back to a conversion", exc)
            loaded = self.load(EXACT_3x10)
            loaded.note = f"Trained default not available ({exc}). Showing an untrained conversion."
            return loaded

    def load(self, label: str) -> Loaded:
        if label in self._cache:
            self.current = self._cache[label]
            return self.current
        try:
            loaded = self._build(label)
        except ModelLoadError as exc:
            raise ServiceError(str(exc)) from exc
        self._remember(loaded)
        self.current = loaded
        return loaded

    def _build(self, label: str) -> Loaded:
        if label in (TRAINED_DEFAULT, TRAINED_MOR):
            model, tok = load_model("default" if label == TRAINED_DEFAULT else "default-mor")
            note = "Trained recursive model. " + _training_summary(model.config.training)
        elif label in BUILTIN_CONVERSIONS:
            base, tok = load_model("smollm2-135m")
            model = recursify(base, base_name="smollm2-135m", **BUILTIN_CONVERSIONS[label])
            note = ("Untrained conversion: early exits are poor until the model is trained; "
                    "intermediate loops disagree with the last one for most tokens.")
        elif (folder := self.allowed_folder(label)) is not None:
            model, tok = load_model(folder)
            note = f"Checkpoint {label}"
        else:
            raise ServiceError(NOT_ALLOWED)
        from model.inference.decoder import as_recursive

        model = as_recursive(model).to(default_device())
        resolve_numerics(model)  # dtype / threads measured once per model and machine (cached), not on a first click
        return Loaded(label, model, tok, note, describe_model(model, label))

    def _remember(self, loaded: Loaded) -> None:
        self._cache[loaded.label] = loaded
        self._order = [l for l in self._order if l != loaded.label] + [loaded.label]
        while len(self._order) > self.max_cached:
            self._cache.pop(self._order.pop(0), None)

    def converter(self) -> "Converter":
        """The Convert tab's state (one per service)."""
        if self._converter is None:
            self._converter = Converter(self)
        return self._converter

    # --- generation -------------------------------------------------------------------------
    def prepare_prompt(self, prompt: str, chat: bool) -> tuple[str, str | None]:
        """Validate the prompt; cut it to the token limit. Returns (prompt, notice or None)."""
        if prompt is None or not str(prompt).strip():
            raise ServiceError("The prompt is empty: type something or pick an example.")
        notice = None
        prompt = str(prompt)
        if len(prompt) > MAX_PROMPT_CHARS:
            prompt, notice = prompt[:MAX_PROMPT_CHARS], f"Prompt cut to {MAX_PROMPT_CHARS} characters."
        tok = self.current.tokenizer
        ids = tok(prompt, add_special_tokens=False).input_ids
        if len(ids) > MAX_PROMPT_TOKENS:
            prompt = tok.decode(ids[-MAX_PROMPT_TOKENS:])
            notice = (f"The prompt had {len(ids)} tokens; only its last {MAX_PROMPT_TOKENS} are used.")
        return prompt, notice

    def start(self, prompt: str, settings: Settings, inspect: bool = True):
        """A ``model.inference.generation.Stream`` for validated settings (iterate it for TokenSteps)."""
        loaded = self.current
        self.generations_started += 1
        return stream(loaded.model, loaded.tokenizer, prompt, policy=self.policy_for(settings),
                      max_new_tokens=settings.max_new_tokens, kv_mode=settings.kv_mode,
                      max_loops=settings.max_loops, temperature=settings.temperature, top_p=settings.top_p,
                      repetition_penalty=settings.repetition_penalty, seed=settings.seed, chat=settings.chat,
                      inspect=inspect, model_name=loaded.label,
                      max_prompt_tokens=MAX_PROMPT_TOKENS + 64)

    def full_depth_settings(self, settings: Settings) -> Settings:
        return Settings(**{**settings.__dict__, "policy": "fixed", "depth": settings.max_loops})

    # --- teacher-forced quality -------------------------------------------------------------
    def agreement_with(self, prompt: str, chat: bool, reference_ids: list[int], settings: Settings) -> dict:
        """Teacher-forced on the full-depth answer: the policy's exit depths and their quality."""
        loaded = self.current
        prompt_ids = encode_prompt(loaded.tokenizer, prompt, chat)
        scores = score_ids(loaded.model, prompt_ids + reference_ids, first=len(prompt_ids))
        policy = settings.policy_object()
        point = evaluate_depths(scores, replay(scores, policy, settings.max_loops), policy, settings.threshold)
        return point.to_dict()

    def sweep(self, text: str, policy_name: str, measure: str, current: Settings, max_tokens: int = 384) -> dict:
        """Quality vs compute over thresholds for ``policy_name`` + fixed-depth baselines + the current setting."""
        if not text or not text.strip():
            raise ServiceError("The sweep text is empty: paste a paragraph or use the default text.")
        loaded = self.current
        if policy_name == "halting" and not loaded.model.has_halting_heads:
            raise ServiceError("This model has no halting heads (train them with `python -m model.training exits`).")
        if policy_name == "router" and not loaded.model.config.router_type:
            raise ServiceError("This model has no routers: load 'default-mor' or train them with "
                               "`python -m model.training routers`.")
        ids = loaded.tokenizer(text).input_ids[: max_tokens + 1]
        scores = score_ids(loaded.model, ids)
        family = [p.to_dict() for p in sweep(scores, policy_name, measure=measure)]
        fixed = [p.to_dict() for p in fixed_depth_points(scores)]
        policy = current.policy_object()
        here = evaluate_depths(scores, replay(scores, policy, current.max_loops), policy, current.threshold)
        return {"family": family, "fixed": fixed, "current": {**here.to_dict(), "label": current.label()},
                "tokens": len(scores.token_ids), "policy": policy_name, "measure": measure}

    # --- the teacher beside it ----------------------------------------------------------------
    def teacher(self) -> Loaded:
        """The original model (the embedded SmolLM2, no sharing), loaded once and kept."""
        if self._teacher is None:
            try:
                self._teacher = self._build(TEACHER)
            except ModelLoadError as exc:
                raise ServiceError(f"The teacher could not be loaded: {exc}") from exc
        return self._teacher

    def teacher_answer(self, prompt: str, max_new_tokens: int, repetition_penalty: float = 1.1):
        """The teacher's greedy chat answer to ``prompt`` (a ``GenerationTrace``, one loop per token),
        decoded as the Compare columns are (repetition penalty 1.1)."""
        teacher = self.teacher()
        run = stream(teacher.model, teacher.tokenizer, prompt, max_new_tokens=max_new_tokens, chat=True,
                     repetition_penalty=repetition_penalty, model_name=teacher.label,
                     max_prompt_tokens=MAX_PROMPT_TOKENS + 64)
        for _ in run:
            pass
        return run.trace

    def teacher_agreement(self, prompt: str, answer_ids: list[int]) -> float:
        """Teacher-forced on an answer of the loaded model: the share of its tokens that are the
        teacher's own top-1 choice at that point (1.0: the teacher would have said every token)."""
        if not answer_ids:
            return 0.0
        teacher = self.teacher()
        prompt_ids = encode_prompt(teacher.tokenizer, prompt, True)
        scores = score_ids(teacher.model, prompt_ids + answer_ids, first=len(prompt_ids))
        return sum(row[-1] == t for row, t in zip(scores.argmax, answer_ids)) / len(answer_ids)

    def threshold_view(self, settings: Settings) -> dict | None:
        """FREE's threshold lab for the adaptive policy these settings name (None if it never ran)."""
        policy = self._adaptive.get((self.current.label, settings.measure, settings.threshold))
        return policy.calibration_view() if policy is not None else None

    def policy_for(self, settings: Settings):
        """A policy for these settings; the adaptive one persists so that it keeps calibrating."""
        if settings.policy == "adaptive":
            key = (self.current.label, settings.measure, settings.threshold)
            if key not in self._adaptive:
                self._adaptive[key] = make_policy("adaptive", settings.threshold, measure=settings.measure)
            return self._adaptive[key]
        return make_policy(settings.policy, settings.threshold, settings.depth, settings.measure)


__all__ = ["ConvertOptions", "Converter", "Loaded", "ModelService", "ServiceError"]


# --- the Convert tab: bring your own base ----------------------------------------------------------
MAX_CONVERT_LOOPS = 8
CONVERT_SHARING, CONVERT_INIT, CONVERT_LORA_INIT = SHARING_SCHEMES, INIT_METHODS, LORA_INITS
SAVE_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


@dataclass(frozen=True)
class ConvertOptions:
    """Validated Convert-tab settings."""

    num_loops: int
    sharing: str
    init: str
    lora_rank: int | str
    lora_init: str = "svd"

    @classmethod
    def parse(cls, loops, sharing, init, rank, lora_init="svd") -> "ConvertOptions":
        try:
            loops = int(loops)
        except (TypeError, ValueError):
            raise ServiceError(f"Loops must be a whole number, got {loops!r}.") from None
        if not 1 <= loops <= MAX_CONVERT_LOOPS:
            raise ServiceError(f"Loops must be between 1 and {MAX_CONVERT_LOOPS}, got {loops}.")
        if sharing not in SHARING_SCHEMES:
            raise ServiceError(f"Sharing must be one of {', '.join(SHARING_SCHEMES)}, got {sharing!r}.")
        if init not in INIT_METHODS:
            raise ServiceError(f"Init must be one of {', '.join(INIT_METHODS)}, got {init!r}.")
        text = str(rank).strip().lower()
        if text != "full":
            try:
                rank = int(float(text))
            except ValueError:
                raise ServiceError(f"LoRA rank must be 0, a positive whole number or 'full', got {rank!r}.") from None
            if rank < 0 or rank > 4096:
                raise ServiceError(f"LoRA rank must be between 0 and 4096 (or 'full'), got {rank}.")
        if lora_init not in LORA_INITS:
            raise ServiceError(f"LoRA init must be one of {', '.join(LORA_INITS)}, got {lora_init!r}.")
        return cls(loops, sharing, init, "full" if text == "full" else rank, lora_init)


class Converter:
    """The Convert tab's state: bases it may convert, the last conversion and its report, saving it."""

    def __init__(self, service: ModelService, save_root: Path | None = None):
        self.service = service
        self.bases: dict[str, tuple] = {}  # label -> (model, tokenizer) held in memory (tests, preloaded)
        roots = service.checkpoint_roots
        default = cache_dir("runs") / "converted"
        inside = any(default.resolve().is_relative_to(r.expanduser().resolve()) for r in roots)
        self.save_root = Path(save_root) if save_root else (default if inside or not roots else roots[0] / "converted")
        self.last: tuple | None = None  # (model, tokenizer, report, base label)

    def add_base(self, label: str, model, tokenizer) -> None:
        self.bases[label] = (model, tokenizer)

    def base_choices(self) -> list[str]:
        """In-memory bases, the embedded SmolLM2, and plain Llama folders under the checkpoint roots
        (a Hub id may also be typed where the Hub is allowed: ``hub_allowed``)."""
        local = [str(p) for p in llama_folders(self.service.checkpoint_roots)] if self.service.allow_local else []
        return [*self.bases, EMBEDDED_NAME, *local]

    def load_base(self, label: str):
        """``(model, tokenizer)`` of a base: an in-memory one, the embedded SmolLM2, or an allowed folder."""
        label = (label or "").strip()
        if label in self.bases:
            return self.bases[label]
        try:
            if label == EMBEDDED_NAME:
                return load_model(EMBEDDED_NAME)
            folder = self.service.allowed_folder(label)
            if folder is not None:
                model, tok = load_model(folder)
            elif looks_like_hub_id(label) and hub_allowed():
                model, tok = load_model(label)
            else:
                raise ServiceError("This base is not available here: pick the embedded model, or a Llama checkpoint "
                                   "folder under the configured checkpoint roots"
                                   + (", or a Hub id." if hub_allowed() else " (Hub ids only where the Hub is "
                                      "reachable: on Spaces, or with LAB_ALLOW_HUB=1)."))
        except ModelLoadError as exc:
            raise ServiceError(str(exc)) from exc
        if getattr(model.config, "model_type", None) != "llama":
            raise ServiceError(f"The base must be a plain Llama-family model (this one is "
                               f"{getattr(model.config, 'model_type', 'unknown')!r}).")
        return model, tok

    def convert(self, base_label: str, options: ConvertOptions):
        """Convert and analyse, yielding ``(fraction, message)``; ends with the report in ``self.last``.
        Closing the generator stops the work between steps."""
        yield 0.0, "loading the base…"
        base, tok = self.load_base(base_label)
        texts = None
        if options.lora_init == "asvd":
            try:  # the teacher's committed chat answers, decoded, then tokenized by the base's own tokenizer
                texts = calibration_texts(load_tokenizer(EMBEDDED_NAME))
            except LabError as exc:
                raise ServiceError(f"No calibration text for the activation-aware init: {exc}") from exc
        steps = convert_steps(base, tok, num_loops=options.num_loops, sharing=options.sharing, init=options.init,
                              lora_rank=options.lora_rank, base_name=base_label, lora_init=options.lora_init,
                              calibration_texts=texts)
        try:
            for kind, fraction, payload in steps:
                if kind == "done":
                    rec, report = payload
                    report["base"] = base_label
                    self.last = (rec, tok, report, base_label)
                    return
                yield fraction, payload
        except ValueError as exc:  # a layout recursify cannot build
            raise ServiceError(f"Cannot convert with these settings: {exc}") from exc
        finally:
            steps.close()

    def save(self, name: str) -> Path:
        """Save the last conversion as a checkpoint folder under the save root; returns the folder."""
        if self.last is None:
            raise ServiceError("Convert a model first, then save it.")
        name = (name or "").strip()
        if not name or not set(name) <= SAVE_NAME_CHARS or name.startswith("."):
            raise ServiceError("Give the checkpoint a name of letters, digits, '-', '_' or '.' (not starting with '.').")
        rec, tok, report, _ = self.last
        folder = self.save_root / name
        try:
            save_checkpoint(rec, tok, folder)
        except (OSError, LabError) as exc:
            raise ServiceError(f"Could not save the checkpoint: {exc}") from exc
        return folder


# --- shared batching engine (several browser users share one batch) ---------------------------------
class SharedStream:
    """A Live generation submitted to the shared batching engine: iterate for ``TokenStep``s;
    ``.trace`` grows as they come; ``close()`` cancels the request (e.g. the browser went away)."""

    def __init__(self, events, trace):
        self._events, self.trace = events, trace

    def __iter__(self):
        for event in self._events:
            if event.step is not None:
                self.trace.steps.append(event.step)
                yield event.step
            if event.finished:
                self.trace.finish_reason = event.finish_reason
                if event.finish_reason == "error":
                    raise ServiceError("the batching engine failed on this request; try again")
                return

    def close(self) -> None:
        if self.trace.finish_reason is None:
            self.trace.finish_reason = "cancelled"
        self._events.close()


def _shared_worker(service: ModelService):
    from model.serving import BatchEngine, EngineWorker

    loaded = service.current
    if service._worker is None or service._worker_label != loaded.label:
        if service._worker is not None:
            service._worker.stop()
        engine = BatchEngine(loaded.model, loaded.tokenizer, strategy="cdb", max_requests=8, max_queue=32,
                             model_name=loaded.label, keep_log=False, keep_results=False)
        service._worker, service._worker_label = EngineWorker(engine).start(), loaded.label
    return service._worker


def start_shared(service: ModelService, prompt: str, settings: Settings, inspect: bool = True) -> SharedStream:
    """Submit to the shared continuous depth-wise batching engine; other users' tokens share its steps.
    Every policy and KV mode runs there; ``inspect`` records the top-5 candidates at every loop."""
    from model.serving import EngineFullError, Request
    from model.inference.generation import Sampling

    loaded = service.current
    ids = encode_prompt(loaded.tokenizer, prompt, settings.chat)
    request = Request(prompt_ids=ids, max_new_tokens=settings.max_new_tokens, policy=service.policy_for(settings),
                      kv_mode=settings.kv_mode, max_loops=settings.max_loops, prompt=prompt, inspect=inspect,
                      sampling=Sampling(settings.temperature, settings.top_p, settings.repetition_penalty, settings.seed))
    trace = GenerationTrace(prompt=prompt, prompt_tokens=len(ids),
                            settings={**request.policy.describe(), **settings.__dict__, "engine": "shared cdb"},
                            model=loaded.description)
    try:
        events = _shared_worker(service).stream(request, timeout=600)
        service.generations_started += 1
        return SharedStream(events, trace)
    except EngineFullError as exc:
        raise ServiceError(str(exc)) from exc


def _uploaded_bytes(path: str | None, what: str, action: str) -> bytes:
    """The bytes of a file a visitor uploaded (size-limited by the upload endpoint), or ``ServiceError``."""
    if not path:
        raise ServiceError(f"Pick a {what} (.json) to {action}.")
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ServiceError(f"The {what} could not be read ({exc.strerror}).") from exc


def load_trace(path: str | None) -> GenerationTrace:
    """An uploaded trace file, checked against the trace schema."""
    data = _uploaded_bytes(path, "trace file", "replay")
    try:
        return GenerationTrace.from_json(data)
    except TraceFormatError as exc:
        raise ServiceError(f"This file is not a trace this version can replay: {exc}") from exc


def load_share_file(path: str | None):
    """The JSON of an uploaded share file (its fields are checked by ``settings.from_share``)."""
    data = _uploaded_bytes(path, "share file", "load")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ServiceError(f"This share file is not JSON ({exc}).") from exc


def batching_lab(service: ModelService, n_requests: int, max_new: int, rate: float, strategies: list[str],
                 settings: Settings, prompts: list[str], seed: int = 0) -> dict[str, dict]:
    """Run one workload under each strategy (same engine code, same run); plain data per strategy."""
    import random

    from model.serving import WorkloadItem, compare_strategies

    if not strategies:
        raise ServiceError("Pick at least one strategy.")
    loaded = service.current
    rng = random.Random(seed)
    items, t = [], 0.0
    for i in range(n_requests):
        ids = encode_prompt(loaded.tokenizer, prompts[i % len(prompts)], True)
        items.append(WorkloadItem(ids, rng.randint(max(1, max_new // 2), max_new), t, prompts[i % len(prompts)]))
        t += rng.expovariate(rate) if rate > 0 else 0.0
    runs = compare_strategies(loaded.model, items, strategies, tokenizer=loaded.tokenizer,
                              policy_factory=lambda: make_policy(settings.policy, settings.threshold, settings.depth,
                                                                 settings.measure),
                              kv_mode=settings.kv_mode, max_requests=8)
    return {name: run.to_dict() for name, run in runs.items()}
