"""Workloads: run one on the batching engine, measure it, compare strategies, draw its schedule."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from model.inference.generation import Sampling
from model.inference.policies import DepthPolicy
from model.serving.engine import BatchEngine
from model.serving.requests import Request, RequestResult, StepRecord
from model.serving.scheduler import STRATEGIES


@dataclass
class WorkloadItem:
    """One request of a workload: its prompt, output budget and arrival time (seconds from start)."""

    prompt_ids: list[int]
    max_new_tokens: int
    arrival_s: float = 0.0
    prompt: str = ""


@dataclass
class WorkloadResult:
    """One strategy's run of a workload: per-request results, the schedule log, the metrics."""

    strategy: str
    metrics: dict
    results: list[RequestResult]
    arrivals: list[float]
    schedule: list[StepRecord]

    def to_dict(self) -> dict:
        """Plain JSON data (the dashboard's Batching lab draws ``schedule`` as a Gantt chart)."""
        return {
            "strategy": self.strategy,
            "metrics": self.metrics,
            "schedule": [asdict(r) for r in self.schedule],
            "requests": [{"request_id": r.request_id, "arrival_s": a, "first_token_s": r.first_token_s,
                          "finished_s": r.finished_s, "finish_reason": r.finish_reason, "token_ids": r.token_ids,
                          "depths": [s.depth for s in r.trace.steps], "text": r.text}
                         for r, a in zip(self.results, self.arrivals)],
        }


def run_workload(model, items: list[WorkloadItem], strategy: str = "cdb", tokenizer=None,
                 policy_factory: Callable[[], DepthPolicy | None] = lambda: None, kv_mode: str = "sync",
                 max_requests: int = 16, max_batch_tokens: int = 512, prefill_chunk: int = 64,
                 device=None, dtype=None, sampling: Sampling | None = None) -> WorkloadResult:
    """Run ``items`` through a fresh engine in real time (each request submitted at its arrival time).

    ``policy_factory`` makes each request's depth policy (ignored by the full-depth strategies).
    Request ``i`` gets id ``"r{i}"``.
    """
    engine = BatchEngine(model, tokenizer, strategy=strategy, max_requests=max_requests,
                         max_batch_tokens=max_batch_tokens, prefill_chunk=prefill_chunk,
                         max_queue=max(len(items), 1), device=device, dtype=dtype)
    order = sorted(range(len(items)), key=lambda i: items[i].arrival_s)
    next_i = 0
    engine.reset_clock()
    while next_i < len(order) or engine.has_work():
        now = engine.now()
        while next_i < len(order) and items[order[next_i]].arrival_s <= now:
            it = items[order[next_i]]
            engine.submit(Request(prompt_ids=list(it.prompt_ids), max_new_tokens=it.max_new_tokens,
                                  policy=policy_factory(), kv_mode=kv_mode, sampling=sampling or Sampling(),
                                  request_id=f"r{order[next_i]}", prompt=it.prompt))
            next_i += 1
        if engine.has_work():
            engine.step()
        elif next_i < len(order):
            time.sleep(max(0.0, items[order[next_i]].arrival_s - engine.now()))
    results = [engine.results[f"r{i}"] for i in range(len(items))]
    arrivals = [it.arrival_s for it in items]
    return WorkloadResult(strategy, workload_metrics(engine, results, arrivals), results, arrivals, engine.log)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q))


def workload_metrics(engine: BatchEngine, results: list[RequestResult], arrivals: list[float]) -> dict:
    """Throughput, latency percentiles, depth, block calls, occupancy and overhead of one run."""
    tokens = sum(len(r.token_ids) for r in results)
    start = min(arrivals) if arrivals else 0.0
    makespan = max((r.finished_s for r in results), default=0.0) - start
    ttft = [r.first_token_s - a for r, a in zip(results, arrivals) if r.first_token_s is not None]
    tpot = [(r.token_times_s[-1] - r.token_times_s[0]) / (len(r.token_times_s) - 1)
            for r in results if len(r.token_times_s) > 1]
    depths = [s.depth for r in results for s in r.trace.steps]
    calls = engine.log
    items_per_call = [len(rec.items) for rec in calls]
    return {
        "strategy": engine.strategy,
        "requests": len(results),
        "tokens": tokens,
        "makespan_s": makespan,
        "tokens_per_s": tokens / makespan if makespan > 0 else 0.0,
        "requests_per_s": len(results) / makespan if makespan > 0 else 0.0,
        "ttft_p50_ms": 1000 * _pct(ttft, 0.5) if ttft else None,
        "ttft_p95_ms": 1000 * _pct(ttft, 0.95) if ttft else None,
        "tpot_p50_ms": 1000 * _pct(tpot, 0.5) if tpot else None,
        "tpot_p95_ms": 1000 * _pct(tpot, 0.95) if tpot else None,
        "avg_depth": sum(depths) / len(depths) if depths else 0.0,
        "block_calls": engine.block_calls,
        "mean_items_per_call": sum(items_per_call) / len(items_per_call) if items_per_call else 0.0,
        "occupancy": (sum(items_per_call) / len(items_per_call) / engine.scheduler.max_requests) if items_per_call else 0.0,
        "mean_tokens_per_call": sum(r.batch_tokens for r in calls) / len(calls) if calls else 0.0,
        "step_ms_mean": 1000 * engine.step_s / engine.block_calls if engine.block_calls else 0.0,
        "overhead_share": engine.overhead_s / engine.step_s if engine.step_s else 0.0,
        "finish_reasons": {k: sum(r.finish_reason == k for r in results) for k in ("eos", "length", "stop", "cancelled", "error")},
    }


def compare_strategies(model, items: list[WorkloadItem], strategies: Sequence[str] = STRATEGIES,
                       **kwargs) -> dict[str, WorkloadResult]:
    """Run the same workload under each strategy (same engine code, same run) and add ratios to
    static batching and, for adaptive strategies, greedy agreement with a full-depth strategy."""
    runs = {s: run_workload(model, items, strategy=s, **kwargs) for s in strategies}
    base = runs.get("static")
    full = runs.get("csb") or runs.get("static")
    for name, run in runs.items():
        m = run.metrics
        if base is not None and base.metrics["tokens_per_s"]:
            m["speedup_vs_static"] = m["tokens_per_s"] / base.metrics["tokens_per_s"]
        if full is not None:
            same = total = 0
            for a, b in zip(run.results, full.results):
                n = min(len(a.token_ids), len(b.token_ids))
                same += sum(x == y for x, y in zip(a.token_ids[:n], b.token_ids[:n]))
                total += n
            m["agreement_with_full_depth"] = same / total if total else None
    return runs


def gantt_cells(schedule: Sequence[StepRecord] | Sequence[dict]) -> list[dict]:
    """The schedule log as flat Gantt cells, one per (request, step) where the request was in flight.

    Each cell: ``request_id``, ``step``, ``start_s``, ``end_s``, ``state`` ("decode" | "prefill" |
    "idle"), ``loop`` (None when idle), ``tokens``, ``head`` (the token exited in this step). Rows are
    requests, x is ``step`` (or time), colour is ``loop``; idle cells show the synchronisation waits.
    """
    cells = []
    for rec in schedule:
        rec = asdict(rec) if isinstance(rec, StepRecord) else rec
        start, end = rec["start_s"], rec["start_s"] + rec["wall_ms"] / 1000
        for item in rec["items"]:
            cells.append({"request_id": item["request_id"], "step": rec["step"], "start_s": start, "end_s": end,
                          "state": item["kind"], "loop": item["loop"], "tokens": item["tokens"], "head": item["head"]})
        for rid in rec["idle"]:
            cells.append({"request_id": rid, "step": rec["step"], "start_s": start, "end_s": end, "state": "idle",
                          "loop": None, "tokens": 0, "head": False})
    return cells
