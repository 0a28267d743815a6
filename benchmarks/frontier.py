"""Unique non-embedding parameters vs held-out quality of untrained conversions (no training).

    python benchmarks/frontier.py --rows 1 --json .cache/eval/frontier.json
    python benchmarks/frontier.py --plot docs/gpu-session/eval-frontier.json docs/gpu-session/eval-main.json \
        --svg docs/frontier.svg          # the trained frontier from model.evaluation --json results

Each configuration is ``recursify``-ed from the teacher (plain or activation-aware LoRA init) and
scored with ``model.evaluation.evaluate.evaluate_set`` on the first ``--rows`` rows (512 tokens) of every
held-out set: the cheap end of the frontier (what conversion alone buys, before any training).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # svg_plot

from model.io.checkpoint import load_model  # noqa: E402
from model.data import heldout_names, load_split  # noqa: E402
from model.evaluation.evaluate import Entry, convert, evaluate_set, geo_mean, unique_parameters  # noqa: E402

CONFIGS = [
    "loops=2,sharing=middle_cycle,init=average,rank=128,lora_init=svd",
    "loops=2,sharing=middle_cycle,init=average,rank=128,lora_init=asvd",
    "loops=2,sharing=middle_cycle,init=stepwise,rank=128,lora_init=asvd",
    "loops=2,sharing=middle_cycle,init=average,rank=64,lora_init=asvd",
    "loops=2,sharing=middle_cycle,init=average,rank=256,lora_init=asvd",
    "loops=3,sharing=middle_cycle,init=average,rank=128,lora_init=asvd",
    "loops=2,sharing=middle_cycle,init=average,rank=0",
]


def plot_trained(paths: list[Path], svg: Path, untrained: Path | None = None) -> None:
    """Unique non-embedding parameters vs held-out PPL (full depth, geometric mean over the sets) of every
    model in ``model.evaluation --json`` results; each row of the figure is one model."""
    from svg_plot import line_chart

    series: dict[str, list[tuple]] = {}
    for path in paths:
        results = json.loads(path.read_text())
        for label, info in results["models"].items():
            if label.startswith("mor"):  # routed runs: see the MoR section
                continue
            ppl = geo_mean([results["sets"][s][label]["ppl"][-1] for s in results["sets"]])
            params = info["params"]["unique_non_embedding"] / 1e6
            tokens = (info.get("training") or {}).get("tokens_seen", 0)
            group = ("teacher" if label == "teacher" else "default config, 5M+ tokens" if label.startswith("main")
                     else "trained, equal budget (1M tokens)")
            point = (params, ppl, label if label == "teacher" else f"{label} {tokens / 1e6:.2g}M")
            if point not in series.get(group, []):
                series.setdefault(group, []).append(point)
    if untrained and untrained.exists():
        for spec, r in json.loads(untrained.read_text()).items():
            if spec != "teacher" and r["ppl"] < 1e4:
                series.setdefault("untrained (1 row per set)", []).append((r["params"]["unique_non_embedding"] / 1e6, r["ppl"]))
    svg.write_text(line_chart(series, "unique non-embedding parameters (M)", "held-out perplexity", log_y=True,
                              title="Params vs held-out quality (SmolLM2-135M teacher)",
                              markers_only=set(series)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="*", default=CONFIGS, help="convert options (model.evaluation syntax)")
    parser.add_argument("--rows", type=int, default=1, help="512-token rows per held-out set")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=Path(".cache/eval/frontier.json"))
    parser.add_argument("--plot", type=Path, nargs="+", default=None,
                        help="only draw --svg from model.evaluation --json results (trained models)")
    parser.add_argument("--svg", type=Path, default=Path("docs/frontier.svg"))
    args = parser.parse_args(argv)
    if args.plot:
        plot_trained(args.plot, args.svg, args.json)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    teacher = load_model("smollm2-135m")[0]
    sets = {name: load_split(name)[: args.rows] for name in heldout_names()}
    results = json.loads(args.json.read_text()) if args.json.exists() else {}
    for spec in ["teacher", *args.configs]:
        if spec in results:  # resumable: each finished configuration is kept
            continue
        started = time.time()
        model = teacher if spec == "teacher" else convert(teacher, "smollm2-135m", spec)
        entry = Entry(spec, spec, model, unique_parameters(model))
        per_set = {name: evaluate_set([entry], teacher, rows)[spec] for name, rows in sets.items()}
        results[spec] = {"params": entry.params, "sets": per_set,
                         "ppl": geo_mean([m["ppl"][-1] for m in per_set.values()]),
                         "kl": sum(m["kl"][-1] for m in per_set.values()) / len(per_set),
                         "agreement": sum(m["agreement"][-1] for m in per_set.values()) / len(per_set),
                         "seconds": round(time.time() - started)}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
        logging.info("%s: ppl %.1f", spec, results[spec]["ppl"])
    print("| configuration (untrained) | unique non-emb params | held-out PPL (geo-mean) | KL | agreement |")
    print("|---|---|---|---|---|")
    for spec, r in results.items():
        print(f"| {spec} | {r['params']['unique_non_embedding'] / 1e6:.1f} M | {r['ppl']:.1f} | "
              f"{r['kl']:.2f} | {r['agreement']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
