"""Per-device numerics on the trained default: fp32 vs bf16 vs compiled per call shape, threads, the choice.

    .venv/bin/python benchmarks/numerics.py                    # shapes, start-up choice, agreement, tokens/s
    .venv/bin/python benchmarks/numerics.py --compile          # + torch.compile of the block (minutes on a CPU)
    .venv/bin/python benchmarks/numerics.py --quick            # smoke run
    .venv/bin/python benchmarks/numerics.py --engine-only      # the batching engine, fp32 vs bf16
    LAB_COMPILE=1 python benchmarks/numerics.py --device cuda --compile --threads 1   # on a GPU

1. Call shapes (``model.inference.numerics.measure`` with every thread count timed on every shape, no
   screening): one loop of the block for one token (library layers: the solo path), the norm + LM head, a
   prompt chunk through one loop and N single-token rows in one ``BlockRunner`` call (the engine's step),
   fp32 / bf16 (a bf16 copy of the weights) x threads, interleaved; with ``--compile`` also a compiled
   ``BlockRunner`` (its compile time apart). Autocast (fp32 weights, bf16 compute) is timed on the decode
   shape alongside.
2. The start-up choice as the library makes it (``numerics.choose(refresh=True)``: cached for later runs).
3. Greedy agreement of bf16 with fp32 at full depth on a few chat prompts.
4. Decode tokens/s at the dashboard's opening setting (halting 0.7, copy KV) with fp32 (before), the choice
   (after) and bf16 forced, interleaved per repetition; ratios within a repetition.
5. With ``--compile``: solo decode through the compiled block vs eager, compile time, recompiles while the
   sequence grows.
6. ``--engine-only``: the CDB engine (16 requests offline, halting 0.7, copy KV) in fp32 vs bf16: tokens/s
   and how many answers stay the same (written to ``<json stem>-engine.json``).

Benchmarks are not tests: nothing passes or fails. Timings on a shared machine are noisy: compare ratios.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from model import load_model  # noqa: E402
from model.inference import numerics  # noqa: E402
from model.inference.generation import generate  # noqa: E402
from model.inference.policies import FixedDepth, Halting  # noqa: E402
from model.paths import cache_dir  # noqa: E402

PROMPTS = ("Explain why the sky is blue.", "Write a short story about a robot who learns to paint.",
           "What are three tips for staying productive while working from home?",
           "How do I make a good cup of tea?", "Summarise the causes of the French Revolution.")


def load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def autocast_decode(model, reps: int) -> float:
    """One loop of the block for one token, fp32 weights under autocast (bf16): median ms."""
    from transformers.cache_utils import DynamicCache

    cfg, cache, device = model.config, DynamicCache(), model.device
    ids = torch.randint(0, cfg.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        model.model(input_ids=ids, past_key_values=cache, use_cache=True)
    x = torch.randn(1, 1, cfg.hidden_size, device=device)
    pos = torch.tensor([[64]], device=device)
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):  # entered per call, as a step
            model.model.run_positions(x, cfg.loop_positions(1), model.model.rope(x, pos), None, cache)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(1000 * (time.perf_counter() - t0))
        for p in cfg.loop_positions(1):
            cache.layers[p].crop(-1)
    return statistics.median(times[1:])


def decode(model, tok, prompt, policy, kv_mode, tokens, mode):
    trace = generate(model, tok, prompt, policy=policy, kv_mode=kv_mode, max_new_tokens=tokens, chat=True,
                     numerics=mode)
    return trace


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default=None, help="e.g. cuda (the prepared GPU script; with LAB_COMPILE=1)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--decode-reps", type=int, default=3)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--engine-only", action="store_true", help="only 6: the batching engine, fp32 vs bf16")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--refresh", action="store_true", help="with --engine-only: measure the choice again")
    ap.add_argument("--json", type=Path, default=cache_dir("eval") / "numerics.json")
    args = ap.parse_args()
    if args.quick:
        args.reps, args.tokens, args.prompts, args.decode_reps = 1, 6, 1, 1
    out = {"command": "python benchmarks/numerics.py " + " ".join(sys.argv[1:]), "load_start": load(),
           "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "torch": torch.__version__}
    t_start = time.perf_counter()
    model, tok = load_model(args.model, device=args.device)
    out["device"] = str(model.device)
    if args.engine_only:
        torch.set_num_threads(1)
        out["engine"] = engine_compare(model, tok, args)
        out["load_end"] = load()
        path = args.json.with_name(args.json.stem + "-engine.json")
        path.write_text(json.dumps(out, indent=1))
        print("engine", out["engine"], "wrote", path, "load", out["load_start"], "->", out["load_end"])
        return
    torch.set_num_threads(args.threads[0])

    # 1. call shapes, every thread count on every shape
    shapes = numerics.measure(model, threads=tuple(args.threads), screen=False, reps=args.reps,
                              budget_s=float("inf"), try_compile=args.compile)
    out["shapes"] = shapes.to_dict()
    torch.set_num_threads(args.threads[0])
    out["autocast_decode_ms"] = autocast_decode(model, args.reps)
    for k, v in out["shapes"]["ms"].items():
        print(f"{k:32s} wall {v:8.1f}  cpu {out['shapes']['cpu_ms'].get(k, float('nan')):8.1f}")
    print("autocast decode", out["autocast_decode_ms"], flush=True)

    # 2. the start-up choice, as the library makes it (and caches it)
    torch.set_num_threads(numerics.START_THREADS)
    choice = numerics.choose(model, refresh=True)
    out["choice"] = choice.to_dict()
    print("choice", choice.dtypes, "threads", choice.threads, f"{choice.measured_s:.1f} s", flush=True)
    torch.set_num_threads(1)

    # 3. greedy agreement bf16 vs fp32, full depth
    agree = []
    for prompt in PROMPTS[: max(args.prompts, 3)]:
        a, b = (decode(model, tok, prompt, FixedDepth(model.config.num_loops), "copy", args.tokens, m)
                for m in ("fp32", "bf16"))
        x, y = [s.token_id for s in a.steps], [s.token_id for s in b.steps]
        prefix = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        agree.append({"prompt": prompt, "same": x == y, "common_prefix": prefix, "tokens": max(len(x), len(y)),
                      "equal_positions": sum(p == q for p, q in zip(x, y)) / max(len(x), len(y), 1)})
    out["agreement"] = agree
    print("agreement", agree, flush=True)

    # 4. decode tokens/s at the opening setting: fp32 (before), the choice (after), bf16 forced
    configs = {"fp32 (before)": "fp32", "the choice (after)": choice, "bf16 forced": "bf16"}
    rates: dict = {name: [] for name in configs}
    ratios: dict = {name: [] for name in configs}
    cpu_ratios: dict = {name: [] for name in configs}  # this thread's CPU time per token (1 thread: all the work)
    for name, mode in configs.items():  # warm-up
        decode(model, tok, PROMPTS[0], Halting(0.7), "copy", 4, mode)
    for rep in range(args.decode_reps):
        names = list(configs)[rep % 3:] + list(configs)[: rep % 3]
        per = {n: [0, 0.0, 0.0] for n in configs}
        for prompt in PROMPTS[: args.prompts]:
            for name in names:
                c0 = time.thread_time()
                trace = decode(model, tok, prompt, Halting(0.7), "copy", args.tokens, configs[name])
                per[name][0] += len(trace.steps)
                per[name][1] += sum(s.wall_ms for s in trace.steps) / 1000
                per[name][2] += time.thread_time() - c0  # prefill included, same prompts for all
        for name in configs:
            rates[name].append(per[name][0] / per[name][1])
            ratios[name].append(rates[name][-1] / rates["fp32 (before)"][-1])
            cpu_ratios[name].append((per["fp32 (before)"][2] / per["fp32 (before)"][0]) / (per[name][2] / per[name][0]))
    out["decode"] = {n: {"tokens_per_s": statistics.median(rates[n]), "ratio": statistics.median(ratios[n]),
                         "ratio_range": [min(ratios[n]), max(ratios[n])], "cpu_ratio": statistics.median(cpu_ratios[n]),
                         "cpu_ratio_range": [min(cpu_ratios[n]), max(cpu_ratios[n])]} for n in configs}
    print("decode", out["decode"], flush=True)

    # 5. torch.compile of the block on the solo path
    if args.compile:
        out["compile"] = compile_solo(model, tok, args)
        print("compile", out["compile"], flush=True)
    out["load_end"] = load()
    out["wall_s"] = time.perf_counter() - t_start
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
    print("wrote", args.json, "load", out["load_start"], "->", out["load_end"])


def engine_compare(model, tok, args) -> dict:
    """6. The CDB engine (halting 0.7, copy KV, N requests offline) in fp32 vs bf16 (whatever the cached choice
    says; it is recorded): tokens/s, interleaved per repetition, and the tokens' agreement between the two."""
    from model.inference.prompts import encode_chat
    from model.serving import BatchEngine, Request

    choice = numerics.choose(model, refresh=args.refresh)
    prompts = [encode_chat(tok, [{"role": "user", "content": PROMPTS[i % len(PROMPTS)] + f" ({i})"}])
               for i in range(args.requests)]
    rates: dict = {"fp32": [], "bf16": []}
    tokens: dict = {}
    for rep in range(args.decode_reps + 1):  # rep 0 warms up
        for name in (("fp32", "bf16") if rep % 2 == 0 else ("bf16", "fp32")):
            engine = BatchEngine(model, tok, strategy="cdb", max_requests=args.requests, numerics=name)
            for ids in prompts:
                engine.submit(Request(prompt_ids=list(ids), max_new_tokens=args.tokens, policy=Halting(0.7),
                                      kv_mode="copy"))
            t0 = time.perf_counter()
            results = engine.run()
            seconds = time.perf_counter() - t0
            tokens[name] = [r.token_ids for r in results.values()]
            if rep:
                rates[name].append(sum(len(t) for t in tokens[name]) / seconds)
    same = sum(a == b for x, y in zip(tokens["fp32"], tokens["bf16"]) for a, b in zip(x, y))
    total = sum(max(len(x), len(y)) for x, y in zip(tokens["fp32"], tokens["bf16"]))
    equal = sum(x == y for x, y in zip(tokens["fp32"], tokens["bf16"]))
    return {"choice": choice.dtypes, "choice_measured_s": choice.measured_s, "equal_answers": equal,
            "requests": len(prompts), "tokens_per_s": {n: statistics.median(v) for n, v in rates.items()},
            "ratio": statistics.median([c / f for c, f in zip(rates["bf16"], rates["fp32"])]),
            "ratio_range": [min(c / f for c, f in zip(rates["bf16"], rates["fp32"])),
                            max(c / f for c, f in zip(rates["bf16"], rates["fp32"]))],
            "equal_positions": same / total if total else 1.0}


def compile_solo(model, tok, args) -> dict:
    """Solo decode at full depth with the compiled block vs eager: compile time, ms/token, recompiles."""
    import torch._dynamo.utils as dynamo_utils

    eager = numerics.NumericsChoice({"decode": "float32"}, threads=1)
    compiled = numerics.NumericsChoice({"decode": "float32"}, threads=1, compiled=True)
    t0 = time.perf_counter()
    first = decode(model, tok, PROMPTS[0], FixedDepth(model.config.num_loops), "copy", 4, compiled)
    compile_s = time.perf_counter() - t0
    base = decode(model, tok, PROMPTS[0], FixedDepth(model.config.num_loops), "copy", 4, eager)
    ms: dict = {"eager": [], "compiled": []}
    for rep in range(args.decode_reps):
        for name in (("eager", "compiled") if rep % 2 == 0 else ("compiled", "eager")):
            for prompt in PROMPTS[: args.prompts]:
                trace = decode(model, tok, prompt, FixedDepth(model.config.num_loops), "copy", args.tokens,
                               eager if name == "eager" else compiled)
                ms[name].append(statistics.mean(s.wall_ms for s in trace.steps))
    same = [s.token_id for s in first.steps] == [s.token_id for s in base.steps]
    return {"compile_s": compile_s, "ms_per_token": {n: statistics.median(v) for n, v in ms.items()},
            "ratio": statistics.median(ms["eager"]) / statistics.median(ms["compiled"]),
            "unique_graphs": dynamo_utils.counters["stats"].get("unique_graphs"),
            "same_first_tokens": same}


if __name__ == "__main__":
    main()
