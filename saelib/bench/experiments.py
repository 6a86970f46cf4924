"""Measurements beside the step's throughput: how fast an activation cache supplies batches, how
long a trainer waits for them, and the bf16 encoder's reconstruction parity."""

from __future__ import annotations

import os
import tempfile
import time

from torch import Tensor

from ..activations import CachedSource
from ..evals.reconstruction import reconstruction_metrics
from ..runs import read_metrics
from ..sae import ENCODER_DTYPES
from ..train import fit



def supply_rate(source, batch_size: int, *, epochs: int = 2, seed: int = 0) -> list[dict]:
    """How fast ``source`` (a ``sources.BatchSource``, e.g. ``activations.CachedSource``) yields
    shuffled ``(batch_size, d_in)`` batches: one row per epoch with ``tokens_per_s``.

    Epoch 0 reads the shards (from the page cache if they are there) and checks their checksums;
    later epochs reshuffle what stays resident. Compare with the ``saelib`` row's ``tokens_per_s``:
    the trainer never waits while the supply is many times faster.
    """
    rows = []
    for epoch in range(epochs):
        tokens, start = 0, time.perf_counter()
        for x in source.batches(batch_size, seed=seed, epoch=epoch):
            tokens += len(x)
        seconds = time.perf_counter() - start
        rows.append({"epoch": epoch, "batch_size": batch_size, "tokens": tokens, "seconds": seconds,
                     "tokens_per_s": tokens / seconds, "load_avg_1m": os.getloadavg()[0]})
    return rows


def input_wait(cache, n_latents: int, k: int, batch_size: int, *, steps: int, memory_gb: float, read_ahead: bool,
               seed: int = 0, drop_page_cache: bool = False) -> dict:
    """Does the trainer wait for its batches? ``steps`` training steps (AuxK off) on the activation
    cache ``cache`` (an ``activations.ActivationCache``) through ``CachedSource(cache, memory_gb,
    read_ahead)``, from the disk itself with ``drop_page_cache`` (Linux, needs root).

    Returns ``seconds`` (the training loop's wall time), ``waited_seconds`` (spent waiting for the
    next batch: the runs' ``input_wait`` summed over their log windows) and ``groups`` per epoch.
    """


    source = CachedSource(cache, memory_gb=memory_gb, read_ahead=read_ahead)
    if drop_page_cache:
        os.sync()
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1\n")
        except OSError as error:
            raise PermissionError(f"Cannot drop the page cache ({error}); run as root or leave drop_page_cache off.") from None
    with tempfile.TemporaryDirectory() as run:
        fit(source, n_latents, k, out=run, tokens=steps * batch_size, batch_size=batch_size, auxk=False, seed=seed,
            log_every=10, progress=False)
        lines = read_metrics(run)
    seconds = waited = 0.0
    for before, line in zip([0] + [r["tokens"] for r in lines], lines):
        window = (line["tokens"] - before) / line["tokens_per_s"]
        seconds, waited = seconds + window, waited + line["input_wait"] * window
    return {"read_ahead": read_ahead, "memory_gb": memory_gb, "groups": len(source._plan(seed, 0)[1]), "steps": steps,
            "seconds": seconds, "waited_seconds": waited, "input_wait": waited / seconds, "load_avg_1m": os.getloadavg()[0]}


def bf16_parity(train, validation: Tensor, n_latents: int, k: int, *, batch_size: int = 1024, epochs: int = 2,
                seed: int = 0) -> list[dict]:
    """Does the bf16 encoder train as well as fp32? The same SAE trained twice on the activation
    cache ``train`` (an ``activations.ActivationCache``: same seed, same batches), with the encoder
    GEMM in float32 and in bfloat16, then each scored on the raw held-out activations
    ``validation (N, d_in)``, encoded in fp32 (``fit`` returns the SAE encoding as a loaded one does).

    One row per encoder dtype: ``evals.reconstruction_metrics`` (``nmse``...), ``fit_seconds`` and
    ``rel_nmse_diff``, the NMSE relative to the fp32 run's (parity: within 1%).
    """

    steps = epochs * (train.n_rows // batch_size)
    rows = []
    for dtype in ENCODER_DTYPES:
        start = time.perf_counter()
        sae = fit(CachedSource(train), n_latents, k, normalizer=train.normalizer, tokens=steps * batch_size,
                  batch_size=batch_size, seed=seed, encoder_dtype=dtype, progress=False)
        seconds = time.perf_counter() - start
        metrics = reconstruction_metrics(sae, validation)
        rows.append({"encoder_dtype": dtype, "n_latents": n_latents, "k": k, "batch_size": batch_size, "steps": steps,
                     "train_tokens": train.n_rows, "validation_tokens": len(validation), **metrics,
                     "rel_nmse_diff": metrics["nmse"] / rows[0]["nmse"] - 1 if rows else 0.0, "fit_seconds": seconds})
    return rows
