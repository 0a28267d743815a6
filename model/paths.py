"""Where the project keeps generated files: one git-ignored cache folder.

Set ``LAB_CACHE_DIR`` to move it (e.g. to a bigger disk, or a persistent volume on Spaces).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ASSETS_DIR = REPO_ROOT / "assets"


def cache_dir(*parts: str) -> Path:
    """Return ``$LAB_CACHE_DIR/<parts>`` (default ``<repo>/.cache``), creating it."""
    root = Path(os.environ.get("LAB_CACHE_DIR", REPO_ROOT / ".cache")).expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
