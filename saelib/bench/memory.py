"""What a throughput number depends on: peak memory per implementation, the memory a configuration
needs, how the C library hands out memory (``reuse_heap``) and the machine (threads, CPU, device,
versions, load)."""

from __future__ import annotations

import ctypes
import gc
import os
import platform

import torch

from .. import native
from ..files import cpu_info
from ..version import __version__
from .cases import BenchConfig

HEAPS = ("default", "reuse")  # how glibc's malloc serves large blocks: reuse_heap
_heap = "default"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt's parameters (malloc.h)


def _glibc(name: str):
    """glibc's function ``name`` (``mallopt``, ``malloc_trim``), or None where the C library is not glibc."""
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def resolve_heap(heap: str) -> str:
    """``"auto"``: ``"reuse"`` where the C library is glibc (:func:`reuse_heap`), else ``"default"``;
    ``"reuse"`` and ``"default"`` as they are."""
    if heap not in ("auto", *HEAPS):
        raise ValueError(f"heap must be one of auto, {', '.join(HEAPS)}, got {heap!r}.")
    return ("reuse" if _glibc("mallopt") else "default") if heap == "auto" else heap


def reuse_heap() -> None:
    """Make glibc's malloc serve every block from its heap, reused once freed, for the rest of this
    process: no block gets a fresh mapping (``mallopt(M_MMAP_MAX, 0)``) and freed memory is not
    returned to the OS (``M_TRIM_THRESHOLD``). By default a block over the mmap threshold (128 KB,
    rising to at most 32 MB as such blocks are freed) gets a new mapping, and every page of it faults
    on first touch, so a step that allocates its ``(B, n)`` and ``(B, d_in)`` temporaries afresh pays
    those faults at every step: on 2 cores of an AMD EPYC (Zen 4, a virtual machine) sparsify's step
    ran 1.33-1.52x faster and the GEMM roofline 1.12-1.14x with the heap reused, saelib's, which
    keeps its large buffers, 1.0-1.05x. The bench calls it before any implementation runs (``--heap
    reuse``, and ``auto``, the default, where the C library is glibc), so that each runs at its best.

    Raises ValueError where the C library is not glibc (no ``mallopt``).
    """
    global _heap
    mallopt = _glibc("mallopt")
    if mallopt is None:
        raise ValueError("reuse_heap (--heap reuse) sets glibc's malloc options, and this system's C library is not "
                         "glibc; measure with the default heap (--heap default or auto).")
    if not (mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)):
        raise ValueError("glibc's mallopt refused the options of reuse_heap (--heap reuse); measure with the default heap "
                         "(--heap default).")
    _heap = "reuse"


def _rss_mb(field: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` of this process in MB (Linux); ``None`` elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_memory(device: torch.device) -> None:
    """Return freed heap to the OS and restart the peak-RSS counter (Linux), and on a GPU the peak
    allocated-memory counter, so each impl's peak is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    malloc_trim = _glibc("malloc_trim")
    if malloc_trim:  # with reuse_heap too: the next impl's warm-up steps fault the pages in again
        malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _needed_gb(impl: str, cfg: BenchConfig) -> float:
    """A rough upper bound of the memory an impl needs, to skip what cannot fit."""
    dense = cfg.batch_size * cfg.n_latents * 4
    params = 2 * cfg.n_latents * cfg.d_in * 4
    # sparsify builds a (B, k, d) tensor (its peak RSS with AuxK on fits this too); saelib builds none
    sparse_rows = cfg.batch_size * cfg.k * cfg.d_in * 4
    per_impl = {"naive": 8 * dense, "sae-lens": 7 * dense, "sae-lens-sparse": 7 * dense, "roofline": dense,
                "roofline-bf16": dense, "saelib": 3 * dense, "saelib-bf16": 3 * dense, "sparsify": 3 * dense + 2 * sparse_rows}
    return (per_impl[impl] + 5 * params) / 2**30


def _peak_memory_mb(device: torch.device) -> tuple[float | None, float | None]:
    """(peak RSS of this process, peak memory allocated on the GPU or None) in MB since ``_reset_peak_memory``."""
    return _rss_mb("VmHWM"), torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _available_gb(device: torch.device) -> float | None:
    """Free memory where the impls run: the GPU's, or the host's ``MemAvailable``."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2**30
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def machine(device: torch.device = torch.device("cpu")) -> dict:
    """Threads, CPU model, the device, versions and load: what a throughput number depends on."""
    cpu = cpu_info().get("model name") or platform.processor() or platform.machine()
    return {
        "threads": torch.get_num_threads(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "heap": _heap,  # "reuse" after reuse_heap
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "saelib_version": __version__,
        # saelib's AuxK on the compiled CPU kernels (native.py) or why not; None off the CPU
        "native_kernels": None if device.type != "cpu" else "in use" if native.library() else native.unavailable(),
    }
