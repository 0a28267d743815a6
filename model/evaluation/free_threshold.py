"""FREE's adaptive threshold against fixed confidence thresholds at equal compute (issue 16, item 2).

Everything here replays teacher-forced signals (``model.evaluation.sweep``): one scoring forward per
sequence, then any number of policies. The adaptive policy is the engine's own ``AdaptiveConfidence``,
fed exactly as a ``sync`` decoder (``AdaptiveDecoder``) feeds it:

- at the start of every sequence ``begin_sequence`` refits the Beta mixture on all pairs so far (the
  first ``max_updates`` sequences; then the threshold is frozen), and the threshold stays fixed for the
  sequence, so ``sweep.replay`` gives the sequence's exit depths;
- during the sequence an exited token waits; each later token that runs loop ``r`` carries the waiting
  tokens that lack loop ``r``; when they reach the last loop they are labelled: (their exit signal,
  whether their exit argmax equals the full-depth one). Tokens still waiting when the sequence ends are
  never labelled (the decoder does not flush). ``sync_calibration_pairs`` simulates this from the depths;
- each labelled token costs one LM head (charged as decision FLOPs, as the engine does).

``trigger=True`` adds what FREE's released code also labels: the token whose deep pass carried the
waiting tokens contributes its own shallow pair(s) (for a 2-loop model exactly FREE's ``m + 1`` pairs;
with more loops one pair per loop it passed). The engine does not do this; it is a diagnostic.

Compute is ``sweep.evaluate_depths``'s (the token's own path + decision overhead; sync's deferred
catch-up work is not counted, for the fixed thresholds and the adaptive one alike).
"""
from __future__ import annotations

import math
from typing import Sequence

from model.evaluation.sweep import TextScores, evaluate_depths, replay
from model.inference.policies import AdaptiveConfidence, Confidence, DepthPolicy

FINE_THRESHOLDS = [round(0.005 * i, 3) for i in range(201)]  # 0, 0.005, ..., 1


# --- the adaptive policy, fed as a sync decoder feeds it ----------------------------------------------
def sync_calibration_pairs(scores: TextScores, depths: list[int], signal: str,
                           trigger: bool = False) -> tuple[list[tuple[float, bool]], int]:
    """The calibration pairs a ``sync`` decoder labels during one sequence with these exit depths, in
    order, and how many of them cost a head (the caught-up exited tokens)."""
    full = scores.num_loops
    values = getattr(scores, signal)

    def pair(t: int, depth: int) -> tuple[float, bool]:
        return values[t][depth - 1], scores.argmax[t][depth - 1] == scores.argmax[t][full - 1]

    waiting: list[list[int]] = []  # [token, exit depth, loops held], in position order
    pairs: list[tuple[float, bool]] = []
    caught_up = 0
    for t, depth in enumerate(depths):
        for loop in range(2, depth + 1):  # loop 1 carries no rows: nothing waits at depth 0
            for w in waiting:
                if w[2] == loop - 1:
                    w[2] = loop
            done = [w for w in waiting if w[2] == full]
            if done:
                waiting = [w for w in waiting if w[2] < full]
                pairs += [pair(w[0], w[1]) for w in done]
                caught_up += len(done)
                if trigger:
                    pairs += [pair(t, r) for r in range(1, full)]
        if depth < full:
            waiting.append([t, depth, depth])
    return pairs, caught_up


def replay_adaptive(sequences: Sequence[TextScores], policy: AdaptiveConfidence, trigger: bool = False) -> list[dict]:
    """Run ``policy`` over ``sequences`` in order as a sync decoder would: per sequence the threshold
    in force, the exit depths, the pairs it labelled and the calibration FLOPs (one head each)."""
    runs = []
    for scores in sequences:
        policy.begin_sequence()
        threshold = policy.threshold
        depths = replay(scores, policy)
        pairs, caught_up = sync_calibration_pairs(scores, depths, policy.signal_name, trigger)
        for confidence, consistent in pairs:
            policy.calibrate(confidence, consistent)
        runs.append({"threshold": threshold, "depths": depths, "pairs": len(pairs),
                     "consistent": sum(y for _, y in pairs), "calibration_flops": caught_up * scores.flops_by_depth[0]["head"]})
    return runs


# --- pooled quality and compute ------------------------------------------------------------------------
def pooled(sequences: Sequence[TextScores], depths: Sequence[list[int]], policy: DepthPolicy,
           extra_flops: Sequence[float] | None = None) -> dict:
    """Token-weighted agreement with full depth, PPL, average depth and FLOPs saved of per-sequence
    exit depths (``sweep.evaluate_depths`` per sequence); ``extra_flops``: per-sequence totals to add
    (FREE's calibration heads)."""
    n = agree = nll = depth = flops = full = 0.0
    for i, (scores, d) in enumerate(zip(sequences, depths)):
        p = evaluate_depths(scores, d, policy, policy.threshold)
        k = len(d)
        n += k
        agree += p.agreement * k
        nll += math.log(p.perplexity) * k
        depth += p.avg_depth * k
        flops += p.flops_per_token * k + (extra_flops[i] if extra_flops else 0.0)
        full += p.flops_full * k
    return {"tokens": int(n), "avg_depth": depth / n, "agreement": agree / n, "perplexity": math.exp(nll / n),
            "saved_pct": 100 * (1 - flops / full)}


def fixed_curve(sequences: Sequence[TextScores], thresholds: Sequence[float] = FINE_THRESHOLDS,
                measure: str = "max_prob") -> list[dict]:
    """Every fixed confidence threshold's pooled point."""
    points = []
    for th in thresholds:
        policy = Confidence(th, measure)
        points.append({"threshold": th, **pooled(sequences, [replay(s, policy) for s in sequences], policy)})
    return points


def summarize(policy: AdaptiveConfidence, members: Sequence[tuple[TextScores, dict]]) -> dict:
    """Pooled quality and compute of (sequence, its ``replay_adaptive`` record) pairs, calibration
    heads included, with the threshold history and the pairs labelled along the way."""
    point = pooled([s for s, _ in members], [r["depths"] for _, r in members], policy,
                   [r["calibration_flops"] for _, r in members])
    return {**point, "sequences": len(members), "pairs": sum(r["pairs"] for _, r in members),
            "consistent_pairs": sum(r["consistent"] for _, r in members),
            "thresholds": [r["threshold"] for _, r in members]}


# --- comparisons ----------------------------------------------------------------------------------------
def frontier(curve: Sequence[dict]) -> list[dict]:
    """The points no other point beats on both FLOPs saved and agreement, by FLOPs saved ascending (on
    a fine grid: neighbouring thresholds)."""
    best: list[dict] = []
    for p in sorted(curve, key=lambda p: (-p["saved_pct"], -p["agreement"])):
        if not best or p["agreement"] > best[-1]["agreement"]:
            best.append(p)
    return best[::-1]


def at_equal_compute(curve: Sequence[dict], saved_pct: float) -> dict:
    """The fixed thresholds at ``saved_pct`` FLOPs saved.

    ``interpolated``: the two neighbouring thresholds of the ``frontier`` whose savings bracket
    ``saved_pct``, interpolated to it (agreement linear, PPL log-linear in the weight: what a random
    per-token mix of the two thresholds gets); when every threshold saves more,
    the frontier's most accurate point (it is better on both); ``None`` when none saves as much.
    ``best_grid``: the single grid threshold with the highest agreement among those saving at least as much.
    """
    front = frontier(curve)
    reachable = [p for p in curve if p["saved_pct"] >= saved_pct]
    best_grid = max(reachable, key=lambda p: (p["agreement"], p["saved_pct"])) if reachable else None
    interpolated = None
    if front and saved_pct <= front[0]["saved_pct"]:
        interpolated = {**front[0], "weight": 0.0, "between": [front[0]["threshold"]] * 2}
    else:
        for lo, hi in zip(front, front[1:]):
            if lo["saved_pct"] <= saved_pct <= hi["saved_pct"]:
                w = (saved_pct - lo["saved_pct"]) / (hi["saved_pct"] - lo["saved_pct"])
                interpolated = {"saved_pct": saved_pct, "weight": w, "between": [lo["threshold"], hi["threshold"]],
                                "agreement": lo["agreement"] + w * (hi["agreement"] - lo["agreement"]),
                                "perplexity": math.exp((1 - w) * math.log(lo["perplexity"])
                                                       + w * math.log(hi["perplexity"])),
                                "avg_depth": lo["avg_depth"] + w * (hi["avg_depth"] - lo["avg_depth"])}
                break
    return {"interpolated": interpolated, "best_grid": best_grid}


def tuned_threshold(curve: Sequence[dict], saved_pct: float) -> dict:
    """The grid threshold a tuner picks for a compute target: the highest agreement among thresholds
    saving at least ``saved_pct`` (if none does, the one saving most)."""
    reachable = [p for p in curve if p["saved_pct"] >= saved_pct]
    if not reachable:
        return max(curve, key=lambda p: p["saved_pct"])
    return max(reachable, key=lambda p: (p["agreement"], p["saved_pct"]))


def variant_name(initial: float, trigger: bool) -> str:
    return f"initial {initial:g}" + (", +trigger pairs" if trigger else "")


def compare(sets: dict[str, list[TextScores]], measure: str = "max_prob", zetas: Sequence[float] = (0.2, 0.4, 0.6),
            initials: Sequence[float] = (0.9,), triggers: Sequence[bool] = (False,),
            thresholds: Sequence[float] = FINE_THRESHOLDS) -> dict:
    """FREE's claim per set of sequences (each in stream order) and over all sets ("all"), for every
    initial threshold, ``trigger`` setting and ``zeta``.

    A fresh ``AdaptiveConfidence`` runs over each set's sequences in order (FREE calibrates per data
    stream); "all" pools these per-set runs against one fixed threshold for every set.

    - ``fixed``: the adaptive run vs the fixed thresholds at its compute (``at_equal_compute``);
    - ``split``: each set's first half tunes, its second half tests: the adaptive run (still over the
      whole stream, so it has calibrated on the first half too) on the test half, vs the fixed threshold
      tuned on the tune half for the adaptive's test-half FLOPs saved (``tuned_threshold``), on the test half.
    """
    halves = {name: len(seqs) // 2 for name, seqs in sets.items()}
    groups = {name: [name] for name in sets}
    if len(sets) > 1:
        groups["all"] = list(sets)
    members_of, curves = {}, {}
    for group, members in groups.items():
        whole = [(sets[m][i], m, i) for m in members for i in range(len(sets[m]))]
        tune = [w for w in whole if w[2] < halves[w[1]]]
        test = [w for w in whole if w[2] >= halves[w[1]]]
        members_of[group] = whole, tune, test
        curves[group] = (fixed_curve([w[0] for w in whole], thresholds, measure),
                         fixed_curve([w[0] for w in tune], thresholds, measure) if tune else [])
    out = {"measure": measure, "groups": {g: {"sequences": len(members_of[g][0]), "tune_sequences": len(members_of[g][1]),
                                              "curve": curves[g][0]} for g in groups}, "variants": {}}
    for initial in initials:
        for trigger in triggers:
            runs = {}
            for name, seqs in sets.items():
                for zeta in zetas:
                    policy = AdaptiveConfidence(initial=initial, measure=measure, zeta=zeta)
                    runs[name, zeta] = (policy, replay_adaptive(seqs, policy, trigger))
            variant = out["variants"][variant_name(initial, trigger)] = {"initial": initial, "trigger": trigger, "groups": {}}
            for group, members in groups.items():
                whole, tune, test = members_of[group]
                curve, tune_curve = curves[group]
                rows = variant["groups"][group] = {}
                for zeta in zetas:
                    policy = runs[members[0], zeta][0]
                    adaptive = summarize(policy, [(s, runs[m, zeta][1][i]) for s, m, i in whole])
                    adaptive["final_thresholds"] = {m: runs[m, zeta][0].threshold for m in members}
                    adaptive["refits"] = {m: runs[m, zeta][0].updates for m in members}
                    row = {"adaptive": adaptive, "fixed": at_equal_compute(curve, adaptive["saved_pct"])}
                    if tune and test:
                        on_test = summarize(policy, [(s, runs[m, zeta][1][i]) for s, m, i in test])
                        choice = tuned_threshold(tune_curve, on_test["saved_pct"])
                        fixed = Confidence(choice["threshold"], measure)
                        row["split"] = {"adaptive": on_test, "tuned_on_tune": choice, "tuned_on_test": {
                            "threshold": choice["threshold"],
                            **pooled([w[0] for w in test], [replay(w[0], fixed) for w in test], fixed)}}
                    rows[str(zeta)] = row
    return out
