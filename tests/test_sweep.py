"""Teacher-forced sweeps replay the same policies the engine runs."""
from __future__ import annotations

import pytest
import torch

from model import recursify
from model.inference.decoder import AdaptiveDecoder
from model.inference.policies import Confidence, FixedDepth, Saturation
from model.evaluation.sweep import fixed_depth_points, forced_decode, replay, score_text, sweep


@pytest.fixture
def scored(smol_tokenizer, tiny_vocab_llama):
    rec = recursify(tiny_vocab_llama, num_loops=3, lora_rank=8)
    text = "It was the best of times, it was the worst of times, it was the age of wisdom."
    return rec, score_text(rec, smol_tokenizer, text), smol_tokenizer(text).input_ids


def test_replay_matches_the_engine_in_sync_mode(scored):
    rec, scores, ids = scored
    for policy in (Confidence(0.0005), Saturation(0.9), FixedDepth(2)):
        dec = AdaptiveDecoder(rec, policy, kv_mode="sync")
        dec.prefill(ids[:1])
        engine_depths = [dec.step(t).depth for t in ids[:-1][1:]]
        assert replay(scores, policy)[1:] == engine_depths


def test_full_depth_point_is_perfect_and_fixed_depth_saves_compute(scored):
    _, scores, _ = scored
    points = fixed_depth_points(scores)
    assert points[-1].agreement == 1.0 and points[-1].saved_pct == pytest.approx(0.0, abs=1e-9)
    assert points[0].flops_per_token < points[1].flops_per_token < points[2].flops_per_token
    conf = sweep(scores, "confidence", [0.0, 1.0])
    assert conf[0].avg_depth == 1 and conf[1].avg_depth == 3
    assert conf[1].flops_per_token > points[-1].flops_per_token  # deciding by softmax costs LM heads


def test_forced_decode_matches_the_uniform_forward_at_full_depth(scored):
    import torch

    rec, _, ids = scored
    ref = rec(torch.tensor([ids])).logits[0]
    point = forced_decode(rec, ids, FixedDepth(3), "sync", prefix=2, reference_logits=ref, teacher_logits=ref)
    assert point["agreement"] == 1.0 and point["kl"] == pytest.approx(0.0, abs=1e-4)
    assert point["avg_depth"] == 3 and point["saved_pct"] == pytest.approx(0.0, abs=1e-6)
    shallow = forced_decode(rec, ids, FixedDepth(1), "recursion", prefix=2, reference_logits=ref)
    assert shallow["saved_pct"] > 0 and shallow["kv_entries"] < shallow["kv_entries_full"]
