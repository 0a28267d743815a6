"""The recursive model against transformers' LlamaForCausalLM as the reference (tiny random models)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from model import RecursiveForCausalLM
from model import recursify
from model.definition.lora import relative_error
from model.definition.modeling import projection_owner
from model.conversion.recursify import plan_layout, source_layers
from tests.conftest import tiny_llama

SCHEMES = ["cycle", "sequence", "middle_cycle"]


def test_one_loop_is_exactly_llama():
    base = tiny_llama()
    ids = torch.randint(0, 256, (2, 17))
    rec = recursify(base, num_loops=1)
    assert rec.config.num_unique_layers == 6
    assert torch.equal(rec(ids).logits, base(ids).logits)


@pytest.mark.parametrize("sharing", SCHEMES)
@pytest.mark.parametrize("init", ["stepwise", "average", "lower"])
def test_full_rank_lora_reproduces_the_original(sharing, init):
    base = tiny_llama()
    ids = torch.randint(0, 256, (2, 13))
    rec = recursify(base, num_loops=2, sharing=sharing, init=init, lora_rank="full")
    torch.testing.assert_close(rec(ids).logits, base(ids).logits, atol=2e-5, rtol=1e-4)


def test_without_lora_the_shared_model_differs():
    base = tiny_llama()
    ids = torch.randint(0, 256, (1, 9))
    rec = recursify(base, num_loops=2, lora_rank=0)
    assert (rec(ids).logits - base(ids).logits).abs().max() > 1e-2


def test_reconstruction_error_falls_monotonically_with_rank():
    base = tiny_llama()
    ids = torch.randint(0, 256, (2, 16))
    ref = base(ids).logits
    weight_errors, logit_errors = [], []
    for rank in [0, 1, 2, 4, 8, 16, 32, 64]:
        rec = recursify(base, num_loops=3, sharing="cycle", init="average", lora_rank=rank)
        errs = []
        for p, layer in enumerate(rec.model.layers):
            original = base.model.layers[p]
            for name in ("q_proj", "gate_proj", "down_proj"):
                lora = getattr(projection_owner(layer, name), name)
                errs.append(relative_error(getattr(projection_owner(original, name), name).weight,
                                           lora.effective_weight()))
        weight_errors.append(sum(errs) / len(errs))
        logit_errors.append(float((rec(ids).logits - ref).abs().mean()))
    assert all(a >= b - 1e-7 for a, b in zip(weight_errors, weight_errors[1:])), weight_errors
    assert weight_errors[-1] < 1e-5  # rank 64 = full rank for a 64-wide model
    assert logit_errors[-1] < logit_errors[0] / 100


def test_shared_weights_are_the_same_tensors_also_after_save_and_load(tmp_path):
    rec = recursify(tiny_llama(), num_loops=3, sharing="cycle", lora_rank=4)
    layers = rec.model.layers

    def ptr(model, p, name):
        return getattr(projection_owner(model.model.layers[p], name), name).weight.data_ptr()

    for name in ("q_proj", "down_proj"):
        assert ptr(rec, 0, name) == ptr(rec, 2, name) == ptr(rec, 4, name)
        assert ptr(rec, 0, name) != ptr(rec, 1, name)
    assert layers[0].input_layernorm.weight.data_ptr() != layers[2].input_layernorm.weight.data_ptr()

    rec.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(again, RecursiveForCausalLM)
    for name in ("q_proj", "down_proj"):
        assert ptr(again, 0, name) == ptr(again, 2, name) == ptr(again, 4, name)
    ids = torch.randint(0, 256, (1, 11))
    assert torch.equal(again(ids).logits, rec(ids).logits)
    # training one position's view trains every tied position: same tensor, one gradient
    again.model.layers[0].self_attn.q_proj(torch.ones(1, 64)).sum().backward()
    assert again.model.shared_layers[0].q_proj.weight.grad is not None

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    dense = [k for k in keys if k.endswith("_proj.weight")]
    assert len(dense) == 7 * 2  # two unique layers (6 layers / 3 loops), stored once
    assert all(k.startswith("model.shared_layers.") for k in dense)
    assert sum("lora_A" in k for k in keys) == 7 * 6  # one LoRA pair per position and projection


def test_layouts_follow_the_sharing_schemes():
    cycle = plan_layout(6, 2, "cycle")
    assert cycle.layer_map == [0, 1, 2, 0, 1, 2] and cycle.original_of_position == list(range(6))
    seq = plan_layout(6, 2, "sequence")
    assert seq.layer_map == [0, 0, 1, 1, 2, 2]
    mid = plan_layout(6, 2, "middle_cycle")
    assert mid.layer_map == [0, 1, 2, 1, 2, 3] and (mid.num_prelude, mid.num_coda) == (1, 1)
    odd = plan_layout(30, 4, "cycle")  # 30 is not divisible by 4: keep 28 evenly spread layers
    assert odd.block_size == 7 and len(odd.layer_map) == 28
    assert odd.original_of_position[0] == 0 and odd.original_of_position[-1] == 29
    smol = plan_layout(30, 2, "middle_cycle")
    assert smol.block_size == 14 and smol.layer_map[0] == 0 and smol.layer_map[-1] == 15
    with pytest.raises(ValueError):
        plan_layout(6, 7, "cycle")
    with pytest.raises(ValueError):
        plan_layout(6, 2, "spiral")


def test_initialisation_sources():
    layout = plan_layout(6, 2, "cycle")
    assert source_layers(layout, "average") == [[0, 3], [1, 4], [2, 5]]
    assert source_layers(layout, "lower") == [[0], [1], [2]]
    assert source_layers(layout, "stepwise") == [[0], [2], [5]]  # rounded linspace, fixed ends
    base = tiny_llama()
    rec = recursify(base, num_loops=2, init="average")
    expected = (base.model.layers[1].mlp.up_proj.weight + base.model.layers[4].mlp.up_proj.weight) / 2
    torch.testing.assert_close(rec.model.shared_layers[1].up_proj.weight, expected)


def test_parameter_counts():
    base = tiny_llama()
    n_base = sum(p.numel() for p in base.parameters())
    plain = recursify(base, num_loops=3, lora_rank=0).parameter_counts()
    assert plain["effective"] == n_base
    assert plain["unique"] < n_base
    per_layer = sum(p.numel() for p in base.model.layers[0].parameters()) - 2 * 64  # minus two norms
    assert plain["effective"] - plain["unique"] == per_layer * (6 - 2)
    relaxed = recursify(base, num_loops=3, lora_rank=4).parameter_counts()
    assert relaxed["lora"] == 6 * 4 * sum([64 + 64, 64 + 32, 64 + 32, 64 + 64, 64 + 128, 64 + 128, 128 + 64])
    assert relaxed["unique"] == plain["unique"] + relaxed["lora"]


def test_config_round_trips_and_rejects_bad_layouts(tmp_path):
    rec = recursify(tiny_llama(), num_loops=2, sharing="middle_cycle", lora_rank=2)
    rec.config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model_type"] == "recursive_llama" and data["layer_map"] == rec.config.layer_map
    with pytest.raises(ValueError):
        recursify(tiny_llama(), num_loops=2, lora_rank=-1)
    with pytest.raises(ValueError):
        recursify(tiny_llama(), num_loops=2, init="random")
