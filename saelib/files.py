"""File helpers every other module builds on: atomic writes, digests, checked safetensors, the CPU.

A file saelib writes is either absent or whole: ``atomic_write`` builds it under a temporary name
in the same folder and renames it into place (``os.replace`` is atomic on one file system), so a
process killed mid-write leaves the previous version. Files carry a SHA-256 where saelib reads
them back, so a damaged one is an error naming it, never a silent load; a JSON file is checked
against the schema of its kind (``read_json``: a pydantic model), so an unexpected one is an error
naming the file, the key and the value, never a traceback or a silent acceptance.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import sys
from contextlib import contextmanager, suppress
from functools import lru_cache
from pathlib import Path
from typing import Callable

from pydantic import BaseModel, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file
import torch
from torch import Tensor

from .paths import cache_dir

# tries of writable_folder's check (each process checking the same folder can fail it once)
WRITABLE_TRIES = 100


def atomic_write(target: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp)`` with a temporary path beside ``target``, then rename it to ``target``.

    ``write`` may make a file or a folder there. On failure the temporary is removed and
    ``target`` is left as it was. Returns ``target``.
    """
    target = Path(target)
    tmp = temp_path(target)
    remove(tmp)
    try:
        write(str(tmp))
        replace(tmp, target)
    finally:
        remove(tmp)
    return target


def writable_folder(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a folder to write into, refused in one sentence if it is blank, if it or a folder
    above it is a file, or if it cannot be made or written. ``what`` names the argument in the
    message. The folders it makes to find out are removed again."""
    if not isinstance(path, (str, os.PathLike)) or isinstance(os.fspath(path), bytes):
        raise ValueError(f"{what} must be a folder's path (a str or a Path), got {type(path).__name__} {shorten(repr(path))}.")
    if not str(path).strip():
        raise ValueError(f"{what} must name a folder, got {str(path)!r}.")
    if "\0" in str(path):
        raise ValueError(f"{what} {shorten(repr(str(path)))} holds a NUL character, which no path can; name a folder.")
    path = Path(path)
    for part in (path, *path.parents):
        with suppress(OSError):  # one stat: a folder another process removes is not taken for a file
            if not stat.S_ISDIR(part.stat().st_mode):
                raise ValueError(f"{what} {str(path)!r} cannot be a folder: {part} is a file; name a folder.")
    # the deepest first; os.path.exists is False where the OS refuses to look (a name too long)
    missing = [folder for folder in (path, *path.parents) if not os.path.exists(folder)]
    try:
        # Another process checking the same folder (a rank of the same run) removes what it made, at
        # most once each: a failure then is looked at again, up to the bound, before it counts.
        for attempt in range(WRITABLE_TRIES):
            try:
                path.mkdir(parents=True, exist_ok=True)
                if not os.access(path, os.W_OK | os.X_OK):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
                break
            except OSError:
                if attempt == WRITABLE_TRIES - 1:
                    raise
    except OSError as err:
        raise ValueError(f"{what} {str(path)!r} cannot be written ({err.strerror}); name a folder you can write to.") from None
    finally:
        for folder in missing:
            with suppress(OSError):
                folder.rmdir()
    return path


def temp_path(target: Path, tag: str | None = None) -> Path:
    """The temporary name under which ``target`` is built: ``.<name>.tmp-<tag>`` beside it, the tag
    being the process id unless several processes build it together."""
    return target.with_name(f".{target.name}.tmp-{tag or os.getpid()}")


def replace(tmp: Path, target: Path) -> None:
    """Rename the finished ``tmp`` to ``target`` (a folder replaces a folder of the same name), durably:
    what ``tmp`` holds reaches the disk before the rename, and the rename before this returns, so a
    power cut leaves the old ``target`` or the whole new one (a checkpoint's predecessor is removed
    only after this)."""
    for path in [*sorted(tmp.rglob("*")), tmp] if tmp.is_dir() else [tmp]:
        _fsync(path)
    if tmp.is_dir() and target.is_dir():
        remove(target)  # os.replace renames a folder only onto an empty one
    os.replace(tmp, target)
    _fsync(target.parent)


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's entries to the disk (where the file system syncs folders at all)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF) or not path.is_dir():
            raise
    finally:
        os.close(fd)


@contextmanager
def exclusive(targets: list[Path], waiting: str):
    """Hold an exclusive lock on each of ``targets`` (a lock file ``.<name>.lock`` beside it, made if
    missing) for the block, so that what one process builds there another does not build at the
    same time: a second process waits, saying ``waiting`` once, until the first leaves the block or
    dies (the system then releases its locks). Locks are taken in sorted order, so two processes
    never wait on each other; where the system has no ``fcntl`` (Windows) the block runs unlocked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    files = []
    try:
        for path in sorted({target.with_name(f".{target.name}.lock") for target in targets}):
            path.parent.mkdir(parents=True, exist_ok=True)
            files.append(open(path, "a"))
            try:
                fcntl.flock(files[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if waiting:
                    print(waiting, file=sys.stderr, flush=True)
                    waiting = ""  # said once
                fcntl.flock(files[-1], fcntl.LOCK_EX)
        yield
    finally:
        for f in files:
            f.close()  # closing the file releases its lock


def atomic_write_text(target: str | os.PathLike, text: str) -> Path:
    """``target.write_text(text)``, atomically."""
    return atomic_write(target, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def remove(path: Path) -> None:
    """Delete a file or a folder tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def file_digest(path: str | os.PathLike, new=hashlib.sha256) -> str:
    """Hex digest of a file by the hash constructor ``new`` (a ``hashlib``-like object: ``update``,
    ``hexdigest``), read in 1 MiB chunks into one buffer."""
    h, buffer = new(), bytearray(1 << 20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while size := f.readinto(buffer):
            h.update(view[:size])
    return h.hexdigest()


def digest(*parts, new=hashlib.sha256) -> str:
    """Hex digest of ``parts`` in turn by the hash constructor ``new``: a tensor by its bytes, anything
    else by its JSON. What names a file derived from tensors (a cache of their results)."""
    h = new()
    for part in parts:
        if isinstance(part, Tensor):
            h.update(part.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(json.dumps(part).encode())
    return h.hexdigest()


def kept_json(kind: str, *key) -> tuple[Path, object]:
    """Results that depend on nothing but ``key`` (its parts as :func:`digest` takes them), kept as
    JSON under ``$SAELIB_HOME/<kind>/``, so a later call with the same key reads them instead of
    computing them again: the file's path (named by the digest), and what it holds (None if absent
    or unreadable; the caller checks its shape and writes it with :func:`atomic_write_text`)."""
    path = cache_dir(kind) / f"{digest(*key)[:32]}.json"
    try:
        return path, json.loads(path.read_text())
    except (OSError, ValueError):
        return path, None


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file."""
    return file_digest(path, hashlib.sha256)


def check_sha256(path: Path, sha256: str | None, fix: str) -> None:
    """A ValueError naming ``path`` (and what to do: ``fix``) unless its SHA-256 is ``sha256`` (``None``: unchecked)."""
    if sha256 is not None and sha256_file(path) != sha256:
        raise ValueError(f"{path} is corrupt (its SHA-256 does not match the one recorded when it was written); {fix}.")


def load_safetensors(path: Path, sha256: str | None, fix: str) -> dict[str, Tensor]:
    """The tensors of ``path``; a ValueError naming the file and ``fix`` if it is unreadable or fails ``check_sha256``."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} cannot be read as safetensors ({error}); the file is truncated or corrupt, {fix}.") from None
    check_sha256(path, sha256, fix)
    return tensors


def read_json(path: str | os.PathLike, schema: type[BaseModel], fix: str) -> BaseModel:
    """The JSON file ``path`` as an instance of ``schema`` (a pydantic model: types, ranges, required
    and unknown keys); a ValueError in one sentence naming the file, the key, the value and ``fix``
    (what to do) if it cannot be read, is not JSON or does not fit."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"{path} cannot be read ({error.strerror or error}); {fix}.") from None
    try:
        return schema.model_validate_json(data)
    except ValidationError as error:
        raise ValueError(describe(path, error, fix)) from None


def check_schema(value, schema: type[BaseModel], where: str, fix: str) -> BaseModel:
    """``value`` (already parsed, e.g. from YAML or a safetensors header) as an instance of ``schema``;
    a ValueError like ``read_json``'s, naming ``where``."""
    try:
        return schema.model_validate(value)
    except ValidationError as error:
        raise ValueError(describe(where, error, fix)) from None


def describe(where, error: ValidationError, fix: str) -> str:
    """The first problem pydantic found, as one sentence naming ``where``, the key and the value."""
    first = error.errors(include_url=False)[0]
    # a key that holds a newline or other control character is shown quoted: the message stays one line
    key = ".".join(str(part) if str(part).isprintable() else repr(part) for part in first["loc"])
    if first["type"] == "json_invalid":
        return f"{where} is not valid JSON ({first['msg'].removeprefix('Invalid JSON: ')}); {fix}."
    if first["type"] == "missing":
        return f"{where} has no {key}; {fix}."
    value = shorten(repr(first.get("input")))
    if first["type"] == "extra_forbidden":
        return f"{where} has an unknown key {key} (= {value}); {fix}."
    what = first["msg"][0].lower() + first["msg"][1:]
    return f"{where}: {key or 'the content'} is wrong ({what}, got {value}); {fix}."


def shorten(text: str, limit: int = 60) -> str:
    """``text`` cut to ``limit`` characters (ending in ``...`` where cut): a value shown in a one-line error."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


@lru_cache(maxsize=1)
def cpu_info() -> dict[str, str]:
    """The first ``model name`` and ``flags`` lines of ``/proc/cpuinfo`` (empty where there is none)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "flags") and key not in info:
                    info[key] = value.strip()
    except OSError:
        pass
    return info


def available_memory() -> int | None:
    """Bytes of memory the kernel could give this process now without swapping (``MemAvailable``
    of ``/proc/meminfo``); None where that is unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
    except (OSError, ValueError, IndexError):
        pass
    return None
