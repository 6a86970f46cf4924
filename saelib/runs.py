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
from .activations import ActivationCache, CachedSource, cached_activations
from .distributed import launched
from .files import writable_folder
from .loading import load
from .models import check_layer, text_config
from .sae import TopKSAE, check_fits
from .sources import cache_fingerprint
from .train import check_free, fit, metrics_lines

# A run folder opens with saelib.load, which also takes SAE folders, shards and released names
load_run = load


def train_activations(cfg: config.TrainConfig, progress: bool = True) -> ActivationCache:
    """The train split's activations of a run configuration, extracted on first use by the LM on the
    device the SAE trains on (in bf16 where that is fast: :func:`saelib.activations.extraction_dtype`).

    A budget of less than one batch, a layer the model does not have, or an SAE too large for this
    machine's memory (from the model's config) is refused first, not after the extraction; a rank of
    a launched run checks only the part of the SAE it builds, as it builds it."""
    if not launched():
        cfg.check_one_batch()
        check_model(cfg)
    return cached_activations(**cfg.group("data"), split="train", progress=progress, device=config.resolve_device(cfg.device))


def check_model(cfg: config.TrainConfig, local_only: bool = False) -> bool:
    """Refuse a layer the model does not have, or an SAE too large for this machine's memory, from
    the model's config. With ``local_only`` (``saelib train --dry-run``), a hub model whose config is
    not on this machine is not looked up: False, unchecked; else True."""
    lm_config = text_config(cfg.model, local_only)
    if lm_config is None:
        return False
    check_layer(cfg.model, cfg.layer, lm_config.num_hidden_layers)
    check_fits(lm_config.hidden_size, cfg.n_latents)
    return True


def check_out(cfg: config.TrainConfig, out: str | Path) -> None:
    """Refuse, before anything is extracted, an ``out`` folder that cannot be made or written, that
    another trainer holds or that holds a run on activations of another model, layer, site or corpus;
    :func:`saelib.train.fit` checks the rest (the config, the data's digest) once the activations are
    at hand."""
    run = writable_folder(out, "out")
    check_free(run)
    try:
        recorded = json.loads((run / "config.json").read_text()).get("data")
    except (OSError, ValueError, AttributeError):  # none yet, or damaged: fit says which
        return
    given = cache_fingerprint(cfg.model, cfg.layer, cfg.site, cfg.corpus, "train")
    if isinstance(recorded, str) and recorded.startswith("activation cache of ") and not recorded.startswith(given + ","):
        raise ValueError(f"{run} was trained on other activations ({recorded}; given: {given}); use a new out folder, "
                         "or give the run the data it was trained on.")


def train_run(cfg: config.TrainConfig, out: str | Path, progress: bool = True) -> TopKSAE:
    """Train the SAE a run configuration (:func:`saelib.config.resolve`) describes; return it."""
    if not launched():  # a rank of `saelib train --nproc N` starts after the CLI checked
        check_out(cfg, out)
    data_opts, train_opts = config.split(cfg)
    cache = train_activations(cfg, progress)
    source = CachedSource(cache)
    if train_opts.get("tokens") is None:
        tokens = cfg.epochs * source.n_tokens
        if tokens >= 2**63:
            raise ValueError(f"epochs={cfg.epochs!r} over the {source.n_tokens:,} extracted tokens is {tokens:.3g} tokens, "
                             "more than a run can count; choose fewer epochs or give tokens.")
        if tokens < cfg.batch_size:
            raise ValueError(f"epochs={cfg.epochs!r} over the {source.n_tokens:,} extracted tokens is {int(tokens):,} tokens, "
                             f"less than one batch of batch_size={cfg.batch_size}; choose more epochs or give tokens.")
        train_opts["tokens"] = int(tokens)
    # evaluation packs its contexts as training did, begin-of-sequence token or not
    metadata = {**data_opts, "prepend_bos": cache.manifest["key"].get("prepend_bos", False),
                "lm_dtype": cache.manifest["key"].get("lm_dtype", "float32"),
                "excluded_tokens": cache.manifest["dropped"], "train_rows": source.n_tokens}
    latent_parallel = cfg.latent_parallel if launched() else None  # one rank of `saelib train --nproc N` / torchrun
    return fit(source, out=out, normalizer=source.normalizer, metadata=metadata, progress=progress,
               latent_parallel=latent_parallel, **train_opts)


def read_metrics(run: str | Path) -> list[dict]:
    """The rows of ``RUN/metrics.jsonl``, in order (:func:`saelib.train.metrics_lines`)."""
    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"No training log at {path}; is {run} a run folder?")
    return [row for _, row in metrics_lines(path)]
