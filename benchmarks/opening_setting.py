"""Which exit setting should the dashboard open with? Free generation on held-out chat prompts (issue 13, item 4).

    LAB_CACHE_DIR=.cache python benchmarks/opening_setting.py --stride 8 --threads 1
    python benchmarks/opening_setting.py --from-json .cache/eval/opening-setting.json --report docs/RESULTS.md

Every ``--stride``-th greedy prompt of ``heldout-chat-answers`` (never trained on) is answered by the model
(``--model``, the trained default) with the dashboard's settings: chat template, greedy, ``--new-tokens``,
repetition penalty 1.1. Per prompt: the full-depth answer (``policy=None``: every loop), then every candidate
policy in the ``copy`` and ``sync`` KV modes, then full depth again (the order of the candidates alternates
between prompts, and the two full-depth runs bracket them, so that load drift on a shared CPU falls on both
sides). Per setting, summed over prompts: block FLOPs saved (the traces' own ledger, i.e. weighted by tokens),
average depth, share of tokens exiting early, agreement with the same model's full-depth answer (position-wise
over the longer of the two answers, and the mean common prefix), exactly equal answers, and decode wall-clock
per token relative to full depth in the same run. The JSON (with per-prompt records) is rewritten after every
prompt; ``--resume`` continues it. ``--candidates "halting 0.7 copy,confidence 0.9 copy"`` measures only those
settings; ``--device cuda`` decodes there (FLOPs and agreement as on the CPU; the time ratio is the GPU's).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import generate, load_model  # noqa: E402
from model.data.answer_prompts import HELDOUT_NAME  # noqa: E402
from model.data.answer_store import load_answers  # noqa: E402
from model.evaluation.evaluate import write_report  # noqa: E402
from model.inference.policies import make_policy  # noqa: E402
from model.paths import cache_dir  # noqa: E402

log = logging.getLogger("opening_setting")
REPORT_START, REPORT_END = "<!-- opening-setting:start -->", "<!-- opening-setting:end -->"
HEADING = "## Choosing the opening setting (free generation)"
POLICY_GRID = ([("halting", t) for t in (0.3, 0.4, 0.5, 0.6, 0.7)] + [("confidence", t) for t in (0.3, 0.5, 0.7, 0.9)]
               + [("saturation", t) for t in (0.65, 0.725)])
# FREE's adaptive threshold calibrates only on "sync" catch-up rows; in "copy" it would stay confidence 0.9.
CANDIDATES = [(p, t, kv) for p, t in POLICY_GRID for kv in ("copy", "sync")] + [("adaptive", 0.9, "sync")]
MIN_AGREEMENT = 0.90


def key(policy: str, threshold: float, kv: str) -> str:
    return f"{policy} {threshold:g} {kv}"


def user_text(tokenizer, prompt_ids: list[int]) -> str:
    """The user turn of a chat-templated prompt (the dashboard re-encodes it with the same template)."""
    return tokenizer.decode(prompt_ids).split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def measure(trace) -> dict:
    """The per-answer figures of one trace (its own FLOP ledger and per-token wall time)."""
    t = trace.totals()
    return {"ids": [s.token_id for s in trace.steps], "tokens": t["tokens"], "early": sum(t["depth_counts"][:-1]),
            "depth_sum": sum(s.depth for s in trace.steps), "block_used": t["block_flops_used"],
            "block_full": t["block_flops_full"], "flops_used": t["flops_used"], "flops_full": t["flops_full"],
            "wall_s": t["wall_s"], "caught_up": t["caught_up_tokens"]}


def parse_candidates(text: str | None) -> list[tuple[str, float, str]]:
    """``"halting 0.7 copy,confidence 0.9 sync"`` -> candidate tuples (None or empty: all of ``CANDIDATES``)."""
    if not text:
        return list(CANDIDATES)
    chosen = []
    for part in text.split(","):
        policy, threshold, kv = part.split()
        chosen.append((policy, float(threshold), kv))
    return chosen


def summarise(records: list[dict], candidates: list[tuple[str, float, str]] = CANDIDATES) -> list[dict]:
    """One row per candidate, summed over prompts; time per token relative to the same prompts' full depth."""
    full_tokens = sum(r["full"]["tokens"] for r in records)
    full_wall = sum(r["full"]["wall_s"] for r in records)  # already the mean of the two bracketing runs
    rows = []
    for policy, threshold, kv in candidates:
        ms = [(r["settings"][key(policy, threshold, kv)], r["full"]["ids"]) for r in records]
        n = max(sum(m["tokens"] for m, _ in ms), 1)
        positions = sum(max(len(m["ids"]), len(ref)) for m, ref in ms)
        rows.append({
            "policy": policy, "threshold": threshold, "kv": kv, "tokens": n,
            "block_flops_saved_pct": 100 * (1 - sum(m["block_used"] for m, _ in ms) / sum(m["block_full"] for m, _ in ms)),
            "total_flops_saved_pct": 100 * (1 - sum(m["flops_used"] for m, _ in ms) / sum(m["flops_full"] for m, _ in ms)),
            "avg_depth": sum(m["depth_sum"] for m, _ in ms) / n,
            "early_exit_share": sum(m["early"] for m, _ in ms) / n,
            "agreement": sum(sum(x == y for x, y in zip(m["ids"], ref)) for m, ref in ms) / max(positions, 1),
            "mean_common_prefix": sum(common_prefix(m["ids"], ref) for m, ref in ms) / len(ms),
            "equal_answers": sum(m["ids"] == ref for m, ref in ms) / len(ms),
            "time_per_token_ratio": (sum(m["wall_s"] for m, _ in ms) / n) / (full_wall / max(full_tokens, 1)),
        })
    return rows


def result_of(args, records: list[dict], seconds: float, prompts: int) -> dict:
    full_ms = 1000 * sum(r["full"]["wall_s"] for r in records) / max(sum(r["full"]["tokens"] for r in records), 1)
    return {"command": args.command, "model": args.model, "prompts": len(records), "prompts_planned": prompts,
            "stride": args.stride, "new_tokens": args.new_tokens, "threads": args.threads, "seconds": round(seconds),
            "full_ms_per_token": full_ms, "full_runs_identical": all(r["full_identical"] for r in records),
            "device": args.device, "settings": summarise(records, parse_candidates(args.candidates)), "records": records}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, device=args.device)
    candidates = parse_candidates(args.candidates)
    held = load_answers(HELDOUT_NAME, modes=("greedy",))[:: args.stride][: args.prompts]
    gen = dict(max_new_tokens=args.new_tokens, repetition_penalty=1.1, chat=True)
    old = json.loads(args.json.read_text()) if args.resume and args.json.exists() else {}
    records, spent = old.get("records", []), old.get("seconds", 0)
    adaptive = make_policy("adaptive", 0.9)  # persists across prompts, as in the dashboard (it keeps calibrating)
    started = time.time() - spent
    for i, answer in enumerate(held):
        if i < len(records):  # resumed; the adaptive policy's calibration restarts (noted in the report)
            continue
        prompt = user_text(tokenizer, answer.prompt_ids)
        order = candidates if i % 2 == 0 else candidates[::-1]
        full_a = measure(generate(model, tokenizer, prompt, None, **gen))
        done = {}
        for policy, threshold, kv in order:
            pol = adaptive if policy == "adaptive" else make_policy(policy, threshold)
            done[key(policy, threshold, kv)] = measure(generate(model, tokenizer, prompt, pol, kv_mode=kv, **gen))
        full_b = measure(generate(model, tokenizer, prompt, None, **gen))
        full = {**full_a, "wall_s": (full_a["wall_s"] + full_b["wall_s"]) / 2}
        records.append({"key": answer.key, "prompt": prompt, "full": full, "full_identical": full_a["ids"] == full_b["ids"],
                        "full_text": tokenizer.decode(full["ids"]), "settings": done})
        result = result_of(args, records, time.time() - started, len(held))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1))
        log.info("prompt %d/%d done (%.0f s, full %.1f ms/token)", i + 1, len(held), time.time() - started,
                 result["full_ms_per_token"])
    result["adaptive_threshold_history"] = adaptive.history
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


def best(rows: list[dict], min_agreement: float = MIN_AGREEMENT) -> dict | None:
    """The setting with the most block FLOPs saved at >= ``min_agreement`` agreement with full depth."""
    ok = [r for r in rows if r["agreement"] >= min_agreement and r["block_flops_saved_pct"] > 0]
    return max(ok, key=lambda r: r["block_flops_saved_pct"]) if ok else None


def describe(r: dict) -> str:
    return (f"**{r['policy']} {r['threshold']:g}, {r['kv']}**: {r['block_flops_saved_pct']:.1f} % of block FLOPs saved "
            f"({r['total_flops_saved_pct']:.1f} % of all), agreement {r['agreement']:.3f}, common prefix "
            f"{r['mean_common_prefix']:.1f}, {r['time_per_token_ratio']:.2f}× the full-depth time per token")


def markdown(result: dict) -> str:
    rows = sorted(result["settings"], key=lambda r: (r["kv"], r["policy"], r["threshold"]))
    lines = [f"`{result['command']}` — model `{result['model']}`, {result['prompts']} held-out prompts "
             f"(`{HELDOUT_NAME}`, every {result['stride']}th greedy one), chat template, greedy, repetition penalty "
             f"1.1, {result['new_tokens']} new tokens, {result['threads']} thread(s), {result['seconds']} s; full depth "
             f"{result['full_ms_per_token']:.1f} ms/token. Agreement: share of positions (of the longer answer) holding "
             "the same token as the same model's full-depth answer; FLOPs from the traces' own ledger, summed over all "
             "tokens. In **sync** the exited tokens' skipped loops run later (FLOPs are not saved; only the last "
             "tokens' deferred loops, never run because the answer ends, show up as a small saving); **copy** never "
             "runs them.", "",
             "| policy | KV | block FLOPs saved | total FLOPs saved | avg depth | tokens exiting early | agreement "
             "| common prefix | equal answers | time/token vs full |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['policy']} {r['threshold']:g} | {r['kv']} | {r['block_flops_saved_pct']:.1f} % | "
                     f"{r['total_flops_saved_pct']:.1f} % | {r['avg_depth']:.2f} | {100 * r['early_exit_share']:.1f} % | "
                     f"{r['agreement']:.3f} | {r['mean_common_prefix']:.1f} | {100 * r['equal_answers']:.0f} % | "
                     f"{r['time_per_token_ratio']:.2f}× |")
    chosen, target = best(rows), best([r for r in rows if r["block_flops_saved_pct"] >= 25])
    lines += ["", f"Most block FLOPs saved at ≥ {MIN_AGREEMENT:.2f} agreement: " + (describe(chosen) if chosen else "none.")]
    if not target:
        lines.append(f"No candidate reaches the target (≥ 25 % of block FLOPs saved at ≥ {MIN_AGREEMENT:.2f} agreement).")
    if "adaptive_threshold_history" in result:
        lines.append(f"Adaptive (FREE) threshold by sequence: {result['adaptive_threshold_history'][-1]:.2f} at the end "
                     f"(from {result['adaptive_threshold_history'][0]:.2f}, {len(result['adaptive_threshold_history']) - 1} updates).")
    if not result.get("full_runs_identical", True):
        lines.append("Note: the two full-depth runs of some prompt differ (non-deterministic kernels?).")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/opening_setting.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--stride", type=int, default=8, help="every N-th held-out greedy prompt (8: about 32)")
    parser.add_argument("--prompts", type=int, default=None, help="at most this many prompts (smoke tests)")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--candidates", default=None,
                        help='comma-separated "policy threshold kv" settings to measure (default: the whole grid)')
    parser.add_argument("--json", type=Path, default=cache_dir() / "eval" / "opening-setting.json")
    parser.add_argument("--resume", action="store_true", help="continue the prompts of an unfinished --json")
    parser.add_argument("--from-json", type=Path, default=None, help="render saved results (no model runs)")
    parser.add_argument("--report", type=Path, default=None, help="markdown file whose opening-setting block is replaced")
    args = parser.parse_args(argv)
    args.command = "python benchmarks/opening_setting.py " + " ".join(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result = json.loads(args.from_json.read_text()) if args.from_json else run(args)
    text = markdown(result)
    print(text)
    if args.report:
        doc = args.report.read_text()
        if REPORT_START not in doc:  # a new section at the end, with its heading
            args.report.write_text(doc.rstrip("\n") + f"\n\n{HEADING}\n\n{REPORT_START}\n{REPORT_END}\n")
        write_report(args.report, text, REPORT_START, REPORT_END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
