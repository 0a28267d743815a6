"""Adaptive generation: exactness of the KV modes, policies, sampling, traces (tiny models)."""
from __future__ import annotations

import json

import pytest
import torch

from model import EngineInputError, GenerationTrace, stream
from model import generate
from model import recursify
from model.inference.decoder import AdaptiveDecoder
from model.inference.policies import Confidence, FixedDepth, Saturation, make_policy
from tests.conftest import RandomExits, tiny_llama


def full_forward_cache(rec, ids):
    return rec.model(input_ids=torch.tensor([ids]), use_cache=True)[2]


def decode_with(rec, ids, policy, kv_mode, prompt_len=5):
    dec = AdaptiveDecoder(rec, policy, kv_mode=kv_mode)
    dec.prefill(ids[:prompt_len])
    results = [dec.step(t) for t in ids[prompt_len:]]
    return dec, results


@pytest.mark.parametrize("sharing", ["cycle", "middle_cycle", "sequence"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sync_mode_cache_equals_a_full_depth_forward(sharing, seed):
    rec = recursify(tiny_llama(layers=6), num_loops=3 if sharing != "middle_cycle" else 2,
                    sharing=sharing, lora_rank=8)
    ids = torch.randint(0, 256, (24,), generator=torch.Generator().manual_seed(seed)).tolist()
    dec, results = decode_with(rec, ids, RandomExits(0.5, seed), "sync")
    depths = [r.depth for r in results]
    assert min(depths) < rec.config.num_loops and max(depths) == rec.config.num_loops  # mixed depths
    assert sum(r.caught_up for r in results) > 0
    dec.flush()
    ref = full_forward_cache(rec, ids)
    for p in range(rec.config.num_hidden_layers):
        torch.testing.assert_close(dec.cache.layers[p].keys, ref.layers[p].keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(dec.cache.layers[p].values, ref.layers[p].values, atol=1e-5, rtol=1e-4)


def test_sync_mode_emits_the_exit_depth_prediction_and_full_depth_tokens_match_full_forward():
    rec = recursify(tiny_llama(), num_loops=3, lora_rank=8)
    ids = torch.randint(0, 256, (20,)).tolist()
    _, results = decode_with(rec, ids, RandomExits(0.5, 3), "sync")
    ref = rec(torch.tensor([ids])).logits[0]
    for i, r in enumerate(results):
        if r.depth == 3:  # a full-depth token sees exact KV of every earlier token, exited or not
            torch.testing.assert_close(r.logits, ref[5 + i], atol=1e-4, rtol=1e-4)
    shallow = rec(torch.tensor([ids]), num_loops=1).logits[0]
    first = results[0]  # before any exit, a depth-1 token equals the uniform depth-1 forward
    if first.depth == 1:
        torch.testing.assert_close(first.logits, shallow[5], atol=1e-4, rtol=1e-4)


def test_copy_mode_fills_every_layer_but_approximately():
    rec = recursify(tiny_llama(), num_loops=3, lora_rank=8)
    ids = torch.randint(0, 256, (20,)).tolist()
    dec, results = decode_with(rec, ids, RandomExits(0.6, 4), "copy")
    held, full = dec.kv_entries()
    assert held == full  # state copying writes every skipped position at once
    ref = full_forward_cache(rec, ids)
    last_loop = rec.config.loop_positions(3)[0]
    assert not torch.allclose(dec.cache.layers[last_loop].keys, ref.layers[last_loop].keys, atol=1e-3)
    assert sum(r.flops.get("kv_copy", 0) for r in results) > 0


def test_full_depth_greedy_equals_llama_generate(smol_tokenizer, tiny_vocab_llama):
    base = tiny_vocab_llama
    rec = recursify(base, num_loops=2, sharing="middle_cycle", lora_rank="full")
    prompt = "The capital of France is"
    trace = generate(rec, smol_tokenizer, prompt, policy=FixedDepth(2), max_new_tokens=12)
    ids = smol_tokenizer(prompt, return_tensors="pt").input_ids
    ref = base.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    got = [s.token_id for s in trace.steps]
    assert got == ref[: len(got)] and len(got) >= 1
    assert all(s.depth == 2 for s in trace.steps)


def test_policies_decide_as_documented():
    rec = recursify(tiny_llama(), num_loops=3, lora_rank=4)
    ids = torch.randint(0, 256, (12,)).tolist()
    for depth in (1, 2, 3):
        _, results = decode_with(rec, ids, FixedDepth(depth), "sync")
        assert {r.depth for r in results} == {depth}
    _, results = decode_with(rec, ids, Confidence(0.0), "sync")
    assert {r.depth for r in results} == {1}
    _, results = decode_with(rec, ids, Confidence(1.0, "top2_gap"), "sync")
    assert {r.depth for r in results} == {3}
    for r in results:
        assert all(l.top2_gap is not None and l.top_tokens and len(l.top_tokens) == 5 for l in r.loops)
        assert r.flops["decision"] > 0
    _, results = decode_with(rec, ids, Saturation(-1.0), "sync")
    assert {r.depth for r in results} == {1}
    assert all(r.loops[0].max_prob is None for r in results)  # saturation never pays for the LM head
    for bad in (lambda: Confidence(1.5), lambda: Confidence(0.5, "margin"), lambda: FixedDepth(0),
                lambda: make_policy("oracle")):
        with pytest.raises(ValueError):
            bad()


def test_confidence_signal_matches_the_softmax_of_the_exit_logits():
    rec = recursify(tiny_llama(), num_loops=2, lora_rank=4)
    ids = torch.randint(0, 256, (8,)).tolist()
    _, results = decode_with(rec, ids, Confidence(1.0), "sync")
    last = results[-1]
    probs = torch.softmax(last.logits, -1)
    assert last.loops[-1].max_prob == pytest.approx(float(probs.max()), rel=1e-5)


def test_stream_trace_and_json_round_trip(smol_tokenizer, tiny_vocab_llama):
    rec = recursify(tiny_vocab_llama, num_loops=3, lora_rank=4)
    s = stream(rec, smol_tokenizer, "Hello there", policy=Confidence(0.05), max_new_tokens=6, inspect=True)
    steps = list(s)
    assert steps == s.trace.steps and 1 <= len(steps) <= 6
    assert s.trace.finish_reason in ("length", "eos")
    d = json.loads(json.dumps(s.trace.to_dict()))
    again = GenerationTrace.from_dict(d)
    original, restored = s.trace.totals(), again.totals()
    assert restored.pop("depth_counts") == original.pop("depth_counts")
    assert restored == pytest.approx(original)
    assert again.text == s.trace.text and again.steps[0].loops[0].top_tokens == steps[0].loops[0].top_tokens
    totals = d["totals"]
    assert totals["tokens"] == len(steps)
    assert totals["avg_depth"] == pytest.approx(sum(st.depth for st in steps) / len(steps))
    assert d["model"]["parameters"]["unique"] < d["model"]["parameters"]["effective"] * 2


def test_fixed_depth_saves_block_flops_in_proportion():
    rec = recursify(tiny_llama(layers=6), num_loops=3, lora_rank=0)
    ids = torch.randint(0, 256, (10,)).tolist()
    _, one = decode_with(rec, ids, FixedDepth(1), "copy")
    _, three = decode_with(rec, ids, FixedDepth(3), "copy")
    mlp_one = sum(r.flops["mlp"] for r in one)
    mlp_three = sum(r.flops["mlp"] for r in three)
    assert mlp_one * 3 == pytest.approx(mlp_three)


def test_sampling_is_reproducible_with_a_seed(smol_tokenizer, tiny_vocab_llama):
    rec = recursify(tiny_vocab_llama, num_loops=2, lora_rank=4)
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.9, repetition_penalty=1.2)
    a = generate(rec, smol_tokenizer, "Once upon a time", seed=7, **kw)
    b = generate(rec, smol_tokenizer, "Once upon a time", seed=7, **kw)
    c = generate(rec, smol_tokenizer, "Once upon a time", seed=8, **kw)
    assert [s.token_id for s in a.steps] == [s.token_id for s in b.steps]
    assert [s.token_id for s in a.steps] != [s.token_id for s in c.steps]


def test_bad_input_raises_clear_errors(smol_tokenizer, tiny_vocab_llama):
    rec = recursify(tiny_vocab_llama, num_loops=2)
    cases = [dict(prompt="   "), dict(kv_mode="teleport"), dict(temperature=-1), dict(top_p=0),
             dict(max_new_tokens=0), dict(max_loops=5), dict(repetition_penalty=0.5)]
    for case in cases:
        kwargs = {"prompt": "hi", **case}
        with pytest.raises(EngineInputError):
            generate(rec, smol_tokenizer, kwargs.pop("prompt"), **kwargs)
    with pytest.raises(EngineInputError, match="at most"):
        generate(rec, smol_tokenizer, "word " * 600, max_new_tokens=4)


def test_cancelling_a_stream_stops_it(smol_tokenizer, tiny_vocab_llama):
    rec = recursify(tiny_vocab_llama, num_loops=2)
    s = stream(rec, smol_tokenizer, "Count with me", max_new_tokens=50)
    next(s)
    s.close()
    assert s.trace.finish_reason == "cancelled" and len(s.trace.steps) == 1
    with pytest.raises(StopIteration):
        next(s)


def test_halting_policy_uses_the_learned_head_without_an_lm_head():
    from model.inference.policies import Halting

    base = tiny_llama()
    rec = recursify(base, num_loops=3, lora_rank=4)
    ids = torch.randint(0, 256, (10,)).tolist()
    with pytest.raises(EngineInputError, match="halting heads"):
        AdaptiveDecoder(rec, Halting(0.5))
    rec.config.halting_hidden = 8
    from model import RecursiveForCausalLM

    with_heads = RecursiveForCausalLM(rec.config)
    with_heads.load_state_dict(rec.state_dict(), strict=False)
    torch.nn.init.constant_(with_heads.halting_heads[0].out.bias, 10.0)  # loop 1 says "stop" confidently
    _, results = decode_with(with_heads.eval(), ids, Halting(0.9), "sync")
    assert {r.depth for r in results} == {1}
    assert all(r.loops[0].max_prob is None and r.loops[0].signal > 0.9 for r in results)
    assert all(r.flops["decision"] > 0 for r in results)


def test_loop_logits_match_uniform_depth_forwards():
    rec = recursify(tiny_llama(), num_loops=2, sharing="middle_cycle", lora_rank=4)
    ids = torch.randint(0, 256, (2, 9))
    out = rec(ids, output_loop_logits=True)
    torch.testing.assert_close(out.loop_logits[0], rec(ids, num_loops=1).logits)
    torch.testing.assert_close(out.loop_logits[1], out.logits)


def test_kv_visibility_follows_the_kv_mode(smol_tokenizer, tiny_vocab_llama):
    rec = recursify(tiny_vocab_llama, num_loops=2, lora_rank=4)
    for mode, expect_gap in (("recursion", True), ("sync", False), ("share", False)):
        t = generate(rec, smol_tokenizer, "Hi", policy=FixedDepth(1), max_new_tokens=4, kv_mode=mode)
        loop2 = t.kv_visibility(2)
        assert all(v == 0 for row in loop2 for v in row)  # depth-1 queries never run loop 2
        loop1 = t.kv_visibility(1)
        assert loop1[3][:4] == [1, 1, 1, 1]
