"""The same exactness checks once on the real embedded SmolLM2-135M-Instruct (30 layers)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from model import load_model
from model import recursify
from model.inference.generation import generate
from model.inference.policies import Confidence, FixedDepth

PROMPT = "The capital of France is"


def test_embedded_model_loads_as_smollm2(smol):
    model, tok = smol
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert tok.eos_token == "<|im_end|>" and tok.chat_template


def test_no_sharing_reproduces_smollm2_logits_and_greedy_generation(smol):
    base, tok = smol
    ids = tok("Call me Ishmael. Some years ago, never mind how long precisely", return_tensors="pt").input_ids
    rec = recursify(base, num_loops=1)
    torch.testing.assert_close(rec(ids).logits, base(ids).logits, atol=1e-5, rtol=1e-5)
    trace = generate(rec, tok, PROMPT, policy=FixedDepth(1), max_new_tokens=16)
    pids = tok(PROMPT, return_tensors="pt").input_ids
    ref = base.generate(pids, max_new_tokens=16, do_sample=False)[0, pids.shape[1]:].tolist()
    assert [s.token_id for s in trace.steps] == ref[: len(trace.steps)]
    assert "Paris" in trace.text


def test_full_rank_relaxation_reproduces_smollm2(smol):
    base, tok = smol
    ids = tok("It is a truth universally acknowledged, that a single man", return_tensors="pt").input_ids
    rec = recursify(base, num_loops=2, sharing="middle_cycle", init="average", lora_rank="full")
    ref = base(ids).logits
    out = rec(ids).logits
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=1e-3)
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
    trace = generate(rec, tok, PROMPT, policy=FixedDepth(2), max_new_tokens=8)
    pids = tok(PROMPT, return_tensors="pt").input_ids
    want = base.generate(pids, max_new_tokens=8, do_sample=False)[0, pids.shape[1]:].tolist()
    assert [s.token_id for s in trace.steps] == want[: len(trace.steps)]


def test_the_issue_example_end_to_end(smol, tmp_path):
    base, tok = smol
    rec = recursify(base, num_loops=3, sharing="cycle", init="average", lora_rank=64, base_name="smollm2-135m")
    counts = rec.parameter_counts()
    assert counts["unique_non_embedding"] < counts["effective_non_embedding"]
    trace = generate(rec, tok, PROMPT, policy=Confidence(0.8), max_new_tokens=8)
    d = json.loads(json.dumps(trace.to_dict()))
    assert len(d["steps"]) == 8 and all(1 <= s["depth"] <= 3 for s in d["steps"])
    assert all(s["loops"][-1]["max_prob"] is not None for s in d["steps"])
    assert d["totals"]["flops_full"] > 0 and any("untrained" in n for n in d["notes"])
    rec.save_pretrained(tmp_path / "out")
    again, tok2 = load_model(tmp_path / "out")
    ids = tok("Hello", return_tensors="pt").input_ids
    torch.testing.assert_close(again(ids).logits, rec(ids).logits, atol=1e-3, rtol=1e-4)
    assert tok2.eos_token == tok.eos_token


@pytest.mark.timeout(1800)  # three model loads; a loaded 2-core machine took over 280 s for one
def test_cli_prints_depths_and_json():
    cmd = [sys.executable, "-m", "model.inference", "--prompt", PROMPT, "--loops", "3", "--lora-rank", "16",
           "--policy", "confidence", "--threshold", "0.5", "--max-new-tokens", "4"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    assert "average depth" in out.stdout and "[" in out.stdout
    out = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=900)
    data = json.loads(out.stdout)
    assert data["settings"]["threshold"] == 0.5 and len(data["steps"]) <= 4
    bad = subprocess.run(cmd[:-2] + ["--max-new-tokens", "0"], capture_output=True, text=True, timeout=900)
    assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr
