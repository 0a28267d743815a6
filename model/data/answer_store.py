"""The teacher's answers on disk: record sets (``<name>.jsonl`` + ``<name>.u16.xz``), resumable chunks,
the committed copy under ``assets/teacher-answers``, and loading them for distillation."""
from __future__ import annotations

import json
import logging
import lzma
import os
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.data.split import assert_no_heldout
from model.data.tokens import TOKEN_DTYPE, pack_documents
from model.errors import DataError
from model.paths import ASSETS_DIR, cache_dir
from model.data.answer_prompts import HELDOUT_NAME, MODES, SPLITS, prompt_split

log = logging.getLogger(__name__)

ASSET_FOLDER = ASSETS_DIR / "teacher-answers"
FORMAT = "teacher-answers-v1"
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
        raise DataError(f"no teacher answers in {folder}; run `python -m model.data.teacher_answers generate` and `export`")
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


def calibration_texts(tokenizer: Any, count: int = 64, seed: int = 0, folder: Path = ASSET_FOLDER) -> list[str]:
    """``count`` train conversations (prompt + the teacher's answer, chat template) as text, in a seeded
    order, decoded with ``tokenizer`` (the embedded SmolLM2's, whose ids these are): calibration text that
    is committed, offline and never held out."""
    answers = load_answers("train", folder)
    order = np.random.default_rng(seed).permutation(len(answers))[:count]
    return [tokenizer.decode(conversation_ids(answers[i])) for i in order]


def read_manifest(folder: Path = ASSET_FOLDER) -> dict[str, Any]:
    return json.loads((folder / "manifest.json").read_text())


# --------------------------------------------------------------------------------------------
