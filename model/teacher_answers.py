"""The teacher's own chat answers: prompts from training documents, batched generation, storage.

Sequence-level distillation data on the teacher's own distribution (issue 13, DATA.md section 6):

1. ``build_prompts(docs)``: user prompts, each with its kind, source and source document id, from
   training-split documents only (``assert_no_heldout`` on every doc id): first user turns of the
   chit-chat conversations; templates (explain, list, compare, how-to, summarise, continue,
   poem-story, facts) over wiki topics (titles, section headings, passages); continuations of
   modern prose (wiki paragraphs, State of the Union addresses since 1945). ``lee-news`` is left
   out: its licence allows evaluation only and all of it is ``heldout-news``.
   Deduplicated by a hash of the prompt text, deterministic given the seed.
2. ``prompt_split``: a prompt belongs to ``heldout-chat-answers`` (never trained on) when a hash of
   its text falls below ``HELDOUT_BELOW``; stable whatever else enters the pool.
3. ``generate_answers``: HF ``generate`` on the dequantised teacher, chat template, left padding,
   greedy and sampled rows in one batch (``RowSampler``: temperature/top-p with one generator per
   row, so a sampled answer depends only on its own seed, not on its batch).
4. Storage: a record set is ``<name>.jsonl`` (one record per line, in order) plus ``<name>.u16.xz``
   (each record's prompt ids then answer ids, uint16, xz-compressed). Chunks under
   ``<cache>/teacher-answers/<run>/`` are written atomically (tokens first, then the records file;
   a chunk exists once its records file does), so a killed run resumes without duplicates or
   losses. ``export`` copies all chunks into ``assets/teacher-answers/`` (the committed copy);
   ``generate`` refreshes it after every chunk unless ``--no-export``.
5. Loading for distillation: ``load_answers(split)`` and ``packed_rows(split, seq_len)``.

CLI::

    python -m model.teacher_answers prompts                     # the pool: counts per kind, samples
    python -m model.teacher_answers bench --batch-sizes 8,16,32 # answer tokens/s per batch size
    python -m model.teacher_answers generate --batch-size 16    # held-out greedy first, then train
    python -m model.teacher_answers export                      # chunks -> assets/teacher-answers/
    python -m model.teacher_answers stats                       # what the committed copy holds
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import lzma
import os
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from model.data import (
    TOKEN_DTYPE, DataError, Doc, assert_no_heldout, pack_documents, read_docs, split_of, tokenizer_fingerprint, u,
)
from model.paths import ASSETS_DIR, cache_dir

log = logging.getLogger(__name__)

HELDOUT_NAME = "heldout-chat-answers"
HELDOUT_SALT = "chat-answers-v1:"
HELDOUT_BELOW = 0.05  # share of prompts held out (by a hash of the prompt text)
SPLITS = ("train", HELDOUT_NAME)
MODES = ("greedy", "sampled")
PROMPT_SOURCES = ("chitchat", "wiki-sample", "sotu")
MODERN_SOTU_FROM = 1945  # State of the Union addresses from this year on count as modern prose
ASSET_FOLDER = ASSETS_DIR / "teacher-answers"
FORMAT = "teacher-answers-v1"


# --------------------------------------------------------------------------------------------
# 1. Prompts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """One user prompt and where it came from; ``key`` is the hash of its text (the dedup key)."""

    text: str
    kind: str
    source: str
    doc_id: str

    @property
    def key(self) -> str:
        return prompt_key(self.text)

    @property
    def split(self) -> str:
        return prompt_split(self.key)


def prompt_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def prompt_split(key: str) -> str:
    """``heldout-chat-answers`` or ``train`` for a prompt key; a pure function of the key."""
    return HELDOUT_NAME if u(key, salt=HELDOUT_SALT) < HELDOUT_BELOW else "train"


TOPIC_TEMPLATES: dict[str, tuple[str, ...]] = {
    "explain": ("What is {topic}?", "Explain {topic} in simple terms.", "Can you tell me about {topic}?",
                "Why is {topic} important?"),
    "list": ("List three facts about {topic}.", "Give me five key points about {topic}.",
             "What are the main things to know about {topic}?"),
    "how-to": ("How can I learn more about {topic}?", "How would you explain {topic} to a child?",
               "How do I write a short school report about {topic}?"),
    "poem-story": ("Write a short poem about {topic}.", "Write a short story that involves {topic}.",
                   "Write a haiku about {topic}."),
    "facts": ("Tell me a fun fact about {topic}.", "In one sentence, what is {topic}?",
              "Give me a quick fact about {topic}."),
}
SUBTOPIC_TEMPLATES: dict[str, tuple[str, ...]] = {
    "explain": ("What can you tell me about {topic}?", "Explain {topic} briefly."),
    "list": ("Give me three key facts about {topic}.",),
    "facts": ("Tell me something interesting about {topic}.",),
}
COMPARE_TEMPLATES = ("Compare {topic} and {other}.", "What is the difference between {topic} and {other}?")
SUMMARY_TEMPLATES = ("Summarize this passage in two sentences:\n\n{passage}",
                     "Give a one-sentence summary of the following text.\n\n{passage}",
                     "What is the main idea of this paragraph?\n\n{passage}")
TOPIC_CONTINUE_TEMPLATE = "Continue this paragraph about {topic}:\n\n{passage}"
PROSE_CONTINUE_TEMPLATES = ("Continue this text: {passage}", "Continue the following passage:\n\n{passage}",
                            "What might come next? Continue this text:\n\n{passage}")
STOPWORDS = frozenset("a an and are as at be by for from has in is it its of on or that the this to was were which "
                      "with also one two most many other been who".split())


def training_docs(docs: Iterable[Doc]) -> list[Doc]:
    """Only the documents of the ``train`` split (no validation, no held-out)."""
    return [doc for doc in docs if split_of(doc.id, doc.source) == "train"]


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s]


def leading_text(text: str, max_chars: int) -> str:
    """Whole sentences from the start of ``text``, at most ``max_chars`` (at least one sentence)."""
    kept: list[str] = []
    for sentence in sentences(text):
        if kept and len(" ".join([*kept, sentence])) > max_chars:
            break
        kept.append(sentence)
    return " ".join(kept)


def tidy(text: str) -> str:
    """Remove the debris of stripped wiki templates: empty brackets, ``(; ...``, doubled spaces."""
    text = re.sub(r"\(\s*[;,]?\s*\)", "", text)
    text = re.sub(r"\(\s*[;,]\s*", "(", text)
    return re.sub(r" {2,}", " ", re.sub(r" ([,.;:])", r"\1", text)).strip()


def paragraphs(doc: Doc, min_chars: int = 300) -> list[str]:
    """The document's prose paragraphs (lines of at least ``min_chars``), tidied."""
    return [tidy(line) for line in doc.text.split("\n") if len(line.strip()) >= min_chars]


def wiki_topic(title: str) -> str | None:
    """A topic phrase from a wiki title; None for disambiguation pages."""
    if "(disambiguation)" in title:
        return None
    topic = re.sub(r"\s*\([^)]*\)$", "", title)
    return topic[len("List of "):] if topic.startswith("List of ") else topic


def section_headings(doc: Doc) -> list[str]:
    """Headings of the cleaned wiki text: short unindented lines followed by a paragraph."""
    lines = doc.text.split("\n")
    found = []
    for line, after in zip(lines, lines[1:]):
        if (3 <= len(line) < 60 and line == line.strip() and line[0].isupper() and line[-1] not in ".,:;"
                and len(after) >= 200):
            found.append(line)
    return list(dict.fromkeys(found))


def mid_sentence_phrase(heading: str, text: str) -> str:
    """``heading`` as it reads mid-sentence: first letter lowered unless the word is a proper noun."""
    first = heading.split()[0]
    if first.isupper() or re.search(rf"[a-z,] {re.escape(first)}\b", text):
        return heading
    return heading[0].lower() + heading[1:]


def content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if w not in STOPWORDS and len(w) > 2}


def nearest_topic(doc: Doc, others: Sequence[Doc], rng: random.Random) -> Doc:
    """The other document whose first sentence shares most content words (ties: seeded choice)."""
    mine = content_words(leading_text(doc.text, 300))
    scored = [(len(mine & content_words(leading_text(o.text, 300))), rng.random(), o) for o in others if o.id != doc.id]
    return max(scored, key=lambda s: (s[0], s[1]))[2]


def doc_rng(seed: int, doc_id: str, what: str) -> random.Random:
    """A random generator for one seeded decision about one document (order-independent)."""
    return random.Random(f"{seed}:{what}:{doc_id}")


def chat_prompts(docs: Iterable[Doc], max_chars: int = 400) -> Iterator[Prompt]:
    """The first user turn (``A:`` line) of each chit-chat training conversation."""
    for doc in training_docs(docs):
        first = doc.text.split("\n", 1)[0]
        said = first[3:].strip() if first.startswith("A: ") else ""
        if re.search(r"[A-Za-z]", said) and len(said) <= max_chars:
            yield Prompt(said, "chat", doc.source, doc.id)


def topic_prompts(docs: Iterable[Doc], seed: int = 0, subtopics_per_doc: int = 6,
                  passages_per_doc: int = 3) -> Iterator[Prompt]:
    """Templated questions and instructions over each wiki training document's topic."""
    usable = [d for d in training_docs(docs) if wiki_topic(d.title)]
    for doc in usable:
        topic = wiki_topic(doc.title)
        for kind, templates in TOPIC_TEMPLATES.items():
            for template in templates:
                yield Prompt(template.format(topic=topic), kind, doc.source, doc.id)
        rng = doc_rng(seed, doc.id, "topic")
        other = wiki_topic(nearest_topic(doc, usable, rng).title)
        for template in COMPARE_TEMPLATES:
            yield Prompt(template.format(topic=topic, other=other), "compare", doc.source, doc.id)
        headings = section_headings(doc)
        for heading in rng.sample(headings, min(subtopics_per_doc, len(headings))):
            kind = rng.choice(sorted(SUBTOPIC_TEMPLATES))
            phrase = f"the {mid_sentence_phrase(heading, doc.text)} of {topic}"
            yield Prompt(rng.choice(SUBTOPIC_TEMPLATES[kind]).format(topic=phrase), kind, doc.source, doc.id)
        if len(headings) >= 2:
            a, b = rng.sample(headings, 2)
            yield Prompt(f"In {topic}, what is the difference between {mid_sentence_phrase(a, doc.text)} and "
                         f"{mid_sentence_phrase(b, doc.text)}?", "compare", doc.source, doc.id)
        found = paragraphs(doc)
        for passage in rng.sample(found, min(passages_per_doc, len(found))):
            yield Prompt(rng.choice(SUMMARY_TEMPLATES).format(passage=leading_text(passage, 700)), "summarise",
                         doc.source, doc.id)
        if found:
            yield Prompt(TOPIC_CONTINUE_TEMPLATE.format(topic=topic, passage=leading_text(found[0], 300)), "continue",
                         doc.source, doc.id)


def is_modern_prose(doc: Doc) -> bool:
    """Wiki articles and State of the Union addresses from ``MODERN_SOTU_FROM`` on."""
    if doc.source == "sotu":
        year = doc.id.split("/", 1)[1][:4]
        return year.isdigit() and int(year) >= MODERN_SOTU_FROM
    return doc.source == "wiki-sample"


def prose_prompts(docs: Iterable[Doc], seed: int = 0, passages_per_doc: int = 4) -> Iterator[Prompt]:
    """"Continue this text" over the opening sentences of paragraphs of modern training prose."""
    for doc in training_docs(docs):
        if not is_modern_prose(doc):
            continue
        rng = doc_rng(seed, doc.id, "prose")
        found = paragraphs(doc)
        for passage in rng.sample(found, min(passages_per_doc, len(found))):
            yield Prompt(rng.choice(PROSE_CONTINUE_TEMPLATES).format(passage=leading_text(passage, 350)),
                         "continue-prose", doc.source, doc.id)


def dedupe(prompts: Iterable[Prompt]) -> list[Prompt]:
    """First occurrence of each prompt text (by its hash)."""
    seen: dict[str, Prompt] = {}
    for p in prompts:
        seen.setdefault(p.key, p)
    return list(seen.values())


def build_prompts(docs: Iterable[Doc], seed: int = 0, passages_per_doc: int = 4) -> list[Prompt]:
    """The whole pool from ``docs`` (any sources; held-out and validation documents are skipped)."""
    docs = list(docs)
    pool = dedupe([*chat_prompts(d for d in docs if d.source == "chitchat"),
                   *topic_prompts((d for d in docs if d.source == "wiki-sample"), seed,
                                  passages_per_doc=max(1, passages_per_doc - 1)),
                   *prose_prompts(docs, seed, passages_per_doc)])
    assert_no_heldout({p.doc_id for p in pool})
    return pool


def corpus_docs() -> list[Doc]:
    """The extracted documents of the prompt sources (``python -m model.data prepare`` first)."""
    return [doc for source in PROMPT_SOURCES for doc in read_docs(source)]


# --------------------------------------------------------------------------------------------
# 2. The work list: (prompt, mode) units in generation order
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """One answer to generate: a prompt in one mode; ``seed`` drives a sampled answer (None: greedy)."""

    prompt: Prompt
    mode: str
    seed: int | None

    @property
    def key(self) -> str:
        return f"{self.prompt.key}:{self.mode}"


def sample_seed(run_seed: int, key: str) -> int:
    return int(hashlib.sha256(f"{run_seed}:{key}".encode()).hexdigest()[:8], 16)


def kind_group(prompt: Prompt) -> str:
    return {"chat": "chat", "continue-prose": "prose"}.get(prompt.kind, "topic")


def interleave_groups(prompts: Sequence[Prompt], seed: int) -> list[Prompt]:
    """Seeded shuffle within each group (chat / topic / prose), then round-robin across groups, so
    that any prefix of the schedule is a balanced mix."""
    groups: dict[str, list[Prompt]] = {}
    for p in sorted(prompts, key=lambda p: p.key):
        groups.setdefault(kind_group(p), []).append(p)
    rng = random.Random(f"schedule:{seed}")
    queues = [rng.sample(g, len(g)) for _, g in sorted(groups.items())]
    order = []
    for i in range(max((len(q) for q in queues), default=0)):
        order += [q[i] for q in queues if i < len(q)]
    return order


def schedule(prompts: Sequence[Prompt], seed: int = 0) -> list[Unit]:
    """Held-out prompts' greedy answers first, then each training prompt greedy and sampled."""
    heldout = [Unit(p, "greedy", None) for p in interleave_groups([p for p in prompts if p.split != "train"], seed)]
    train = [Unit(p, mode, sample_seed(seed, f"{p.key}:{mode}") if mode == "sampled" else None)
             for p in interleave_groups([p for p in prompts if p.split == "train"], seed) for mode in MODES]
    return heldout + train


# --------------------------------------------------------------------------------------------
# 3. Generation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.9


def render_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of one user turn in the chat template, ending with the assistant header."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             return_dict=True)
    return list(rendered["input_ids"])


def turn_end_ids(tokenizer: Any) -> list[int]:
    """What the chat template puts after an assistant message (``<|im_end|>\\n`` for SmolLM2)."""
    messages = [{"role": "user", "content": "x"}]
    head = render_prompt(tokenizer, "x")
    full = list(tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": "y"}],
                                              return_dict=True)["input_ids"])
    body = tokenizer("y", add_special_tokens=False)["input_ids"]
    assert full[: len(head)] == head and full[len(head): len(head) + len(body)] == body, "unexpected chat template"
    return full[len(head) + len(body):]


def sample_top_p(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token from ``softmax(logits / T)`` restricted to the top-p nucleus; one uniform draw."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, descending=True)
    cumulative = torch.cumsum(sorted_probs, dim=-1)
    keep = int((cumulative - sorted_probs < top_p).sum())  # smallest prefix with mass >= top_p
    kept = torch.cumsum(sorted_probs[:keep], dim=-1)
    draw = torch.rand((), generator=generator, dtype=torch.float64) * kept[-1]
    return int(order[min(int(torch.searchsorted(kept, draw, right=True)), keep - 1)])


class RowSampler(LogitsProcessor):
    """Turns each sampled row's scores into a one-hot choice drawn with that row's own generator;
    greedy rows (seed None) pass through, so ``generate(do_sample=False)`` takes their argmax."""

    def __init__(self, seeds: Sequence[int | None], temperature: float, top_p: float):
        self.generators = [None if s is None else torch.Generator().manual_seed(s) for s in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = scores
        for row, generator in enumerate(self.generators):
            if generator is None:
                continue
            token = sample_top_p(scores[row], self.temperature, self.top_p, generator)
            if out is scores:
                out = scores.clone()
            out[row] = float("-inf")
            out[row, token] = 0.0
        return out


def left_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` with every row right-aligned."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids, mask


def cut_at_eos(ids: Sequence[int], eos_id: int) -> tuple[list[int], bool]:
    """The answer up to and including the first EOS, and whether there was one."""
    ids = list(ids)
    return (ids[: ids.index(eos_id) + 1], True) if eos_id in ids else (ids, False)


@torch.inference_mode()
def generate_answers(model: Any, prompt_ids: Sequence[Sequence[int]], seeds: Sequence[int | None], eos_id: int,
                     settings: GenerationSettings = GenerationSettings()) -> list[tuple[list[int], bool]]:
    """One batched ``generate`` call: ``(answer ids, eos reached)`` per prompt (seed None: greedy)."""
    ids, mask = left_padded(prompt_ids, eos_id)
    device = next(model.parameters()).device
    processors = LogitsProcessorList([RowSampler(seeds, settings.temperature, settings.top_p)]) \
        if any(s is not None for s in seeds) else None
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                         max_new_tokens=settings.max_new_tokens, logits_processor=processors,
                         pad_token_id=eos_id, eos_token_id=eos_id, temperature=None, top_p=None, top_k=None)
    return [cut_at_eos(row.tolist(), eos_id) for row in out[:, ids.shape[1]:].cpu()]


def teacher_fingerprint(model: Any, tokenizer: Any) -> str:
    """A hash of the teacher's weights (bytes, in state-dict order) and its tokenizer."""
    digest = hashlib.sha256(tokenizer_fingerprint(tokenizer).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# 4. Storage: record sets (<name>.jsonl + <name>.u16.xz), chunks, export
# --------------------------------------------------------------------------------------------


@dataclass
class Answer:
    """One generated answer with its prompt's token ids (chat template) and provenance."""

    key: str
    split: str
    kind: str
    source: str
    doc_id: str
    mode: str
    seed: int | None
    eos: bool
    prompt_ids: list[int] = field(repr=False)
    answer_ids: list[int] = field(repr=False)

    @property
    def unit_key(self) -> str:
        return f"{self.key}:{self.mode}"

    def record(self) -> dict[str, Any]:
        fields = {k: v for k, v in asdict(self).items() if k not in ("prompt_ids", "answer_ids")}
        return {**fields, "prompt_tokens": len(self.prompt_ids), "answer_tokens": len(self.answer_ids)}


def replace_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_record_set(folder: Path, name: str, answers: Sequence[Answer]) -> None:
    """``<name>.u16.xz`` then ``<name>.jsonl``, each atomically: the records file appears last."""
    folder.mkdir(parents=True, exist_ok=True)
    stream = [t for a in answers for t in (*a.prompt_ids, *a.answer_ids)]
    replace_atomically(folder / f"{name}.u16.xz",
                       lzma.compress(np.asarray(stream, dtype="<u2").tobytes(), preset=6))
    lines = "".join(json.dumps(a.record(), ensure_ascii=False) + "\n" for a in answers)
    replace_atomically(folder / f"{name}.jsonl", lines.encode("utf-8"))


def read_record_set(folder: Path, name: str) -> list[Answer]:
    """The answers of one record set; raises ``DataError`` if its two files do not match."""
    records = [json.loads(line) for line in (folder / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
    tokens = np.frombuffer(lzma.decompress((folder / f"{name}.u16.xz").read_bytes()), dtype="<u2")
    if sum(r["prompt_tokens"] + r["answer_tokens"] for r in records) != len(tokens):
        raise DataError(f"{folder / name}: records and token file do not match (being rewritten? retry)")
    answers, start = [], 0
    for r in records:
        middle = start + r.pop("prompt_tokens")
        end = middle + r.pop("answer_tokens")
        answers.append(Answer(**r, prompt_ids=tokens[start:middle].tolist(), answer_ids=tokens[middle:end].tolist()))
        start = end
    return answers


def run_folder(run: str = "main") -> Path:
    return cache_dir("teacher-answers", run)


def chunk_names(folder: Path) -> list[str]:
    """Complete chunks (those whose records file exists), in order."""
    return sorted(p.name[: -len(".jsonl")] for p in folder.glob("chunk-*.jsonl"))


def read_chunks(folder: Path) -> list[Answer]:
    """Every answer in the run's chunks, first occurrence of each (prompt, mode) only."""
    seen: dict[str, Answer] = {}
    for name in chunk_names(folder):
        for answer in read_record_set(folder, name):
            seen.setdefault(answer.unit_key, answer)
    return list(seen.values())


def write_chunk(folder: Path, answers: Sequence[Answer]) -> str:
    """The next chunk file (numbered after the last complete one)."""
    names = chunk_names(folder)
    name = f"chunk-{int(names[-1].split('-')[1]) + 1 if names else 0:06d}"
    write_record_set(folder, name, answers)
    return name


def split_answers(answers: Iterable[Answer]) -> dict[str, list[Answer]]:
    by_split: dict[str, list[Answer]] = {s: [] for s in SPLITS}
    for a in answers:
        by_split[a.split].append(a)
    return by_split


def summary(answers: Sequence[Answer]) -> dict[str, Any]:
    """Counts for a manifest: records, tokens, EOS share, per kind / mode / source."""
    return {
        "records": len(answers),
        "prompt_tokens": sum(len(a.prompt_ids) for a in answers),
        "answer_tokens": sum(len(a.answer_ids) for a in answers),
        "eos_share": round(sum(a.eos for a in answers) / len(answers), 4) if answers else None,
        "by_kind": dict(sorted(Counter(a.kind for a in answers).items())),
        "by_mode": dict(sorted(Counter(a.mode for a in answers).items())),
        "by_source": dict(sorted(Counter(a.source for a in answers).items())),
    }


def export(run: str = "main", out: Path = ASSET_FOLDER) -> dict[str, Any]:
    """Copy a run's chunks into the committed record sets ``train`` and ``heldout-chat-answers``."""
    folder = run_folder(run)
    settings = json.loads((folder / "run.json").read_text())
    answers = read_chunks(folder)
    by_split = split_answers(answers)
    check_split_integrity(by_split)
    for split, items in by_split.items():
        write_record_set(out, split, items)
    manifest = {
        "format": FORMAT, **settings,
        "files": {s: [f"{s}.jsonl", f"{s}.u16.xz"] for s in SPLITS},
        "layout": "per record, in .jsonl order: prompt_tokens ids (chat template, ends with the assistant header) "
                  "then answer_tokens ids (ends with EOS when eos is true); uint16 little-endian, xz",
        "splits": {s: summary(items) for s, items in by_split.items()},
        "bytes": {s: sum((out / f).stat().st_size for f in files) for s, files in
                  {s: [f"{s}.jsonl", f"{s}.u16.xz"] for s in SPLITS}.items()},
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    replace_atomically(out / "manifest.json", (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest


def check_split_integrity(by_split: dict[str, list[Answer]]) -> None:
    """Held-out and train prompts are disjoint, each answer sits in its prompt's split, and no
    answer comes from a held-out document."""
    keys = {s: {a.key for a in items} for s, items in by_split.items()}
    if keys["train"] & keys[HELDOUT_NAME]:
        raise DataError("a prompt is in both the train and the held-out chat answers")
    wrong = [a.key for items in by_split.values() for a in items if a.split != prompt_split(a.key)]
    if wrong:
        raise DataError(f"{len(wrong)} answers are filed under the wrong split, e.g. {wrong[:3]}")
    assert_no_heldout({a.doc_id for items in by_split.values() for a in items})


# --------------------------------------------------------------------------------------------
# 5. Loading for distillation
# --------------------------------------------------------------------------------------------


def load_answers(split: str = "train", folder: Path = ASSET_FOLDER, modes: Sequence[str] = MODES) -> list[Answer]:
    """The committed answers of ``train`` or ``heldout-chat-answers`` (optionally only some modes)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    if not (folder / f"{split}.jsonl").exists():
        raise DataError(f"no teacher answers in {folder}; run `python -m model.teacher_answers generate` and `export`")
    answers = [a for a in read_record_set(folder, split) if a.mode in modes]
    if any(prompt_split(a.key) != split for a in answers):
        raise DataError(f"{folder / split}: holds answers of another split")
    assert_no_heldout({a.doc_id for a in answers})
    return answers


def conversation_ids(answer: Answer) -> list[int]:
    """Prompt + answer, without the final EOS (``pack_documents`` appends one after every record)."""
    return answer.prompt_ids + (answer.answer_ids[:-1] if answer.eos else answer.answer_ids)


def packed_rows(split: str = "train", seq_len: int = 512, seed: int = 0, folder: Path = ASSET_FOLDER,
                modes: Sequence[str] = MODES) -> torch.Tensor:
    """Whole conversations (chat template, answer closed by EOS) in a seeded order, packed into
    LongTensor rows ``(rows, seq_len)`` for forward KL on every position; the last partial row is dropped."""
    answers = load_answers(split, folder, modes)
    order = np.random.default_rng(seed).permutation(len(answers))
    eos_id = read_manifest(folder)["eos_id"]
    rows = pack_documents((np.asarray(conversation_ids(answers[i]), dtype=TOKEN_DTYPE) for i in order), eos_id, seq_len)
    return torch.from_numpy(rows.astype(np.int64))


def read_manifest(folder: Path = ASSET_FOLDER) -> dict[str, Any]:
    return json.loads((folder / "manifest.json").read_text())


# --------------------------------------------------------------------------------------------
# 6. The generation loop (resumable)
# --------------------------------------------------------------------------------------------


def run_settings(model: Any, tokenizer: Any, seed: int, settings: GenerationSettings) -> dict[str, Any]:
    """What a run's answers depend on; a resumed run must match it."""
    return {
        "teacher": "smollm2-135m (SmolLM2-135M-Instruct Q4_1 GGUF, dequantised, float32)",
        "teacher_fingerprint": teacher_fingerprint(model, tokenizer),
        "generator": "transformers generate, chat template, left padding; sampled rows: temperature/top-p with a "
                     "per-row torch.Generator seeded by the record's seed (model.teacher_answers.RowSampler)",
        "settings": asdict(settings), "schedule_seed": seed, "eos_id": int(tokenizer.eos_token_id),
        "turn_end_ids": turn_end_ids(tokenizer), "heldout": {"name": HELDOUT_NAME, "salt": HELDOUT_SALT,
                                                              "below": HELDOUT_BELOW},
    }


def start_run(folder: Path, settings: dict[str, Any]) -> None:
    """Write ``run.json``, or check that a resumed run uses the same teacher and settings."""
    path = folder / "run.json"
    if path.exists():
        before = json.loads(path.read_text())
        if before != settings:
            changed = sorted(k for k in settings if before.get(k) != settings[k])
            raise DataError(f"{folder} was generated with other settings ({changed}); use another --run")
    else:
        replace_atomically(path, json.dumps(settings, indent=1).encode())


def answer_chunk(model: Any, tokenizer: Any, units: Sequence[Unit], batch_size: int,
                 settings: GenerationSettings) -> list[Answer]:
    """Answers for ``units``, batched by prompt length (less padding), returned in ``units`` order."""
    prompt_ids = [render_prompt(tokenizer, u.prompt.text) for u in units]
    order = sorted(range(len(units)), key=lambda i: len(prompt_ids[i]))
    results: dict[int, tuple[list[int], bool]] = {}
    for start in range(0, len(order), batch_size):
        batch = order[start: start + batch_size]
        outputs = generate_answers(model, [prompt_ids[i] for i in batch], [units[i].seed for i in batch],
                                   tokenizer.eos_token_id, settings)
        results.update(zip(batch, outputs))
    return [Answer(u.prompt.key, u.prompt.split, u.prompt.kind, u.prompt.source, u.prompt.doc_id, u.mode, u.seed,
                   results[i][1], prompt_ids[i], results[i][0]) for i, u in enumerate(units)]


def generate(run: str = "main", seed: int = 0, batch_size: int = 16, chunk_size: int = 64,
             settings: GenerationSettings = GenerationSettings(), max_seconds: float | None = None,
             max_units: int | None = None, export_to: Path | None = ASSET_FOLDER, passages_per_doc: int = 4,
             model: Any = None, tokenizer: Any = None, prompts: Sequence[Prompt] | None = None) -> Path:
    """Generate pending units chunk by chunk until done, ``max_seconds`` or ``max_units``; resumable.
    After every chunk the committed copy in ``export_to`` is refreshed (None: never)."""
    from model import load_model

    if model is None:
        model, tokenizer = load_model("smollm2-135m")
    folder = run_folder(run)
    start_run(folder, run_settings(model, tokenizer, seed, settings))
    prompts = prompts if prompts is not None else build_prompts(corpus_docs(), seed, passages_per_doc)
    done = {a.unit_key for a in read_chunks(folder)}
    pending = [unit for unit in schedule(prompts, seed) if unit.key not in done]
    if max_units is not None:
        pending = pending[:max_units]
    log.info("%d prompts, %d answers done, %d pending", len(prompts), len(done), len(pending))
    started = time.monotonic()
    for start in range(0, len(pending), chunk_size):
        if max_seconds is not None and time.monotonic() - started > max_seconds:
            break
        tic = time.monotonic()
        answers = answer_chunk(model, tokenizer, pending[start: start + chunk_size], batch_size, settings)
        name = write_chunk(folder, answers)
        seconds = time.monotonic() - tic
        tokens = sum(len(a.answer_ids) for a in answers)
        log.info("%s: %d answers (%s), %d answer tokens in %.0f s = %.1f tok/s; %d of %d pending done", name,
                 len(answers), dict(Counter(a.split for a in answers)), tokens, seconds, tokens / seconds,
                 start + len(answers), len(pending))
        if export_to is not None:
            export(run, export_to)
    return folder


def bench(batch_sizes: Sequence[int], rows: int, seed: int = 0, settings: GenerationSettings = GenerationSettings(),
          passages_per_doc: int = 4) -> list[dict[str, Any]]:
    """Answer tokens/s per batch size, on the first ``rows`` units of the training schedule."""
    from model import load_model

    model, tokenizer = load_model("smollm2-135m")
    units = [u for u in schedule(build_prompts(corpus_docs(), seed, passages_per_doc), seed)
             if u.prompt.split == "train"][:rows]
    results = []
    for batch_size in batch_sizes:
        tic = time.monotonic()
        answers = answer_chunk(model, tokenizer, units, batch_size, settings)
        seconds = time.monotonic() - tic
        tokens = sum(len(a.answer_ids) for a in answers)
        results.append({"batch_size": batch_size, "rows": len(units), "seconds": round(seconds, 1),
                        "answer_tokens": tokens, "answer_tokens_per_s": round(tokens / seconds, 1),
                        "mean_answer_tokens": round(tokens / len(answers), 1),
                        "eos_share": round(sum(a.eos for a in answers) / len(answers), 3)})
        log.info("%s", results[-1])
    return results


# --------------------------------------------------------------------------------------------
# 7. CLI
# --------------------------------------------------------------------------------------------


def describe_pool(prompts: Sequence[Prompt], samples: int, seed: int) -> str:
    """Counts per kind and split, and a few seeded samples per kind."""
    lines = [f"{len(prompts)} prompts; split: {dict(Counter(p.split for p in prompts))}"]
    for kind, count in sorted(Counter(p.kind for p in prompts).items()):
        lines.append(f"  {kind:15} {count:6}")
    rng = random.Random(seed)
    for kind in sorted({p.kind for p in prompts}):
        of_kind = [p for p in prompts if p.kind == kind]
        for p in rng.sample(of_kind, min(samples, len(of_kind))):
            lines.append(f"[{kind} | {p.doc_id}] {p.text[:200]!r}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m model.teacher_answers", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, helptext in [("prompts", "describe the prompt pool"), ("bench", "answer tokens/s per batch size"),
                           ("generate", "generate answers into resumable chunks"),
                           ("export", "chunks -> assets/teacher-answers/"), ("stats", "what the committed copy holds")]:
        sub = commands.add_parser(name, help=helptext)
        sub.add_argument("--seed", type=int, default=0, help="prompt templates, schedule order, sampling seeds")
        sub.add_argument("--run", default="main", help="run name: <cache>/teacher-answers/<run>/")
        sub.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared 2-core machine)")
        sub.add_argument("--passages-per-doc", type=int, default=4, help="prose passages per document")
        sub.add_argument("--max-new-tokens", type=int, default=128)
        sub.add_argument("--batch-size", type=int, default=16)
    commands.choices["prompts"].add_argument("--samples", type=int, default=3, help="samples per kind")
    commands.choices["bench"].add_argument("--batch-sizes", default="4,8,16,32")
    commands.choices["bench"].add_argument("--rows", type=int, default=32, help="answers per batch size")
    gen = commands.choices["generate"]
    gen.add_argument("--chunk-size", type=int, default=64, help="answers per chunk file")
    gen.add_argument("--max-seconds", type=float, default=None, help="stop starting chunks after this long")
    gen.add_argument("--max-answers", type=int, default=None, help="stop after this many new answers")
    gen.add_argument("--no-export", action="store_true", help="do not refresh assets/teacher-answers/ per chunk")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    try:
        if args.command == "prompts":
            print(describe_pool(build_prompts(corpus_docs(), args.seed, args.passages_per_doc), args.samples, args.seed))
        elif args.command == "bench":
            sizes = [int(s) for s in args.batch_sizes.split(",")]
            print(json.dumps(bench(sizes, args.rows, args.seed, settings, args.passages_per_doc), indent=1))
        elif args.command == "generate":
            generate(args.run, args.seed, args.batch_size, args.chunk_size, settings, args.max_seconds,
                     args.max_answers, None if args.no_export else ASSET_FOLDER, args.passages_per_doc)
        elif args.command == "export":
            print(json.dumps(export(args.run)["splits"], indent=1))
        else:
            print(json.dumps(read_manifest()["splits"], indent=1))
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
