"""What the issue-13 GPU run adds to the teacher-answer generator (benchmarks/gpu_session.sh): the vectorised
sampler, the extended prompt pool, the prompt file, skipping committed answers and merging a run into the
committed copy; and the serving benchmark's closed loop. All on the CPU with hand-made data and tiny models."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from model import recursify
from model.data import DataError, Doc, split_of
from model.data import teacher_answers as TA
from model.data.answer_prompts import HELDOUT_NAME, Prompt, build_prompts, prompt_split, schedule
from model.data.answer_store import export, load_answers, read_chunks, run_folder
from model.data.teacher_answers import (
    BatchRowSampler, GenerationSettings, RowSampler, generate, load_prompts, merge, sample_top_p, sample_top_p_rows,
    save_prompts,
)


def doc_id_in(split: str, prefix: str, stem: str) -> str:
    return next(f"{prefix}/{stem}{n}" for n in range(10_000) if split_of(f"{prefix}/{stem}{n}") == split)


@pytest.fixture(scope="module")
def docs() -> list[Doc]:
    """Training documents of every extended-pool source, and held-out ones that say SECRET."""
    chat = Doc(doc_id_in("train", "chitchat", "c"), "chitchat", "What do you cook on Sundays?",
               "A: Hello there!\nB: hi, do you like to cook at home?\nA: yes\nB: What is your favorite dish?")
    secret = Doc(doc_id_in("heldout-chat", "chitchat", "h"), "chitchat", "SECRET title?",
                 "A: SECRET first turn\nB: is this a SECRET question too?")
    words = [Doc(doc_id_in("train", "gcide", f"w{i}-"), "gcide", w, f"{w} \\n.\\ a word") for i, w in
             enumerate(["Apple", "river", "kettle", "lantern", "meadow", "x1", "tea", "garden", "pebble", "window"] * 3)]
    jargon = Doc(doc_id_in("train", "jargon", "j"), "jargon", "hack", "hack\n\nA quick job that works.")
    fortune = Doc(doc_id_in("train", "fortunes", "f"), "fortunes", "art", "A penny saved is a penny earned.")
    long_fortune = Doc(doc_id_in("train", "fortunes", "g"), "fortunes", "art", "word " * 100)
    return [chat, secret, *words, jargon, fortune, long_fortune]


def test_batch_sampler_draws_what_the_row_sampler_draws():
    torch.manual_seed(0)
    scores = torch.randn(6, 300) * 3
    seeds = [None, 11, 12, None, 13, 14]
    row, batch = RowSampler(seeds, 0.7, 0.9), BatchRowSampler(seeds, 0.7, 0.9)
    for _ in range(5):  # several steps: each row's generator advances by one draw per step in both
        a, b = row(None, scores), batch(None, scores)
        assert torch.equal(a.argmax(-1), b.argmax(-1))
        assert torch.equal(a[[0, 3]], scores[[0, 3]]) and torch.equal(b[[0, 3]], scores[[0, 3]])  # greedy rows
    draws = torch.rand(4, dtype=torch.float64)
    logits = torch.randn(4, 50)
    rows = sample_top_p_rows(logits, 1.0, 0.8, draws)
    for i in range(4):  # the batched choice is the per-row choice with the same uniform
        gen = torch.Generator().manual_seed(i)
        u = torch.rand((), generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        assert int(sample_top_p_rows(logits[i:i + 1], 1.0, 0.8, u[None])[0]) == sample_top_p(logits[i], 1.0, 0.8, gen)
        assert 0 <= int(rows[i]) < 50


def test_extended_pool_keeps_the_base_pool_first_and_never_uses_heldout_documents(docs):
    base = build_prompts(docs, seed=0)
    extended = build_prompts(docs, seed=0, pool="extended")
    assert extended[: len(base)] == base
    kinds = {p.kind for p in extended[len(base):]}
    assert kinds == {"chat", "define", "quote"}
    texts = [p.text for p in extended]
    assert "What do you cook on Sundays?" in texts and "What is your favorite dish?" in texts
    assert "hi, do you like to cook at home?" in texts and not any("SECRET" in t for t in texts)
    assert any("'hack'" in t for t in texts) and any("A penny saved" in t for t in texts)
    assert not any("word word" in t for t in texts)  # sayings over 280 characters are left out
    defined = [p for p in extended if p.kind == "define" and p.source == "gcide"]
    assert 0 < len(defined) < 27 and all("'x1'" not in p.text for p in defined)  # a seeded share of real words
    assert build_prompts(docs, seed=0, pool="extended") == extended
    with pytest.raises(ValueError):
        build_prompts(docs, pool="huge")


def test_prompt_file_round_trip_and_heldout_guard(docs, tmp_path, monkeypatch):
    pool = build_prompts(docs, seed=0, pool="extended")
    save_prompts(pool, tmp_path / "p.jsonl.xz")
    assert load_prompts(tmp_path / "p.jsonl.xz") == pool
    bad = [*pool, Prompt("leak", "chat", "chitchat", docs[1].id)]
    save_prompts(bad, tmp_path / "bad.jsonl")
    with pytest.raises(DataError):
        load_prompts(tmp_path / "bad.jsonl")


def test_gpu_style_generation_skips_committed_and_merges(docs, tiny_vocab_llama, smol_tokenizer, tmp_path,
                                                         monkeypatch, one_thread):
    monkeypatch.setenv("LAB_CACHE_DIR", str(tmp_path / "cache"))
    assets = tmp_path / "assets"
    pool = build_prompts(docs, seed=0, pool="extended")[:6]
    pool.append(next(Prompt(f"Tell me about number {n}.", "explain", "wiki-sample", doc_id_in("train", "wiki", "t")) for n in range(999)
                     if prompt_split(Prompt(f"Tell me about number {n}.", "x", "", "").key) == HELDOUT_NAME))
    kw = dict(seed=0, batch_size=3, chunk_size=4, settings=GenerationSettings(max_new_tokens=3), export_to=None,
              model=tiny_vocab_llama, tokenizer=smol_tokenizer, prompts=pool)
    generate("main", max_units=5, **kw)  # the "committed" copy: the held-out answer and four train ones
    export("main", assets)
    committed = {a.unit_key for a in read_chunks(run_folder("main"))}
    heldout_before = (assets / f"{HELDOUT_NAME}.jsonl").read_bytes()
    monkeypatch.setattr(TA, "ASSET_FOLDER", assets)
    generate("gpu", splits=["train"], skip_committed=True, pool="extended", **kw)
    new = read_chunks(run_folder("gpu"))
    train_units = {u.key for u in schedule(pool) if u.prompt.split == "train"}
    assert {a.unit_key for a in new} == train_units - committed and all(a.split == "train" for a in new)
    settings = json.loads((run_folder("gpu") / "run.json").read_text())
    assert settings["pool"] == "extended" and "precision" not in settings  # CPU float32: as before
    manifest = merge("gpu")
    train = load_answers("train", assets)
    assert {a.unit_key for a in train} == train_units and len(train) == len(train_units)
    assert (assets / f"{HELDOUT_NAME}.jsonl").read_bytes() == heldout_before
    assert manifest["merged"][0]["run"] == "gpu" and manifest["merged"][0]["records"] == len(new)
    assert manifest["splits"]["train"]["records"] == len(train_units)
    merge("gpu")  # again: nothing new, nothing doubled
    assert len(load_answers("train", assets)) == len(train_units)


def test_serving_closed_loop_keeps_at_most_c_requests_in_flight(smol_tokenizer, one_thread):
    from tests.conftest import tiny_llama

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import serving

    model = recursify(tiny_llama(layers=6, vocab=len(smol_tokenizer)), num_loops=2, sharing="middle_cycle", lora_rank=8)
    tokenizer = smol_tokenizer
    items = [serving.WorkloadItem(tokenizer("hello there", add_special_tokens=False).input_ids + [i % 7 + 10], 3)
             for i in range(7)]
    run = serving.run_closed_loop(model, items, 2, "cdb", tokenizer=tokenizer)
    assert run.metrics["requests"] == 7 and all(len(r.token_ids) >= 1 for r in run.results)
    finishes = sorted(r.finished_s for r in run.results)
    assert run.arrivals == sorted(run.arrivals)
    for k in range(2, 7):  # request k (the (k+1)-th) is submitted only once k - 1 of the earlier ones finished
        assert run.arrivals[k] >= finishes[k - 2] - 1e-9
    runs = serving.add_ratios({"csb": serving.run_closed_loop(model, items, 2, "csb", tokenizer=tokenizer),
                               "static": serving.run_closed_loop(model, items, 2, "static", tokenizer=tokenizer)})
    assert runs["csb"].metrics["agreement_with_full_depth"] == 1.0
    assert runs["static"].metrics["speedup_vs_static"] == 1.0
