"""What mixing loop depths in one block call costs, with LoRA per position vs grouped LoRA.

    .venv/bin/python benchmarks/mixed_loops.py                       # the default and the 3x10 r64 conversion
    .venv/bin/python benchmarks/mixed_loops.py --items 12 32 --reps 30 --json .cache/runs/mixed_loops.json

One ``BlockRunner.run`` call over N single-token items of N different requests (each with a short
prefilled context): all items at loop 1, or spread evenly over the loops. Each call is timed on the
same prepared segments (their KV writes undone after each call), median over ``--reps`` after a
warm-up, 1 torch thread. "per position" applies each position's LoRA pair as its own small matmul
pair; "grouped" applies all of them in one pair (``BlockRunner(grouped_lora=True)``). The
interesting number is the ratio mixed / single within a run. Not a test: nothing passes or fails.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from model import load_model
from model import recursify  # noqa: E402
from model.inference.decoder import AdaptiveDecoder, Segment  # noqa: E402
from model.inference.policies import FixedDepth  # noqa: E402
from model.serving import BlockRunner  # noqa: E402


def segments_for(model, decoders, spread: bool) -> list[Segment]:
    cfg = model.config
    out = []
    for i, dec in enumerate(decoders):
        loop = 1 + (i % cfg.num_loops if spread else 0)
        hidden = torch.randn(1, cfg.hidden_size, generator=torch.Generator().manual_seed(i)) * 0.1
        out.append(Segment(hidden, [dec.length], cfg.loop_positions(loop), dec.cache))
    return out


@torch.no_grad()
def time_call(runner: BlockRunner, segments: list[Segment], reps: int) -> float:
    """Median ms of one block call over ``segments`` (their KV writes undone after each call)."""
    times = []
    for rep in range(reps + 3):
        t0 = time.perf_counter()
        runner.run(segments)
        elapsed = time.perf_counter() - t0
        for seg in segments:
            for p in seg.layer_positions:
                seg.cache.layers[p].crop(-1)
        if rep >= 3:
            times.append(1000 * elapsed)
    return statistics.median(times)


def measure(name: str, model, items: list[int], reps: int) -> list[dict]:
    rows = []
    for n in items:
        decoders = [AdaptiveDecoder(model, FixedDepth(model.config.num_loops)) for _ in range(n)]
        for i, dec in enumerate(decoders):
            dec.prefill(list(range(10, 42 + i)))  # ~32-token contexts
        row = {"model": name, "items": n, "loops": model.config.num_loops, "lora_rank": model.config.lora_rank}
        for grouped in (False, True):
            runner = BlockRunner(model, grouped_lora=grouped, grouped_max_rows=max(items))
            label = "grouped" if grouped else "per_position"
            row[f"{label}_single_ms"] = time_call(runner, segments_for(model, decoders, False), reps)
            row[f"{label}_mixed_ms"] = time_call(runner, segments_for(model, decoders, True), reps)
            row[f"{label}_mixed_over_single"] = row[f"{label}_mixed_ms"] / row[f"{label}_single_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | items | per position: one loop / mixed ms (ratio) | grouped: one loop / mixed ms (ratio) |",
             "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['items']} | {r['per_position_single_ms']:.1f} / {r['per_position_mixed_ms']:.1f} "
                     f"(×{r['per_position_mixed_over_single']:.3f}) | {r['grouped_single_ms']:.1f} / "
                     f"{r['grouped_mixed_ms']:.1f} (×{r['grouped_mixed_over_single']:.3f}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, nargs="+", default=[12, 32])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    default, _ = load_model("default")
    base, _ = load_model("smollm2-135m")
    models = {"default (2 loops, r128)": default,
              "3x10 cycle r64": recursify(base, num_loops=3, sharing="cycle", lora_rank=64, base_name="smollm2-135m")}
    rows = [row for name, model in models.items() for row in measure(name, model.eval(), args.items, args.reps)]
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
