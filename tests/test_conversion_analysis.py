"""The conversion report (model.conversion.analysis) on tiny random Llamas."""
from __future__ import annotations

import pytest
import torch

from model import recursify
from model.conversion.analysis import analyse, convert_steps, energy_curve, held_out_check, layer_map
from model.definition.config import PROJECTIONS
from tests.conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base():
    return tiny_llama(layers=6)


def test_full_rank_lora_reconstructs_every_projection(base):
    report = analyse(base, recursify(base, num_loops=3, lora_rank="full"))
    for pos in report["positions"]:
        assert max(pos["error"].values()) < 1e-5, pos
        assert all(abs(e - 1.0) < 1e-6 for e in pos["energy_at_rank"].values())


def test_error_decreases_with_rank(base):
    errors = []
    for rank in (0, 4, 16, 48):
        report = analyse(base, recursify(base, num_loops=3, lora_rank=rank))
        errors.append(sum(report["summary"]["mean_error"].values()))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 0.1  # pure sharing of random layers loses a lot


def test_energy_curve_is_monotone_and_ends_at_one(base):
    report = analyse(base, recursify(base, num_loops=2, lora_rank=8))
    assert report["ranks"][-1] >= 64  # up to the largest matrix side of the tiny model (128)
    for pos in report["positions"]:
        for name in PROJECTIONS:
            curve = pos["energy"][name]
            assert all(b >= a - 1e-12 for a, b in zip(curve, curve[1:])), curve
            assert abs(curve[-1] - 1.0) < 1e-9
    assert energy_curve(torch.tensor([3.0, 4.0]), [0, 1, 2, 5]) == [0.0, 9 / 25, 1.0, 1.0]
    assert energy_curve(torch.zeros(3), [1, 2]) == [1.0, 1.0]  # nothing to capture


def test_error_at_rank_matches_the_energy_left_out(base):
    """With SVD init, ||R - R_r||² = (1 - energy(r)) ||R||²: the two views agree."""
    rank = 4
    rec = recursify(base, num_loops=3, lora_rank=rank)
    report = analyse(base, rec)
    pos = report["positions"][2]
    layer, original = rec.model.layers[2], base.model.layers[report["layer_map"][2]["original"]]
    w = original.self_attn.q_proj.weight.detach().float()
    residual = w - layer.self_attn.q_proj.weight.detach().float()
    expected = (1 - pos["energy_at_rank"]["q_proj"]) ** 0.5 * torch.linalg.norm(residual) / torch.linalg.norm(w)
    assert pos["error"]["q_proj"] == pytest.approx(float(expected), rel=1e-3, abs=1e-6)


def test_parameter_counts_match_the_model(base):
    rec = recursify(base, num_loops=3, lora_rank=4)
    params = analyse(base, rec)["params"]
    assert params["unique"] == sum(p.numel() for p in rec.parameters())
    assert params["base"] == sum(p.numel() for p in base.parameters())
    assert params["lora"] == sum(p.numel() for n, p in rec.named_parameters() if "lora_" in n) > 0
    assert params["unique"] - params["lora"] < params["base"]  # sharing stores fewer layer weights
    assert params["effective"] == pytest.approx(params["base"], rel=0.01)  # same depth as the base


@pytest.mark.parametrize("sharing", ["cycle", "sequence", "middle_cycle"])
def test_layer_map(base, sharing):
    rec = recursify(base, num_loops=2, sharing=sharing, lora_rank=0)
    rows = layer_map(rec, len(base.model.layers))
    assert [r["unique"] for r in rows] == list(rec.config.layer_map)
    assert [r["position"] for r in rows] == list(range(rec.config.num_hidden_layers))
    looped = [r for r in rows if r["role"] == "loop"]
    assert {r["loop"] for r in looped} == {1, 2}
    if sharing == "middle_cycle":
        assert rows[0]["role"] == "prelude" and rows[-1]["role"] == "coda"
        assert rows[0]["original"] == 0 and rows[-1]["original"] == 5
    else:
        assert [r["original"] for r in rows] == list(range(6))
    with pytest.raises(ValueError):
        layer_map(rec, 3)  # too few base layers for this layout


def test_held_out_check_and_progress(base, smol_tokenizer):
    big = tiny_llama(layers=4, vocab=len(smol_tokenizer))
    exact = held_out_check(big, recursify(big, num_loops=2, lora_rank="full"), smol_tokenizer)
    assert exact["agreement"] == 1.0 and exact["ppl"] == pytest.approx(exact["base_ppl"], rel=1e-3)
    assert exact["tokens"] > 50 and len(exact["per_loop"]["ppl"]) == 2
    events = list(convert_steps(big, smol_tokenizer, num_loops=2, lora_rank=0))
    fractions = [e[1] for e in events]
    assert fractions == sorted(fractions) and events[-1][0] == "done"
    rec, report = events[-1][2]
    assert rec.config.num_loops == 2 and report["held_out"]["agreement"] < 1.0
    assert report["config"]["lora_rank"] == 0 and len(report["positions"]) == 4


def test_stepwise_lora_init_equals_recursify(base):
    """convert_steps sets the LoRA one position at a time: the same factors as recursify's own init."""
    *_, (kind, _, (stepped, report)) = convert_steps(base, None, num_loops=3, sharing="middle_cycle", lora_rank=4)
    direct = recursify(base, num_loops=3, sharing="middle_cycle", lora_rank=4)
    for (name, a), (_, b) in zip(stepped.state_dict().items(), direct.state_dict().items()):
        assert torch.equal(a, b), name
    assert "held_out" not in report


def test_activation_aware_init_lowers_the_output_error(smol_tokenizer):
    """``lora_init="asvd"`` reports output errors on the calibration text, lower than plain SVD's there."""
    from model.conversion.analysis import CALIBRATION_LEN, CALIBRATION_ROWS, position_analysis
    from model.conversion.asvd import calibrate, text_batches
    from model.data.answer_store import calibration_texts

    big = tiny_llama(layers=6, vocab=len(smol_tokenizer), seed=4)
    texts = calibration_texts(smol_tokenizer, count=24)
    assert len(texts) == 24 and all("<|im_start|>" in t for t in texts)  # chat conversations, decoded
    *_, (kind, _, (rec, report)) = list(convert_steps(big, smol_tokenizer, num_loops=3, lora_rank=4,
                                                      lora_init="asvd", calibration_texts=texts))
    assert kind == "done" and report["config"]["lora_init"] == "asvd"
    cov = calibrate(big, text_batches(smol_tokenizer, texts, CALIBRATION_ROWS, CALIBRATION_LEN))
    svd = recursify(big, num_loops=3, lora_rank=4)  # plain SVD factors, the same covariances
    svd_rows = [position_analysis(big, svd, row["position"], row["original"], [4], covariances=cov)
                for row in report["layer_map"]]
    for ours, plain in zip(report["positions"], svd_rows):
        for name in PROJECTIONS:
            assert ours["output_error"][name] <= plain["output_error"][name] + 1e-6, (ours["position"], name)
    mean = lambda rows: sum(sum(r["output_error"].values()) for r in rows) / len(rows)
    assert mean(report["positions"]) < 0.95 * mean(svd_rows)
    assert set(report["summary"]["mean_output_error"]) == set(PROJECTIONS)


def test_asvd_needs_calibration_text(base):
    with pytest.raises(ValueError, match="calibration"):
        list(convert_steps(base, None, num_loops=3, lora_rank=4, lora_init="asvd"))
    with pytest.raises(ValueError, match="lora_init"):
        list(convert_steps(base, None, num_loops=3, lora_rank=4, lora_init="pca"))
