"""Evaluation metrics, sweeps and the report block on tiny random models."""
from __future__ import annotations

import pytest
import torch

from model.evaluation import evaluate as E
from model.conversion.recursify import recursify
from tests.conftest import tiny_llama


@pytest.fixture(scope="module")
def models():
    teacher = tiny_llama(layers=6)
    exact = recursify(teacher, num_loops=2, sharing="cycle", init="average", lora_rank="full")
    lossy = recursify(teacher, num_loops=2, sharing="cycle", init="average", lora_rank=2)
    return teacher, exact, lossy


def test_metrics_per_loop(models):
    teacher, exact, lossy = models
    rows = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(0))
    entries = [E.Entry("teacher", "teacher", teacher), E.Entry("exact", "x", exact), E.Entry("lossy", "y", lossy)]
    res = E.evaluate_set(entries, teacher, rows, batch_size=2)
    assert res["teacher"]["kl"][0] == pytest.approx(0.0, abs=1e-5) and res["teacher"]["agreement"] == [1.0]
    assert len(res["exact"]["ppl"]) == 2 and res["exact"]["agreement"][-1] == 1.0
    assert res["exact"]["ppl"][-1] == pytest.approx(res["teacher"]["ppl"][0], rel=1e-4)
    assert res["lossy"]["kl"][-1] > 1e-3 and res["teacher"]["tokens"] == 3 * 23


def test_sweeps_and_report(models, tmp_path):
    teacher, exact, _ = models
    rows = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    fams = E.sweeps(exact, rows)
    assert {"fixed", "confidence", "saturation"} <= set(fams)
    assert len(fams["fixed"]) == 2 and fams["fixed"][-1]["agreement"] == 1.0
    res = {"command": "python -m model.evaluation --model x", "device": "CPU", "tokens_per_set": 30,
           "wall_seconds": 1.0, "models": {"exact": {"params": E.unique_parameters(exact)}},
           "sets": {"heldout-a": E.evaluate_set([E.Entry("exact", "x", exact)], teacher, rows)},
           "sweeps": {"exact": fams}}
    text = E.markdown(res)
    assert "| exact |" in text and "heldout-a" in text
    doc = tmp_path / "RESULTS.md"
    doc.write_text("# R\n<!-- training:start -->\nintro\n<!-- training:end -->\nother\n")
    E.write_report(doc, text)
    E.write_report(doc, "second\n")  # replaces, does not duplicate
    out = doc.read_text()
    assert out.count(E.EVAL_START) == 1 and "second" in out and "intro" in out and out.endswith("other\n")


def test_evaluate_set_on_unpadded_sequences_counts_only_from_starts(models):
    teacher, exact, lossy = models
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 256, (n,), generator=g) for n in (9, 14)]
    entries = [E.Entry("lossy", "y", lossy)]
    res = E.evaluate_set(entries, teacher, seqs, starts=[4, 10])["lossy"]
    assert res["tokens"] == (9 - 4) + (14 - 10)
    whole = E.evaluate_set(entries, teacher, seqs)["lossy"]
    assert whole["tokens"] == 8 + 13
    assert E.evaluate_set(entries, teacher, seqs[0][None], batch_size=1)["lossy"] == \
        E.evaluate_set(entries, teacher, seqs[:1])["lossy"]  # one unpadded sequence = one row
    with pytest.raises(ValueError):
        E.evaluate_set(entries, teacher, seqs, starts=[1])


def test_batched_greedy_answers_equal_one_at_a_time(models):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import chat_eval

    teacher, _, lossy = models
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (3, 7, 5, 11)]
    for model in (teacher, lossy):
        batched = chat_eval.greedy_answers(model, prompts, 6, eos_id=2, batch_size=4)
        single = [chat_eval.greedy_answers(model, [p], 6, eos_id=2)[0] for p in prompts]
        assert batched == single and all(1 <= len(a) <= 6 for a in batched)
    assert chat_eval.prefix_match([5, 6, 2], [5, 6, 2]) and not chat_eval.prefix_match([5, 6, 2], [5, 6, 7, 2])
    assert chat_eval.prefix_match(list(range(20)), list(range(16)) + [99])
