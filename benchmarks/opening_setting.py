"""Which exit setting should the dashboard open with? Free generation on held-out chat prompts (issue 13, item 4).

    python benchmarks/opening_setting.py --json .cache/eval/opening-setting.json --report docs/RESULTS.md
    python benchmarks/opening_setting.py --from-json .cache/eval/opening-setting.json --report docs/RESULTS.md

For every ``--stride``-th prompt of ``heldout-chat-answers`` (never trained on), the model (``--model``, the
trained default) answers greedily with the dashboard's settings (chat template, ``--new-tokens``, repetition
penalty 1.1), first at full depth, then under every candidate policy in the ``copy`` and ``sync`` KV modes.
Per setting: block FLOPs saved (the traces' own ledger, summed over all tokens), average depth, the share of
tokens that exit early, agreement with the same model's full-depth answer (the share of its positions
holding the same token, and the mean common prefix), exactly equal answers, and wall-clock per token
relative to full depth, measured in the same run (the settings of one prompt run back to back).
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

log = logging.getLogger("opening_setting")
REPORT_START, REPORT_END = "<!-- opening-setting:start -->", "<!-- opening-setting:end -->"
CANDIDATES = [("halting", t) for t in (0.5, 0.7, 0.8, 0.9)] + [("confidence", t) for t in (0.3, 0.5, 0.7)]
KV = ("copy", "sync")


def user_text(tokenizer, prompt_ids: list[int]) -> str:
    """The user turn of a chat-templated prompt (the dashboard re-encodes it with the same template)."""
    text = tokenizer.decode(prompt_ids)
    return text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    held = [a for a in load_answers(HELDOUT_NAME) if a.mode == "greedy"][:: args.stride]
    prompts = [user_text(tokenizer, a.prompt_ids) for a in held]
    settings = dict(max_new_tokens=args.new_tokens, repetition_penalty=1.1, chat=True)
    rows = {f"{p} {t} {kv}": {"policy": p, "threshold": t, "kv": kv, "tokens": 0, "early": 0, "depth_sum": 0,
                              "block_used": 0.0, "block_full": 0.0, "match": 0, "ref_tokens": 0, "prefix": 0,
                              "equal": 0, "wall_s": 0.0, "full_wall_s": 0.0, "full_tokens": 0}
            for p, t in CANDIDATES for kv in KV}
    started = time.time()
    for i, prompt in enumerate(prompts):
        full = generate(model, tokenizer, prompt, None, **settings)
        ref = [s.token_id for s in full.steps]
        for key, row in rows.items():
            trace = generate(model, tokenizer, prompt, make_policy(row["policy"], row["threshold"]),
                             kv_mode=row["kv"], **settings)
            ids, t = [s.token_id for s in trace.steps], trace.totals()
            row["tokens"] += t["tokens"]
            row["early"] += sum(d for d in t["depth_counts"][:-1])
            row["depth_sum"] += sum(s.depth for s in trace.steps)
            row["block_used"] += t["block_flops_used"]
            row["block_full"] += t["block_flops_full"]
            row["match"] += sum(x == y for x, y in zip(ids, ref))
            row["ref_tokens"] += len(ref)
            row["prefix"] += common_prefix(ids, ref)
            row["equal"] += int(ids == ref)
            row["wall_s"] += t["wall_s"]
            row["full_wall_s"] += full.totals()["wall_s"]
            row["full_tokens"] += len(ref)
        log.info("prompt %d/%d done (%.0f s)", i + 1, len(prompts), time.time() - started)
    table = []
    for row in rows.values():
        n = max(row["tokens"], 1)
        table.append({"policy": row["policy"], "threshold": row["threshold"], "kv": row["kv"],
                      "block_flops_saved_pct": 100 * (1 - row["block_used"] / row["block_full"]),
                      "avg_depth": row["depth_sum"] / n, "early_exit_share": row["early"] / n,
                      "agreement": row["match"] / max(row["ref_tokens"], 1), "mean_common_prefix": row["prefix"] / len(prompts),
                      "equal_answers": row["equal"] / len(prompts),
                      "time_per_token_ratio": (row["wall_s"] / n) / (row["full_wall_s"] / max(row["full_tokens"], 1))})
    return {"command": "python benchmarks/opening_setting.py " + " ".join(sys.argv[1:]), "model": args.model,
            "prompts": len(prompts), "new_tokens": args.new_tokens, "threads": args.threads,
            "seconds": round(time.time() - started), "settings": table}


def best(result: dict, min_agreement: float = 0.9) -> dict | None:
    """The setting with the most block FLOPs saved at >= ``min_agreement`` agreement with full depth."""
    ok = [r for r in result["settings"] if r["agreement"] >= min_agreement and r["block_flops_saved_pct"] > 0]
    return max(ok, key=lambda r: r["block_flops_saved_pct"]) if ok else None


def markdown(result: dict) -> str:
    lines = [f"`{result['command']}` — model `{result['model']}`, {result['prompts']} held-out prompts "
             f"(`{HELDOUT_NAME}`), greedy, {result['new_tokens']} new tokens, {result['threads']} thread(s), "
             f"{result['seconds']} s. Agreement: share of the full-depth answer's positions holding the same token.",
             "", "| policy | KV | block FLOPs saved | avg depth | tokens exiting early | agreement | common prefix "
             "| equal answers | time/token vs full |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["settings"]:
        lines.append(f"| {r['policy']} {r['threshold']:.2f} | {r['kv']} | {r['block_flops_saved_pct']:.1f}% | "
                     f"{r['avg_depth']:.2f} | {100 * r['early_exit_share']:.1f}% | {r['agreement']:.3f} | "
                     f"{r['mean_common_prefix']:.1f} | {100 * r['equal_answers']:.0f}% | {r['time_per_token_ratio']:.2f}× |")
    chosen = best(result)
    lines += ["", "Most block FLOPs saved at ≥ 0.90 agreement: " + (
        f"**{chosen['policy']} {chosen['threshold']:.2f}, {chosen['kv']}** ({chosen['block_flops_saved_pct']:.1f}% saved, "
        f"agreement {chosen['agreement']:.3f}, {chosen['time_per_token_ratio']:.2f}× the full-depth time per token)."
        if chosen else "none of the candidates.")]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/opening_setting.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--stride", type=int, default=25, help="every N-th held-out prompt")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--from-json", type=Path, default=None, help="render saved results (no model runs)")
    parser.add_argument("--report", type=Path, default=None, help="markdown file whose opening-setting block is replaced")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result = json.loads(args.from_json.read_text()) if args.from_json else run(args)
    if args.json and not args.from_json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    text = markdown(result)
    print(text)
    if args.report:
        write_report(args.report, text, REPORT_START, REPORT_END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
