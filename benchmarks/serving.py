"""Serving throughput of the batching strategies on one workload, in one run.

    .venv/bin/python benchmarks/serving.py --model default --requests 64 --arrival poisson --rate 4
    .venv/bin/python benchmarks/serving.py --model default --requests 64 --arrival offline   # all at t=0
    .venv/bin/python benchmarks/serving.py --requests 16 --arrival offline poisson --rate 2 8 --write-results docs/RESULTS.md
    .venv/bin/python benchmarks/serving.py --device cuda --dtype bfloat16 ...                # on a GPU
    .venv/bin/python benchmarks/serving.py --concurrency 1 8 32 64 128 --arrival poisson --rate 16 64 \
        --policy halting --threshold 0.7 --kv-mode copy --device cuda --json serving.json   # issue 17 item 4

Workload: chat prompts (the first user turn of held-out chitchat conversations when the data cache
has them, else the committed ``heldout-chat-answers`` prompts, else a built-in list), rendered with the chat template; output budgets drawn uniformly
from ``--min-tokens..--max-tokens`` (greedy, EOS honoured). Every strategy of ``model.serving``
(``cdb``, ``ee_sequence``, ``csb``, ``static``) runs the same workload in the same process, one
after the other, after a short warm-up of each. Arrivals: ``offline`` (all at once) and ``poisson`` at each
``--rate`` (requests/s, seeded). ``--concurrency C ...``: closed loop, ``C`` users each sending its next
request the moment its previous one finished (the engine holds up to ``C``; TTFT counts from each
request's own submission), ``max(--requests, --per-client x C)`` requests per level; then the arrival runs.
``--json`` is rewritten after every section, so a run cut short keeps what it measured.

Per strategy: tokens/s, requests/s, time to first token (TTFT) and time per output token (TPOT)
p50/p95, average depth, block calls, mean items per block call (and occupancy = items /
``--max-requests``), engine overhead share (scheduling, gathering/scattering, bookkeeping, sampling
and detokenisation: time outside the model's layer kernels), ratios to static batching and to
continuous sequence batching, greedy token agreement with full depth. Not a test: nothing passes
or fails. On a shared CPU absolute numbers drift; compare ratios within one run.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import platform
import random
import re
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from model.inference.decoder import KV_MODES  # noqa: E402
from model.inference.generation import Sampling  # noqa: E402
from model.serving import STRATEGIES, WorkloadItem, compare_strategies  # noqa: E402
from model.serving.engine import BatchEngine  # noqa: E402
from model.serving.requests import Request  # noqa: E402
from model.serving.workloads import WorkloadResult, workload_metrics  # noqa: E402
from model.inference.policies import POLICIES, make_policy  # noqa: E402
from model.serving.server import load_served_model  # noqa: E402

log = logging.getLogger("serving")
SECTION_END = "<!-- serving:end -->"


def markers(tag: str | None) -> tuple[str, str]:
    name = "serving:table" + (f":{tag}" if tag else "")
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"
BUILTIN_PROMPTS = (
    "Hi! How are you doing today?", "What's your favourite movie and why?", "Can you recommend a good book?",
    "I just got a puppy. Any tips?", "What should I cook for dinner tonight?", "Tell me a fun fact about space.",
    "How do I stay motivated when studying?", "What is the best way to learn a new language?",
    "Do you like music? What kind?", "I'm planning a trip to Italy. Where should I go?",
    "Explain why the sky is blue.", "Write a short poem about autumn.",
)


def heldout_answer_prompts(tokenizer, limit: int) -> list[str]:
    """The user turns of the committed ``heldout-chat-answers`` prompts (in the repository, so also on a
    machine without the data cache)."""
    from model.data.answer_prompts import HELDOUT_NAME
    from model.data.answer_store import load_answers

    texts = [tokenizer.decode(a.prompt_ids).split("<|im_start|>user\n", 1)[-1].split("<|im_end|>", 1)[0]
             for a in load_answers(HELDOUT_NAME, modes=("greedy",))]
    return [t for t in texts if 8 <= len(t) <= 300][:limit]


def heldout_chat_prompts(limit: int, tokenizer=None) -> tuple[list[str], str]:
    """First user turns of held-out chitchat conversations, else the committed held-out chat-answer prompts,
    else the built-in list (and which one)."""
    try:
        from model.data import chat_messages, heldout_ids_path, read_docs

        ids = set(heldout_ids_path("heldout-chat").read_text().split())
        prompts = []
        for doc in read_docs("chitchat"):
            if doc.id in ids:
                first = chat_messages(doc.text)[0]["content"].strip()
                if 8 <= len(first) <= 300:
                    prompts.append(first)
            if len(prompts) >= limit:
                break
        if prompts:
            return prompts, f"held-out chitchat ({len(prompts)} conversations' first turns)"
    except Exception as exc:  # the data cache is optional here
        log.info("held-out chat prompts unavailable (%s)", exc)
    try:
        prompts = heldout_answer_prompts(tokenizer, limit) if tokenizer is not None else []
        if prompts:
            return prompts, f"heldout-chat-answers prompts ({len(prompts)})"
    except Exception as exc:
        log.info("heldout-chat-answers prompts unavailable (%s)", exc)
    log.info("using the built-in prompt list")
    return list(BUILTIN_PROMPTS), "built-in prompt list"


def make_workload(tokenizer, n: int, min_tokens: int, max_tokens: int, arrival: str, rate: float,
                  seed: int) -> tuple[list[WorkloadItem], str]:
    prompts, source = heldout_chat_prompts(max(n, 64), tokenizer)
    rng = random.Random(seed)
    t = 0.0
    items = []
    for i in range(n):
        text = prompts[i % len(prompts)]
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                            add_generation_prompt=True)
        ids = tokenizer(ids, add_special_tokens=False).input_ids
        if arrival == "poisson":
            t += rng.expovariate(rate)
        items.append(WorkloadItem(ids, rng.randint(min_tokens, max_tokens), t if arrival == "poisson" else 0.0, text))
    return items, source


def run_closed_loop(model, items: list[WorkloadItem], clients: int, strategy: str, tokenizer=None,
                    policy_factory=lambda: None, kv_mode: str = "sync", max_batch_tokens: int = 512,
                    prefill_chunk: int = 64, device=None, dtype=None, **_) -> WorkloadResult:
    """``clients`` closed-loop users over ``items`` (in order): the first ``clients`` requests at t=0, then a
    new one each time one finishes; the engine holds up to ``clients`` requests. Arrival = submission."""
    engine = BatchEngine(model, tokenizer, strategy=strategy, max_requests=clients, max_batch_tokens=max_batch_tokens,
                         prefill_chunk=prefill_chunk, max_queue=max(len(items), 1), device=device, dtype=dtype)
    arrivals: list[float] = []

    def submit() -> None:
        i = len(arrivals)
        it = items[i]
        arrivals.append(engine.now())
        engine.submit(Request(prompt_ids=list(it.prompt_ids), max_new_tokens=it.max_new_tokens, policy=policy_factory(),
                              kv_mode=kv_mode, sampling=Sampling(), request_id=f"r{i}", prompt=it.prompt))

    engine.reset_clock()
    while len(arrivals) < min(clients, len(items)):
        submit()
    while engine.has_work():
        engine.step()
        while len(arrivals) < len(items) and len(arrivals) - len(engine.results) < clients:
            submit()
    results = [engine.results[f"r{i}"] for i in range(len(items))]
    return WorkloadResult(strategy, workload_metrics(engine, results, arrivals), results, arrivals, engine.log)


def add_ratios(runs: dict[str, WorkloadResult]) -> dict[str, WorkloadResult]:
    """Tokens/s relative to static batching and greedy agreement with a full-depth strategy (as
    ``compare_strategies`` adds them)."""
    base, full = runs.get("static"), runs.get("csb") or runs.get("static")
    for run in runs.values():
        m = run.metrics
        if base is not None and base.metrics["tokens_per_s"]:
            m["speedup_vs_static"] = m["tokens_per_s"] / base.metrics["tokens_per_s"]
        if full is not None:
            pairs = [(a.token_ids, b.token_ids) for a, b in zip(run.results, full.results)]
            total = sum(min(len(a), len(b)) for a, b in pairs)
            same = sum(x == y for a, b in pairs for x, y in zip(a, b))
            m["agreement_with_full_depth"] = same / total if total else None
    return runs


def fmt(v, spec=".1f") -> str:
    return "–" if v is None else format(v, spec)


def table(runs: dict, max_requests: int) -> str:
    rows = ["| strategy | tokens/s | req/s | TTFT p50 / p95 ms | TPOT p50 / p95 ms | avg depth | block calls | "
            "items/call (occupancy) | × static | × CSB | × static in block calls | agreement w/ full depth | overhead |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    csb, static = runs.get("csb"), runs.get("static")
    for name, run in runs.items():
        m = run.metrics
        x_csb = m["tokens_per_s"] / csb.metrics["tokens_per_s"] if csb and csb.metrics["tokens_per_s"] else None
        rows.append(
            f"| {name} | {m['tokens_per_s']:.1f} | {m['requests_per_s']:.2f} | {fmt(m['ttft_p50_ms'], '.0f')} / "
            f"{fmt(m['ttft_p95_ms'], '.0f')} | {fmt(m['tpot_p50_ms'], '.0f')} / {fmt(m['tpot_p95_ms'], '.0f')} | "
            f"{m['avg_depth']:.2f} | {m['block_calls']} | {m['mean_items_per_call']:.1f} ({100 * m['occupancy']:.0f} %) | "
            f"×{fmt(m.get('speedup_vs_static'), '.2f')} | ×{fmt(x_csb, '.2f')} | "
            f"×{fmt(static.metrics['block_calls'] / m['block_calls'] if static and m['block_calls'] else None, '.2f')} | "
            f"{fmt(100 * m['agreement_with_full_depth'] if m.get('agreement_with_full_depth') is not None else None, '.1f')} % | "
            f"{100 * m['overhead_share']:.1f} % |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # model
    p.add_argument("--model", default="default", help="load_model name; 'default' falls back to the conversion")
    p.add_argument("--lora-rank", type=int, default=None,
                   help="instead of --model: convert smollm2-135m to 3 loops with this LoRA rank (0 = pure sharing)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16", "float16"])
    # workload
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--arrival", nargs="+", default=["poisson"], choices=["offline", "poisson"])
    p.add_argument("--rate", type=float, nargs="+", default=[4.0], help="Poisson arrival rates, requests/s")
    p.add_argument("--min-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=int, nargs="*", default=[],
                   help="closed-loop levels: this many concurrent users each (run before the --arrival settings)")
    p.add_argument("--per-client", type=int, default=2, help="closed loop: requests per user (at least --requests)")
    # engine
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    p.add_argument("--policy", default=None, choices=sorted(POLICIES),
                   help="depth policy of the adaptive strategies (default: router for a MoR model, halting if "
                        "trained with halting heads, else confidence)")
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--kv-mode", default="sync", choices=KV_MODES)
    p.add_argument("--max-requests", type=int, default=16)
    p.add_argument("--max-batch-tokens", type=int, default=512)
    p.add_argument("--prefill-chunk", type=int, default=64)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: 1 on CPU: on these shared 2-core machines 2 threads ran up to 8x "
                        "slower under load; torch's default elsewhere)")
    # output
    p.add_argument("--json", type=Path, default=None, help="write all metrics + schedules here")
    p.add_argument("--write-results", type=Path, default=None, help="replace the generated table block in this file")
    p.add_argument("--results-tag", default=None, help="name of the table block (several runs side by side)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads or not (args.device or "cpu").startswith("cuda"):
        torch.set_num_threads(args.threads or 1)

    if args.lora_rank is not None:
        from model import load_model
        from model import recursify

        base, tok = load_model("smollm2-135m")
        model = recursify(base, num_loops=3, lora_rank=args.lora_rank, base_name="smollm2-135m")
        name, note = f"conversion of smollm2-135m, 3 loops, LoRA rank {args.lora_rank} (untrained)", None
    else:
        model, tok, name, note = load_served_model(args.model)
    if note:
        log.warning(note)
    policy = args.policy or ("router" if getattr(model.config, "router_type", None) else
                             "halting" if model.has_halting_heads else "confidence")
    policy_factory = lambda: make_policy(policy, args.threshold, model.config.num_loops)  # noqa: E731
    kw = dict(tokenizer=tok, policy_factory=policy_factory, kv_mode=args.kv_mode, max_requests=args.max_requests,
              max_batch_tokens=args.max_batch_tokens, prefill_chunk=args.prefill_chunk, device=args.device,
              dtype=args.dtype)
    log.info("warm-up")
    warm, _ = make_workload(tok, min(4, args.requests), 4, 4, "offline", 1.0, args.seed)
    compare_strategies(model, warm, strategies=args.strategies, **kw)

    settings = [("closed", c) for c in args.concurrency]
    settings += [("offline", None)] if "offline" in args.arrival else []
    settings += [("poisson", r) for r in args.rate] if "poisson" in args.arrival else []
    sections, dump = [], {}
    t_all = time.perf_counter()
    for arrival, rate in settings:
        if arrival == "closed":
            n = max(args.requests, args.per_client * rate)
            items, source = make_workload(tok, n, args.min_tokens, args.max_tokens, "offline", 1.0, args.seed)
            label = f"closed loop, {rate} concurrent users ({n} requests)"
        else:
            items, source = make_workload(tok, args.requests, args.min_tokens, args.max_tokens, arrival, rate or 1.0,
                                          args.seed)
            label = "offline (all at t=0)" if arrival == "offline" else f"Poisson arrivals, {rate:g} req/s"
        log.info("%s: %d requests, strategies %s", label, len(items), args.strategies)
        t0 = time.perf_counter()
        if arrival == "closed":
            runs = add_ratios({s: run_closed_loop(model, items, rate, s, **kw) for s in args.strategies})
        else:
            runs = compare_strategies(model, items, strategies=args.strategies, **kw)
        log.info("  done in %.0f s", time.perf_counter() - t0)
        text = table(runs, rate if arrival == "closed" else args.max_requests)
        print(f"\n{label}\n{text}\n", flush=True)
        sections.append(f"**{label}**\n\n{text}")
        dump[label] = {s: r.to_dict() for s, r in runs.items()}
        if args.json:  # after every section: a run cut short keeps what it measured
            args.json.write_text(json.dumps({"header": "(partial)", "runs": dump}, indent=1))
    elapsed = time.perf_counter() - t_all
    device = args.device or "cpu"
    if device.startswith("cuda") and torch.cuda.is_available():
        device = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    header = (
        f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/serving.py'] + [shlex.quote(a) for a in (argv or sys.argv[1:])])}`  \n"
        f"Model: {name}{' (FALLBACK: untrained conversion of smollm2-135m, 3 loops, LoRA r64)' if note else ''}, "
        f"{model.config.num_loops} loops × {model.config.block_size} layers; policy {policy}"
        f"{'' if args.threshold is None else f' {args.threshold}'}, KV mode {args.kv_mode}; "
        f"max {args.max_requests} requests per batch (closed loop: the level); workload {args.requests} requests "
        f"from {source}, "
        f"output budgets {args.min_tokens}–{args.max_tokens} tokens (greedy, EOS honoured).  \n"
        f"Machine: {platform.machine()} {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{dt.date.today().isoformat()}; benchmark wall time {elapsed / 60:.1f} min."
    )
    block = header + "\n\n" + "\n\n".join(sections)
    if args.json:
        args.json.write_text(json.dumps({"header": header, "runs": dump}, indent=1))
    if args.write_results:
        path = args.write_results
        start, end = markers(args.results_tag)
        doc = path.read_text()
        if start in doc:
            doc = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: f"{start}\n{block}\n{end}", doc, flags=re.S)
        elif SECTION_END in doc:
            doc = doc.replace(SECTION_END, f"{start}\n{block}\n{end}\n{SECTION_END}")
        else:
            doc = doc.rstrip("\n") + f"\n\n{start}\n{block}\n{end}\n"
        path.write_text(doc)
        log.info("wrote %s", path)


if __name__ == "__main__":
    main()
