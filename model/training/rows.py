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


def training_batches(iter_batches, args, progress: Progress, world: int, rank: int):
    """Endless per-process micro-batches, starting at the saved position: each global batch takes its
    rows from the prose split and (``--answers-share``) the teacher answers by ``answer_row``; the
    positions in ``progress`` count the rows handed out."""
    global_size = args.batch_size * world
    index = progress.tokens_seen // args.seq_len  # global rows consumed so far
    prose = prose_rows(iter_batches, args, progress)
    answers = answer_rows(args, progress) if args.answers_share > 0 else None
    while True:
        rows = [next(answers) if answers is not None and answer_row(index + i, args.answers_share) else next(prose)
                for i in range(global_size)]
        index += global_size
        yield torch.stack(rows[rank * args.batch_size : (rank + 1) * args.batch_size])


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
