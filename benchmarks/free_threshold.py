"""FREE's claim on the held-out sets: its adaptive threshold vs a tuned fixed threshold at equal compute
(issue 16, item 2).

    python benchmarks/free_threshold.py --models default \\
        "teacher-3exits=convert:loops=3,sharing=cycle,rank=full" --threads 1 --initials 0.9 0.5 0.3 \\
        --trigger --engine-check 3 --json .cache/eval/free-threshold.json
    python benchmarks/free_threshold.py --from-json .cache/eval/free-threshold.json \\
        --table-initials 0.9 0.5 --report docs/RESULTS.md

Sequences: each DATA.md held-out set gives windows of ``--prompt-tokens`` + ``--seq-tokens`` tokens (3 per
512-token row, in file order; the prompt is prefilled, the rest decoded), ``heldout-chat-answers`` gives
conversations (the chat prompt, then the teacher's stored greedy answer, its first ``--seq-tokens``
tokens decoded), ``--tokens`` decoded tokens per set. Every sequence is scored once
(``model.evaluation.sweep.score_ids``: every loop's signals, teacher-forced; cached under
``.cache/eval/free-threshold/``) and then replayed (``model.evaluation.free_threshold``): a fresh
``AdaptiveConfidence`` per set, fed as a sync decoder feeds it (refit at each sequence start from the
pairs of exited tokens that caught up), for every ``--zetas``, against fixed confidence thresholds
0, 0.005, ..., 1. The JSON is rewritten after every scored set and every comparison.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.evaluation import evaluate as E  # noqa: E402
from model.evaluation import free_threshold as F  # noqa: E402
from model.evaluation.sweep import TextScores, replay, score_ids  # noqa: E402
from model.paths import cache_dir  # noqa: E402

log = logging.getLogger("free_threshold")
REPORT_START, REPORT_END = "<!-- free-threshold:start -->", "<!-- free-threshold:end -->"
CHAT_ANSWERS = "heldout-chat-answers"


# --- sequences ------------------------------------------------------------------------------------------
def prose_sequences(name: str, tokens: int, prompt: int, decoded: int, row_len: int = 512) -> list[tuple[list[int], int]]:
    """(token ids, first decoded index) windows of a held-out set until ``tokens`` decoded tokens."""
    from model.data import load_split

    window, out = prompt + decoded, []
    for row in load_split(name, row_len):
        for start in range(0, row_len - window + 1, window):
            out.append((row[start: start + window].tolist(), prompt))
            if len(out) * decoded >= tokens:
                return out
    return out


def chat_sequences(tokens: int, decoded: int) -> list[tuple[list[int], int]]:
    """Held-out conversations: the chat prompt, then the teacher's greedy answer (first ``decoded`` tokens)."""
    from model.data import answer_store
    from model.data.answer_prompts import HELDOUT_NAME

    out, total = [], 0
    for a in answer_store.load_answers(HELDOUT_NAME, modes=("greedy",)):
        answer = a.answer_ids[:decoded]
        if len(answer) < 2:
            continue
        out.append((a.prompt_ids + answer, len(a.prompt_ids)))
        total += len(answer)
        if total >= tokens:
            break
    return out


def scored_set(model, label: str, name: str, sequences: list[tuple[list[int], int]]) -> list[TextScores]:
    """Scores of every sequence, cached by model label, set and the sequences' own tokens."""
    key = hashlib.sha1(json.dumps(sequences).encode()).hexdigest()[:12]
    path = cache_dir("eval", "free-threshold", label) / f"{name}-{len(sequences)}-{key}.json"
    if path.exists():
        return [TextScores(**d) for d in json.loads(path.read_text())]
    scores = [score_ids(model, ids, first=first) for ids, first in sequences]
    path.write_text(json.dumps([asdict(s) for s in scores]))
    return scores


@torch.no_grad()
def engine_check(model, sequences: list[tuple[list[int], int]], scores: list[TextScores], measure: str,
                 initial: float, zeta: float = 0.4) -> dict:
    """The real sync decoder (``AdaptiveDecoder``, one per sequence, one shared ``AdaptiveConfidence``)
    against the replay on the same sequences: equal exit depths, thresholds and calibration labels."""
    from model.inference.decoder import AdaptiveDecoder
    from model.inference.policies import AdaptiveConfidence, Confidence

    engine = AdaptiveConfidence(initial=initial, measure=measure, zeta=zeta)
    depths = []
    for ids, first in sequences:
        dec = AdaptiveDecoder(model, engine, kv_mode="sync")
        dec.prefill(ids[: first - 1])
        depths.append([dec.step(t).depth for t in ids[first - 1:-1]])
    replayed = AdaptiveConfidence(initial=initial, measure=measure, zeta=zeta)
    runs = F.replay_adaptive(scores, replayed)
    same = sum(a == b for e, r in zip(depths, runs) for a, b in zip(e, r["depths"]))
    fixed, same_fixed = Confidence(initial, measure), 0  # the same check for a fixed threshold
    for (ids, first), s in zip(sequences, scores):
        dec = AdaptiveDecoder(model, fixed, kv_mode="sync")
        dec.prefill(ids[: first - 1])
        same_fixed += sum(dec.step(t).depth == d for t, d in zip(ids[first - 1:-1], replay(s, fixed)))
    return {"sequences": len(sequences), "measure": measure, "initial": initial, "zeta": zeta,
            "tokens": sum(map(len, depths)), "equal_depths": same,
            "exits_engine": sum(d < model.config.num_loops for e in depths for d in e),
            "exits_replay": sum(d < model.config.num_loops for r in runs for d in r["depths"]),
            "thresholds_engine": engine.history, "thresholds_replay": replayed.history,
            "pairs_engine": len(engine.pairs[1]), "pairs_replay": len(replayed.pairs[1]),
            "equal_labels": engine.pairs[1] == replayed.pairs[1], "equal_depths_fixed": same_fixed}


# --- run ------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace, argv: list[str]) -> dict:
    from model.data import heldout_names
    from model.io.checkpoint import load_model

    torch.set_num_threads(args.threads)
    started = time.time()
    results = {"command": "python benchmarks/free_threshold.py " + " ".join(argv),
               "date": time.strftime("%Y-%m-%d", time.gmtime()), "threads": args.threads,
               "tokens": args.tokens, "prompt_tokens": args.prompt_tokens, "seq_tokens": args.seq_tokens,
               "zetas": args.zetas, "measures": args.measures, "initials": args.initials, "models": {}}
    set_names = args.sets or [*heldout_names(), CHAT_ANSWERS]
    sequences = {name: chat_sequences(args.tokens, args.seq_tokens) if name == CHAT_ANSWERS
                 else prose_sequences(name, args.tokens, args.prompt_tokens, args.seq_tokens) for name in set_names}
    teacher = None
    for spec in args.models:
        if "convert:" in spec and teacher is None:
            teacher = load_model(args.teacher)[0]
        entry = E.load_entry(spec, teacher, args.teacher)
        model = entry.model.eval()
        res = results["models"][entry.label] = {"spec": entry.spec, "num_loops": model.config.num_loops,
                                                "sets": {}, "measures": {}}
        sets = {}
        for name, seqs in sequences.items():
            tic = time.time()
            sets[name] = scored_set(model, entry.label, name, seqs)
            res["sets"][name] = {"sequences": len(seqs), "decoded_tokens": sum(len(s.token_ids) for s in sets[name]),
                                 "score_seconds": round(time.time() - tic, 1)}
            log.info("%s %s: %s", entry.label, name, res["sets"][name])
            save(results, args.json, started)
        if args.engine_check:
            name = CHAT_ANSWERS if CHAT_ANSWERS in sets else next(iter(sets))
            tic = time.time()
            res["engine_check"] = engine_check(model, sequences[name][: args.engine_check],
                                               sets[name][: args.engine_check], args.measures[0], args.engine_check_initial)
            res["engine_check"].update(set=name, seconds=round(time.time() - tic, 1))
            log.info("%s engine check: %s", entry.label, res["engine_check"])
            save(results, args.json, started)
        for measure in args.measures:
            res["measures"][measure] = F.compare(sets, measure, args.zetas, args.initials,
                                                 [False, True] if args.trigger else [False])
            log.info("%s %s compared", entry.label, measure)
            save(results, args.json, started)
        del entry, model
    return save(results, args.json, started)


def save(results: dict, path: Path | None, started: float) -> dict:
    results["wall_seconds"] = round(time.time() - started, 1)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1))
    return results


# --- report ---------------------------------------------------------------------------------------------
def _fixed_cells(fixed: dict) -> str:
    """'thresholds | agreement / PPL | best single' of an ``at_equal_compute`` result."""
    mix, grid = fixed["interpolated"], fixed["best_grid"]
    if mix is None:
        mixed = "none saves as much | –"
    elif mix["between"][0] == mix["between"][1]:
        mixed = f"{mix['between'][0]:.3g} (saves {mix['saved_pct']:.1f} %) | {mix['agreement']:.3f} / {mix['perplexity']:.1f}"
    else:
        mixed = f"{mix['between'][0]:.3g}–{mix['between'][1]:.3g} | {mix['agreement']:.3f} / {mix['perplexity']:.1f}"
    best = "–" if grid is None else f"{grid['threshold']:.3g}: {grid['saved_pct']:.1f} % / {grid['agreement']:.3f}"
    return f"{mixed} | {best}"


def _split_cells(split: dict | None) -> str:
    if split is None:
        return "– | –"
    a, t = split["adaptive"], split["tuned_on_test"]
    return (f"{a['saved_pct']:.1f} % / {a['agreement']:.3f} | {t['threshold']:.3g} → {t['saved_pct']:.1f} % / "
            f"{t['agreement']:.3f}")


def _finals(adaptive: dict) -> str:
    return ", ".join(f"{v:.3g}" for v in adaptive["final_thresholds"].values())


def markdown(results: dict, zeta: str = "0.4", initials: list[float] | None = None) -> str:
    """Per model: every set for the engine's defaults (first measure, first initial threshold, ζ), then the
    pooled ("all") rows of every measure, initial threshold (those of ``initials``; default all) and ζ, and
    of FREE's code's extra pairs with the first initial threshold."""
    lines = [f"`{results['command']}` ({results['date']}, {results['threads']} thread(s), {results['wall_seconds']:.0f} s). "
             f"Sequences: {results['prompt_tokens']} prompt + {results['seq_tokens']} decoded tokens of each DATA.md "
             f"held-out set, and `{CHAT_ANSWERS}` conversations (chat prompt + the teacher's answer, first "
             f"{results['seq_tokens']} tokens), {results['tokens']} decoded tokens per set, in file order. "
             "Adaptive: `AdaptiveConfidence` (FREE's grid 0.3–0.9, refits for the first 300 sequences), a fresh "
             "policy per set, fed as the sync decoder feeds it; \"+trigger pairs\": also the pairs FREE's code takes "
             "from the token whose deep pass carried the waiting ones. FLOPs saved: the token's own path plus decision "
             "heads, calibration heads included (`model.evaluation.sweep`; sync's deferred catch-up is not counted, for "
             "either). Fixed at equal compute: fixed thresholds 0, 0.005, …, 1; of the Pareto-efficient ones, the two "
             "neighbours whose FLOPs saved bracket the adaptive run's, interpolated to it (agreement linear, PPL "
             "log-linear: what a random per-token mix of the two gets; one threshold when every threshold saves more); "
             "best single: the grid threshold with the highest agreement among those saving at least as much. Split: "
             "each set's first half tunes (the threshold with the best agreement among those saving at least what the "
             "adaptive run saves on the test half), its second half tests (the adaptive run still sees the whole "
             "stream in order).", ""]
    for label, res in results["models"].items():
        if not res["measures"]:  # a partial result: still scoring
            lines += [f"**{label}**: not compared yet (scored: {', '.join(res['sets'])}).", ""]
            continue
        measure, comp = next(iter(res["measures"].items()))
        vname, variant = next(iter(comp["variants"].items()))
        lines += [f"**{label}** ({res['num_loops']} loops): `{measure}`, {vname}, ζ = {zeta}, per set:", "",
                  "| set | seqs | pairs (consistent) | λ at the end | adaptive: avg loops / saved / agreement / PPL "
                  "| fixed at equal compute (interpolated): λ | agreement / PPL | best single fixed: saved / agreement "
                  "| split: adaptive on the test half: saved / agreement | fixed tuned on the tune half → on the test half |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for group, rows in variant["groups"].items():
            row = rows[zeta]
            a = row["adaptive"]
            lines.append(f"| {group} | {a['sequences']} | {a['pairs']} ({a['consistent_pairs']}) | {_finals(a)} | "
                         f"{a['avg_depth']:.2f} / {a['saved_pct']:.1f} % / {a['agreement']:.3f} / {a['perplexity']:.1f} | "
                         f"{_fixed_cells(row['fixed'])} | {_split_cells(row.get('split'))} |")
        lines += ["", f"**{label}**, all sets pooled (each set its own adaptive run; one fixed threshold for all):", "",
                  "| measure | adaptive run | ζ | λ at the end (per set, in the order above) | pairs (consistent) | adaptive: saved / agreement / PPL "
                  "| fixed at equal compute (interpolated): λ | agreement / PPL | best single fixed: saved / agreement "
                  "| split: adaptive on the test half | fixed tuned on the tune half → on the test half |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for measure, comp in res["measures"].items():
            for vname, variant in comp["variants"].items():
                if initials and variant["initial"] not in initials:
                    continue
                if variant["trigger"] and variant["initial"] != results["initials"][0]:
                    continue  # FREE's code's pairs: shown with FREE's initial threshold only
                rows = variant["groups"].get("all") or next(iter(variant["groups"].values()))
                for z, row in rows.items():
                    a = row["adaptive"]
                    lines.append(f"| `{measure}` | {vname} | {z} | {_finals(a)} | {a['pairs']} ({a['consistent_pairs']}) | "
                                 f"{a['saved_pct']:.1f} % / {a['agreement']:.3f} / {a['perplexity']:.1f} | "
                                 f"{_fixed_cells(row['fixed'])} | {_split_cells(row.get('split'))} |")
        check = res.get("engine_check")
        if check:
            lines += ["", f"Engine check ({label}): the real sync decoder (`AdaptiveDecoder`) on the first {check['sequences']} "
                      f"`{check['set']}` sequences, `{check['measure']}`, initial {check['initial']:g}, ζ = {check['zeta']:g}: "
                      f"equal exit depths at {check['equal_depths']} of {check['tokens']} tokens ({check['exits_engine']} vs "
                      f"{check['exits_replay']} early exits), thresholds by sequence "
                      f"{', '.join(f'{t:.3g}' for t in check['thresholds_engine'])} (engine) vs "
                      f"{', '.join(f'{t:.3g}' for t in check['thresholds_replay'])} (replay), {check['pairs_engine']} vs "
                      f"{check['pairs_replay']} calibration pairs, labels {'equal' if check['equal_labels'] else 'different'}; "
                      f"a fixed threshold {check['initial']:g}: equal depths at {check['equal_depths_fixed']} of {check['tokens']}."]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# --- CLI ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=["default"],
                        help="model specs (model.evaluation.evaluate.load_entry), e.g. default, "
                             "'untrained-3loop=convert:loops=3,sharing=cycle,rank=64'")
    parser.add_argument("--teacher", default="smollm2-135m", help="the base that convert: specs start from")
    parser.add_argument("--sets", nargs="*", default=None, help=f"held-out sets (default: DATA.md's and {CHAT_ANSWERS})")
    parser.add_argument("--tokens", type=int, default=2048, help="decoded tokens per set")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--seq-tokens", type=int, default=128, help="decoded tokens per sequence")
    parser.add_argument("--zetas", type=float, nargs="*", default=[0.2, 0.4, 0.6])
    parser.add_argument("--measures", nargs="*", default=["max_prob", "top2_gap"])
    parser.add_argument("--initials", type=float, nargs="*", default=[0.9, 0.5],
                        help="thresholds before the first fit (FREE: 0.9), one adaptive run each")
    parser.add_argument("--trigger", action="store_true",
                        help="also replay with FREE's code's extra pairs (the token whose deep pass carried them)")
    parser.add_argument("--engine-check", type=int, default=0,
                        help="run the real sync decoder on this many sequences and compare with the replay")
    parser.add_argument("--engine-check-initial", type=float, default=0.5,
                        help="the engine check's initial threshold (low enough that tokens exit and pairs arrive)")
    parser.add_argument("--table-initials", type=float, nargs="*", default=None,
                        help="initial thresholds whose pooled rows the report shows (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--from-json", type=Path, default=None, help="render a saved --json (no model runs)")
    parser.add_argument("--report", type=Path, default=None, help="replace the free-threshold block of this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    results = json.loads(args.from_json.read_text()) if args.from_json else run(args, argv)
    text = markdown(results, initials=args.table_initials)
    print(text)
    if args.report:
        if REPORT_START not in args.report.read_text():
            raise SystemExit(f"{args.report} has no {REPORT_START} block: add the section first")
        E.write_report(args.report, text, REPORT_START, REPORT_END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
