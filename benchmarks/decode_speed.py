"""Decode speed at batch 1 on CPU: full depth, fixed depths, adaptive policies, decision overhead.

    .venv/bin/python benchmarks/decode_speed.py                        # full run (~5-6 min on 2 busy cores)
    .venv/bin/python benchmarks/decode_speed.py --quick                # smoke run (~1 min)
    .venv/bin/python benchmarks/decode_speed.py --write-results docs/RESULTS.md

One process measures every configuration on the same model, interleaved round-robin (for each
repetition, for each prompt, every configuration once, in an order rotated per repetition), after a
warm-up run of each. Two clocks: the engine's per-token ``wall_ms`` (prefill excluded) and this
thread's CPU time per streamed token (``time.thread_time()``; with one torch thread it holds all the
work but not the time the scheduler gives other processes). Speeds are reported as ratios to the
full-depth run *of the same repetition* (median over repetitions): on a shared machine absolute
tokens/s drift, paired ratios much less. Generation goes through ``model.stream`` (what
``model.generate`` loops over) so that each token can be timed from outside.

Configurations (recursive model with N loops; greedy, ``chat=True``):

- ``teacher``: the original model (``recursify(base, num_loops=1)``), reference line
- ``full``: ``FixedDepth(N)``; ``fixed-d``: ``FixedDepth(d)`` for d < N
- ``confidence`` / ``saturation``: adaptive exits, KV modes ``sync`` and ``copy``
- ``confidence-never`` / ``saturation-never``: the same policies computing the same signals every loop
  but never exiting before loop N, i.e. full depth + the decision's cost only (decision overhead)
- ``full bf16``: full depth with the model in bfloat16 (``--no-bf16`` to skip)

Ideal speedup is ``GenerationTrace.totals()["ideal_speedup"]`` (full-depth FLOPs / FLOPs used,
decisions, catch-up and KV copying included). Benchmarks are not tests: nothing here passes or fails.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from model import load_model, stream
from model import recursify  # noqa: E402
from model.io.checkpoint import ModelLoadError  # noqa: E402
from model.inference.compute import CostModel  # noqa: E402
from model.inference.policies import Confidence, DepthPolicy, FixedDepth, Observation, Saturation  # noqa: E402

PROMPTS = (
    "Explain why the sky is blue.",
    "Write a short story about a robot who learns to paint.",
    "What are three tips for staying productive while working from home?",
)
START, END = "<!-- decode:start -->", "<!-- decode:end -->"


class NeverExit:
    """Mixin: compute the policy's signal every loop exactly as the policy does, but never stop early."""

    def decide(self, obs: Observation) -> tuple[bool, str]:
        stop, reason = super().decide(obs)  # type: ignore[misc]  (same signal computation)
        if obs.loop < obs.max_loops:
            return False, ""
        return stop, reason


class NeverExitConfidence(NeverExit, Confidence):
    pass


class NeverExitSaturation(NeverExit, Saturation):
    pass


@dataclass
class Config:
    name: str
    model: torch.nn.Module
    policy: DepthPolicy
    kv_mode: str = "sync"
    dtype: str = "fp32"
    # filled while running, per repetition, summed over prompts
    tokens: list[int] = field(default_factory=list)  # generated tokens (wall clock: all of them)
    wall_s: list[float] = field(default_factory=list)  # the engine's per-token wall_ms, summed
    cpu_tokens: list[int] = field(default_factory=list)  # tokens after the first (CPU time)
    cpu_s: list[float] = field(default_factory=list)  # this thread's CPU time for those tokens
    totals: list[dict] = field(default_factory=list)  # first repetition, one per prompt
    decision_flops: float = 0.0
    used_flops: float = 0.0
    texts: list[list[int]] = field(default_factory=list)  # token ids per prompt, first repetition
    deterministic: bool = True

    def ms(self, rep: int, clock: str) -> float:
        """Milliseconds per token in repetition ``rep`` by ``clock`` ("wall" or "cpu")."""
        if clock == "wall":
            return 1000 * self.wall_s[rep] / self.tokens[rep] if self.tokens[rep] else float("nan")
        return 1000 * self.cpu_s[rep] / self.cpu_tokens[rep] if self.cpu_tokens[rep] else float("nan")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="auto",
                   help="'auto' (the trained default if load_model('default') works, else the untrained "
                        "conversion), 'convert' (always the conversion), or a name/folder for load_model")
    p.add_argument("--loops", type=int, default=3, help="loops of the conversion")
    p.add_argument("--lora-rank", type=int, default=64, help="LoRA rank of the conversion")
    p.add_argument("--tokens", type=int, default=16, help="new tokens per prompt (max_new_tokens)")
    p.add_argument("--reps", type=int, default=4, help="timed repetitions (round-robin over configurations)")
    p.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"how many of the {len(PROMPTS)} fixed prompts")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (default 1: on a 2-core machine shared with another job, "
                        "2 threads were ~4x slower than 1 in a probe; with 1 thread the CPU-time clock "
                        "covers all the work)")
    p.add_argument("--confidence", type=float, default=0.8, help="Confidence (max_prob) threshold")
    p.add_argument("--saturation", type=float, default=0.4,
                   help="Saturation (cosine) threshold; the default 0.4 suits the untrained conversion, whose "
                        "loop-to-loop cosines are ~0.0 / 0.4 / 0.55 (the library default 0.95 never exits)")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 full-depth configuration")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 prompt, 8 tokens, 2 repetitions")
    p.add_argument("--write-results", metavar="RESULTS_MD", default=None,
                   help=f"replace the text between {START} and {END} in this file")
    return p


def load_models(args) -> tuple[torch.nn.Module, torch.nn.Module, object, str]:
    """(recursive model, teacher, tokenizer, description of what was used)."""
    base, tok = load_model("smollm2-135m")
    teacher = recursify(base, num_loops=1, base_name="smollm2-135m")
    if args.model in ("auto", "default"):
        try:
            model, tok_default = load_model("default")
            return model, teacher, tok_default, "trained default (`load_model(\"default\")`)"
        except ModelLoadError as exc:
            if args.model == "default":
                raise
            why = str(exc).split(";")[0]
            print(f"[decode_speed] load_model('default') failed ({why}); using the untrained conversion",
                  file=sys.stderr)
    if args.model in ("auto", "convert"):
        model = recursify(base, num_loops=args.loops, sharing="cycle", init="average",
                          lora_rank=args.lora_rank, base_name="smollm2-135m")
        desc = (f"untrained conversion `recursify(load_model(\"smollm2-135m\")[0], num_loops={args.loops}, "
                f"sharing=\"cycle\", init=\"average\", lora_rank={args.lora_rank})`"
                + (" (the trained default does not exist yet: `load_model(\"default\")` failed)"
                   if args.model == "auto" else ""))
        return model.eval(), teacher, tok, desc
    model, tok_m = load_model(args.model)
    return model, teacher, tok_m, f"`load_model({args.model!r})`"


def make_configs(args, model, teacher) -> list[Config]:
    n = model.config.num_loops
    configs = [Config("teacher (original model)", teacher, FixedDepth(1)),
               Config(f"full (fixed {n})", model, FixedDepth(n))]
    configs += [Config(f"fixed {d}", model, FixedDepth(d)) for d in range(1, n)]
    for kv in ("sync", "copy"):
        configs.append(Config(f"confidence {args.confidence:g}", model, Confidence(args.confidence), kv))
    for kv in ("sync", "copy"):
        configs.append(Config(f"saturation {args.saturation:g}", model, Saturation(args.saturation), kv))
    configs.append(Config("confidence, never exits", model, NeverExitConfidence(args.confidence)))
    configs.append(Config("saturation, never exits", model, NeverExitSaturation(args.saturation)))
    if not args.no_bf16:
        configs.append(Config(f"full (fixed {n}) bf16", copy.deepcopy(model).to(torch.bfloat16),
                              FixedDepth(n), dtype="bf16"))
    return configs


def run_one(cfg: Config, tok, prompt: str, tokens: int):
    """One generation (``stream`` = ``generate`` token by token); returns (trace, CPU seconds per token).

    The CPU time of a token is this thread's ``time.thread_time()`` across one step of the stream (the
    engine step plus its small per-token bookkeeping); the first token's includes the prefill.
    """
    gc.collect()
    s = stream(cfg.model, tok, prompt, policy=cfg.policy, max_new_tokens=tokens, kv_mode=cfg.kv_mode, chat=True)
    cpu = []
    while True:
        c0 = time.thread_time()
        try:
            next(s)
        except StopIteration:
            break
        cpu.append(time.thread_time() - c0)
    return s.trace, cpu


def measure(args, configs: list[Config], tok, prompts: list[str]) -> None:
    t0 = time.perf_counter()
    for cfg in configs:  # warm-up: every configuration once (allocator, kernels, lazy init)
        run_one(cfg, tok, prompts[0], min(args.tokens, 8))
    print(f"[decode_speed] warm-up {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    for rep in range(args.reps):
        t0 = time.perf_counter()
        k = rep % len(configs)
        order = configs[k:] + configs[:k]
        for cfg in configs:
            cfg.tokens.append(0)
            cfg.wall_s.append(0.0)
            cfg.cpu_tokens.append(0)
            cfg.cpu_s.append(0.0)
        for pi, prompt in enumerate(prompts):
            for cfg in order:
                trace, cpu = run_one(cfg, tok, prompt, args.tokens)
                tot = trace.totals()
                cfg.tokens[rep] += tot["tokens"]
                cfg.wall_s[rep] += tot["wall_s"]
                cfg.cpu_tokens[rep] += max(len(cpu) - 1, 0)
                cfg.cpu_s[rep] += sum(cpu[1:])
                ids = [s.token_id for s in trace.steps]
                if rep == 0:
                    cfg.totals.append(tot)
                    cfg.texts.append(ids)
                    cfg.decision_flops += sum(s.flops.get("decision", 0.0) for s in trace.steps)
                    cfg.used_flops += tot["flops_used"]
                elif ids != cfg.texts[pi]:
                    cfg.deterministic = False
        print(f"[decode_speed] repetition {rep + 1}/{args.reps} {time.perf_counter() - t0:.0f}s "
              f"load {os.getloadavg()[0]:.2f}", file=sys.stderr)


# --- summarising ---------------------------------------------------------------------------------
def _median(xs):
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def _spread(xs):
    xs = [x for x in xs if x == x]
    return (min(xs), max(xs)) if xs else (float("nan"), float("nan"))


def summarise(configs: list[Config], model, reps: int) -> dict:
    full = configs[1]
    n = model.config.num_loops
    rows = []
    for cfg in configs:
        toks = sum(t["tokens"] for t in cfg.totals)
        row = {"cfg": cfg, "tokens": toks,
               "tps": _median([1000 / cfg.ms(r, "wall") for r in range(reps)]),
               "avg_depth": sum(t["avg_depth"] * t["tokens"] for t in cfg.totals) / toks if toks else 0.0,
               "depth_counts": [sum(t["depth_counts"][i] for t in cfg.totals)
                                for i in range(len(cfg.totals[0]["depth_counts"]))],
               "ideal": sum(t["flops_full"] for t in cfg.totals) / cfg.used_flops if cfg.used_flops else 1.0,
               "flops_per_token": cfg.used_flops / toks if toks else 0.0,
               "decision_pct": 100 * cfg.decision_flops / cfg.used_flops if cfg.used_flops else 0.0}
        for clock in ("wall", "cpu"):  # paired: full depth's time over this one's, same repetition
            ratios = [full.ms(r, clock) / cfg.ms(r, clock) for r in range(reps)]
            row[clock] = _median(ratios)
            row[clock + "_range"] = _spread(ratios)
            row[clock + "_ms"] = _median([cfg.ms(r, clock) for r in range(reps)])
        rows.append(row)
    # the teacher's FLOPs relative to the recursive model's full depth (its own totals() say 1.0)
    rows[0]["ideal"] = rows[1]["flops_per_token"] / rows[0]["flops_per_token"]
    fixed = {d: next(c for c in configs if c.name == f"fixed {d}") for d in range(1, n)}
    fixed[n] = full
    for row in rows:  # time fixed-depth runs with the same depth histogram took (same repetition)
        if row["cfg"].model is model and row["tokens"]:
            for clock in ("wall", "cpu"):
                est = [sum(c * fixed[d + 1].ms(r, clock) for d, c in enumerate(row["depth_counts"])) / row["tokens"]
                       for r in range(reps)]
                row["matched_" + clock] = _median([row["cfg"].ms(r, clock) / e for r, e in enumerate(est)])
    never_conf = next(c for c in configs if isinstance(c.policy, NeverExitConfidence))
    never_sat = next(c for c in configs if isinstance(c.policy, NeverExitSaturation))
    k = model.config.block_size
    per_rep = {"loop_ms": [], "probe_ms": [], "cosine_ms": [], "probe_layers": []}
    for r in range(reps):  # per-token costs from differences within one repetition (CPU clock)
        loop = (full.ms(r, "cpu") - fixed[1].ms(r, "cpu")) / (n - 1) if n > 1 else float("nan")
        probe = (never_conf.ms(r, "cpu") - full.ms(r, "cpu")) / (n - 1) if n > 1 else float("nan")
        per_rep["loop_ms"].append(loop)
        per_rep["probe_ms"].append(probe)
        per_rep["cosine_ms"].append((never_sat.ms(r, "cpu") - full.ms(r, "cpu")) / (n - 1) if n > 1 else float("nan"))
        per_rep["probe_layers"].append(k * probe / loop if loop > 0 else float("nan"))
    costs = CostModel.from_model(model)
    derived = {key: _median(v) for key, v in per_rep.items()}
    derived.update({key + "_range": _spread(v) for key, v in per_rep.items()})
    return {"rows": rows, **derived, "block_size": k, "head_flops": costs.head(),
            "layer_flops": sum(costs.layer(0, 64).values()), "n": n}


def fmt_table(summary: dict) -> str:
    head = ("| configuration | KV | avg depth | tokens at depth 1..N | tok/s (wall) | speedup, wall (range) "
            "| speedup, CPU time (range) | ideal speedup (FLOPs) | CPU-time speedup / ideal | decision FLOPs "
            "| time vs depth-matched fixed (CPU) |")
    lines = [head, "|" + "---|" * 11]
    for r in summary["rows"]:
        c = r["cfg"]
        adaptive = isinstance(c.policy, (Confidence, Saturation)) and not isinstance(c.policy, NeverExit)
        matched = r.get("matched_cpu")
        lines.append(
            f"| {c.name}{'' if c.deterministic else ' (*)'} | {c.kv_mode if adaptive else '-'} | "
            f"{r['avg_depth']:.2f} | {'/'.join(map(str, r['depth_counts']))} | {r['tps']:.1f} | "
            f"{r['wall']:.2f}x ({r['wall_range'][0]:.2f}-{r['wall_range'][1]:.2f}) | "
            f"{r['cpu']:.2f}x ({r['cpu_range'][0]:.2f}-{r['cpu_range'][1]:.2f}) | {r['ideal']:.2f}x | "
            f"{r['cpu'] / r['ideal']:.2f} | {r['decision_pct']:.1f}% | {'' if matched is None else f'{matched:.2f}'} |")
    return "\n".join(lines)


def fmt_overhead(summary: dict) -> str:
    n, k = summary["n"], summary["block_size"]
    rows = summary["rows"]
    conf = next(r for r in rows if isinstance(r["cfg"].policy, NeverExitConfidence))
    sat = next(r for r in rows if isinstance(r["cfg"].policy, NeverExitSaturation))
    full = rows[1]
    bf16 = next((r for r in rows if r["cfg"].dtype == "bf16"), None)
    out = [
        f"- Decision overhead at equal depth (every token runs all {n} loops): with the confidence policy "
        f"(an exit probe = norm + LM head + softmax/top-2/entropy after loops 1..{n - 1}) decoding runs at "
        f"{conf['cpu']:.2f}x full-depth speed (CPU time; wall {conf['wall']:.2f}x), i.e. "
        f"{100 * (1 - conf['cpu']):.0f}% of its time is the decision (FLOP share {conf['decision_pct']:.1f}%); "
        f"with the saturation policy (one cosine per loop) at {sat['cpu']:.2f}x (wall {sat['wall']:.2f}x; "
        f"FLOP share {sat['decision_pct']:.4f}%).",
        f"- Per token, from differences within each repetition (CPU time, median, range in brackets): one loop "
        f"({k} layers) ≈ {summary['loop_ms']:.1f} ms ({summary['loop_ms_range'][0]:.1f}-{summary['loop_ms_range'][1]:.1f}; "
        f"fixed {n} minus fixed 1, over {n - 1}); one confidence probe ≈ {summary['probe_ms']:.1f} ms "
        f"({summary['probe_ms_range'][0]:.1f}-{summary['probe_ms_range'][1]:.1f}) ≈ {summary['probe_layers']:.1f} layers "
        f"of time ({summary['probe_layers_range'][0]:.1f}-{summary['probe_layers_range'][1]:.1f}); one cosine ≈ "
        f"{summary['cosine_ms']:.2f} ms ({summary['cosine_ms_range'][0]:.2f}-{summary['cosine_ms_range'][1]:.2f}). "
        f"Analytically the head is {summary['head_flops'] / summary['layer_flops']:.1f} layers of FLOPs "
        f"({summary['head_flops'] / 1e6:.0f} vs {summary['layer_flops'] / 1e6:.1f} MFLOPs per layer incl. LoRA, "
        f"context 64).",
        f"- Full depth fp32: {full['tps']:.1f} tok/s wall, {1000 / full['cpu_ms']:.1f} tok/s of CPU time (medians)"
        + (f"; bf16 full depth: {bf16['cpu']:.2f}x fp32 (CPU time, range {bf16['cpu_range'][0]:.2f}-"
           f"{bf16['cpu_range'][1]:.2f}; wall {bf16['wall']:.2f}x)." if bf16 else "."),
    ]
    return "\n".join(out)


def cpu_description() -> str:
    """CPU model and the instruction sets that decide whether bf16 matmuls are native."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = re.search(r"model name\s*:\s*(.+)", info)
    found = re.search(r"flags\s*:\s*(.+)", info)
    flags = set(found.group(1).split()) if found else set()
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name.group(1).strip() if name else platform.machine()} ({', '.join(isa) or 'no AVX2'})"


def render_section(args, argv: list[str], summary: dict, meta: dict) -> str:
    cmd = " ".join([".venv/bin/python", "benchmarks/decode_speed.py", *map(shlex.quote, argv)])
    nondet = any(not r["cfg"].deterministic for r in summary["rows"])
    untrained = meta["untrained"]
    parts = [
        "## Decode speed (batch 1, CPU)",
        "",
        f"Command: `{cmd}`  ",
        f"Date: {meta['date']}; torch {torch.__version__}; {cpu_description()}, "
        f"{os.cpu_count()} CPUs, `torch.set_num_threads({args.threads})`; load average (1/5/15 min) "
        f"{meta['load_start']} at start, {meta['load_end']} at end; wall time {meta['wall_min']:.1f} min.  ",
        f"Model: {meta['model']}; {summary['n']} loops of {summary['block_size']} layers. "
        f"Teacher: `recursify(base, num_loops=1)` (the original SmolLM2-135M-Instruct, 30 layers).  ",
        f"Setup: greedy, `chat=True`, {len(meta['prompts'])} fixed prompt{'s' if len(meta['prompts']) > 1 else ''} x {args.tokens} new tokens "
        f"(up to; EOS ends a generation), "
        f"{args.reps} timed repetitions after a warm-up, configurations interleaved round-robin "
        f"(order rotated per repetition). fp32 unless marked. Two clocks: wall = the engine's per-token "
        f"`wall_ms` (prefill excluded); CPU time = this thread's `time.thread_time()` per streamed token "
        f"(first token, which includes the prefill, excluded). With one torch thread the CPU time holds all "
        f"the work but not the time the scheduler gave the other job, so it is the less noisy clock here.",
        "",
    ]
    if untrained:
        parts += ["**The model is an untrained conversion**: its text is garbage and its exits are not "
                  "meaningful (intermediate loops disagree with the last one); the depth histograms below are "
                  "what these thresholds happen to do on it, not a quality-preserving operating point. "
                  "Read the speed columns, not the depths.", ""]
    parts += [
        "Speedup = full-depth time per token over this configuration's, *in the same repetition*, median "
        "over repetitions (min-max in brackets); tok/s (wall) is the median absolute rate. Ideal speedup = `totals()[\"ideal_speedup\"]` (full-depth FLOPs / FLOPs used, "
        "decisions, sync catch-up and copy-KV included); for the teacher, the recursive full depth's FLOPs "
        "over the teacher's. \"Time vs depth-matched fixed\" = CPU ms/token over what the fixed-depth rows "
        "take for the same depth histogram (same repetition): > 1 is the extra cost of deciding and of the "
        "KV mode (sync catch-up, copy projections). \"never exits\" rows compute the policy's signal every loop but always run all loops.",
        "",
        fmt_table(summary),
        "",
        fmt_overhead(summary),
    ]
    if nondet:
        parts.append("- (*) greedy output differed between repetitions for this configuration.")
    return "\n".join(parts) + "\n"


def write_section(path: Path, section: str) -> None:
    """Replace only the text between the markers (re-read right before writing; atomic replace)."""
    text = path.read_text()
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path} has no {START} ... {END} section")
    new = pattern.sub(lambda _: f"{START}\n{section}{END}", text, count=1)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w") as f:
        f.write(new)
    os.chmod(tmp, path.stat().st_mode & 0o777)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.quick:
        args.tokens, args.reps, args.prompts = 8, 2, 1
    torch.set_num_threads(args.threads)
    fmt_load = lambda: " / ".join(f"{x:.2f}" for x in os.getloadavg())  # noqa: E731
    load_start = fmt_load()
    print(f"[decode_speed] load average at start: {load_start}; threads {args.threads}; torch {torch.__version__}",
          file=sys.stderr)
    t_start = time.perf_counter()
    model, teacher, tok, desc = load_models(args)
    model.eval()
    prompts = list(PROMPTS[: max(1, args.prompts)])
    configs = make_configs(args, model, teacher)
    measure(args, configs, tok, prompts)
    load_end = fmt_load()
    summary = summarise(configs, model, args.reps)
    meta = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "load_start": load_start,
            "load_end": load_end, "model": desc, "prompts": prompts,
            "untrained": model.config.training is None,
            "wall_min": (time.perf_counter() - t_start) / 60}
    print(f"[decode_speed] load average at end: {load_end}", file=sys.stderr)
    section = render_section(args, argv, summary, meta)
    print(section)
    if args.write_results:
        write_section(Path(args.write_results), section)
        print(f"[decode_speed] wrote the decode section of {args.write_results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
