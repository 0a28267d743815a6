"""The teacher-answer generator: prompt builders, held-out split, storage, resume, batched exactness.

Prompt-builder tests run on small hand-made documents (a fresh clone has no corpus cache); one
extra test checks the real pool when the corpus has been built. Generation tests use a tiny random
Llama with SmolLM2's vocabulary, and the real teacher for the exactness check (8 new tokens).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model import data
from model.data import split
from model.data import DataError, Doc, split_of
from model.data.answer_prompts import HELDOUT_NAME, MODES, Prompt, build_prompts, chat_prompts, prompt_split, schedule
from model.data.answer_store import (
    Answer, chunk_names, conversation_ids, export, load_answers, packed_rows, read_chunks, read_record_set, run_folder,
    write_record_set,
)
from model.data.teacher_answers import (
    GenerationSettings, cut_at_eos, generate, generate_answers, render_prompt, sample_top_p,
)

KINDS = {"chat", "explain", "list", "compare", "how-to", "summarise", "continue", "poem-story", "facts",
         "continue-prose"}


def doc_id_in(split: str, prefix: str, stem: str) -> str:
    """The first ``<prefix>/<stem><n>`` whose split is ``split``."""
    return next(f"{prefix}/{stem}{n}" for n in range(10_000) if split_of(f"{prefix}/{stem}{n}") == split)


def wiki_doc(doc_id: str, topic: str) -> Doc:
    paragraph = (f"{topic} is a small thing studied by many people around the world. It has a long history "
                 f"and many uses in daily life. People who study {topic} write about its parts, its origins and "
                 "its effects on the places where it is found, and they argue about all of them. ")
    text = "\n".join([paragraph * 2, "History", paragraph, "Uses", paragraph * 2, "Culture", paragraph])
    return Doc(doc_id, "wiki-sample", doc_id.split("/", 1)[1], text)


@pytest.fixture(scope="module")
def docs() -> list[Doc]:
    """Train, validation and held-out documents of the three prompt sources; held-out ones say SECRET."""
    train_chat = [Doc(doc_id_in("train", "chitchat", f"c{i}-"), "chitchat", "t", f"A: {said}\nB: ok")
                  for i, said in enumerate(["Hello!", "Hello!", "What is your favorite food?", "Do you like dogs?"])]
    secret_chat = Doc(doc_id_in("heldout-chat", "chitchat", "h"), "chitchat", "t", "A: SECRET chat turn\nB: ok")
    val_chat = Doc(doc_id_in("val", "chitchat", "v"), "chitchat", "t", "A: SECRET validation turn\nB: ok")
    wiki = [wiki_doc(doc_id_in("train", "wiki", f"{t} "), t) for t in ("Volcano", "Glacier", "River")]
    secret_wiki = wiki_doc(doc_id_in("heldout-expository", "wiki", "Secretum "), "SECRET")
    speech = Doc(doc_id_in("train", "sotu", "1999_x_"), "sotu", "1999", wiki[0].text.replace("Volcano", "Union"))
    old_speech = Doc(doc_id_in("train", "sotu", "1801_x_"), "sotu", "1801", wiki[0].text.replace("Volcano", "OLD"))
    secret_speech = Doc(doc_id_in("heldout-speech", "sotu", "2000_x_"), "sotu", "2000", secret_wiki.text)
    return [*train_chat, secret_chat, val_chat, *wiki, secret_wiki, speech, old_speech, secret_speech]


# ---- prompts --------------------------------------------------------------------------------------


def test_prompts_are_deterministic_sourced_and_deduplicated(docs):
    pool = build_prompts(docs, seed=0)
    assert pool == build_prompts(docs, seed=0)
    assert pool != build_prompts(docs, seed=1)  # seeded choices (passages, headings, templates)
    assert len({p.key for p in pool}) == len(pool) == len({p.text for p in pool})
    assert [p.text for p in pool if p.kind == "chat"].count("Hello!") == 1
    assert {p.kind for p in pool} == KINDS
    by_id = {d.id: d for d in docs}
    for p in pool:
        assert p.doc_id in by_id and by_id[p.doc_id].source == p.source
    assert {p.source for p in pool if p.kind == "continue-prose"} == {"wiki-sample", "sotu"}


def test_prompts_never_touch_heldout_or_validation_documents(docs):
    pool = build_prompts(docs, seed=0)
    assert all(split_of(p.doc_id) == "train" for p in pool)
    assert not any("SECRET" in p.text or "OLD" in p.text for p in pool)  # held-out / val / pre-1945 speech
    leaked = Doc("austen/persuasion", "chitchat", "t", "A: hi there\nB: ok")  # held out by the committed list
    assert not list(chat_prompts([leaked]))


def test_build_prompts_refuses_a_committed_heldout_id(docs, monkeypatch):
    monkeypatch.setattr(split, "committed_heldout_ids", lambda: {docs[0].id})
    with pytest.raises(DataError):
        build_prompts(docs, seed=0)


def test_real_pool_when_the_corpus_is_built():
    try:
        corpus = [doc for source in ("chitchat", "wiki-sample", "sotu") for doc in data.read_docs(source)]
    except DataError:
        pytest.skip("corpus not built (python -m model.data prepare)")
    pool = build_prompts(corpus, seed=0)
    heldout_docs = {d.id for d in corpus if split_of(d.id, d.source) != "train"}
    assert not heldout_docs & {p.doc_id for p in pool}
    assert sum(p.split == HELDOUT_NAME for p in pool) >= 200
    assert {p.kind for p in pool} == KINDS


def test_heldout_split_is_a_stable_hash_of_the_prompt(docs):
    keys = [f"{n:016x}" for n in range(4000)]
    share = sum(prompt_split(k) == HELDOUT_NAME for k in keys) / len(keys)
    assert 0.03 < share < 0.07
    pool = build_prompts(docs, seed=0)
    assert all(p.split == prompt_split(p.key) for p in pool)
    units = schedule(pool, seed=0)
    heldout = [u for u in units if u.prompt.split == HELDOUT_NAME]
    assert units[: len(heldout)] == heldout and all(u.mode == "greedy" and u.seed is None for u in heldout)
    train = units[len(heldout):]
    assert all(u.prompt.split == "train" for u in train)
    assert len({u.key for u in units}) == len(units)
    assert {u.mode for u in train} == set(MODES) and all((u.seed is None) == (u.mode == "greedy") for u in train)


# ---- sampling, storage ----------------------------------------------------------------------------


def test_sample_top_p_stays_in_the_nucleus_and_follows_its_seed():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    draws = [sample_top_p(logits, 1.0, 0.75, torch.Generator().manual_seed(s)) for s in range(200)]
    assert set(draws) == {0, 1}  # 0.5 + 0.3 >= 0.75: the nucleus is the first two tokens
    again = [sample_top_p(logits, 1.0, 0.75, torch.Generator().manual_seed(s)) for s in range(200)]
    assert draws == again
    assert cut_at_eos([5, 6, 2, 7], 2) == ([5, 6, 2], True) and cut_at_eos([5, 6], 2) == ([5, 6], False)


def answer(key: str, prompt: list[int], reply: list[int], mode: str = "greedy", eos: bool = True) -> Answer:
    return Answer(key, prompt_split(key), "chat", "chitchat", "chitchat/x", mode, None if mode == "greedy" else 7,
                  eos, prompt, reply)


def test_record_set_round_trip(tmp_path):
    answers = [answer("a" * 16, [1, 49151, 3], [4, 2]), answer("b" * 16, [1], [0, 5, 6], "sampled", eos=False)]
    write_record_set(tmp_path, "set", answers)
    assert read_record_set(tmp_path, "set") == answers
    (tmp_path / "set.jsonl").write_text(json.dumps(answers[0].record()) + "\n")  # tokens of two, records of one
    with pytest.raises(DataError):
        read_record_set(tmp_path, "set")


# ---- generation: resume, export, loaders ------------------------------------------------------------


@pytest.fixture
def tiny_run(docs, tiny_vocab_llama, smol_tokenizer, tmp_path, monkeypatch, one_thread):
    """Run ``generate`` on the hand-made pool with a tiny model in a temporary cache."""
    monkeypatch.setenv("LAB_CACHE_DIR", str(tmp_path / "cache"))
    pool = [p for p in build_prompts(docs, seed=0) if p.kind in ("chat", "facts", "continue-prose")][:6]
    pool.append(next(Prompt(f"Tell me about number {n}.", "explain", "wiki-sample", docs[6].id) for n in range(999)
                     if prompt_split(Prompt(f"Tell me about number {n}.", "x", "", "").key) == HELDOUT_NAME))

    def run(name: str, **kwargs) -> list[Answer]:
        generate(name, seed=0, batch_size=3, chunk_size=4, settings=GenerationSettings(max_new_tokens=3),
                 export_to=None, model=tiny_vocab_llama, tokenizer=smol_tokenizer, prompts=pool, **kwargs)
        return read_chunks(run_folder(name))

    return run, pool


def test_resume_after_a_partial_chunk_neither_duplicates_nor_loses(tiny_run):
    run, pool = tiny_run
    whole = run("whole")
    assert len(whole) == len(schedule(pool)) == 13  # 1 held-out greedy + 6 train prompts x 2 modes
    assert [a.unit_key for a in whole] == [u.key for u in schedule(pool)]
    first = run("killed", max_units=5)
    assert len(first) == 5 and chunk_names(run_folder("killed")) == ["chunk-000000", "chunk-000001"]
    folder = run_folder("killed")
    (folder / "chunk-000002.u16.xz").write_bytes(b"half-written")  # killed before its records file
    (folder / ".chunk-000002.jsonl.tmp-1").write_text("{")
    resumed = run("killed")
    assert sorted(a.unit_key for a in resumed) == sorted(a.unit_key for a in whole)
    assert {a.unit_key: (a.answer_ids, a.seed) for a in resumed} == {a.unit_key: (a.answer_ids, a.seed) for a in whole}
    assert run("killed") == resumed  # nothing left to do


def test_export_and_loaders(tiny_run, tmp_path):
    run, _ = tiny_run
    answers = run("main")
    manifest = export("main", tmp_path / "assets")
    assert manifest["splits"][HELDOUT_NAME]["records"] == 1 and manifest["splits"]["train"]["records"] == 12
    assert manifest["teacher_fingerprint"] and manifest["settings"]["temperature"] == 0.7
    train = load_answers("train", tmp_path / "assets")
    heldout = load_answers(HELDOUT_NAME, tmp_path / "assets")
    assert not {a.key for a in train} & {a.key for a in heldout}
    assert sorted(a.unit_key for a in train + heldout) == sorted(a.unit_key for a in answers)
    assert len(load_answers("train", tmp_path / "assets", modes=("greedy",))) == 6
    rows = packed_rows("train", seq_len=16, seed=0, folder=tmp_path / "assets")
    assert rows.dtype == torch.long and rows.shape[1] == 16
    order = np.random.default_rng(0).permutation(len(train))
    stream = torch.cat([torch.tensor(conversation_ids(train[i]) + [2]) for i in order])
    assert torch.equal(rows.flatten(), stream[: rows.numel()])


# ---- exactness against transformers ------------------------------------------------------------------


def test_batched_left_padded_generation_equals_unbatched(smol, one_thread):
    model, tokenizer = smol
    prompts = [render_prompt(tokenizer, t) for t in ("What is the capital of France?", "hi", "Write a haiku.")]
    assert len({len(p) for p in prompts}) == 3  # different lengths: real left padding
    settings = GenerationSettings(max_new_tokens=8)
    eos = tokenizer.eos_token_id
    batched = generate_answers(model, prompts, [None, None, 1234], eos, settings)
    for prompt, (ids, reached) in zip(prompts[:2], batched[:2]):
        with torch.no_grad():
            plain = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8, pad_token_id=eos)
        assert (ids, reached) == cut_at_eos(plain[0, len(prompt):].tolist(), eos)
    assert batched[2] == generate_answers(model, prompts[2:], [1234], eos, settings)[0]  # seed, not batch
