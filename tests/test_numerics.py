"""Per-device numerics (model.inference.numerics): the measured choice, its cache, the trace header, the paths.

The suite runs with ``LAB_NUMERICS=fp32`` (conftest): these tests ask for a choice explicitly.
"""
from __future__ import annotations

import json

import pytest
import torch

from model import recursify
from model.inference import numerics
from model.inference.decoder import AdaptiveDecoder
from model.inference.generation import generate
from model.inference.policies import FixedDepth, Saturation
from model.inference.trace import TRACE_SCHEMA, GenerationTrace
from model.serving import BatchEngine, Request
from model.serving.runner import BlockRunner
from model.inference.decoder import Segment
from tests.conftest import tiny_llama

SMALL = {"threads": (1,), "reps": 1, "batch_rows": (2,), "prefill_tokens": 4, "context": 8}


@pytest.fixture(scope="module")
def rec():
    return recursify(tiny_llama(), num_loops=3, lora_rank=4)


@pytest.fixture(scope="module")
def smol_rec(smol_tokenizer):
    return recursify(tiny_llama(vocab=len(smol_tokenizer)), num_loops=3, lora_rank=4)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_the_choice_is_measured_once_and_round_trips_through_the_cache_file(rec, cache_dir):
    first = numerics.choose(rec, **SMALL)
    assert first.source == "measured" and first.threads == 1 and not first.compiled
    assert set(first.dtypes) == {"decode", "prefill", "batch2"}
    assert set(first.dtypes.values()) <= {"float32", "bfloat16"}
    assert {"decode/float32/t1", "decode/bfloat16/t1", "head/float32/t1", "batch2/bfloat16/t1"} <= set(first.ms)
    assert 0.0 <= first.agreement <= 1.0 and first.machine["device"] == "cpu"
    files = list((cache_dir / "numerics").glob("*.json"))
    assert [f.stem for f in files] == [first.key]
    again = numerics.choose(rec, **SMALL)
    assert again.source == "cache"
    assert {**again.to_dict(), "source": "measured"} == first.to_dict()
    assert numerics.NumericsChoice.from_dict(json.loads(files[0].read_text())).dtypes == first.dtypes


def test_the_decision_takes_the_cheaper_dtype_per_shape_with_a_margin_for_fp32():
    ms = {"decode/float32/t1": 10.0, "decode/bfloat16/t1": 9.9, "head/float32/t1": 4.0, "head/bfloat16/t1": 4.0,
          "prefill/float32/t1": 30.0, "prefill/bfloat16/t1": 10.0, "batch8/float32/t1": 20.0,
          "batch8/bfloat16/t1": 30.0}
    variants = [("float32", 1, False), ("bfloat16", 1, False)]
    shapes = ["decode", "head", "prefill", "batch8"]
    choice = numerics._decide(ms, shapes, variants, 2, 0.95, None, {}, 0.0, 0.05)
    assert choice.dtypes == {"decode": "float32", "prefill": "bfloat16", "batch8": "float32"}  # 1% is no win
    assert choice.dtype_for(1) == torch.float32 and choice.dtype_for(16) == torch.float32
    insane = numerics._decide(ms, shapes, variants, 2, 0.5, None, {}, 0.0, 0.05)  # bf16 changes the argmax
    assert set(insane.dtypes.values()) == {"float32"}
    cpu = {**ms, "batch8/float32/t1": 20.0, "batch8/bfloat16/t1": 10.0}  # the CPU-time clock disagrees
    on_cpu = numerics._decide(ms, shapes, variants, 2, 0.95, None, {"device": "cpu"}, 0.0, 0.05, cpu)
    assert on_cpu.dtypes["batch8"] == "bfloat16" and on_cpu.cpu_ms == cpu  # at 1 thread on a CPU: CPU time
    mixed = numerics.NumericsChoice({"decode": "float32", "batch8": "bfloat16", "batch32": "float32"}, 1)
    assert mixed.dtype_for(8) == torch.float32  # an engine runs bf16 only if it won at every batch shape
    assert numerics.NumericsChoice({"decode": "float32", "batch8": "bfloat16"}, 1).dtype_for(8) == torch.bfloat16


def test_forcing_fp32_is_todays_path_bit_for_bit(smol_rec, smol_tokenizer):
    rec = smol_rec
    trace = generate(rec, smol_tokenizer, "Hello there", policy=Saturation(0.9), max_new_tokens=8,
                     kv_mode="copy", numerics="fp32")
    dec = AdaptiveDecoder(rec, Saturation(0.9), "copy")  # today's path, by hand: no numerics involved
    ids = smol_tokenizer("Hello there").input_ids
    dec.prefill(ids[:-1])
    tokens = []
    for _ in range(len(trace.steps)):
        tokens.append(int(dec.step(ids[-1]).logits.argmax()))
        ids.append(tokens[-1])
    assert tokens == [s.token_id for s in trace.steps]
    assert trace.numerics["dtype"] == "float32" and trace.numerics["source"] == "forced"


def test_a_bf16_choice_still_decodes_solo_and_batched_and_leaves_the_model_alone(smol_rec, smol_tokenizer):
    rec = smol_rec
    choice = numerics.NumericsChoice({"decode": "bfloat16", "batch8": "bfloat16"}, threads=1)
    trace = generate(rec, smol_tokenizer, "Hello there", policy=Saturation(0.9), max_new_tokens=6,
                     kv_mode="sync", numerics=choice)
    assert len(trace.steps) >= 1 and trace.numerics["dtype"] == "bfloat16" and trace.numerics["path"] == "solo"
    assert trace.model["kv_bytes_per_entry"] > 0
    engine = BatchEngine(rec, smol_tokenizer, numerics=choice)
    rid = engine.submit(Request(prompt_ids=smol_tokenizer("Hello there").input_ids, max_new_tokens=4,
                                policy=FixedDepth(3)))
    result = engine.run()[rid]
    assert result.finish_reason in ("length", "eos") and result.trace.numerics["path"] == "engine"
    assert engine.model.dtype == torch.bfloat16 and rec.dtype == torch.float32  # a copy; the caller's is fp32
    assert engine.model is numerics.model_in(rec, torch.bfloat16)  # one copy, kept
    rope = engine.model.model.rotary_emb.inv_freq
    assert rope.dtype == torch.float32  # RoPE frequencies are not rounded to bf16


def test_the_trace_header_records_the_choice_and_old_traces_still_load(smol_rec, smol_tokenizer):
    rec = smol_rec
    trace = generate(rec, smol_tokenizer, "Hi", max_new_tokens=3, numerics="fp32")
    data = json.loads(json.dumps(trace.to_dict()))
    assert data["schema"] == TRACE_SCHEMA == 2 and data["numerics"]["dtype"] == "float32"
    assert GenerationTrace.from_dict(data).numerics == trace.numerics
    old = {k: v for k, v in data.items() if k not in ("numerics", "schema")}  # written before schema 2
    assert GenerationTrace.from_dict({**old, "schema": 1}).numerics == {}
    assert GenerationTrace.from_dict(old).steps == trace.steps


def test_the_environment_variable_forces_a_mode(rec, monkeypatch):
    monkeypatch.setenv(numerics.ENV, "bf16")
    assert numerics.resolve(rec).dtype_for(1) == torch.bfloat16
    monkeypatch.setenv(numerics.ENV, "fp32")
    assert numerics.resolve(rec).dtype_for(32) == torch.float32
    assert numerics.resolve(numerics.model_in(rec, torch.bfloat16)) is None  # not fp32: runs as given
    monkeypatch.setenv(numerics.ENV, "fast")
    with pytest.raises(ValueError, match="numerics must be one of"):
        numerics.resolve(rec)


def test_the_compiled_block_runner_matches_the_eager_one(rec):
    torch.manual_seed(0)
    from transformers.cache_utils import DynamicCache

    outs = []
    for compiled in (False, True):
        runner = BlockRunner(rec, compile=compiled)
        caches = [DynamicCache(), DynamicCache()]
        result = []
        for length in (5, 1, 1):  # a chunk, then single tokens: varying row counts and cache sizes
            start = caches[0].get_seq_length(rec.config.loop_positions(1)[0])
            x = torch.randn(length, rec.config.hidden_size, generator=torch.Generator().manual_seed(length + start))
            segs = [Segment(x, list(range(start, start + length)), rec.config.loop_positions(1), c) for c in caches]
            result += runner.run(segs)
        outs.append(result)
    for eager, compiled in zip(*outs):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
