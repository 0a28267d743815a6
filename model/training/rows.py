"""The training rows: the prose ``train`` split mixed with the teacher's answers (``--answers-share``),
resumable from the saved position."""
from __future__ import annotations

import math

import torch

from model.training.run_state import Progress


def answer_row(index: int, share: float) -> bool:
    """Whether global row ``index`` of a run comes from the teacher answers: exactly ``floor(n * share)``
    of the first ``n`` rows do, spread evenly (a pure function of the index, so resuming needs no state)."""
    return math.floor((index + 1) * share + 1e-9) > math.floor(index * share + 1e-9)


def row_source(index: int, args) -> str:
    """``"prose"``, ``"answer"`` (a teacher-answer row) or ``"on_policy"`` (the student answers the prompts,
    ``--on-policy-share`` of the answer rows): a pure function of the global row index."""
    if args.answers_share <= 0 or not answer_row(index, args.answers_share):
        return "prose"
    share = getattr(args, "on_policy_share", 0.0)
    answers_before = math.floor(index * args.answers_share + 1e-9)  # answer rows among the first ``index``
    return "on_policy" if share > 0 and answer_row(answers_before, share) else "answer"


def training_batches(iter_batches, args, progress: Progress, world: int, rank: int, on_policy=None):
    """Endless per-process micro-batches ``(ids, mask)``, starting at the saved position: each global batch
    takes its rows from the prose split, the teacher answers and (``on_policy``, an ``OnPolicyRows``) the
    student's own answers by ``row_source``; the positions in ``progress`` count the rows handed out.
    ``mask`` (False on padding) is None when no row of the micro-batch has padding. With ``on_policy`` the
    rows of a whole optimizer step are made at once (one generation call per step)."""
    global_size = args.batch_size * world
    index = progress.tokens_seen // args.seq_len  # global rows consumed so far
    prose = prose_rows(iter_batches, args, progress)
    answers = answer_rows(args, progress) if args.answers_share > 0 else None
    chunk = global_size * (args.grad_accum if on_policy is not None else 1)
    while True:
        sources = [row_source(index + i, args) for i in range(chunk)]
        rows = [next(prose) if s == "prose" else next(answers) if s == "answer" else None for s in sources]
        if on_policy is not None and "on_policy" in sources:
            at = [i for i, s in enumerate(sources) if s == "on_policy"]
            made = on_policy.rows(len(at), [(i % global_size) // args.batch_size == rank for i in at])
            for i, row in zip(at, made):
                rows[i] = row
        index += chunk
        for start in range(0, chunk, global_size):
            mine = rows[start + rank * args.batch_size: start + (rank + 1) * args.batch_size]
            ids = torch.stack([r[0] if isinstance(r, tuple) else r for r in mine])
            padded = any(isinstance(r, tuple) and not bool(r[1].all()) for r in mine)
            mask = torch.stack([r[1] if isinstance(r, tuple) else torch.ones(args.seq_len, dtype=torch.bool)
                                for r in mine]) if padded else None
            yield ids, mask


def prose_rows(iter_batches, args, progress: Progress):
    """Rows of the prose ``train`` split in the seeded order of each epoch."""
    while True:
        for batch in iter_batches("train", 1, args.seq_len, seed=args.seed + progress.epoch, start_row=progress.row):
            progress.row += 1
            yield batch[0]
        progress.epoch += 1
        progress.row = 0


def answer_rows(args, progress: Progress):
    """Rows of the teacher's answers (``train`` split only), packed anew in a seeded order each pass."""
    from model.data import answer_store

    while True:
        rows = answer_store.packed_rows("train", args.seq_len, seed=args.seed + progress.answer_epoch)
        if len(rows) == 0:
            raise ValueError(f"no teacher-answer rows of {args.seq_len} tokens; generate and export answers first")
        for row in rows[progress.answer_row:]:
            progress.answer_row += 1
            progress.answer_rows_seen += 1
            yield row
        progress.answer_epoch += 1
        progress.answer_row = 0
