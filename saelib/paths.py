"""Where saelib keeps its caches: one folder, set by the environment variable ``SAELIB_HOME``.

Converted models, corpora, activation caches, kept evaluation baselines, compiled kernels and
the tracebacks of unexpected errors live under it (training runs go where ``out`` says).
It defaults to ``~/.cache/saelib``; the project's Makefile points it at ``.cache/`` inside the
checkout, which git ignores.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The cache root: ``$SAELIB_HOME`` or ``~/.cache/saelib``, created on first use."""
    root = Path(os.environ.get("SAELIB_HOME") or Path.home() / ".cache" / "saelib").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_dir(*parts: str) -> Path:
    """A sub-folder of the cache root, created on first use."""
    path = home().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def packaged_file(dist: str, rel: str, what: str, hint: str) -> Path:
    """A data file shipped inside an installed distribution; a clear error naming the install step."""
    import importlib.metadata

    try:
        path = Path(importlib.metadata.distribution(dist).locate_file(rel))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.exists():
        raise FileNotFoundError(f"{what} needs the package {dist}: run `{hint}`.")
    return path
