"""The trained default: int8 round trip, a clear error without an artifact, and (when committed)
that it rebuilds offline and reproduces its recorded validation perplexity."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.io import default as D
from model.io.checkpoint import ModelLoadError

# the artifact's check rows, saved from the token cache: np.save(path, load_split("val", 512)[:2].numpy())
CHECK_ROWS = Path(__file__).parent / "data" / "default_check_rows.npy"


def test_int8_round_trip_is_close():
    g = torch.Generator().manual_seed(0)
    state = {"a.lora_A": torch.randn(8, 32, generator=g), "norm.weight": torch.rand(32, generator=g)}
    back = D.dequantize_state(D.quantize_state(state, {"a.lora_A"}))
    assert torch.equal(back["norm.weight"], state["norm.weight"])
    err = (back["a.lora_A"] - state["a.lora_A"]).abs().amax(1)  # per row: at most half a step
    assert (err <= state["a.lora_A"].abs().amax(1) / 254 + 1e-6).all()


def test_missing_artifact_raises_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no trained default artifact"):
        D.default_folder(tmp_path)


@pytest.mark.skipif(not (D.ARTIFACT_DIR / "weights.safetensors").exists(), reason="no default artifact committed")
def test_default_artifact_reproduces_recorded_validation_ppl():
    import numpy as np

    from model.io.checkpoint import load_model

    config = json.loads((D.ARTIFACT_DIR / "config.json").read_text())
    check = config["training"]["artifact"]
    assert check["bytes"] <= 50 * 2**20
    model, tokenizer = load_model("default")
    assert model.config.model_type == "recursive_llama" and tokenizer is not None
    counts = model.parameter_counts()
    assert counts["unique_non_embedding"] < counts["effective_non_embedding"]  # shares weights for real
    # the check rows (first rows of the val split) are committed, so this runs without the data cache
    rows = torch.from_numpy(np.load(CHECK_ROWS).astype(np.int64))
    assert rows.shape[0] == check["rows"]
    ppl = D.validation_ppl(model, ids=rows)
    assert ppl == pytest.approx(check["ppl_rebuilt"], rel=1e-3)



# --- a trained shared block: the low-rank delta export (--block-rank) ----------------------------------
from tests.test_train import tiny_run, uptrain_args  # noqa: E402,F401  (the tiny-run fixture: synthetic data splits)


def test_int4_round_trip_is_close_and_handles_odd_widths():
    g = torch.Generator().manual_seed(1)
    state = {"b": torch.randn(6, 5, generator=g), "a": torch.randn(3, 8, generator=g)}
    stored = D.quantize_state(state, set(), {"b", "a"})
    assert stored["b"].dtype == torch.uint8 and stored["b"].shape == (6, 3) and stored["a"].shape == (3, 4)
    back = D.dequantize_state(stored)
    assert set(back) == {"a", "b"}
    for key, value in state.items():  # per row: at most half a step of amax / 7
        assert back[key].shape == value.shape
        assert ((back[key] - value).abs().amax(1) <= value.abs().amax(1) / 14 + 1e-6).all()


def test_low_rank_delta_is_exact_at_full_rank_and_the_best_at_lower_rank():
    g = torch.Generator().manual_seed(2)
    delta = torch.randn(12, 7, generator=g)
    b, a = D.low_rank_delta(delta, 99)
    assert b.shape == (12, 7) and a.shape == (7, 7)
    torch.testing.assert_close(b @ a, delta, atol=1e-5, rtol=1e-5)
    b, a = D.low_rank_delta(delta, 2)
    s = torch.linalg.svdvals(delta)
    assert float(torch.linalg.norm(delta - b @ a)) == pytest.approx(float(s[2:].square().sum().sqrt()), rel=1e-4)


@pytest.fixture
def trained_block(tiny_run, monkeypatch):
    """A tiny run that trained everything (shared block, embeddings), and the logits of its checkpoint."""
    from model.io.checkpoint import load_model
    from model.training import train as T

    tmp, base = tiny_run
    monkeypatch.setenv("LAB_CACHE_DIR", str(tmp / "cache"))
    T.train(uptrain_args(base, tmp / "all", steps=2, extra=["--train", "all"]))
    trained = load_model(tmp / "all" / "checkpoint")[0]
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        return tmp, ids, trained(ids).logits


def test_a_trained_block_is_refused_without_block_rank(trained_block):
    tmp, _, _ = trained_block
    with pytest.raises(ValueError, match="--block-rank"):
        D.export_artifact(tmp / "all", tmp / "art")


@pytest.mark.parametrize("bits, tolerance", [(8, 0.02), (4, 0.3)])
def test_full_rank_block_delta_reproduces_the_trained_model(trained_block, bits, tolerance):
    from model.io.checkpoint import load_model

    tmp, ids, logits = trained_block
    check = D.export_artifact(tmp / "all", tmp / "art", int8=False, block_rank=64, block_bits=bits)
    delta = check["block_delta"]
    assert delta["tensors"] == 3 * 7 + 1 and delta["embedding"]  # 3 unique layers x 7 projections + the embedding
    assert delta["svd_relative_error"]["max"] < 1e-4 and check["bytes"] <= check["artifact_bytes"]
    rebuilt, _ = D.rebuild(tmp / "art")
    loaded = load_model(D.default_folder(tmp / "art"))[0]  # base + delta, through the cache like load_model("default")
    with torch.no_grad():
        got, via_cache = rebuilt(ids).logits, loaded(ids).logits
    torch.testing.assert_close(via_cache, got, atol=1e-5, rtol=1e-5)
    assert float((got - logits).abs().max()) < tolerance * float(logits.abs().max())
    assert check["ppl_rebuilt"] == pytest.approx(check["ppl_fp32"], rel=0.01 if bits == 8 else 0.1)


def test_block_delta_size_limit_refuses_and_accepts_by_size(trained_block):
    tmp, _, _ = trained_block
    small = D.export_artifact(tmp / "all", tmp / "small", int8=False, block_rank=1)
    full = D.export_artifact(tmp / "all", tmp / "full", int8=False, block_rank=64)
    assert small["artifact_bytes"] < full["artifact_bytes"]
    limit = (small["artifact_bytes"] + full["artifact_bytes"]) // 2
    with pytest.raises(ValueError, match="over the"):
        D.export_artifact(tmp / "all", tmp / "refused", int8=False, block_rank=64, max_bytes=limit)
    assert not (tmp / "refused" / "weights.safetensors").exists()
    ok = D.export_artifact(tmp / "all", tmp / "ok", int8=False, block_rank=1, max_bytes=limit)
    assert ok["artifact_bytes"] <= limit and ok["block_delta"]["svd_relative_error"]["mean"] > 0
