"""A run: one configuration (see :mod:`saelib.config`) taken from activations to a trained SAE in a folder.

``train_run(cfg, out)`` is what ``saelib train`` does: cache the train split's activations
(extracting them on first use), train with :func:`saelib.train.fit` on shuffled, normalised
batches, and leave ``out/sae``, ``out/metrics.jsonl`` and ``out/checkpoints``. Re-running it on
an interrupted ``out`` resumes; on a finished one it loads the result.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import config
from .activations import CachedSource, cached_activations
from .sae import TopKSAE, load


def train_run(cfg: config.TrainConfig, out: str | Path, progress: bool = True) -> TopKSAE:
    """Train the SAE a run configuration (:func:`saelib.config.resolve`) describes; return it."""
    from .distributed import fit_distributed, launched
    from .train import fit

    data_opts, train_opts = config.split(cfg)
    cache = cached_activations(**data_opts, split="train", progress=progress)
    source = CachedSource(cache)
    if train_opts.get("tokens") is None:
        train_opts["tokens"] = int(cfg.epochs * source.n_tokens)
    metadata = {**data_opts, "excluded_tokens": cache.manifest["dropped"], "train_rows": source.n_tokens}
    if launched():  # one rank of `saelib train --nproc N` / torchrun
        train_opts["latent_parallel"] = cfg.latent_parallel
        train = fit_distributed
    else:
        train = fit
    return train(source, out=out, normalizer=source.normalizer, metadata=metadata, progress=progress, **train_opts)


def load_run(path: str | Path) -> TopKSAE:
    """The SAE of a run folder (``RUN/sae``) or an SAE folder itself."""
    from .distributed import merge_shards

    path = Path(path)
    if not path.exists():  # a released SAE's name; load() says which names exist if it is none
        return load(path)
    sae_dir = path / "sae" if (path / "sae").is_dir() else path
    return merge_shards(sae_dir) if any(sae_dir.glob("shard_*_of_*")) else load(sae_dir)


def read_metrics(run: str | Path) -> list[dict]:
    """The rows of ``RUN/metrics.jsonl``, in order."""
    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"No training log at {path}; is {run} a run folder?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
