"""Tokenize, mix and pack documents into ``uint16`` rows per split (``<cache>/data/tokens/seq<L>``)."""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from model.errors import DataError
from model.paths import file_sha256
from model.data.formats import docs_path, read_docs
from model.data.sources import manifest_path, check_sources, tokens_dir
from model.data.split import assert_no_heldout, heldout_names, split_of, sync_heldout_ids, u

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Training mix (one epoch = one train.npy)
# --------------------------------------------------------------------------------------------

FICTION_SOURCES = ("austen", "mobydick", "shakespeare")
FICTION_WEIGHT = 1.5  # every fiction doc once, plus a seeded half of them again
SCRIPTURE_SOURCES = ("bible-web", "bible-kjv")  # one translation per book per epoch -> x0.5
GCIDE_SAMPLE = 0.25
CHAT_TEMPLATE_SHARE = 0.05  # share of train chitchat docs rendered with the chat template

DEFAULT_SEQ_LEN = 512
TOKEN_DTYPE = np.uint16

# --------------------------------------------------------------------------------------------
# 4. Tokenize and pack
# --------------------------------------------------------------------------------------------


@dataclass
class TokenizedSource:
    """All documents of one source as one flat token array; doc ``i`` is ``tokens[offsets[i]:offsets[i+1]]``."""

    ids: list[str]
    offsets: np.ndarray  # (n_docs + 1,) int64
    tokens: np.ndarray  # (n_tokens,) uint16

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]


def _encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added."""
    return tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash that changes when the tokenizer's behaviour does."""
    probe = "Call me Ishmael — “naïve” 1769, A: lol\nB: ½ ok"
    key = [len(tokenizer), tokenizer.eos_token_id, _encode(tokenizer, [probe])[0]]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def tokenize_source(tokenizer: Any, source: str, batch_docs: int = 512) -> TokenizedSource:
    """Tokenize a source's documents, cached in ``tokens/docs/<source>.npz`` per tokenizer and docs file."""
    path = tokens_dir() / "docs" / f"{source}.npz"
    key = f"{tokenizer_fingerprint(tokenizer)}:{file_sha256(docs_path(source))}"
    if path.exists():
        cached = np.load(path)
        if str(cached["key"]) == key:
            return TokenizedSource(str(cached["ids"]).split("\n"), cached["offsets"], cached["tokens"])
    docs = list(read_docs(source))
    pieces: list[np.ndarray] = []
    for start in tqdm(range(0, len(docs), batch_docs), desc=f"tokenize {source}", unit="batch", leave=False):
        for ids in _encode(tokenizer, [d.text for d in docs[start : start + batch_docs]]):
            pieces.append(np.asarray(ids, dtype=TOKEN_DTYPE))
    offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in pieces], out=offsets[1:])
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=TOKEN_DTYPE)
    path.parent.mkdir(exist_ok=True)
    ids = "\n".join(d.id for d in docs)  # one string: a fixed-width array of long ids would be huge
    np.savez(path.with_suffix(".tmp.npz"), ids=ids, offsets=offsets, tokens=tokens, key=key)
    path.with_suffix(".tmp.npz").rename(path)
    return TokenizedSource([d.id for d in docs], offsets, tokens)


def pack_documents(docs: Iterable[np.ndarray], eos_id: int, seq_len: int) -> np.ndarray:
    """Concatenate documents, each followed by ``eos_id``, into rows of ``seq_len``; the tail that
    does not fill a row is dropped. Returns ``(rows, seq_len)`` uint16."""
    eos = np.array([eos_id], dtype=TOKEN_DTYPE)
    pieces = [part for doc in docs for part in (np.asarray(doc, dtype=TOKEN_DTYPE), eos)]
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=TOKEN_DTYPE)
    rows = len(stream) // seq_len
    return stream[: rows * seq_len].reshape(rows, seq_len)


def chat_messages(text: str) -> list[dict[str, str]]:
    """``A:``/``B:`` lines -> alternating user/assistant messages for a chat template."""
    messages = []
    for line in text.split("\n"):
        speaker, _, said = line.partition(": ")
        role = "user" if speaker == "A" else "assistant"
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n" + said
        else:
            messages.append({"role": role, "content": said})
    return messages


@dataclass
class _Piece:
    """One document (or document copy) headed for a split's stream."""

    doc_id: str
    source: str
    tokens: np.ndarray


def _mix_draw(seed: int, what: str, doc_id: str) -> float:
    """A per-document uniform number for one seeded mixing decision (order-independent)."""
    return u(doc_id, salt=f"mix-v1:{seed}:{what}:")


def train_mix(tokenized: dict[str, TokenizedSource], tokenizer: Any, seed: int) -> list[_Piece]:
    """One epoch of the training stream (unshuffled): the weights of DATA.md section 4."""
    pieces: list[_Piece] = []
    chat_rendered: list[tuple[int, str]] = []  # (index in pieces, text to render)
    bibles = {s: dict(zip(t.ids, range(len(t.ids)))) for s, t in tokenized.items() if s in SCRIPTURE_SOURCES}
    for source, tok in tokenized.items():
        for i, doc_id in enumerate(tok.ids):
            if split_of(doc_id, source) != "train":
                continue
            copies = 1
            if source in FICTION_SOURCES:
                copies += int(_mix_draw(seed, "fiction", doc_id) < FICTION_WEIGHT - 1)
            elif source == "gcide":
                copies = int(_mix_draw(seed, "gcide", doc_id) < GCIDE_SAMPLE)
            elif source in SCRIPTURE_SOURCES:
                copies = int(_scripture_pick(seed, doc_id, bibles) == source)
            for _ in range(copies):
                if source == "chitchat" and _mix_draw(seed, "chat", doc_id) < CHAT_TEMPLATE_SHARE:
                    chat_rendered.append((len(pieces), doc_id))
                pieces.append(_Piece(doc_id, source, tok.doc(i)))
    _render_chat(pieces, chat_rendered, tokenizer)
    return pieces


def _scripture_pick(seed: int, doc_id: str, bibles: dict[str, dict[str, int]]) -> str | None:
    """Which translation of this book trains this epoch: one of those that have it, or (for a book
    only one translation has) that one half the time. Halves scripture without repeating content."""
    book = doc_id.split("/", 1)[1]
    having = [s for s in SCRIPTURE_SOURCES if f"{s}/{book}" in bibles.get(s, {})]
    draw = _mix_draw(seed, "scripture", book)
    if len(having) == 1:
        return having[0] if draw < 0.5 else None
    return having[int(draw * len(having))]


def _render_chat(pieces: list[_Piece], chosen: list[tuple[int, str]], tokenizer: Any) -> None:
    """Replace the chosen chitchat pieces by their chat-template rendering."""
    if not chosen:
        return
    texts = _chitchat_texts({doc_id for _, doc_id in chosen})
    rendered = [tokenizer.apply_chat_template(chat_messages(texts[doc_id]), tokenize=False) for _, doc_id in chosen]
    for (index, _), ids in zip(chosen, _encode(tokenizer, rendered)):
        pieces[index] = _Piece(pieces[index].doc_id, "chitchat-template", np.asarray(ids, dtype=TOKEN_DTYPE))


def _chitchat_texts(ids: set[str]) -> dict[str, str]:
    return {doc.id: doc.text for doc in read_docs("chitchat") if doc.id in ids}


def _shuffled(pieces: list[_Piece], seed: int) -> list[_Piece]:
    order = np.random.default_rng(seed).permutation(len(pieces))
    return [pieces[i] for i in order]


def _data_key(sources: Sequence[str]) -> str:
    """Hash of the raw-archive manifest and the extracted documents."""
    digest = hashlib.sha256(manifest_path().read_bytes() if manifest_path().exists() else b"")
    for source in sources:
        digest.update(f"{source}:{file_sha256(docs_path(source))}".encode())
    return digest.hexdigest()[:16]


def build_token_cache(
    tokenizer: Any,
    seq_len: int = DEFAULT_SEQ_LEN,
    seed: int = 0,
    sources: Iterable[str] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Tokenize the extracted documents and write packed ``uint16`` rows per split to
    ``tokens/seq<seq_len>/``: ``train.npy`` (one epoch of the seeded training mix), ``val.npy``,
    ``heldout-<name>.npy``, ``train.ids`` and ``meta.json``. Returns the meta dict."""
    sources = [s for s in check_sources(sources) if docs_path(s).exists()]
    if not sources:
        raise DataError("no extracted documents; run `python -m model.data prepare` first")
    if len(tokenizer) > np.iinfo(TOKEN_DTYPE).max + 1:
        raise DataError(f"vocabulary of {len(tokenizer)} does not fit {TOKEN_DTYPE.__name__}")
    out = tokens_dir(seq_len)
    build_key = f"{tokenizer_fingerprint(tokenizer)}:{_data_key(sources)}:{seed}"
    meta_path = out / "meta.json"
    if not force and meta_path.exists() and json.loads(meta_path.read_text()).get("build_key") == build_key:
        log.info("token cache %s is up to date", out)
        return json.loads(meta_path.read_text())

    tokenized = {s: tokenize_source(tokenizer, s) for s in tqdm(sources, desc="tokenize", unit="source")}
    streams: dict[str, list[_Piece]] = {"train": _shuffled(train_mix(tokenized, tokenizer, seed), seed), "val": []}
    for source, tok in tokenized.items():
        for i, doc_id in enumerate(tok.ids):
            split = split_of(doc_id, source)
            if split != "train":
                streams.setdefault(split, []).append(_Piece(doc_id, source, tok.doc(i)))
    streams["val"] = _shuffled(streams["val"], 0)  # mixed sources, independent of the train seed
    for name in heldout_names():
        streams[name] = sorted(streams.get(name, []), key=lambda p: p.doc_id)
    train_ids = sorted({p.doc_id for p in streams["train"]})
    assert_no_heldout(train_ids)
    assert_no_heldout(p.doc_id for p in streams["val"])
    sync_heldout_ids({name: [p.doc_id for p in streams[name]] for name in heldout_names()}, sources)

    meta: dict[str, Any] = {
        "seq_len": seq_len, "seed": seed, "eos_token_id": int(tokenizer.eos_token_id),
        "vocab_size": len(tokenizer), "tokenizer": tokenizer_fingerprint(tokenizer),
        "data_key": _data_key(sources), "build_key": build_key, "sources": sources, "splits": {},
    }
    for split, pieces in streams.items():
        rows = pack_documents((p.tokens for p in pieces), tokenizer.eos_token_id, seq_len)
        np.save(out / f"{split}.npy", rows)
        per_source: dict[str, int] = {}
        for p in pieces:
            per_source[p.source] = per_source.get(p.source, 0) + len(p.tokens)
        meta["splits"][split] = {
            "docs": len(pieces), "rows": len(rows), "tokens": int(rows.size), "by_source": per_source,
        }
    (out / "train.ids").write_text("".join(f"{i}\n" for i in train_ids), encoding="utf-8")
    meta_path.write_text(json.dumps(meta, indent=1))
    return meta
