"""Analytical FLOP accounting, checked on a case worked out by hand."""
from __future__ import annotations

from model import recursify
from model.inference.compute import CostModel
from tests.conftest import tiny_llama


def test_costs_on_a_hand_worked_case():
    # d=4, f=8, 2 query heads and 1 KV head of size 2 (q width 4, kv width 2), vocab 10,
    # one layer position with a rank-1 LoRA on q_proj only.
    ranks = ({"q_proj": 1, "k_proj": 0, "v_proj": 0, "o_proj": 0, "gate_proj": 0, "up_proj": 0, "down_proj": 0},)
    cm = CostModel(d=4, f=8, heads=2, kv_heads=1, head_dim=2, vocab=10, lora_ranks=ranks)
    layer = cm.layer(0, context=3)
    assert layer["attn_proj"] == 2 * 4 * (4 + 2 + 2) + 2 * 4 * 4 == 96  # q,k,v then o
    assert layer["attn_context"] == 4 * 4 * 3 == 48  # QK^T and AV over 3 tokens
    assert layer["mlp"] == 3 * 2 * 4 * 8 == 192
    assert layer["lora"] == 2 * 1 * (4 + 4) == 16
    assert layer["norm"] == 2 * 4 * 4 == 32
    assert cm.head() == 4 * 4 + 2 * 4 * 10 == 96
    assert cm.kv_copy() == 4 * 4 + 2 * 2 * 4 * 2 == 48
    assert cm.full_token(3) == 96 + 48 + 192 + 16 + 32 + 96
    assert cm.kv_numbers_per_entry() == 4


def test_cost_model_reads_ranks_from_the_model():
    rec = recursify(tiny_llama(), num_loops=2, sharing="middle_cycle", lora_rank=3)
    cm = CostModel.from_model(rec)
    assert cm.lora_ranks[0]["q_proj"] == 0 and cm.lora_ranks[-1]["q_proj"] == 0  # prelude, coda: no LoRA
    assert cm.lora_ranks[1]["q_proj"] == 3
    assert cm.layer(1, 5)["lora"] > 0 == cm.layer(0, 5)["lora"]
