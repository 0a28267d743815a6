"""The dashboard's plotly figures: what they draw and that nothing hides (built from traces, no browser)."""
from __future__ import annotations

from dashboard import plots
from model import generate
from model import recursify
from model.inference.policies import FixedDepth
from tests.conftest import tiny_llama


def test_the_full_depth_line_is_drawn_over_the_run(smol_tokenizer):
    rec = recursify(tiny_llama(vocab=len(smol_tokenizer)), num_loops=2, lora_rank=4)
    trace = generate(rec, smol_tokenizer, "Hi", policy=FixedDepth(2), max_new_tokens=4)  # full depth: equal lines
    fig = plots.cumulative_compute(trace)
    assert [t.name for t in fig.data] == ["this run (incl. decisions)", "full depth"]  # the last trace is on top
    assert fig.data[1].line.dash == "dash"


def test_compare_labels_have_room_at_the_top_and_the_sides():
    points = [{"saved_pct": 0.0, "agreement": 1.0, "label": "1: full depth"},
              {"saved_pct": 40.0, "agreement": 0.3, "label": "2: fixed depth 1"},
              {"saved_pct": -8.0, "agreement": 0.9, "label": "3: confidence (max_prob) ≥ 0.2"}]
    fig = plots.compare_chart(points)
    assert fig.layout.yaxis.range[1] > 1.15 and all(t.cliponaxis is False for t in fig.data)
    low, high = fig.layout.xaxis.range
    assert low < 60 - 4 and high > 108 + 4


def test_where_the_time_goes_sums_measured_components_beside_the_flops(smol_tokenizer):
    from model.inference.policies import Confidence

    rec = recursify(tiny_llama(vocab=len(smol_tokenizer)), num_loops=3, lora_rank=4)
    trace = generate(rec, smol_tokenizer, "Hi there", policy=Confidence(0.01), max_new_tokens=6, kv_mode="copy")
    assert all(s.time_ms.get("block", 0) > 0 and "head" in s.time_ms and "sampling" in s.time_ms
               for s in trace.steps)
    fig = plots.time_breakdown(trace)
    wall = [b for b in fig.data if b.y[0] == "wall-clock (measured)"]
    counted = [b for b in fig.data if b.y[0] == "FLOPs (counted)"]
    assert abs(sum(b.x[0] for b in wall) - 100) < 1e-6 and abs(sum(b.x[0] for b in counted) - 100) < 1e-6
    assert {b.name for b in wall} >= {"block loops", "exit decisions", "emitted head", "sampling + detokenisation"}
    colours = {b.name: b.marker.color for b in wall}
    assert all(b.marker.color == colours[b.name] for b in counted if b.name in colours)  # one colour per component


def test_time_components_follow_the_flop_ledger(smol_tokenizer):
    """A head run to exit is the emitted path ("head"), one run only to show the top-5 is "inspect", a
    probe that says "go on" is an exit decision: the wall-clock split mirrors the FLOP ledger's."""
    from model.inference.policies import Confidence, FixedDepth

    rec = recursify(tiny_llama(vocab=len(smol_tokenizer)), num_loops=3, lora_rank=4)
    at_once = generate(rec, smol_tokenizer, "Hi there", policy=Confidence(0.0), max_new_tokens=4)
    assert all(s.depth == 1 and s.time_ms["head"] > 0 and "decision" not in s.time_ms for s in at_once.steps)
    assert all(s.flops.get("decision", 0) < 0.1 * s.flops["head"] for s in at_once.steps)  # the softmax only
    shown = generate(rec, smol_tokenizer, "Hi there", policy=FixedDepth(3), max_new_tokens=4, inspect=True)
    assert all(s.time_ms["inspect"] > 0 and s.time_ms["head"] > 0 and s.inspected_flops > 0 for s in shown.steps)
    plain = generate(rec, smol_tokenizer, "Hi there", policy=FixedDepth(3), max_new_tokens=4)
    assert all("inspect" not in s.time_ms and s.inspected_flops == 0 for s in plain.steps)


def test_the_counters_say_what_each_kv_mode_saves(smol_tokenizer):
    """Sync spends the skipped loops later (latency, not FLOPs); copy never computes them (issue 13)."""
    from dashboard import render
    from model.inference.policies import Confidence

    rec = recursify(tiny_llama(vocab=len(smol_tokenizer)), num_loops=2, lora_rank=4)
    strips = {kv: render.counters(generate(rec, smol_tokenizer, "Hi", policy=Confidence(0.01), max_new_tokens=4,
                                           kv_mode=kv)) for kv in ("copy", "sync")}
    assert "FLOPs are not saved" in strips["sync"] and "latency" in strips["sync"]
    assert "never computed" in strips["copy"] and "FLOPs are not saved" not in strips["copy"]
