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
import subprocess
import sys
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
    """
    gc.collect()
    torch.cuda.empty_cache()  # nothing to do where CUDA was never used
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc)), **os.environ}
    return subprocess.call(torchrun_command(nproc, argv), env=env)
