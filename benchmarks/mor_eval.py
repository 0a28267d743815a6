"""Routed depth vs early-exit policies vs fixed depth, through the real engine, on held-out text.

    .venv/bin/python benchmarks/mor_eval.py --model default-mor --sets heldout-fiction,heldout-chat \\
        --tokens 192 --write-results docs/RESULTS.md

Every policy runs teacher-forced through ``model.evaluation.sweep.forced_decode`` (the real decoder, token by
token) with the same KV semantics, MoR's recursion-wise caching (``kv_mode="recursion"``: a token that
stops at depth r holds KV only in loops <= r), so only the depth decision differs. Reported per
policy: average depth (= block compute in loops), FLOPs per token with the decision's own cost,
perplexity, KL to the teacher, top-1 agreement with the teacher and with the model's full depth,
KV entries held. Not a test: numbers from one run on this machine.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere: the repo's model/
sys.path.insert(0, str(Path(__file__).resolve().parent))  # svg_plot

from model import load_model
from model.data import load_split
from model.inference.policies import Confidence, FixedDepth, Halting, Router
from model.evaluation.sweep import forced_decode

MARK_START, MARK_END = "<!-- mor:start -->", "<!-- mor:end -->"


def policies(model) -> list[tuple[str, object]]:
    out = [(f"fixed {d}", lambda d=d: FixedDepth(d)) for d in range(1, model.config.num_loops + 1)]
    # thresholds low enough to reach the routers' depths (≈ 1.5 of 2), high enough for near-full quality
    out += [(f"confidence {t}", lambda t=t: Confidence(t)) for t in (0.1, 0.3, 0.6, 0.9)]
    if model.has_halting_heads:
        out += [(f"halting {t}", lambda t=t: Halting(t)) for t in (0.1, 0.2, 0.3, 0.6, 0.9)]
    if model.config.router_type:
        out += [(f"router bias {b:+.1f}", lambda b=b: Router(b)) for b in (-1.0, 0.0, 1.0)]
    return out


def pareto_svg(runs: dict[str, list[dict]], title: str) -> str:
    """Perplexity vs average depth, one series per policy family (and per run when several)."""
    from svg_plot import line_chart

    series: dict[str, list[tuple[float, float]]] = {}
    for run, summary in runs.items():
        families: dict[str, list[tuple[float, float]]] = {}
        for row in summary:
            families.setdefault(row["policy"].split()[0], []).append((row["avg_depth"], row["perplexity"]))
        for family, points in families.items():
            if any(sorted(points) == sorted(other) for other in series.values()):
                continue  # the same block under another router: its non-router policies are identical
            series[f"{run}: {family}" if run and len(runs) > 1 and family == "router" else family] = points
    return line_chart(series, "average loops per token (block compute)", "held-out perplexity", log_y=True,
                      title=f"Quality vs compute per depth policy ({title})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default-mor")
    p.add_argument("--sets", default="heldout-fiction,heldout-chat,heldout-expository")
    p.add_argument("--tokens", type=int, default=192, help="scored tokens per held-out set")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--write-results", type=Path, default=None)
    p.add_argument("--svg", type=Path, default=None, help="write the Pareto figure (PPL vs average depth) here")
    p.add_argument("--from-json", nargs="+", default=None, metavar="[NAME=]JSON",
                   help="only draw --svg from saved --json results (several: one set of series per file)")
    args = p.parse_args(argv)
    if args.from_json:
        runs = {}
        for spec in args.from_json:
            name, _, path = spec.rpartition("=")
            runs[name] = json.loads(Path(path).read_text())["summary"]
        args.svg.write_text(pareto_svg(runs, args.model))
        return 0
    torch.set_num_threads(args.threads)
    started = time.time()
    model, _ = load_model(args.model)
    teacher, _ = load_model("smollm2-135m")
    rows = {}
    for name in args.sets.split(","):
        ids = load_split(name)[0, : args.tokens + 2].tolist()
        x = torch.tensor([ids])
        with torch.no_grad():
            full, t = model(x).logits[0], teacher(x).logits[0]
        for label, make in policies(model):
            point = forced_decode(model, ids, make(), "recursion", prefix=1, reference_logits=full, teacher_logits=t)
            rows.setdefault(label, []).append(point)
            print(f"{name:20s} {label:18s} depth {point['avg_depth']:.2f} ppl {point['perplexity']:.1f} "
                  f"kl {point['kl']:.3f} agree(full) {point['agreement']:.2f}", flush=True)
    summary = []
    for label, points in rows.items():
        n = len(points)
        summary.append({"policy": label, "avg_depth": sum(p["avg_depth"] for p in points) / n,
                        "saved_pct": sum(p["saved_pct"] for p in points) / n,
                        "perplexity": math.exp(sum(math.log(p["perplexity"]) for p in points) / n),
                        "kl": sum(p["kl"] for p in points) / n,
                        "agreement": sum(p["agreement"] for p in points) / n,
                        "kv_pct": 100 * sum(p["kv_entries"] / p["kv_entries_full"] for p in points) / n})
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    if args.svg:
        args.svg.write_text(pareto_svg({"": summary}, args.model))
    table = ["| policy (KV: recursion-wise) | avg depth | FLOPs saved (decision incl.) | PPL (geometric mean over sets) | KL to teacher | "
             "agreement with full depth | KV entries held |", "|---|---|---|---|---|---|---|"]
    for r in sorted(summary, key=lambda r: r["avg_depth"]):
        table.append(f"| {r['policy']} | {r['avg_depth']:.2f} | {r['saved_pct']:.1f}% | {r['perplexity']:.1f} | "
                     f"{r['kl']:.3f} | {r['agreement']:.2f} | {r['kv_pct']:.0f}% |")
    text = "\n".join(table)
    print(text)
    if args.write_results:
        cmd = "python benchmarks/mor_eval.py " + " ".join(argv or __import__("sys").argv[1:])
        cfg = model.config
        body = (f"{MARK_START}\n## Routed depth (MoR) vs early exit vs fixed depth\n\nCommand: `{cmd}`  \n"
                f"Model: `{args.model}` ({cfg.num_loops} loops, {cfg.sharing}, routers: {cfg.router_type}, "
                f"halting heads: {model.has_halting_heads}); training: {json.dumps((cfg.training or {}).get('stages', [{}])[-1].get('command', ''))}.  \n"
                f"Held-out sets: {args.sets}, first {args.tokens} tokens each (DATA.md), teacher-forced through the "
                f"engine; wall time {time.time() - started:.0f} s.\n\n{text}\n{MARK_END}")
        doc = args.write_results.read_text()
        if MARK_START in doc:
            doc = doc[: doc.index(MARK_START)] + body + doc[doc.index(MARK_END) + len(MARK_END):]
        else:
            doc = doc.rstrip() + "\n\n" + body + "\n"
        args.write_results.write_text(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
