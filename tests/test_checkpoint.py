"""Loading names, folders and bad checkpoints: one clear error type, a message that says what to do."""
from __future__ import annotations

import json

import pytest
import torch

from model import ModelLoadError, load_model, save_checkpoint
from model import recursify
from model.io.checkpoint import atomic_write_folder
from tests.conftest import tiny_llama


def test_project_checkpoint_round_trip_with_tokenizer(tmp_path, smol_tokenizer, tiny_vocab_llama):
    rec = recursify(tiny_vocab_llama, num_loops=3, lora_rank=4, base_name="smollm2-135m")
    rec.save_pretrained(tmp_path / "plain")  # no tokenizer saved: found through config.base_model
    again, tok = load_model(tmp_path / "plain")
    assert tok.vocab_size == smol_tokenizer.vocab_size
    ids = torch.randint(0, 1000, (1, 7))
    assert torch.equal(again(ids).logits, rec(ids).logits)
    save_checkpoint(rec, smol_tokenizer, tmp_path / "full")
    assert (tmp_path / "full" / "tokenizer.json").exists()


def test_plain_llama_folder_loads(tmp_path, smol_tokenizer):
    base = tiny_llama(vocab=len(smol_tokenizer))
    save_checkpoint(base, smol_tokenizer, tmp_path / "llama")
    model, _ = load_model(tmp_path / "llama")
    assert type(model).__name__ == "LlamaForCausalLM"


def test_bad_names_and_folders(tmp_path):
    with pytest.raises(ModelLoadError, match="no model called"):
        load_model("no-such-model-name")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="supports"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model(tmp_path)


def test_truncated_weights_are_reported_as_corrupt(tmp_path):
    rec = recursify(tiny_llama(), num_loops=2)
    rec.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_model(tmp_path)


def test_atomic_write_keeps_the_old_folder_when_writing_fails(tmp_path):
    target = tmp_path / "ckpt"
    atomic_write_folder(target, lambda d: (d / "a.txt").write_text("old"))

    def crash(d):
        (d / "a.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_folder(target, crash)
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary leftovers
