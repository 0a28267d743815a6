"""UI settings: limits and validation at the boundary (clear messages, no stack traces)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from model.inference.decoder import KV_MODES
from model.inference.policies import CONFIDENCE_MEASURES, POLICIES, make_policy

MAX_NEW_TOKENS = 256
MAX_PROMPT_TOKENS = 1024
MAX_PROMPT_CHARS = 20_000
MENU_FIRST = ("confidence", "saturation", "fixed", "halting")  # the menu's order; then the rest of the registry
POLICY_CHOICES = [*MENU_FIRST, *(name for name in POLICIES if name not in MENU_FIRST)]
KV_CHOICES = ["sync", *(m for m in KV_MODES if m != "sync")]  # sync first: the default


class SettingsError(ValueError):
    """An out-of-range or inconsistent setting; the message says what is allowed."""


@dataclass
class Settings:
    policy: str = "confidence"
    threshold: float = 0.5
    depth: int = 1  # for the fixed-depth policy
    measure: str = "max_prob"
    max_loops: int | None = None  # None: the model's loops
    kv_mode: str = "sync"
    max_new_tokens: int = 48
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.1
    seed: int = 0
    chat: bool = True

    def validated(self, num_loops: int) -> "Settings":
        """Check every field against the loaded model; raise ``SettingsError`` otherwise."""
        if self.policy not in POLICY_CHOICES:
            raise SettingsError(f"policy must be one of {POLICY_CHOICES}")
        if self.measure not in CONFIDENCE_MEASURES:
            raise SettingsError(f"confidence measure must be one of {CONFIDENCE_MEASURES}")
        if self.kv_mode not in KV_CHOICES:
            raise SettingsError(f"KV mode must be one of {KV_CHOICES}")
        low = -1.0 if self.policy in ("saturation", "router") else 0.0  # router: the value is a logit bias
        if self.threshold is None or not low <= float(self.threshold) <= 1.0:
            raise SettingsError(f"threshold must be between {low} and 1 for the {self.policy} policy")
        max_loops = num_loops if self.max_loops in (None, 0) else int(self.max_loops)
        if not 1 <= max_loops <= num_loops:
            raise SettingsError(f"max loops must be between 1 and {num_loops} for this model")
        if not 1 <= int(self.depth) <= num_loops:
            raise SettingsError(f"fixed depth must be between 1 and {num_loops}")
        if not 1 <= int(self.max_new_tokens) <= MAX_NEW_TOKENS:
            raise SettingsError(f"max new tokens must be between 1 and {MAX_NEW_TOKENS}")
        if not 0.0 <= float(self.temperature) <= 2.0:
            raise SettingsError("temperature must be between 0 (greedy) and 2")
        if not 0.05 <= float(self.top_p) <= 1.0:
            raise SettingsError("top-p must be between 0.05 and 1")
        if not 1.0 <= float(self.repetition_penalty) <= 2.0:
            raise SettingsError("repetition penalty must be between 1 and 2")
        if not 0 <= int(self.seed) < 2**31:
            raise SettingsError("seed must be a non-negative integer")
        return Settings(**{**asdict(self), "max_loops": max_loops, "depth": int(self.depth),
                           "max_new_tokens": int(self.max_new_tokens), "seed": int(self.seed),
                           "threshold": float(self.threshold)})

    def policy_object(self):
        return make_policy(self.policy, self.threshold, self.depth, self.measure)

    def label(self) -> str:
        if self.policy == "fixed":
            return f"fixed depth {self.depth}"
        if self.policy == "router":
            return f"router (bias {self.threshold:+.2f})"
        if self.policy == "adaptive":
            return f"adaptive ({self.measure}, from {self.threshold:.2f})"
        measure = f" ({self.measure})" if self.policy == "confidence" else ""
        return f"{self.policy}{measure} ≥ {self.threshold:.2f}"


# --- share files: what another user needs to reproduce a Live run ---------------------------------------
SHARE_KIND = "adaptive-depth-lab share"
SHARE_SCHEMA = 1


def share_dict(prompt: str, settings: Settings, model_label: str) -> dict:
    """A compact, plain-JSON description of a Live run: the prompt, every setting, the model's label."""
    return {"kind": SHARE_KIND, "schema": SHARE_SCHEMA, "model": model_label, "prompt": prompt,
            "settings": asdict(settings)}


def from_share(data) -> tuple[str, Settings, str]:
    """``(prompt, settings, model label)`` of a share file; ``SettingsError`` says what is wrong with it."""
    if not isinstance(data, dict) or data.get("kind") != SHARE_KIND:
        raise SettingsError("This file is not a share file of the Adaptive-Depth Lab (a trace file? use Replay).")
    if data.get("schema") != SHARE_SCHEMA:
        raise SettingsError(f"share file schema {data.get('schema')!r} is not supported (this version reads "
                            f"{SHARE_SCHEMA})")
    values, prompt, model = data.get("settings"), data.get("prompt"), data.get("model")
    known = {f.name for f in fields(Settings)}
    if not isinstance(values, dict) or not isinstance(prompt, str) or not isinstance(model, str) \
            or set(values) - known:
        raise SettingsError("The share file's prompt, model or settings are missing or malformed.")
    return prompt, Settings(**values), model
