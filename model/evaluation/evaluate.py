"""Held-out evaluation: perplexity, KL to the teacher and top-1 agreement per loop; policy sweeps.

    python -m model.evaluation --model .cache/runs/rrt-ee --compare teacher \\
        "untrained=convert:loops=2,sharing=middle_cycle,init=average,rank=128,lora_init=asvd" \\
        .cache/runs/rrt --report docs/RESULTS.md

Model specs: a run folder (``<run>/checkpoint`` is used), a checkpoint folder, a name
``load_model`` knows (``smollm2-135m``, ``default``), ``teacher`` (the base itself), or
``convert:<key=value,...>`` (an untrained ``recursify`` conversion of the teacher: loops, sharing,
init, rank, lora_init=svd|asvd, block_size). Prefix ``label=`` to name a row.

For every held-out set of DATA.md (first ``--max-tokens`` tokens, rows of 512) the teacher runs
once per batch and every model is compared against it: perplexity of the true next token, mean
KL(teacher || model) and the share of positions whose argmax equals the teacher's, after every loop.
Policy sweeps (``model.sweep``: confidence, saturation, halting, fixed depth) replay the
teacher-forced per-loop signals of the first ``--sweep-tokens`` tokens of each set.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.evaluation.metrics import LoopTally

log = logging.getLogger("model.evaluation")

EVAL_START, EVAL_END = "<!-- training-eval:start -->", "<!-- training-eval:end -->"
SECTION_END = "<!-- training:end -->"


@dataclass
class Entry:
    label: str
    spec: str
    model: torch.nn.Module
    params: dict = field(default_factory=dict)


# --- loading ----------------------------------------------------------------------------------------
def load_entry(spec: str, teacher, teacher_name: str) -> Entry:
    """Resolve one ``[label=]spec`` (see the module docstring)."""
    label, _, target = spec.partition("=") if "=" in spec.split(":")[0] else ("", "", spec)
    target = target or spec
    if target == "teacher":
        model = teacher
    elif target.startswith("convert:"):
        model = convert(teacher, teacher_name, target[len("convert:"):])
    else:
        from model.io.checkpoint import load_model
        from model.io.folders import run_model_folder

        model = load_model(run_model_folder(target) if Path(target).exists() else target)[0]
    model.eval()
    return Entry(label or target, target, model, unique_parameters(model))


def convert(teacher, teacher_name: str, options: str):
    """An untrained conversion of the teacher from ``loops=2,sharing=middle_cycle,...``."""
    from model.conversion.recursify import recursify

    opts = dict(kv.split("=", 1) for kv in options.split(",") if kv)
    rank = opts.get("rank", "0")
    rank = rank if rank == "full" else int(rank)
    rec = recursify(teacher, num_loops=int(opts.get("loops", 2)), sharing=opts.get("sharing", "middle_cycle"),
                    init=opts.get("init", "average"), lora_rank=rank,
                    block_size=int(opts["block_size"]) if "block_size" in opts else None, base_name=teacher_name)
    if opts.get("lora_init", "svd") == "asvd" and rank not in (0, "full"):
        from model.conversion.asvd import apply_asvd_, cached_covariances

        apply_asvd_(rec, teacher, cached_covariances(teacher, teacher_name))
    return rec


def unique_parameters(model) -> dict:
    """Unique (stored) parameter counts; a plain Llama counts as fully unique."""
    if hasattr(model, "parameter_counts"):
        return model.parameter_counts()
    embedding = model.model.embed_tokens.weight.numel()
    unique = sum(p.numel() for p in model.parameters())
    return {"unique": unique, "unique_non_embedding": unique - embedding, "embedding": embedding}


# --- metrics ----------------------------------------------------------------------------------------
@torch.no_grad()
def loop_logits(model, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if hasattr(model, "parameter_counts"):
        return model(input_ids=ids, output_loop_logits=True).loop_logits
    return (model(input_ids=ids).logits,)


@torch.no_grad()
def evaluate_set(entries: list[Entry], teacher, rows: torch.Tensor | list[torch.Tensor], batch_size: int = 2,
                 starts: list[int] | None = None) -> dict[str, dict]:
    """Per-loop ppl / KL / agreement of every entry on ``rows`` (teacher computed once per batch).

    ``rows``: equal-length rows (``(n, T)``, batched) or a list of 1-D sequences of any length (one at a
    time, unpadded); ``starts[i]``: count only the predictions of tokens ``i >= starts[i]`` of sequence ``i``
    (e.g. an answer after its prompt; default: every token after the first)."""
    tallies: dict[str, LoopTally] = {}
    device = next(teacher.parameters()).device
    batches = rows.split(batch_size) if isinstance(rows, torch.Tensor) else [r[None] for r in rows]
    skips = [0] * len(batches) if starts is None else [max(0, s - 1) for s in starts]
    if starts is not None and len(skips) != len(batches):
        raise ValueError("starts needs one entry per sequence (rows given as a list)")
    for ids, skip in zip(batches, skips):
        ids = ids.to(device)
        targets = ids[:, 1 + skip:]
        t_logits = teacher(input_ids=ids).logits
        for entry in entries:
            loops = (t_logits,) if entry.model is teacher else loop_logits(entry.model, ids)
            tallies.setdefault(entry.label, LoopTally()).add([logits[:, skip:-1] for logits in loops], targets,
                                                             t_logits[:, skip:-1])
    return {label: tally.result() for label, tally in tallies.items()}


def sweeps(model, rows: torch.Tensor) -> dict[str, list[dict]]:
    """Quality vs FLOPs per policy family, replayed on teacher-forced per-loop signals of ``rows``."""
    from model.evaluation import sweep as S

    scores = [S.score_ids(model, row.tolist()) for row in rows]
    merged = scores[0]
    for extra in scores[1:]:  # equal-length rows: same FLOPs per depth, concatenate the token lists
        for name in ("token_ids", "max_prob", "top2_gap", "certainty", "cosine", "argmax", "target_logprob"):
            getattr(merged, name).extend(getattr(extra, name))
        if merged.halting is not None:
            merged.halting.extend(extra.halting)
    families = ["fixed", "confidence", "saturation"] + (["halting"] if merged.halting is not None else [])
    return {f: [p.to_dict() for p in S.sweep(merged, f)] for f in families}


# --- report -----------------------------------------------------------------------------------------
def markdown(results: dict) -> str:
    """Tables for docs/RESULTS.md from an ``evaluate`` result."""
    lines = [f"Evaluation: `{results['command']}` ({results['tokens_per_set']} tokens per held-out set, "
             f"{results['wall_seconds']:.0f} s on {results['device']}).", ""]
    sets = list(results["sets"])
    labels = list(results["models"])
    lines += ["Full depth (last loop), per held-out set: perplexity / KL to teacher / top-1 agreement with teacher.",
              "", "| model | unique non-emb params | " + " | ".join(sets) + " | mean PPL |",
              "|---|---|" + "---|" * len(sets) + "---|"]
    for label in labels:
        cells, ppls = [], []
        for s in sets:
            m = results["sets"][s][label]
            ppls.append(m["ppl"][-1])
            cells.append(f"{m['ppl'][-1]:.1f} / {m['kl'][-1]:.2f} / {m['agreement'][-1]:.2f}")
        params = results["models"][label]["params"].get("unique_non_embedding", 0)
        lines.append(f"| {label} | {params / 1e6:.1f} M | " + " | ".join(cells) + f" | {geo_mean(ppls):.1f} |")
    lines += ["", "Per loop (geometric-mean PPL over the sets; mean KL and agreement):", "",
              "| model | loop | PPL | KL | agreement |", "|---|---|---|---|---|"]
    for label in labels:
        n = len(results["sets"][sets[0]][label]["ppl"])
        for r in range(n):
            ppl = geo_mean([results["sets"][s][label]["ppl"][r] for s in sets])
            kl = sum(results["sets"][s][label]["kl"][r] for s in sets) / len(sets)
            ag = sum(results["sets"][s][label]["agreement"][r] for s in sets) / len(sets)
            lines.append(f"| {label} | {r + 1}/{n} | {ppl:.1f} | {kl:.3f} | {ag:.3f} |")
    if results.get("sweeps"):
        lines += ["", "Policy sweeps (teacher-forced replay, model.sweep; all held-out sets pooled): "
                  "agreement with full depth and PPL vs FLOPs saved.", ""]
        for label, fams in results["sweeps"].items():
            lines += [f"**{label}**", "", "| policy | threshold | avg loops | agreement w/ full | PPL | FLOPs saved % |",
                      "|---|---|---|---|---|---|"]
            for fam, points in fams.items():
                for p in points[:: max(1, len(points) // 6)] if fam != "fixed" else points:
                    th = "" if p["threshold"] is None else f"{p['threshold']:.3g}"
                    lines.append(f"| {fam} | {th} | {p['avg_depth']:.2f} | {p['agreement']:.3f} | "
                                 f"{p['perplexity']:.1f} | {p['saved_pct']:.1f} |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def geo_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def write_report(path: Path, text: str, start: str = EVAL_START, end: str = EVAL_END) -> None:
    """Replace the block between ``start`` and ``end`` in ``path`` (default: the evaluation block); a
    missing block is created at the end of the training section."""
    doc = path.read_text()
    block = f"{start}\n{text}{end}"
    if start in doc and end in doc:
        head, rest = doc.split(start, 1)
        doc = head + block + rest.split(end, 1)[1]
    elif SECTION_END in doc:
        doc = doc.replace(SECTION_END, block + "\n" + SECTION_END, 1)
    else:
        raise ValueError(f"{path} has no {SECTION_END} marker; add the training section first")
    path.write_text(doc)


# --- CLI --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m model.evaluation", description=__doc__.split("\n\n")[0])
    models = parser.add_argument_group("models")
    models.add_argument("--model", help="model spec (see module docstring)")
    models.add_argument("--compare", nargs="*", default=[], help="more model specs evaluated on the same tokens")
    models.add_argument("--teacher", default="smollm2-135m", help="reference model for KL and agreement")
    data = parser.add_argument_group("data")
    data.add_argument("--sets", nargs="*", default=None, help="held-out sets (default: all of DATA.md)")
    data.add_argument("--max-tokens", type=int, default=4096, help="tokens per set (rows of --seq-len)")
    data.add_argument("--sweep-tokens", type=int, default=1024, help="tokens per set for policy sweeps (0 = none)")
    data.add_argument("--seq-len", type=int, default=512)
    data.add_argument("--batch-size", type=int, default=2)
    out = parser.add_argument_group("output")
    out.add_argument("--report", type=Path, default=None, help="markdown file whose training-eval block is replaced")
    out.add_argument("--json", type=Path, default=None, help="write the raw results here")
    out.add_argument("--threads", type=int, default=2)
    out.add_argument("--device", default="cpu", help="cpu, cuda or auto (metrics in fp32 either way; "
                                                     "policy sweeps always replay on the CPU)")
    out.add_argument("--from-json", type=Path, default=None, help="re-render a saved --json result (no model runs)")
    return parser


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    from model.io.checkpoint import default_device, load_model
    from model.data import heldout_names, load_split

    torch.set_num_threads(args.threads)
    started = time.time()
    device = torch.device(default_device() if args.device == "auto" else args.device)
    teacher = load_model(args.teacher)[0]
    entries = [load_entry(spec, teacher, args.teacher) for spec in [args.model, *args.compare]]  # built on the CPU
    for model in [teacher, *(e.model for e in entries)]:
        model.to(device)
    sets = args.sets or heldout_names()
    rows_per_set = max(1, args.max_tokens // args.seq_len)
    results = {"command": "python -m model.evaluation " + " ".join(argv),
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
               "tokens_per_set": rows_per_set * (args.seq_len - 1),
               "models": {e.label: {"spec": e.spec, "params": e.params,
                                    "training": getattr(e.model.config, "training", None)} for e in entries},
               "sets": {}, "sweeps": {}}
    pooled = []
    for name in sets:
        rows = load_split(name, args.seq_len)[:rows_per_set]
        log.info("evaluating %d models on %s (%d rows)", len(entries), name, len(rows))
        results["sets"][name] = evaluate_set(entries, teacher, rows, args.batch_size)
        if args.sweep_tokens:
            pooled.append(rows[: max(1, args.sweep_tokens // args.seq_len)])
    if pooled:
        rows = torch.cat(pooled)
        for e in entries:
            if hasattr(e.model, "parameter_counts") and e.model.config.num_loops > 1:
                log.info("policy sweeps for %s", e.label)
                results["sweeps"][e.label] = sweeps(e.model.to("cpu"), rows)
    results["wall_seconds"] = time.time() - started
    return results


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.from_json:
        results = json.loads(args.from_json.read_text())
    elif args.model:
        results = run(args, argv)
    else:
        build_parser().error("give --model (and --compare ...) or --from-json")
    text = markdown(results)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str))
    if args.report:
        write_report(args.report, text)
    return 0

