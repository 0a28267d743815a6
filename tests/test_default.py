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

