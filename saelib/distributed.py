"""Train one TopK SAE on many processes: data parallel, latent parallel, or both.

    torchrun --standalone --nproc-per-node 4 my_script.py   # my_script calls fit_distributed(...)
    fit_distributed(activations, n_latents, k, latent_parallel=2, out="runs/big") -> this rank's shard
    saelib train --nproc 4 --latent-parallel 2 ...         # the same from the command line

Every rank runs :func:`saelib.train.fit`'s one loop on its place in the ``D x L`` grid of
:mod:`saelib.grid` (one process is the trivial ``1 x 1`` grid); the run folder has the layout of
:mod:`saelib.checkpoint`, so ``fit`` and ``fit_distributed`` resume each other's runs, on any grid
whose ``L`` divides ``n_latents`` and whose ``D`` divides ``batch_size``. :func:`merge_shards`
(or ``saelib.load(run)``) loads a latent-sharded ``sae/`` as one ``TopKSAE``.
See ``docs/distributed.md`` for the layout of a run of the paper's size.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor

from .checkpoint import merge_shards  # noqa: F401  (documented here: loads what fit_distributed writes)
from .normalize import Normalizer
from .sae import TopKSAE
from .sources import BatchSource
from .train import fit


def fit_distributed(
    data: Tensor | BatchSource | Iterable[Tensor],
    n_latents: int,
    k: int,
    *,
    latent_parallel: int = 1,
    out: str | os.PathLike | None = None,
    normalizer: Normalizer | None = None,
    normalize: bool | None = None,
    metadata: dict | None = None,
    progress: bool = True,
    **options,
) -> TopKSAE:
    """``saelib.fit`` on every rank of a ``torch.distributed`` world; returns this rank's shard.

    Every rank passes the same ``data`` and options (the batch order is the one-process order;
    each rank keeps its ``batch_size / D`` rows of every batch). With ``latent_parallel=1`` the
    returned shard is the whole SAE; otherwise load the result with ``saelib.load(out)``.

    Args:
        latent_parallel: ``L``, ranks sharing one SAE's latents; the other factor of the world
            size is data parallel. ``L`` must divide ``n_latents``; ``D`` must divide ``batch_size``.
        Others: as ``saelib.fit`` (``arch`` must be ``"topk"`` on more than one rank).
    """
    return fit(data, n_latents, k, latent_parallel=latent_parallel, out=out, normalizer=normalizer, normalize=normalize,
               metadata=metadata, progress=progress, **options)


def launched() -> bool:
    """Whether this process is one rank of a multi-process launch (torchrun sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m saelib *argv``."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive integer, got {nproc!r}.")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "saelib", *argv]


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``saelib *argv`` on ``nproc`` local ranks (torchrun, a free port); its exit status.

    Each rank gets ``OMP_NUM_THREADS = cores // nproc`` unless the caller set it. What this process
    holds on a GPU (an extraction's cached memory) is freed first: rank 0 shares that GPU.

    torchrun and the ranks run in a session of their own, and a Ctrl-C, SIGTERM or SIGHUP to this
    process is passed on to the ranks once (SIGINT as itself, the others as SIGTERM): each finishes
    its step, writes a checkpoint and stops, and torchrun ends with them. A terminal's Ctrl-C would
    otherwise reach each rank twice, from the terminal and from torchrun, and a second SIGINT stops a
    rank at once. A second signal kills them all. After a Ctrl-C this raises KeyboardInterrupt once
    they have stopped; after another signal it returns ``128 + signal``.
    """
    gc.collect()
    torch.cuda.empty_cache()  # nothing to do where CUDA was never used
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc)), **os.environ}
    process = subprocess.Popen(torchrun_command(nproc, argv), env=env, start_new_session=True)
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        if process.poll() is not None:
            return
        if len(received) > 1:
            os.killpg(process.pid, signal.SIGKILL)
            return
        print("Waiting for the ranks to write their checkpoint and stop (Ctrl-C again to kill them).", file=sys.stderr)
        sent = signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM
        ranks = _children(process.pid)
        for rank in ranks:
            try:
                os.kill(rank, sent)
            except ProcessLookupError:
                pass
        if not ranks:  # not started yet, or no /proc here: torchrun passes it on
            process.send_signal(sent)

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    main = threading.current_thread() is threading.main_thread()  # handlers can only be set there
    previous = {sig: signal.signal(sig, forward) for sig in signals} if main else {}
    try:
        code = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received and received[0] == signal.SIGINT:
        raise KeyboardInterrupt
    return 128 + received[0] if received else code


def _children(pid: int) -> list[int]:
    """The process ids of ``pid``'s children (Linux's /proc; none elsewhere)."""
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
