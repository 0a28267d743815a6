"""Depth policies: after loop r, given what was observed, does this token stop?

A policy is a small object with one question, ``decide(obs) -> (stop, reason)``, plus what it
needs to answer it: ``needs_logits`` (softmax signals cost an LM head per loop; the engine
computes them only for policies that ask) and ``signal(obs)`` (the number shown per loop). Every
policy stops at the last loop ("max depth").
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

CONFIDENCE_MEASURES = ("max_prob", "top2_gap", "entropy")
DEFAULT_MEASURE = "max_prob"  # every confidence policy's default measure


@dataclass
class Observation:
    """What the engine saw after loop ``loop`` for one token."""

    loop: int
    max_loops: int
    hidden: torch.Tensor  # (d,) residual stream after this loop
    previous: torch.Tensor  # (d,) residual stream entering this loop
    probs: torch.Tensor | None = None  # (V,) exit distribution, only if needs_logits (or inspected)
    halting: float | None = None  # sigmoid of the learned halting head, only if needs_halting
    router_logit: float | None = None  # expert-choice: logit of the router of the NEXT recursion
    planned_depth: int | None = None  # token-choice: the depth the router chose up front

    def softmax_signals(self) -> dict[str, float]:
        """max_prob, top2_gap, certainty of ``probs`` (computed once, then reused)."""
        if self.probs is None:
            return {}
        cached = self.__dict__.get("_softmax_signals")
        if cached is None:
            top2 = torch.topk(self.probs, 2).values
            entropy = -(self.probs * torch.log(self.probs.clamp_min(1e-12))).sum()
            cached = self.__dict__["_softmax_signals"] = {
                "max_prob": float(top2[0]),
                "top2_gap": float(top2[0] - top2[1]),
                "certainty": float(1 - entropy / math.log(self.probs.numel())),
            }
        return cached

    def cosine(self) -> float:
        return float(torch.nn.functional.cosine_similarity(self.hidden.float(), self.previous.float(), dim=0))


class DepthPolicy:
    """Base class. Subclasses set ``name``, ``needs_logits``, ``signal_name`` and ``threshold``."""

    name = "policy"
    needs_logits = False
    needs_halting = False  # asks the engine for the learned halting head's score
    needs_router = False  # asks the engine for Mixture-of-Recursions router outputs
    signal_name: str | None = None
    threshold: float | None = None
    decision_cost = "none"  # "softmax" | "cosine" | "none": what compute.CostModel charges per loop

    def signal(self, obs: Observation) -> float | None:
        return None

    def decide(self, obs: Observation) -> tuple[bool, str]:
        if obs.loop >= obs.max_loops:
            return True, "max depth"
        value = self.signal(obs)
        if value is not None and self.threshold is not None and value >= self.threshold:
            return True, f"{self.signal_name} {value:.2f} >= {self.threshold:.2f}"
        return False, ""

    def describe(self) -> dict:
        return {"policy": self.name, "threshold": self.threshold, "signal": self.signal_name}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


class FixedDepth(DepthPolicy):
    """Every token runs exactly ``depth`` loops (static exit; ``depth`` is capped at the model's loops)."""

    name = "fixed"

    def __init__(self, depth: int):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.depth = depth

    def decide(self, obs: Observation) -> tuple[bool, str]:
        if obs.loop >= min(self.depth, obs.max_loops):
            return True, f"fixed depth {min(self.depth, obs.max_loops)}"
        return False, ""

    def describe(self) -> dict:
        return {"policy": self.name, "depth": self.depth}


class Confidence(DepthPolicy):
    """Stop when the exit distribution is confident: ``measure >= threshold`` (CALM / FREE style).

    ``max_prob``: top-1 probability; ``top2_gap``: top-1 minus top-2 (FREE's measure);
    ``entropy``: certainty ``1 - H(p)/log V``. All lie in [0, 1]. Costs an LM head per loop.
    """

    name = "confidence"
    needs_logits = True
    decision_cost = "softmax"

    def __init__(self, threshold: float = 0.8, measure: str = DEFAULT_MEASURE):
        if measure not in CONFIDENCE_MEASURES:
            raise ValueError(f"measure must be one of {CONFIDENCE_MEASURES}, got {measure!r}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.threshold = threshold
        self.measure = measure
        self.signal_name = "certainty" if measure == "entropy" else measure

    def signal(self, obs: Observation) -> float | None:
        return obs.softmax_signals().get(self.signal_name)

    def describe(self) -> dict:
        return {**super().describe(), "measure": self.measure}


class Saturation(DepthPolicy):
    """Stop when a loop barely changes the residual stream: cosine(h_r, h_{r-1}) >= threshold.

    Needs no LM head: the decision costs one cosine similarity.
    """

    name = "saturation"
    signal_name = "cosine"
    decision_cost = "cosine"

    def __init__(self, threshold: float = 0.95):
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [-1, 1], got {threshold}")
        self.threshold = threshold

    def signal(self, obs: Observation) -> float | None:
        return obs.cosine()


class Halting(DepthPolicy):
    """Stop when the learned halting head says this loop's prediction already matches the last
    loop's: ``sigmoid(head(h_r)) >= threshold``. Needs no LM head (model trained with exit heads)."""

    name = "halting"
    needs_halting = True
    signal_name = "halting"
    decision_cost = "halting"

    def __init__(self, threshold: float = 0.5):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.threshold = threshold

    def signal(self, obs: Observation) -> float | None:
        return obs.halting


class Router(DepthPolicy):
    """Mixture-of-Recursions routing at decode time: no LM head, no threshold tuning.

    Expert-choice: continue into recursion r+1 while ``sigmoid(logit_{r+1} + bias) >= 0.5`` (the
    causal rule the auxiliary loss trains); ``bias`` trades compute for quality. Token-choice: the
    depth chosen once, on the block input.
    """

    name = "router"
    needs_router = True
    signal_name = "router"
    decision_cost = "router"

    def __init__(self, bias: float = 0.0):
        self.bias = float(bias)
        self.threshold = 0.5

    def signal(self, obs: Observation) -> float | None:
        if obs.router_logit is None:
            return None
        return float(torch.sigmoid(torch.tensor(obs.router_logit + self.bias)))

    def decide(self, obs: Observation) -> tuple[bool, str]:
        if obs.loop >= obs.max_loops:
            return True, "max depth"
        if obs.planned_depth is not None:
            stop = obs.loop >= obs.planned_depth
            return stop, f"token-choice depth {obs.planned_depth}" if stop else ""
        score = self.signal(obs)
        if score is not None and score < 0.5:
            return True, f"router {score:.2f} < 0.50"
        return False, ""

    def describe(self) -> dict:
        return {"policy": self.name, "bias": self.bias, "threshold": 0.5, "signal": "router"}


class BetaMixture:
    """FREE's supervised two-component Beta mixture over confidences (METHODS §2.5).

    Components: "inconsistent" and "consistent" (exit prediction != / == the full-depth one), each
    fitted by weighted method of moments on its labelled samples. The threshold is the lowest point of
    a grid above which the posterior of "consistent" (equal priors) exceeds ``zeta``.
    """

    def __init__(self, zeta: float = 0.4, grid: tuple[float, float, int] = (0.3, 0.9, 10)):
        self.zeta, self.grid = zeta, torch.linspace(*grid[:2], grid[2]).double()
        self.params: dict[bool, tuple[float, float]] = {}

    @staticmethod
    def _moments(x: torch.Tensor) -> tuple[float, float]:
        m, v = float(x.mean()), float(x.var(unbiased=False)) + 1e-8
        common = m * (1 - m) / v - 1
        return max(m * common, 1e-3), max((1 - m) * common, 1e-3)

    def fit(self, confidences: list[float], consistent: list[bool]) -> bool:
        c = torch.tensor(confidences, dtype=torch.float64).clamp(1e-4, 1 - 1e-4)
        y = torch.tensor(consistent)
        if y.sum() < 2 or (~y).sum() < 2:
            return False  # both components need samples
        self.params = {True: self._moments(c[y]), False: self._moments(c[~y])}
        return True

    def pdf(self, x: torch.Tensor, consistent: bool) -> torch.Tensor:
        a, b = self.params[consistent]
        return torch.distributions.Beta(torch.tensor(a), torch.tensor(b)).log_prob(x.double()).exp()

    def mean(self, consistent: bool) -> float:
        a, b = self.params[consistent]
        return a / (a + b)

    def posterior(self, x: torch.Tensor) -> torch.Tensor:
        """P(consistent | confidence x) under equal priors."""
        cons = self.mean(True) >= self.mean(False)  # the "consistent" component has the larger mean
        p_c, p_i = self.pdf(x, cons), self.pdf(x, not cons)
        return p_c / (p_c + p_i + 1e-300)

    def threshold(self) -> float:
        n = int((self.posterior(self.grid) > self.zeta).sum())
        return float(self.grid[min(max(len(self.grid) - n, 0), len(self.grid) - 1)])


class AdaptiveConfidence(Confidence):
    """FREE's adaptive threshold: confidence exits whose threshold is re-estimated online.

    The engine (``kv_mode="sync"``) feeds calibration pairs for free: when exited tokens catch up
    to full depth, their exit confidence and whether the exit prediction matched the full-depth
    one. At the start of each new sequence the Beta mixture is refitted on all pairs so far and
    the threshold updated, for the first ``max_updates`` sequences; then it is frozen.
    """

    name = "adaptive"
    wants_calibration = True

    def __init__(self, initial: float = 0.9, measure: str = DEFAULT_MEASURE, zeta: float = 0.4, max_updates: int = 300):
        super().__init__(initial, measure)
        self.mixture = BetaMixture(zeta)
        self.pairs: tuple[list[float], list[bool]] = ([], [])
        self.updates, self.max_updates = 0, max_updates
        self.history = [initial]

    def calibrate(self, confidence: float, consistent: bool) -> None:
        self.pairs[0].append(confidence)
        self.pairs[1].append(consistent)

    def begin_sequence(self) -> None:
        if self.updates < self.max_updates and self.mixture.fit(*self.pairs):
            self.threshold = self.mixture.threshold()
            self.updates += 1
            self.history.append(self.threshold)

    def describe(self) -> dict:
        return {**super().describe(), "policy": self.name, "pairs": len(self.pairs[0]), "updates": self.updates}

    def calibration_view(self, points: int = 99) -> dict:
        """Plain data for the threshold lab: the calibration pairs by label, the fitted Beta densities
        and the posterior on a grid over (0, 1), the threshold in force, and its history by sequence."""
        confidences, consistent = self.pairs
        view = {"measure": self.measure, "zeta": self.mixture.zeta, "threshold": self.threshold,
                "history": list(self.history), "updates": self.updates,
                "consistent": [c for c, y in zip(confidences, consistent) if y],
                "inconsistent": [c for c, y in zip(confidences, consistent) if not y],
                "fitted": bool(self.mixture.params)}
        if view["fitted"]:
            x = torch.linspace(0.01, 0.99, points).double()
            view.update(grid=x.tolist(), pdf_consistent=self.mixture.pdf(x, True).tolist(),
                        pdf_inconsistent=self.mixture.pdf(x, False).tolist(), posterior=self.mixture.posterior(x).tolist())
        return view


# --- the one registry of policies: name -> builder(threshold, depth, measure); None means its default --------
POLICIES: dict[str, Callable[[float | None, int | None, str], DepthPolicy]] = {
    "fixed": lambda threshold, depth, measure: FixedDepth(depth or 1),
    "confidence": lambda threshold, depth, measure: Confidence(0.8 if threshold is None else threshold, measure),
    "saturation": lambda threshold, depth, measure: Saturation(0.95 if threshold is None else threshold),
    "halting": lambda threshold, depth, measure: Halting(0.5 if threshold is None else threshold),
    "router": lambda threshold, depth, measure: Router(0.0 if threshold is None else threshold),  # value = its bias
    "adaptive": lambda threshold, depth, measure: AdaptiveConfidence(0.9 if threshold is None else threshold, measure),
}


def make_policy(name: str, threshold: float | None = None, depth: int | None = None,
                measure: str = DEFAULT_MEASURE) -> DepthPolicy:
    """Build a policy from plain settings (CLI, server, dashboard): one of ``POLICIES``."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose from {sorted(POLICIES)}")
    return POLICIES[name](threshold, depth, measure)
