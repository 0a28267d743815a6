"""Continuous depth-wise batching: every request's tokens equal its solo run; strategies, bounds, log."""
from __future__ import annotations

import json
import random
import threading

import pytest
import torch

from model import EngineInputError, GenerationTrace
from model import generate
from model import recursify
from model.serving import (
    STRATEGIES,
    BatchEngine,
    EngineFullError,
    EngineWorker,
    Request,
    WorkloadItem,
    compare_strategies,
    gantt_cells,
)
from model.inference.generation import Sampling
from model.inference.prompts import encode_prompt
from model.inference.policies import FixedDepth
from tests.conftest import RandomExits, tiny_llama

PROMPTS = ["Hello there", "The capital of France is", "Once upon a time, in a land far away, there lived",
           "Why is the sky blue?", "List three fruits:", "A", "Tell me about the history of the printing press "
           "and why it mattered so much for Europe"]


pytestmark = pytest.mark.usefixtures("one_thread")


class RandomProbe(RandomExits):
    """Random exits that ask for logits: exercises the probe path (coda + head every loop, undone)."""

    needs_logits = True


class CalibratingRandom(RandomProbe):
    """Random exits that take FREE calibration pairs and let them shift later decisions."""

    wants_calibration = True

    def __init__(self, p, seed):
        super().__init__(p, seed)
        self.pairs = []

    def signal(self, obs):
        return obs.softmax_signals().get("max_prob")

    def calibrate(self, confidence, consistent):
        self.pairs.append((round(confidence, 5), consistent))

    def decide(self, obs):
        if obs.loop >= obs.max_loops:
            return True, "max depth"
        return self.rng.random() < self.p + 0.1 * (len(self.pairs) % 3), "random"


@pytest.fixture(scope="module")
def models(smol_tokenizer):
    """Recursive tiny models with SmolLM2's vocabulary: cycle (3 loops) and middle_cycle (2 loops, prelude + coda)."""
    base = tiny_llama(layers=6, vocab=len(smol_tokenizer))
    return {"cycle": recursify(base, num_loops=3, sharing="cycle", lora_rank=8),
            "middle_cycle": recursify(base, num_loops=2, sharing="middle_cycle", lora_rank=8)}


def solo(rec, tok, prompt, policy, kv_mode="sync", n=10, **kw):
    trace = generate(rec, tok, prompt, policy=policy, kv_mode=kv_mode, max_new_tokens=n, **kw)
    return [(s.token_id, s.depth) for s in trace.steps], trace.finish_reason


def batched(rec, tok, prompts, policies, kv_mode="sync", n=10, seed=0, strategy="cdb", **engine_kw):
    """Submit in a random order with random pauses (arrivals while others run); returns the engine."""
    rng = random.Random(seed)
    engine = BatchEngine(rec, tok, strategy=strategy, **engine_kw)
    order = list(range(len(prompts)))
    rng.shuffle(order)
    for i in order:
        engine.submit(Request(prompt_ids=encode_prompt(tok, prompts[i]), max_new_tokens=n, policy=policies[i],
                              kv_mode=kv_mode, request_id=f"r{i}", prompt=prompts[i]))
        for _ in range(rng.randint(0, 4)):
            engine.step()
    engine.run()
    return engine


def got(engine, i):
    result = engine.results[f"r{i}"]
    return [(s.token_id, s.depth) for s in result.trace.steps], result.finish_reason


@pytest.mark.parametrize("sharing", ["cycle", "middle_cycle"])
@pytest.mark.parametrize("kv_mode", ["sync", "copy"])
@pytest.mark.parametrize("seed", [0, 1])
def test_cdb_tokens_equal_solo_generate(models, smol_tokenizer, sharing, kv_mode, seed):
    rec, tok = models[sharing], smol_tokenizer
    rng = random.Random(seed)
    prompts = rng.sample(PROMPTS, 5)
    engine = batched(rec, tok, prompts, [RandomExits(0.5, 10 * seed + i) for i in range(5)], kv_mode, seed=seed,
                     max_requests=rng.randint(1, 4), prefill_chunk=rng.randint(2, 9))
    depths = set()
    for i, prompt in enumerate(prompts):
        ref = solo(rec, tok, prompt, RandomExits(0.5, 10 * seed + i), kv_mode)
        assert got(engine, i) == ref, f"request {i} differs from its solo run"
        depths.update(d for _, d in ref[0])
    assert len(depths) > 1  # mixed depths: the sync catch-up / copy paths ran
    if kv_mode == "sync":
        assert any(s.caught_up for r in engine.results.values() for s in r.trace.steps)


@pytest.mark.parametrize("sharing", ["cycle", "middle_cycle"])
def test_probe_policies_equal_solo(models, smol_tokenizer, sharing):
    """Policies that need logits run coda + head after every loop and undo the coda KV if they go on."""
    rec, tok = models[sharing], smol_tokenizer
    prompts = PROMPTS[:4]
    engine = batched(rec, tok, prompts, [RandomProbe(0.4, i) for i in range(4)], "sync", max_requests=3)
    for i, prompt in enumerate(prompts):
        assert got(engine, i) == solo(rec, tok, prompt, RandomProbe(0.4, i))
    step = engine.results["r0"].trace.steps[0]
    assert step.flops["decision"] > 0 and step.loops[0].top_tokens is not None


def test_free_calibration_and_mor_routers_equal_solo(models, smol_tokenizer):
    """FREE's calibration pairs (from caught-up tokens) and MoR router decisions, batched as solo."""
    from model.inference.policies import Router
    from model.conversion.recursify import add_routers

    rec, tok = models["cycle"], smol_tokenizer
    policies = [CalibratingRandom(0.5, i) for i in range(4)]
    engine = batched(rec, tok, PROMPTS[:4], policies, "sync", n=12, max_requests=3)
    for i, prompt in enumerate(PROMPTS[:4]):
        ref_policy = CalibratingRandom(0.5, i)
        assert got(engine, i) == solo(rec, tok, prompt, ref_policy, n=12)
        assert policies[i].pairs == ref_policy.pairs
    assert any(p.pairs for p in policies)
    for router_type in ("expert", "token"):
        mor = add_routers(recursify(tiny_llama(layers=6, vocab=len(tok), seed=3), num_loops=3, lora_rank=4),
                          router_type).eval()
        engine = batched(mor, tok, PROMPTS[:3], [Router(0.0) for _ in range(3)], "sync", max_requests=2)
        depths = set()
        for i, prompt in enumerate(PROMPTS[:3]):
            ref = solo(mor, tok, prompt, Router(0.0))
            assert got(engine, i) == ref, router_type
            depths.update(d for _, d in ref[0])
        assert len(depths) > 1, router_type
    with pytest.raises(EngineInputError, match="router"):
        BatchEngine(rec, tok).submit(Request([1, 2, 3], 4, Router(0.0)))


def _steps_in_full(trace):
    """Everything a trace says per token: ids, depths, exit reasons, per-loop signals with top-5, FLOPs, KV."""
    return [(s.token_id, s.depth, s.exit_reason, s.caught_up, s.kv_entries, round(s.inspected_flops, 3),
             {k: round(v, 3) for k, v in s.flops.items()},
             [(sig.loop, None if sig.signal is None else round(sig.signal, 5), sig.top_tokens and
               [(t, round(p, 5)) for t, p in sig.top_tokens]) for sig in s.loops]) for s in trace.steps]


@pytest.mark.parametrize("sharing", ["cycle", "middle_cycle"])
@pytest.mark.parametrize("kv_mode", ["copy", "sync", "recursion", "share"])
def test_every_kv_mode_with_inspect_equals_solo(models, smol_tokenizer, sharing, kv_mode):
    """The batch engine runs all four KV modes, with per-loop top-5 candidates (``inspect``), as solo does."""
    rec, tok = models[sharing], smol_tokenizer
    prompts = PROMPTS[:4]
    engine = BatchEngine(rec, tok, max_requests=3, prefill_chunk=4)
    for i, prompt in enumerate(prompts):
        engine.submit(Request(prompt_ids=encode_prompt(tok, prompt), max_new_tokens=8, policy=RandomExits(0.5, i),
                              kv_mode=kv_mode, request_id=f"r{i}", prompt=prompt, inspect=True))
        engine.step()
    engine.run()
    depths = set()
    for i, prompt in enumerate(prompts):
        ref = generate(rec, tok, prompt, policy=RandomExits(0.5, i), kv_mode=kv_mode, max_new_tokens=8, inspect=True)
        assert _steps_in_full(engine.results[f"r{i}"].trace) == _steps_in_full(ref), (kv_mode, i)
        depths.update(s.depth for s in ref.steps)
        assert all(sig.top_tokens for s in ref.steps for sig in s.loops) and ref.steps[0].inspected_flops > 0
    assert len(depths) > 1


def test_sampling_stop_strings_and_seeds_equal_solo(models, smol_tokenizer):
    rec, tok = models["cycle"], smol_tokenizer
    kw = dict(temperature=1.0, top_p=0.9, repetition_penalty=1.2)
    engine = BatchEngine(rec, tok, max_requests=4)
    refs = []
    for i, prompt in enumerate(PROMPTS[:4]):
        ref = generate(rec, tok, prompt, policy=RandomExits(0.5, i), max_new_tokens=12, seed=i, **kw)
        stop = [ref.steps[5].text] if i == 0 and ref.steps[5].text.strip() else []
        if stop:
            ref = generate(rec, tok, prompt, policy=RandomExits(0.5, i), max_new_tokens=12, seed=i, stop=stop, **kw)
        refs.append(ref)
        engine.submit(Request(encode_prompt(tok, prompt), 12, RandomExits(0.5, i), sampling=Sampling(seed=i, **kw),
                              stop=stop, request_id=f"r{i}"))
    engine.run()
    for i, ref in enumerate(refs):
        r = engine.results[f"r{i}"]
        assert r.token_ids == [s.token_id for s in ref.steps] and r.finish_reason == ref.finish_reason
        assert r.text == ref.text


def test_full_depth_strategies_equal_solo_full_depth_and_differ_in_schedule(models, smol_tokenizer):
    rec, tok = models["cycle"], smol_tokenizer
    items = [WorkloadItem(encode_prompt(tok, p), n) for p, n in zip(PROMPTS[:5], (3, 9, 5, 12, 4))]
    runs = compare_strategies(rec, items, tokenizer=tok, policy_factory=lambda: RandomExits(0.5, 7),
                              max_requests=3, prefill_chunk=4)
    for i, p in enumerate(PROMPTS[:5]):
        ref, _ = solo(rec, tok, p, FixedDepth(3), n=items[i].max_new_tokens)
        for strategy in ("csb", "static"):
            assert [(s.token_id, s.depth) for s in runs[strategy].results[i].trace.steps] == ref
        # early exit under sequence batching computes exactly what CDB computes, only scheduled worse
        assert runs["ee_sequence"].results[i].token_ids == runs["cdb"].results[i].token_ids
    m = {s: r.metrics for s, r in runs.items()}
    assert m["cdb"]["block_calls"] < m["ee_sequence"]["block_calls"] <= m["csb"]["block_calls"]
    assert m["csb"]["block_calls"] <= m["static"]["block_calls"]
    assert m["static"]["speedup_vs_static"] == 1.0 and m["csb"]["agreement_with_full_depth"] == 1.0
    assert m["cdb"]["avg_depth"] < 3 == m["csb"]["avg_depth"]
    # static batching: nothing is admitted while a batch runs
    batch: set[str] = set()
    for rec_ in runs["static"].schedule:
        batch = set(rec_.admitted) or batch
        assert {i.request_id for i in rec_.items} <= batch
    # lockstep strategies: exited tokens sit idle while the deepest finishes; CDB never idles a request
    assert any(rec_.idle for rec_ in runs["ee_sequence"].schedule)
    assert not any(rec_.idle for rec_ in runs["cdb"].schedule)


def test_schedule_log_is_plain_json_for_a_gantt_chart(models, smol_tokenizer):
    rec, tok = models["cycle"], smol_tokenizer
    engine = batched(rec, tok, PROMPTS[:4], [RandomExits(0.5, i) for i in range(4)], max_requests=3, n=6)
    log = json.loads(json.dumps(engine.schedule_log()))
    assert [r["step"] for r in log] == list(range(len(log))) and engine.block_calls == len(log)
    for row in log:
        ids = [i["request_id"] for i in row["items"]]
        assert len(ids) == len(set(ids)) <= 3  # one item per request per step, within max_requests
        assert all(1 <= i["loop"] <= 3 and i["kind"] in ("decode", "prefill") and i["tokens"] >= 1
                   for i in row["items"])
        assert row["batch_tokens"] == sum(i["tokens"] for i in row["items"]) and row["wall_ms"] > 0
    cells = gantt_cells(engine.log)
    assert len(cells) == sum(len(r["items"]) + len(r["idle"]) for r in log) and gantt_cells(log) == cells
    heads = sum(i["head"] for row in log for i in row["items"])
    assert heads == sum(len(r.trace.steps) + (r.finish_reason == "eos") for r in engine.results.values())


def test_traces_have_the_same_counters_as_solo(models, smol_tokenizer):
    rec, tok = models["middle_cycle"], smol_tokenizer
    engine = batched(rec, tok, PROMPTS[:2], [RandomExits(0.5, i) for i in range(2)], kv_mode="copy")
    trace = generate(rec, tok, PROMPTS[0], policy=RandomExits(0.5, 0), kv_mode="copy", max_new_tokens=10)
    mine = engine.results["r0"].trace
    a, b = mine.totals(), trace.totals()
    for key in ("tokens", "avg_depth", "flops_used", "flops_full", "kv_entries", "kv_entries_full"):
        assert a[key] == pytest.approx(b[key]), key
    again = GenerationTrace.from_dict(json.loads(json.dumps(mine.to_dict())))
    assert again.text == mine.text and again.settings["strategy"] == "cdb"


def test_bounds_and_bad_requests_are_refused_clearly(models, smol_tokenizer):
    rec, tok = models["cycle"], smol_tokenizer
    engine = BatchEngine(rec, tok, max_requests=2, max_batch_tokens=8, prefill_chunk=5, max_queue=2)
    ids = encode_prompt(tok, PROMPTS[6])
    for bad in (Request([], 4), Request(ids, 0), Request(ids, 600), Request([10**7], 4),
                Request(ids, 4, sampling=Sampling(temperature=-1.0)), Request(ids, 4, kv_mode="teleport")):
        with pytest.raises(EngineInputError):
            engine.submit(bad)
    for bad_kw in (dict(strategy="magic"), dict(max_requests=0), dict(max_requests=8, max_batch_tokens=4)):
        with pytest.raises(EngineInputError):
            BatchEngine(rec, tok, **bad_kw)
    engine.submit(Request(ids, 4))
    engine.submit(Request(ids, 4))
    with pytest.raises(EngineFullError, match="queue is full"):
        engine.submit(Request(ids, 4))
    engine.run()
    assert all(row.batch_tokens <= 8 for row in engine.log)  # no catch-up rows at full depth
    assert max(i.tokens for row in engine.log for i in row.items if i.kind == "prefill") <= 5


def test_cancel_stops_one_request_and_leaves_the_others_exact(models, smol_tokenizer):
    rec, tok = models["cycle"], smol_tokenizer
    engine = BatchEngine(rec, tok, max_requests=3)
    for i in range(3):
        engine.submit(Request(encode_prompt(tok, PROMPTS[i]), 10, RandomExits(0.5, i), request_id=f"r{i}"))
    for _ in range(12):
        engine.step()
    assert engine.cancel("r1") and not engine.cancel("nope")
    engine.run()
    assert engine.results["r1"].finish_reason == "cancelled" and len(engine.results["r1"].token_ids) < 10
    for i in (0, 2):
        assert got(engine, i) == solo(rec, tok, PROMPTS[i], RandomExits(0.5, i))


def test_worker_thread_serves_concurrent_streams_unmixed(models, smol_tokenizer):
    rec, tok = models["cycle"], smol_tokenizer
    worker = EngineWorker(BatchEngine(rec, tok, max_requests=4, max_queue=16)).start()
    outputs: dict[int, list[int]] = {}

    def client(i):
        events = worker.stream(Request(encode_prompt(tok, PROMPTS[i % 7]), 6, RandomExits(0.5, i)), timeout=60)
        outputs[i] = [e.step.token_id for e in events if e.step is not None]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    worker.stop()
    for i in range(8):
        ref, _ = solo(rec, tok, PROMPTS[i % 7], RandomExits(0.5, i), n=6)
        assert outputs[i] == [t for t, _ in ref]


def test_real_default_conversion_batched_equals_solo(smol):
    """The project's default conversion of SmolLM2-135M (3 loops, LoRA rank 64): 3 requests, 8 tokens."""
    base, tok = smol
    rec = recursify(base, num_loops=3, lora_rank=64)
    prompts = ["The capital of France is", "Write a haiku about the sea.", "1, 2, 3, 4,"]
    for kv_mode in ("sync", "copy"):
        engine = batched(rec, tok, prompts, [RandomExits(0.5, i) for i in range(3)], kv_mode, n=8,
                         max_requests=3, prefill_chunk=4)
        for i, prompt in enumerate(prompts):
            assert got(engine, i) == solo(rec, tok, prompt, RandomExits(0.5, i), kv_mode, n=8), (kv_mode, i)


def test_strategies_are_listed():
    assert set(STRATEGIES) == {"cdb", "ee_sequence", "csb", "static"}


@pytest.mark.parametrize("rank", [8, "full"])
def test_grouped_lora_equals_one_matmul_pair_per_position(smol_tokenizer, rank):
    """A block call mixing loop positions gives the same outputs with grouped LoRA (one matmul pair
    over the positions' factors side by side) as with a matmul pair per position."""
    from model.inference.decoder import AdaptiveDecoder, Segment
    from model.serving import BlockRunner

    rec = recursify(tiny_llama(layers=6, vocab=len(smol_tokenizer)), num_loops=3, sharing="cycle", lora_rank=rank)
    decoders = [AdaptiveDecoder(rec, RandomExits(0.5, i)) for i in range(5)]
    for i, dec in enumerate(decoders):
        dec.prefill(list(range(3, 8 + i)))
    torch.manual_seed(0)
    outputs = {}
    for grouped in (False, True):
        runner = BlockRunner(rec, grouped_lora=grouped)
        segments = [Segment(torch.randn(1 + (i == 2), rec.config.hidden_size), list(range(dec.length, dec.length +
                            1 + (i == 2))), rec.config.loop_positions(1 + i % 3), dec.cache)
                    for i, dec in enumerate(decoders)]
        torch.manual_seed(1)
        segments = [Segment(torch.randn_like(s.hidden), s.token_positions, s.layer_positions, s.cache) for s in segments]
        outputs[grouped] = runner.run(segments)
        for dec, seg in zip(decoders, segments):  # undo the KV the call wrote
            for p in seg.layer_positions:
                dec.cache.layers[p].crop(-len(seg.token_positions))
    for a, b in zip(outputs[False], outputs[True]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_batched_tokens_carry_their_measured_time_by_component(models, smol_tokenizer):
    rec, tok = models["middle_cycle"], smol_tokenizer
    engine = batched(rec, tok, PROMPTS[:3], [RandomProbe(0.5, i) for i in range(3)], "sync", n=6, max_requests=3)
    steps = [s for r in engine.results.values() for s in r.trace.steps]
    assert steps and all(s.time_ms["block"] > 0 and s.time_ms["head"] > 0 and "sampling" in s.time_ms
                         for s in steps)  # the probe of the exit loop is the emitted path ("head")
    assert all(s.time_ms.get("decision", 0) > 0 for s in steps if s.depth > 1)  # earlier probes decided "go on"
    assert any(s.time_ms.get("catchup", 0) > 0 for s in steps)  # some rode along a catch-up coda
