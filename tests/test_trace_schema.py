"""Trace files: a versioned schema, checked on load, so a replay is exact or refused with a reason."""
from __future__ import annotations

import json

import pytest

from model import TraceFormatError
from model import generate
from model import recursify
from model.inference.policies import Confidence
from model.inference.trace import TRACE_SCHEMA, GenerationTrace
from tests.conftest import tiny_llama


@pytest.fixture(scope="module")
def trace(smol_tokenizer):
    rec = recursify(tiny_llama(vocab=len(smol_tokenizer)), num_loops=3, lora_rank=4)
    return generate(rec, smol_tokenizer, "Hello there", policy=Confidence(0.01), max_new_tokens=5, inspect=True)


def test_a_trace_round_trips_with_its_schema(trace):
    data = json.loads(json.dumps(trace.to_dict()))
    assert data["schema"] == TRACE_SCHEMA
    again = GenerationTrace.from_json(json.dumps(data))
    assert again.to_dict() == trace.to_dict()
    legacy = {k: v for k, v in data.items() if k != "schema"}  # files written before the schema field
    assert GenerationTrace.from_dict(legacy).steps == trace.steps


@pytest.mark.parametrize("change,words", [
    (lambda d: [d], "JSON object"),
    (lambda d: {**d, "schema": 99}, "schema 99"),
    (lambda d: {**d, "steps": "many"}, "'steps'"),
    (lambda d: {k: v for k, v in d.items() if k != "prompt"}, "'prompt'"),
    (lambda d: {**d, "steps": [{**d["steps"][0], "loops": None}]}, "step 0"),
    (lambda d: {**d, "steps": [d["steps"][0], {**d["steps"][1], "depth": "deep"}]}, "step 1"),
    (lambda d: {**d, "steps": [{k: v for k, v in d["steps"][0].items() if k != "token_id"}]}, "step 0"),
])
def test_a_file_that_is_no_trace_is_refused_with_a_reason(trace, change, words):
    data = json.loads(json.dumps(trace.to_dict()))
    with pytest.raises(TraceFormatError, match=words):
        GenerationTrace.from_dict(change(data))


def test_not_json_is_refused(trace):
    with pytest.raises(TraceFormatError, match="not JSON"):
        GenerationTrace.from_json(b"\xff{")
