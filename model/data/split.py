"""The split rule (a pure function of a document's id) and the guard of the five held-out sets."""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path


from model.errors import DataError
from model.paths import ASSETS_DIR

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Split rule and held-out sets
# --------------------------------------------------------------------------------------------

SPLIT_SALT = "split-v1:"
VAL_FROM = 0.98  # u(id) >= VAL_FROM -> validation slice (per source)
HELDOUT_SOURCES: dict[str, str] = {  # held-out set -> the source it is drawn from
    "heldout-fiction": "austen",
    "heldout-expository": "wiki-sample",
    "heldout-news": "lee-news",
    "heldout-chat": "chitchat",
    "heldout-speech": "sotu",
}
HELDOUT_FICTION_ID = "austen/persuasion"
HELDOUT_U_BELOW: dict[str, float] = {"wiki-sample": 0.22, "chitchat": 0.03, "sotu": 0.08}
HELDOUT_DIR = ASSETS_DIR / "heldout"
ID_PREFIX: dict[str, str] = {"wiki-sample": "wiki"}  # source -> id prefix where they differ

# --------------------------------------------------------------------------------------------
# 3. Split rule and held-out guard
# --------------------------------------------------------------------------------------------


def u(doc_id: str, salt: str = SPLIT_SALT) -> float:
    """A stable uniform number in [0, 1) for a document id (the split hash)."""
    return int(hashlib.sha256((salt + doc_id).encode()).hexdigest()[:12], 16) / 16**12


def source_of(doc_id: str) -> str:
    prefix = doc_id.split("/", 1)[0]
    return {v: k for k, v in ID_PREFIX.items()}.get(prefix, prefix)


def split_of(doc_id: str, source: str | None = None) -> str:
    """``heldout-<name>``, ``val`` or ``train`` for a document id (source inferred from the id)."""
    source = source or source_of(doc_id)
    value = u(doc_id)
    if doc_id == HELDOUT_FICTION_ID:
        return "heldout-fiction"
    if source == "lee-news":
        return "heldout-news"
    for name, held_source in HELDOUT_SOURCES.items():
        if source == held_source and value < HELDOUT_U_BELOW.get(source, -1.0):
            return name
    return "val" if value >= VAL_FROM else "train"


def heldout_names() -> list[str]:
    """The named held-out sets, e.g. ``heldout-fiction``."""
    return list(HELDOUT_SOURCES)


def heldout_ids_path(name: str) -> Path:
    return HELDOUT_DIR / f"{name}.ids"


def committed_heldout_ids() -> set[str]:
    """Every id listed in ``assets/heldout/*.ids``."""
    ids: set[str] = set()
    for name in heldout_names():
        path = heldout_ids_path(name)
        if path.exists():
            ids.update(line for line in path.read_text(encoding="utf-8").splitlines() if line)
    return ids


def assert_no_heldout(ids: Iterable[str]) -> None:
    """Raise ``DataError`` if any id belongs to a named held-out set (by rule or committed list)."""
    committed = committed_heldout_ids()
    leaked = [i for i in ids if i in committed or split_of(i).startswith("heldout-")]
    if leaked:
        raise DataError(f"{len(leaked)} held-out document(s) in training data, e.g. {leaked[:3]}")


def sync_heldout_ids(ids_by_split: dict[str, list[str]], sources: Iterable[str]) -> None:
    """Write ``assets/heldout/<name>.ids`` if absent, else check the extracted ids still match.

    A mismatch means documents were renamed or a source changed: a held-out set must not drift.
    """
    HELDOUT_DIR.mkdir(parents=True, exist_ok=True)
    present = set(sources)
    for name, source in HELDOUT_SOURCES.items():
        if source not in present:
            log.warning("source %s not built: held-out set %s is unavailable", source, name)
            continue
        ids = sorted(ids_by_split.get(name, []))
        path = heldout_ids_path(name)
        if not path.exists():
            path.write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
            log.info("wrote %s (%d ids)", path, len(ids))
        elif path.read_text(encoding="utf-8").splitlines() != ids:
            raise DataError(
                f"{name}: the extracted documents no longer match {path} (renamed documents or changed "
                "source?). Fix the extraction; regenerate the file only if the change is intended."
            )
