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

Modules: ``answer_prompts`` (1-2, and the generation order), ``answer_store`` (4-5), this one (3, the
resumable loop, the CLI).

CLI::

    python -m model.data.teacher_answers prompts                     # the pool: counts per kind, samples
    python -m model.data.teacher_answers bench --batch-sizes 8,16,32 # answer tokens/s per batch size
    python -m model.data.teacher_answers generate --batch-size 16    # held-out greedy first, then train
    python -m model.data.teacher_answers export                      # chunks -> assets/teacher-answers/
    python -m model.data.teacher_answers stats                       # what the committed copy holds

On a GPU (issue 13's prepared run, ``benchmarks/gpu_session.sh``): the pool is built here and travels as a
file (the documents it comes from are ~80 MB), generation runs in bf16 with large batches and a vectorised
sampler (``BatchRowSampler``: the same per-row draws as ``RowSampler``), skips what the committed set holds,
and ``merge`` adds the new train answers to the committed copy (held-out files untouched)::

    python -m model.data.teacher_answers prompts --pool extended --save .gpu-stage/prompts.jsonl.xz
    python -m model.data.teacher_answers generate --run gpu --prompts-file .gpu-stage/prompts.jsonl.xz \
        --device cuda --dtype bfloat16 --batch-size 1024 --chunk-size 4096 --splits train --skip-committed \
        --no-export --max-seconds 180
    python -m model.data.teacher_answers merge --run gpu              # committed train + run's train answers
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import lzma
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from model.data.tokens import tokenizer_fingerprint
from model.errors import DataError
from model.data.answer_prompts import (
    HELDOUT_BELOW, HELDOUT_NAME, HELDOUT_SALT, POOLS, Prompt, Unit, build_prompts, corpus_docs, prompt_split,
    schedule,
)
from model.data.answer_store import (
    ASSET_FOLDER, FORMAT, Answer, check_split_integrity, export, read_chunks, read_manifest, read_record_set,
    replace_atomically, run_folder, summary, write_chunk,
)
from model.data.split import assert_no_heldout

log = logging.getLogger(__name__)

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


def sample_top_p_rows(logits: torch.Tensor, temperature: float, top_p: float, draws: torch.Tensor) -> torch.Tensor:
    """``sample_top_p`` for a batch of rows at once: row ``i`` takes the uniform ``draws[i]`` (float64)
    instead of drawing it; the same nucleus and the same inverse-CDF choice, so on the same device and
    with the same draws it picks the same tokens. Returns LongTensor ``(rows,)``."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, descending=True, dim=-1)
    cumulative = torch.cumsum(sorted_probs, dim=-1)
    keep = ((cumulative - sorted_probs) < top_p).sum(-1, keepdim=True)  # (rows, 1)
    mass = cumulative.gather(1, keep - 1)  # the kept prefix's mass
    outside = torch.arange(cumulative.shape[1], device=logits.device)[None] >= keep
    index = torch.searchsorted(cumulative.masked_fill(outside, float("inf")), draws[:, None].to(cumulative) * mass,
                               right=True)
    return order.gather(1, torch.minimum(index, keep - 1)).squeeze(1)


class BatchRowSampler(LogitsProcessor):
    """``RowSampler`` vectorised for large batches on a GPU: each sampled row still draws its one uniform
    per step from its own CPU ``torch.Generator`` (so an answer depends only on its seed), the nucleus and
    the choice are computed for all sampled rows in one go (no per-row kernels or synchronisations)."""

    def __init__(self, seeds: Sequence[int | None], temperature: float, top_p: float):
        self.rows = [i for i, s in enumerate(seeds) if s is not None]
        self.generators = [torch.Generator().manual_seed(seeds[i]) for i in self.rows]
        self.temperature, self.top_p = temperature, top_p
        self._index: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.rows:
            return scores
        if self._index is None or self._index.device != scores.device:
            self._index = torch.tensor(self.rows, device=scores.device)
        draws = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in self.generators])
        tokens = sample_top_p_rows(scores[self._index], self.temperature, self.top_p, draws.to(scores.device))
        out = scores.clone()
        out[self._index] = float("-inf")
        out[self._index, tokens] = 0.0
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
    sampler = RowSampler if device.type == "cpu" else BatchRowSampler  # the CPU keeps the committed path
    processors = LogitsProcessorList([sampler(seeds, settings.temperature, settings.top_p)]) \
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


# 6. The generation loop (resumable)
# --------------------------------------------------------------------------------------------


def run_settings(model: Any, tokenizer: Any, seed: int, settings: GenerationSettings,
                 precision: str | None = None, pool: str = "base") -> dict[str, Any]:
    """What a run's answers depend on; a resumed run must match it. ``precision`` (e.g. "bfloat16 on
    cuda") and a non-base ``pool`` are recorded only when given, so older CPU runs still resume."""
    extra = {**({"precision": precision} if precision else {}), **({"pool": pool} if pool != "base" else {})}
    return {**extra,
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


def committed_unit_keys(folder: Path | None = None) -> set[str]:
    """``<prompt key>:<mode>`` of every answer in the committed copy (both splits; records files only)."""
    folder = ASSET_FOLDER if folder is None else folder
    keys = set()
    for split in (HELDOUT_NAME, "train"):
        path = folder / f"{split}.jsonl"
        if path.exists():
            keys |= {f"{r['key']}:{r['mode']}" for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}
    return keys


def generate(run: str = "main", seed: int = 0, batch_size: int = 16, chunk_size: int = 64,
             settings: GenerationSettings = GenerationSettings(), max_seconds: float | None = None,
             max_units: int | None = None, export_to: Path | None = ASSET_FOLDER, passages_per_doc: int = 4,
             model: Any = None, tokenizer: Any = None, prompts: Sequence[Prompt] | None = None,
             device: str = "cpu", dtype: str = "float32", splits: Sequence[str] | None = None,
             skip_committed: bool = False, pool: str = "base") -> Path:
    """Generate pending units chunk by chunk until done, ``max_seconds`` or ``max_units``; resumable.
    After every chunk the committed copy in ``export_to`` is refreshed (None: never). ``device``/``dtype``:
    where and in what precision the teacher runs (recorded in ``run.json`` unless CPU float32);
    ``splits``: only units of these prompt splits; ``skip_committed``: not what the committed copy holds."""
    from model import load_model

    if model is None:
        model, tokenizer = load_model("smollm2-135m")
    folder = run_folder(run)
    precision = None if (device, dtype) == ("cpu", "float32") else f"{dtype} on {device}"
    start_run(folder, run_settings(model, tokenizer, seed, settings, precision, pool))  # fingerprint: fp32 weights
    model = model.to(device=torch.device(device), dtype=getattr(torch, dtype))
    prompts = prompts if prompts is not None else build_prompts(corpus_docs(pool), seed, passages_per_doc, pool)
    done = {a.unit_key for a in read_chunks(folder)}
    skipped = committed_unit_keys() if skip_committed else set()
    pending = [unit for unit in schedule(prompts, seed) if unit.key not in done and unit.key not in skipped
               and (splits is None or unit.prompt.split in splits)]
    if max_units is not None:
        pending = pending[:max_units]
    log.info("%d prompts, %d answers done, %d committed skipped, %d pending", len(prompts), len(done),
             len(skipped), len(pending))
    started = time.monotonic()
    for start in range(0, len(pending), chunk_size):
        if max_seconds is not None and time.monotonic() - started > max_seconds:
            break
        tic = time.monotonic()
        answers = answer_chunk(model, tokenizer, pending[start: start + chunk_size], batch_size, settings)
        name = write_chunk(folder, answers)
        seconds = time.monotonic() - tic
        tokens = sum(len(a.answer_ids) for a in answers)
        log.info("%s: %d answers (%s), %d answer tokens in %.0f s = %.1f tok/s; %d of %d pending done "
                 "(%.0f s in all)", name, len(answers), dict(Counter(a.split for a in answers)), tokens, seconds,
                 tokens / seconds, start + len(answers), len(pending), time.monotonic() - started)
        if export_to is not None:
            export(run, export_to)
    return folder


def save_prompts(prompts: Sequence[Prompt], path: Path) -> None:
    """The pool as JSON lines (``text``, ``kind``, ``source``, ``doc_id``); xz-compressed if ``path`` ends in .xz."""
    data = "".join(json.dumps(asdict(p), ensure_ascii=False) + "\n" for p in prompts).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, lzma.compress(data, preset=9) if path.suffix == ".xz" else data)


def load_prompts(path: Path) -> list[Prompt]:
    """A pool saved by ``save_prompts``; refuses prompts of held-out documents (as ``build_prompts`` does)."""
    data = path.read_bytes()
    prompts = [Prompt(**json.loads(line)) for line in
               (lzma.decompress(data) if path.suffix == ".xz" else data).decode("utf-8").splitlines()]
    assert_no_heldout({p.doc_id for p in prompts})
    return prompts


def merge(run: str, out: Path | None = None, preset: int = 1) -> dict[str, Any]:
    """Add a run's ``train`` answers to the committed copy's ``train`` set in ``out`` (answers already
    there, by prompt and mode, are kept as they are; held-out files are not touched; ``preset``: xz level).
    The manifest keeps the first run's settings and lists every merged run with its own settings."""
    out = ASSET_FOLDER if out is None else out
    folder = run_folder(run)
    settings = json.loads((folder / "run.json").read_text())
    base = read_record_set(out, "train")
    have = {a.unit_key for a in base}
    new = [a for a in read_chunks(folder) if a.split == "train" and a.unit_key not in have]
    wrong = [a.key for a in new if prompt_split(a.key) != "train"]
    if wrong:
        raise DataError(f"{len(wrong)} answers of held-out prompts in {folder}, e.g. {wrong[:3]}")
    heldout = read_record_set(out, HELDOUT_NAME) if (out / f"{HELDOUT_NAME}.jsonl").exists() else []
    answers = base + new
    check_split_integrity({"train": answers, HELDOUT_NAME: heldout})
    stream = [t for a in answers for t in (*a.prompt_ids, *a.answer_ids)]
    replace_atomically(out / "train.u16.xz", lzma.compress(np.asarray(stream, dtype="<u2").tobytes(), preset=preset))
    replace_atomically(out / "train.jsonl", "".join(json.dumps(a.record(), ensure_ascii=False) + "\n"
                                                    for a in answers).encode("utf-8"))
    manifest = read_manifest(out)
    if manifest.get("format") != FORMAT:
        raise DataError(f"{out}/manifest.json is not a {FORMAT} manifest")
    manifest.setdefault("merged", []).append({"run": run, **settings, "records": len(new),
                                              "answer_tokens": sum(len(a.answer_ids) for a in new)})
    manifest["splits"]["train"] = summary(answers)
    manifest["bytes"]["train"] = sum((out / f).stat().st_size for f in ("train.jsonl", "train.u16.xz"))
    manifest["exported_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    replace_atomically(out / "manifest.json", (json.dumps(manifest, indent=1) + "\n").encode())
    log.info("merged %d new train answers (%d answer tokens) of run %s into %s: %d in all", len(new),
             manifest["merged"][-1]["answer_tokens"], run, out, len(answers))
    return manifest


def bench(batch_sizes: Sequence[int], rows: int, seed: int = 0, settings: GenerationSettings = GenerationSettings(),
          passages_per_doc: int = 4, device: str = "cpu", dtype: str = "float32",
          prompts: Sequence[Prompt] | None = None) -> list[dict[str, Any]]:
    """Answer tokens/s per batch size, on the first ``rows`` units of the training schedule."""
    from model import load_model

    model, tokenizer = load_model("smollm2-135m")
    model = model.to(device=torch.device(device), dtype=getattr(torch, dtype))
    prompts = prompts if prompts is not None else build_prompts(corpus_docs(), seed, passages_per_doc)
    units = [u for u in schedule(prompts, seed) if u.prompt.split == "train"][:rows]
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
    parser = argparse.ArgumentParser(prog="python -m model.data.teacher_answers", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, helptext in [("prompts", "describe the prompt pool"), ("bench", "answer tokens/s per batch size"),
                           ("generate", "generate answers into resumable chunks"),
                           ("export", "chunks -> assets/teacher-answers/"), ("stats", "what the committed copy holds"),
                           ("merge", "add a run's train answers to assets/teacher-answers/ (held-out untouched)")]:
        sub = commands.add_parser(name, help=helptext)
        sub.add_argument("--seed", type=int, default=0, help="prompt templates, schedule order, sampling seeds")
        sub.add_argument("--run", default="main", help="run name: <cache>/teacher-answers/<run>/")
        sub.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared 2-core machine)")
        sub.add_argument("--passages-per-doc", type=int, default=4, help="prose passages per document")
        sub.add_argument("--max-new-tokens", type=int, default=128)
        sub.add_argument("--batch-size", type=int, default=16)
        sub.add_argument("--pool", default="base", choices=POOLS, help="prompt pool (extended: + chat turns, words, "
                                                                       "sayings)")
        sub.add_argument("--prompts-file", type=Path, default=None, help="a pool saved by `prompts --save`")
        sub.add_argument("--device", default="cpu", help="where the teacher runs (cuda: bf16 + BatchRowSampler)")
        sub.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    commands.choices["prompts"].add_argument("--samples", type=int, default=3, help="samples per kind")
    commands.choices["prompts"].add_argument("--save", type=Path, default=None, help="write the pool here (.xz: compressed)")
    commands.choices["merge"].add_argument("--out", type=Path, default=ASSET_FOLDER, help="the committed copy to extend")
    commands.choices["bench"].add_argument("--batch-sizes", default="4,8,16,32")
    commands.choices["bench"].add_argument("--rows", type=int, default=32, help="answers per batch size")
    gen = commands.choices["generate"]
    gen.add_argument("--chunk-size", type=int, default=64, help="answers per chunk file")
    gen.add_argument("--max-seconds", type=float, default=None, help="stop starting chunks after this long")
    gen.add_argument("--max-answers", type=int, default=None, help="stop after this many new answers")
    gen.add_argument("--no-export", action="store_true", help="do not refresh assets/teacher-answers/ per chunk")
    gen.add_argument("--splits", nargs="*", default=None, help="only prompts of these splits (e.g. train)")
    gen.add_argument("--skip-committed", action="store_true", help="skip answers assets/teacher-answers/ already holds")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)

    def pool() -> list[Prompt]:
        if args.prompts_file is not None:
            return load_prompts(args.prompts_file)
        return build_prompts(corpus_docs(args.pool), args.seed, args.passages_per_doc, args.pool)

    try:
        if args.command == "prompts":
            prompts = pool()
            if args.save:
                save_prompts(prompts, args.save)
            print(describe_pool(prompts, args.samples, args.seed))
        elif args.command == "bench":
            sizes = [int(s) for s in args.batch_sizes.split(",")]
            print(json.dumps(bench(sizes, args.rows, args.seed, settings, args.passages_per_doc, args.device,
                                   args.dtype, pool()), indent=1))
        elif args.command == "generate":
            generate(args.run, args.seed, args.batch_size, args.chunk_size, settings, args.max_seconds,
                     args.max_answers, None if args.no_export else ASSET_FOLDER, args.passages_per_doc,
                     prompts=pool(), device=args.device, dtype=args.dtype, splits=args.splits,
                     skip_committed=args.skip_committed, pool=args.pool)
        elif args.command == "merge":
            print(json.dumps(merge(args.run, args.out)["splits"]["train"], indent=1))
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
