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
    return _made(root)


def cache_dir(*parts: str) -> Path:
    """A sub-folder of the cache root, created on first use."""
    return _made(home().joinpath(*parts))


def _made(path: Path) -> Path:
    """``path``, created as a folder if missing; a cache folder that cannot be one (a file on the way,
    no permission) is an OSError in one sentence naming it and ``SAELIB_HOME``."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"Cannot use {path} as saelib's cache folder ({error.strerror or error}); set SAELIB_HOME to "
                      "a writable folder.") from None
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
