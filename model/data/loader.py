"""What the trainer and evaluator read: packed rows per split, batches, the cache's meta."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.errors import DataError
from model.data.sources import tokens_dir
from model.data.split import assert_no_heldout, heldout_names
from model.data.tokens import DEFAULT_SEQ_LEN


# --------------------------------------------------------------------------------------------
# 5. Loading API (trainer, evaluator)
# --------------------------------------------------------------------------------------------


def _split_file(name: str, seq_len: int) -> Path:
    path = tokens_dir(seq_len) / f"{name}.npy"
    if not path.exists():
        known = ["train", "val", *heldout_names()]
        if name not in known:
            raise DataError(f"unknown split {name!r}; choose from {', '.join(known)}")
        raise DataError(f"no token cache for {name} at seq_len {seq_len}; run "
                        f"`python -m model.data prepare --seq-len {seq_len}` first")
    return path


def _rows(name: str, seq_len: int) -> np.ndarray:
    rows = np.load(_split_file(name, seq_len), mmap_mode="r")
    if name == "train":  # the guard: nothing held out may reach training
        assert_no_heldout((tokens_dir(seq_len) / "train.ids").read_text(encoding="utf-8").splitlines())
    assert rows.ndim == 2 and rows.shape[1] == seq_len, f"{name}.npy has shape {rows.shape}"
    return rows


def load_split(name: str, seq_len: int = DEFAULT_SEQ_LEN) -> torch.Tensor:
    """All rows of a split (``train``, ``val`` or ``heldout-<name>``): LongTensor ``(rows, seq_len)``."""
    return torch.from_numpy(np.asarray(_rows(name, seq_len), dtype=np.int64))


def iter_batches(
    name: str, batch_size: int, seq_len: int = DEFAULT_SEQ_LEN, seed: int = 0, start_row: int = 0,
    shuffle: bool = True, drop_last: bool = False,
) -> Iterator[torch.Tensor]:
    """One pass over a split in batches of LongTensor ``(batch_size, seq_len)``.

    The row order is a permutation fixed by ``seed`` (identity when ``shuffle`` is False);
    ``start_row`` skips the first rows of that order, so a resumed run continues where it stopped.
    """
    rows = _rows(name, seq_len)
    order = np.random.default_rng(seed).permutation(len(rows)) if shuffle else np.arange(len(rows))
    for start in range(start_row, len(order), batch_size):
        index = order[start : start + batch_size]
        if drop_last and len(index) < batch_size:
            return
        yield torch.from_numpy(np.asarray(rows[index], dtype=np.int64))


def read_meta(seq_len: int = DEFAULT_SEQ_LEN) -> dict[str, Any]:
    path = tokens_dir(seq_len) / "meta.json"
    if not path.exists():
        raise DataError(f"no token cache at seq_len {seq_len}; run `python -m model.data prepare` first")
    return json.loads(path.read_text())
