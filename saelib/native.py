"""Compiled CPU kernels (``saelib/csrc/*.c``), built on first use with the machine's C compiler.

``library()`` compiles ``csrc/auxk.c`` (``cc -O3 -march=native``: it runs where it is built) into
``$SAELIB_HOME/native/``, keyed by the source, the compiler and the CPU, and loads it with ctypes;
the calls release the GIL and run on ``torch.get_num_threads()`` threads of their own. Without a
compiler, or with ``SAELIB_NATIVE=0``, it returns None and saelib runs the same maths with torch
ops (``kernels.sparse_rows_decode`` picks); ``unavailable()`` says why, and the first fallback
warns once.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import threading
import warnings
from pathlib import Path

from .files import atomic_write, cpu_info, exclusive
from .paths import cache_dir

SOURCE = Path(__file__).parent / "csrc" / "auxk.c"
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-shared", "-fPIC", "-pthread")
# ctypes signatures: p a pointer (a tensor's data_ptr), i an int64, n an int (thread count)
SIGNATURES = {
    "saelib_select": ("p", "n", "i", "i", "i", "i", "p", "p", "n"),
    "saelib_group": ("p", "p", "i", "i", "i", "i", "p", "p", "p", "n"),
    "saelib_decode": ("p", "p", "p", "i", "i", "i", "i", "i", "p", "p", "p", "p", "n"),
    "saelib_backward": ("p", "p", "p", "p", "p", "i", "i", "i", "i", "i", "p", "p", "p", "p", "p", "p", "p", "n"),
}
_CTYPES = {"p": ctypes.c_void_p, "i": ctypes.c_int64, "n": ctypes.c_int}

OFF = "SAELIB_NATIVE=0 turns them off"  # the reason when the user turned them off (no warning then)
_lock = threading.Lock()
_state: dict = {}  # "lib": the loaded library or None, "reason": why None


def _cpu_id() -> str:
    """The CPU's model and feature flags (``-march=native`` code is only valid on such a CPU)."""
    info = cpu_info()
    return "\n".join((platform.machine(), info.get("model name", ""), info.get("flags", "")))


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


def _build(compiler: list[str]) -> Path:
    """The compiled library, from the cache or built now: by one process at a time (the others wait
    for it), under a temporary name, loaded once there to check it and flushed to disk before it is
    renamed into place, so that a cached build is always a whole one.

    Named ``auxk-<machine>-<source>.so``: ``<machine>`` digests the compiler, its flags and the CPU,
    ``<source>`` the C file. Builds of other sources (other saelib versions sharing ``$SAELIB_HOME``)
    are left alone: a process of that version may be about to load its own.
    """
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    machine = _digest(" ".join(FLAGS), version, _cpu_id())
    target = cache_dir("native") / f"auxk-{machine}-{_digest(SOURCE.read_text())}.so"
    if target.exists():
        return target
    with exclusive([target], "Waiting for another process to build saelib's CPU kernels"):
        if not target.exists():  # not built while this one waited
            def compile_to(tmp: str) -> None:
                run = subprocess.run([*compiler, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True,
                                     text=True, timeout=300)
                if run.returncode:
                    raise RuntimeError(f"`{' '.join(compiler)} {SOURCE.name}` failed: {run.stderr.strip()[-500:]}")
                _bind(ctypes.CDLL(tmp))  # it loads and has every function
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())

            atomic_write(target, compile_to)
    return target


def _no_scratch(result: int, function, args) -> int:
    """ctypes' ``errcheck`` of the kernels that allocate scratch memory: -1 says they could not."""
    if result < 0:
        raise MemoryError(f"saelib's CPU kernel {function.__name__} could not allocate its scratch memory (a few "
                          "numbers per dead latent, per thread); free some memory, run on fewer threads, or set "
                          "SAELIB_NATIVE=0 to use torch's ops instead.")
    return result


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """``lib`` with the argument and result types of each kernel set (an AttributeError names one it lacks)."""
    for name, signature in SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes = [_CTYPES[c] for c in signature]
        allocates = name != "saelib_decode"  # the others return -1 when their scratch memory cannot be had
        function.restype = ctypes.c_int64 if allocates else None
        if allocates:
            function.errcheck = _no_scratch
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (see ``unavailable()``); built once per process."""
    with _lock:
        if "lib" not in _state:
            compiler = shlex.split(os.environ.get("CC", "cc")) or ["cc"]  # CC may carry arguments ("ccache gcc")
            if os.environ.get("SAELIB_NATIVE", "1") == "0":
                lib, reason = None, OFF
            elif shutil.which(compiler[0]) is None:
                lib, reason = None, f"no C compiler `{compiler[0]}` on PATH (install gcc, or set CC)"
            else:
                try:  # an interruption (Ctrl-C in the first build) leaves no state: the next call builds again
                    lib, reason = _bind(ctypes.CDLL(str(_build(compiler)))), None
                except Exception as err:  # noqa: BLE001 - any failure falls back to the torch ops, saying why
                    lib, reason = None, f"building them failed: {err}"
            _state["lib"], _state["reason"] = lib, reason
        return _state["lib"]


def unavailable() -> str | None:
    """Why ``library()`` is None (None when it is not)."""
    library()
    return _state["reason"]


def warn_fallback() -> None:
    """Warn, once per process, that the torch ops stand in for the native kernels."""
    if unavailable() not in (None, OFF) and not _state.get("warned"):
        _state["warned"] = True
        warnings.warn(f"saelib's native CPU kernels are not in use ({_state['reason']}): AuxK runs on torch ops, "
                      "with the same results, more slowly.", RuntimeWarning, stacklevel=3)


def reset() -> None:
    """Forget the loaded library, so that the next ``library()`` looks again (tests)."""
    with _lock:
        _state.clear()
