"""Teacher-forced threshold sweeps: quality vs compute for a depth policy on a given text.

One forward pass collects, for every token and loop, the scalars a policy can decide on (softmax
confidences, the residual-stream cosine, the halting score) plus what quality needs (argmax, the
log-probability of the true next token). Any threshold is then a cheap replay of the policy.

Semantics: each token's loop-r state comes from a uniform-depth forward, i.e. with full-depth KV for
all earlier tokens, which is exactly what "sync" decoding gives (FREE's synchronised parallel
decoding; exact for schemes without a coda, and up to the coda's provisional KV for MIDDLE-CYCLE).
Compute is the token's own path (layers it ran + head + decision overhead), excluding the deferred
catch-up work that sync decoding does in batched passes. Router policies are replayed under the same
full-KV semantics (an approximation of their recursion-wise decoding; ``forced_decode`` is exact).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from model.inference.compute import CostModel
from model.inference.decoder import as_recursive
from model.inference.policies import Confidence, DepthPolicy, FixedDepth, Halting, Observation, Router, Saturation


@dataclass
class TextScores:
    """Per-token, per-loop scalars for one text. Lists are indexed [token][loop-1]."""

    token_ids: list[int]  # the scored positions' input tokens
    max_prob: list[list[float]]
    top2_gap: list[list[float]]
    certainty: list[list[float]]
    cosine: list[list[float]]
    halting: list[list[float]] | None
    router: list[list[float]] | None  # expert-choice: logit of the router of recursion r+1 after loop r
    planned: list[int] | None  # token-choice: the depth each token's router chose up front
    argmax: list[list[int]]
    target_logprob: list[list[float]]  # log p(true next token) at each loop
    flops_by_depth: list[dict[str, float]]  # per depth d: path layers, head, one decision of each kind (mean per token)
    flops_full: float  # mean full-depth FLOPs per token
    num_loops: int


class _Replayed(Observation):
    """An Observation whose signals were precomputed (so a policy can be replayed cheaply)."""

    def __init__(self, loop: int, max_loops: int, signals: dict, cosine: float, halting: float | None,
                 router_logit: float | None = None, planned_depth: int | None = None):
        self.loop, self.max_loops, self.probs, self.halting = loop, max_loops, None, halting
        self.router_logit, self.planned_depth = router_logit, planned_depth
        self._signals, self._cosine = signals, cosine

    def softmax_signals(self) -> dict[str, float]:
        return self._signals

    def cosine(self) -> float:
        return self._cosine


def score_text(model, tokenizer, text: str, max_tokens: int = 512) -> TextScores:
    """Run ``text`` (truncated to ``max_tokens``) once and collect every loop's signals."""
    return score_ids(model, tokenizer(text).input_ids[: max_tokens + 1])


@torch.no_grad()
def score_ids(model, token_ids: list[int], first: int = 0) -> TextScores:
    """Like ``score_text`` for token ids; only predictions of tokens after index ``first`` are kept."""
    model = as_recursive(model)
    ids = torch.tensor([token_ids])
    if ids.shape[1] < 2:
        raise ValueError("the text needs at least two tokens to score")
    inputs, targets = ids[:, :-1], ids[0, 1:]
    out = model(inputs, output_loop_logits=True)
    cfg = model.config
    pos = torch.arange(inputs.shape[1])[None]
    entering = model.model.embed_tokens(inputs)
    entering = model.model.run_positions(entering, cfg.prelude_positions, model.model.rope(entering, pos))
    states = (entering,) + tuple(out.loop_hidden_states)
    cols = {k: [] for k in ("max_prob", "top2_gap", "certainty", "cosine", "halting", "argmax", "target_logprob")}
    for r, logits in enumerate(out.loop_logits, start=1):
        logp = torch.log_softmax(logits[0].float(), -1)
        p = logp.exp()
        top2 = torch.topk(p, 2, dim=-1).values
        entropy = -(p * logp).sum(-1)
        cols["max_prob"].append(top2[:, 0])
        cols["top2_gap"].append(top2[:, 0] - top2[:, 1])
        cols["certainty"].append(1 - entropy / math.log(p.shape[-1]))
        cols["cosine"].append(torch.cosine_similarity(states[r][0].float(), states[r - 1][0].float(), dim=-1))
        cols["argmax"].append(logp.argmax(-1))
        cols["target_logprob"].append(logp.gather(-1, targets[:, None])[:, 0])
        if model.has_halting_heads and r < cfg.num_loops:
            cols["halting"].append(torch.sigmoid(model.halting_logit(r, states[r])[0]))
        if cfg.router_type == "expert" and r < cfg.num_loops:
            cols.setdefault("router", []).append(model.routers.logit(r + 1, states[r][0]))
    keep = slice(max(first - 1, 0), None)  # predictions of tokens first.. come from inputs first-1..
    per_token = {k: torch.stack(v, 1)[keep].tolist() for k, v in cols.items() if v}
    planned = model.token_router.depth(entering[0])[keep].tolist() if cfg.router_type == "token" else None
    costs = CostModel.from_model(model)
    return TextScores(
        token_ids=inputs[0, keep].tolist(),
        halting=per_token.get("halting"),
        router=per_token.get("router"),
        planned=planned,
        flops_by_depth=[_path_flops(costs, cfg, d, inputs.shape[1]) for d in range(1, cfg.num_loops + 1)],
        flops_full=sum(costs.full_token(t + 1) for t in range(inputs.shape[1])) / inputs.shape[1],
        num_loops=cfg.num_loops,
        **{k: per_token[k] for k in ("max_prob", "top2_gap", "certainty", "cosine", "argmax", "target_logprob")},
    )


def _path_flops(costs: CostModel, cfg, depth: int, n_tokens: int) -> dict[str, float]:
    """Mean FLOPs per token of a depth-``depth`` path, by part (decision parts are per loop)."""
    mean_ctx = (n_tokens + 1) / 2  # attention cost is linear in context: the mean is exact
    positions = list(cfg.prelude_positions) + [p for r in range(1, depth + 1) for p in cfg.loop_positions(r)] \
        + list(cfg.coda_positions)
    coda = sum(costs.layers(cfg.coda_positions, mean_ctx).values())
    decisions = {kind: costs.decision(kind, probe_layers=coda, halting_width=cfg.halting_hidden or 0)
                 for kind in ("softmax", "cosine", "halting", "router")}
    if cfg.router_type == "token":  # token-choice decides once, up front, over every depth
        decisions["router"] = costs.router(cfg.num_loops)
    return {"layers": sum(costs.layers(positions, mean_ctx).values()), "head": costs.head(),
            # at the exit loop the probe's coda and head are the path's own: only the softmax signals are extra
            "softmax_at_exit": costs.softmax_signals(), "router_once": 1.0 if cfg.router_type == "token" else 0.0,
            **{f"decision_{k}": v for k, v in decisions.items()}}


def replay(scores: TextScores, policy: DepthPolicy, max_loops: int | None = None) -> list[int]:
    """Exit depth of every token under ``policy`` (teacher-forced)."""
    max_loops = max_loops or scores.num_loops
    depths = []
    for t in range(len(scores.token_ids)):
        for loop in range(1, max_loops + 1):
            signals = {"max_prob": scores.max_prob[t][loop - 1], "top2_gap": scores.top2_gap[t][loop - 1],
                       "certainty": scores.certainty[t][loop - 1]}
            halting = scores.halting[t][loop - 1] if scores.halting and loop < scores.num_loops else None
            router = scores.router[t][loop - 1] if scores.router and loop < scores.num_loops else None
            planned = scores.planned[t] if scores.planned else None
            stop, _ = policy.decide(_Replayed(loop, max_loops, signals, scores.cosine[t][loop - 1], halting,
                                              router, planned))
            if stop:
                break
        depths.append(loop)
    return depths


@dataclass
class SweepPoint:
    policy: str
    threshold: float | None
    avg_depth: float
    agreement: float  # share of tokens whose exit-depth argmax equals the full-depth argmax
    perplexity: float  # of the true next tokens under the exit-depth distributions
    flops_per_token: float  # the tokens' own paths + decision overhead
    flops_full: float
    saved_pct: float

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_depths(scores: TextScores, depths: list[int], policy: DepthPolicy, threshold: float | None) -> SweepPoint:
    """Quality and compute of given per-token exit depths."""
    full = scores.num_loops - 1
    n = len(depths)
    agree = sum(scores.argmax[t][d - 1] == scores.argmax[t][full] for t, d in enumerate(depths)) / n
    nll = -sum(scores.target_logprob[t][d - 1] for t, d in enumerate(depths)) / n
    flops = sum(_decision_and_path(scores.flops_by_depth[d - 1], policy, d, scores.num_loops) for d in depths) / n
    return SweepPoint(policy.name, threshold, sum(depths) / n, agree, math.exp(nll), flops, scores.flops_full,
                      100 * (1 - flops / scores.flops_full))


def _decision_and_path(parts: dict[str, float], policy: DepthPolicy, depth: int, max_loops: int) -> float:
    total = parts["layers"] + parts["head"]
    kind = policy.decision_cost
    if kind == "softmax":
        total += (depth - 1) * parts["decision_softmax"] + parts["softmax_at_exit"]
    elif kind in ("cosine", "halting"):
        total += min(depth, max_loops - 1) * parts[f"decision_{kind}"]
    elif kind == "router":  # expert: a router before each further loop; token: one, up front
        total += parts["decision_router"] * (1 if parts["router_once"] else min(depth, max_loops - 1))
    return total


DEFAULT_THRESHOLDS = {
    "confidence": [0.05 * i for i in range(1, 20)] + [0.99],
    "saturation": [0.5 + 0.025 * i for i in range(20)] + [0.995],
    "halting": [0.05 * i for i in range(1, 20)] + [0.99],
    "router": [-4.0, -3.0, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0],  # the router's logit bias
}


def sweep(scores: TextScores, policy_name: str, thresholds: list[float] | None = None,
          measure: str = "max_prob") -> list[SweepPoint]:
    """Quality vs compute over thresholds for one policy family (plus nothing else)."""
    if policy_name == "fixed":
        return fixed_depth_points(scores)
    thresholds = thresholds or DEFAULT_THRESHOLDS[policy_name]
    points = []
    for th in thresholds:
        policy = {"confidence": lambda: Confidence(th, measure), "saturation": lambda: Saturation(th),
                  "halting": lambda: Halting(th), "router": lambda: Router(th)}[policy_name]()
        points.append(evaluate_depths(scores, replay(scores, policy), policy, th))
    return points


def fixed_depth_points(scores: TextScores) -> list[SweepPoint]:
    """Static truncation at every depth: the baseline an adaptive policy must beat."""
    points = []
    for d in range(1, scores.num_loops + 1):
        policy = FixedDepth(d)
        points.append(evaluate_depths(scores, [d] * len(scores.token_ids), policy, float(d)))
    return points


@torch.no_grad()
def forced_decode(model, token_ids: list[int], policy: DepthPolicy, kv_mode: str = "sync", prefix: int = 1,
                  reference_logits: torch.Tensor | None = None, teacher_logits: torch.Tensor | None = None) -> dict:
    """Teacher-forced decoding through the real engine (exact decode-time semantics, any KV mode).

    Feeds ``token_ids`` one by one after prefilling ``prefix`` tokens; each step's exit logits predict
    the next true token. Returns mean depth, perplexity, agreement with ``reference_logits`` (full
    depth, (T, V)), KL to ``teacher_logits`` where given, FLOPs per token (decisions included) and the
    KV entries held at the end vs full depth. Slower than ``replay`` but exact for routed KV modes.
    """
    from model.inference.decoder import AdaptiveDecoder

    model = as_recursive(model)
    dec = AdaptiveDecoder(model, policy, kv_mode=kv_mode)
    dec.prefill(token_ids[:prefix])
    nll, agree, kl, depths, flops, full = 0.0, 0, 0.0, [], 0.0, 0.0
    targets = token_ids[prefix + 1:]
    for i, (token, target) in enumerate(zip(token_ids[prefix:-1], targets)):
        r = dec.step(token)
        logp = torch.log_softmax(r.logits.float(), -1)
        nll -= float(logp[target])
        t = prefix + i  # the position whose next-token distribution this is
        if reference_logits is not None:
            agree += int(r.logits.argmax() == reference_logits[t].argmax())
        if teacher_logits is not None:
            tp = torch.log_softmax(teacher_logits[t].float(), -1)
            kl += float((tp.exp() * (tp - logp)).sum())
        depths.append(r.depth)
        flops += sum(r.flops.values())
        full += dec.costs.full_token(dec.length)
    n = len(depths)
    held, held_full = dec.kv_entries()
    return {"policy": policy.describe(), "kv_mode": kv_mode, "tokens": n, "avg_depth": sum(depths) / n,
            "perplexity": math.exp(nll / n), "agreement": agree / n if reference_logits is not None else None,
            "kl": kl / n if teacher_logits is not None else None, "flops_per_token": flops / n,
            "saved_pct": 100 * (1 - flops / full), "kv_entries": held, "kv_entries_full": held_full,
            "depth_counts": [depths.count(d) for d in range(1, model.config.num_loops + 1)]}
