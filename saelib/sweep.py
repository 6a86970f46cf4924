"""Sweeps: many SAEs trained on the same cached activations, one run folder each, one table out.

    configs = sweep.grid(n_latents=[256, 1024, 4096], k=[8, 32], seed=[0, 1])
    table = sweep.run_sweep(configs, train_cache, "runs/03_scaling_laws-ci", validation=val_cache,
                            tokens=32_768, batch_size=1024)

Every run trains with :func:`saelib.train.fit` on one :class:`~saelib.activations.CachedSource`
(the cache is read once and shared), in ``root/<run_name(options)>`` (the config with the
options shared by every run, so changing those trains new runs beside the old). ``fit`` resumes an
interrupted run and loads a finished one, so re-running a sweep only trains what is missing.

On a GPU, ``device="cuda"`` (a ``fit`` option; the default where CUDA is available) trains there. On
several GPUs or machines sharing the sweep folder, each process trains its share and one call
without ``shard`` collects the table (it loads the finished runs)::

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])   # e.g. under torchrun
    sweep.run_sweep(configs, train_cache, root, shard=(rank, world), device=f"cuda:{rank % 8}", ...)

Each row of the table holds the run's configuration, its final training metrics, the
reconstruction metrics on held-out activations (a ``split="validation"`` cache, normalised with
the *training* normaliser the SAE carries), the training compute ``flops`` (see
:func:`training_flops`) and its learning curve (``curve``: the ``metrics.jsonl`` rows).
"""

from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from .activations import ActivationCache, CachedSource
from .evals.reconstruction import RECONSTRUCTION_KEYS, reconstruction_metrics
from .files import atomic_write_text
from .runs import read_metrics
from .config import TRAINER_FIELDS, TrainConfig
from .sources import BatchSource
from .stats import mean_interval
from .train import fit

# the keys a run name spells out, in order, with their short labels
NAME_KEYS = {"arch": "", "n_latents": "n", "k": "k", "l1_coef": "l1", "lr": "lr", "lr_multiplier": "lrx", "auxk": "auxk",
             "tied_init": "tied", "tokens": "T", "seed": "s"}
# where a run executes, not which run it is: left out of its folder name (a sweep resumes on a GPU)
EXECUTION_KEYS = {"device"}
RESULT_FILE = "sweep_result.json"


def grid(**axes) -> list[dict]:
    """Every combination of the given values: ``grid(n_latents=[256, 512], k=[8, 32])`` -> 4 configs.

    A scalar is one value; a list is an axis. Configs are ordered with the last axis varying
    fastest. Configs that ``fit`` would reject (``k > n_latents``, Multi-TopK with
    ``4k > n_latents``) are left out.
    """
    lists = {key: value if isinstance(value, (list, tuple)) else [value] for key, value in axes.items()}
    configs = [dict(zip(lists, values)) for values in itertools.product(*lists.values())]
    return [c for c in configs if _feasible(c)]


def _feasible(cfg: dict) -> bool:
    n, k = cfg.get("n_latents"), cfg.get("k")
    if n is None or k is None:
        return True
    return k <= n and (cfg.get("arch") != "multitopk" or 4 * k <= n)


def run_name(cfg: dict) -> str:
    """A folder name that identifies a config, e.g. ``topk-n1024-k32-lrx16-s0``: the values of
    ``NAME_KEYS`` that are set (``l1_coef`` only for the ReLU SAE it acts on) and a hash of the others."""
    named = {key: label for key, label in NAME_KEYS.items()
             if cfg.get(key) is not None and (key != "l1_coef" or cfg.get("arch") == "relu")}
    parts = []
    for key, label in named.items():
        value = cfg[key]
        value = {True: "1", False: "0"}.get(value, value) if isinstance(value, bool) else value
        parts.append(f"{label}{value:g}" if isinstance(value, float) else f"{label}{value}")
    rest = {key: cfg[key] for key in sorted(cfg) if key not in named and key not in EXECUTION_KEYS}
    if rest:
        import hashlib

        parts.append(hashlib.sha1(json.dumps(rest, sort_keys=True, default=str).encode()).hexdigest()[:8])
    return "-".join(parts)


def training_flops(d_in: int, n_latents: int, tokens: int) -> float:
    """Training compute ``C = 6 * d_in * n_latents * tokens`` (FLOPs).

    The dense encoder matmul costs ``2 * d_in * n_latents`` per token forward and twice that
    backward; the decoder is sparse (``k`` rows per token) and is left out, as the paper's
    compute counts the dominant dense term. For ReLU SAEs the decoder is dense too; the same
    formula keeps the architectures on one axis.
    """
    return 6.0 * d_in * n_latents * tokens


def run_sweep(configs: list[dict], cache: ActivationCache | BatchSource, root: str | Path, *,
              validation: ActivationCache | torch.Tensor | None = None, progress: bool = True,
              shard: tuple[int, int] | None = None, **common) -> list[dict]:
    """Train every config (skipping finished ones) and return one row of results per config.

    Args:
        configs: dicts of ``fit`` options, each with at least ``n_latents`` (and ``k``, unless
            ``arch="relu"``); see :func:`grid`.
        cache: the training activations: an :class:`ActivationCache`, or any ``BatchSource``
            already on the normalised scale (a ``CachedSource``; a ``TensorSource`` in tests).
        root: sweep folder; each run goes to ``root/<run_name({**common, **config})>``, so a run
            with other shared options (a changed preset) gets its own folder.
        validation: held-out raw activations (a validation-split cache or an ``(N, d_in)``
            tensor) for the reconstruction metrics; without it the row has training metrics only.
        progress: print one line per run, with the time left (:func:`_time_left`).
        shard: ``(i, N)``: train and return only configs ``i, i + N, i + 2N...``, so that N
            processes (GPUs, machines) sharing ``root`` split the sweep between them.
        **common: ``fit`` options shared by every run (``tokens``, ``batch_size``...); a config's
            own value wins.
    """
    if shard is not None:
        i, N = shard
        if not (isinstance(i, int) and isinstance(N, int) and 0 <= i < N):
            raise ValueError(f"shard must be (i, N) with 0 <= i < N, got {shard!r}.")
        configs = configs[i::N]
    runs = [{**common, **cfg} for cfg in configs]
    for cfg, options in zip(configs, runs):  # before any training
        unknown = sorted(set(options) - set(TRAINER_FIELDS))
        if unknown:
            raise ValueError(f"Sweep config {cfg} has unknown option(s) {unknown}; use TrainConfig's trainer fields.")
    source = CachedSource(cache) if isinstance(cache, ActivationCache) else cache
    x_val = validation.all_rows() if isinstance(validation, ActivationCache) else validation
    root = Path(root)
    table, trained = [], []  # trained: (row, seconds) of the runs trained here, in order
    for i, options in enumerate(runs):
        folder = root / run_name(options)
        finished, start = (folder / RESULT_FILE).exists(), time.perf_counter()
        row = _run_one(source, options, folder, x_val)
        table.append(row)
        if not finished:
            trained.append((row, time.perf_counter() - start))
        if progress:
            shown = {key: row[key] for key in ("val_nmse", "val_l0", "dead_fraction") if key in row}
            left = _time_left(trained, runs[i + 1:], row["d_in"])
            eta = f"; about {_duration(left)} left" if left is not None else ""
            print(f"[{i + 1}/{len(configs)}] {folder.name}: "
                  + (f"diverged ({row['diverged']})" if "diverged" in row else
                     ", ".join(f"{key} {value:.4g}" for key, value in shown.items()))
                  + f" ({row['train_seconds']:.1f} s{eta})", flush=True)
    return table


def run_until_converged(configs: list[dict], cache: ActivationCache | BatchSource, root: str | Path, *, tokens: int,
                        max_tokens: int, tol: float = 0.01, n_boot: int = 200,
                        validation: ActivationCache | torch.Tensor | None = None, progress: bool = True,
                        **common) -> list[dict]:
    """Train each config at a constant learning rate until its learning curve has converged.

    Each run starts with a budget of ``tokens`` and doubles it, training on from where it stopped
    (:func:`saelib.train.fit` extends a run at a constant learning rate), until the tokens ``T`` at
    which its fitted learning curve comes within ``tol`` of its asymptote
    (:func:`saelib.scaling.converged_at` on the curve after its first 5%) lie inside the run, or its
    budget reaches ``max_tokens`` (whole batches). Runs live in ``root/<run_name(config)>``, a name
    without the budget, so a later call with a larger ``max_tokens`` trains on from there.

    Returns :func:`run_sweep`'s rows, each with ``T`` and its bootstrap interval ``T_low``,
    ``T_high`` (``n_boot`` resamples), ``curve_fit`` (the :class:`~saelib.scaling.Fit` of the curve)
    and ``converged`` (``T`` inside the run); a run that diverged has NaN ``T`` and no ``curve_fit``.
    """
    from .scaling import converged_at

    if common.get("decay") != "none":
        raise ValueError(f"run_until_converged trains at a constant learning rate; pass decay='none', got "
                         f"decay={common.get('decay')!r}.")
    B = common.get("batch_size") or TrainConfig.batch_size
    if not B <= tokens <= max_tokens:
        raise ValueError(f"Need batch_size ({B:,}) <= tokens ({tokens:,}) <= max_tokens ({max_tokens:,}).")
    source = CachedSource(cache) if isinstance(cache, ActivationCache) else cache
    x_val = validation.all_rows() if isinstance(validation, ActivationCache) else validation
    table = []
    for i, cfg in enumerate(configs):
        options = {**common, **cfg}
        folder, budget = Path(root) / run_name(options), tokens // B * B
        if (folder / "config.json").is_file():  # trained before: go on from the budget it reached
            budget = max(budget, json.loads((folder / "config.json").read_text())["tokens"])
        while True:
            row = _run_one(source, {**options, "tokens": budget}, folder, x_val)
            if "diverged" in row:
                break
            t, nmse = [p["tokens"] for p in row["curve"]], [p["nmse"] for p in row["curve"]]
            T = converged_at(t, nmse, tol=tol, after=0.05 * t[-1], n_boot=0)[0]  # the interval once, below
            converged = T <= t[-1]
            if progress:
                print(f"[{i + 1}/{len(configs)}] {folder.name}: {t[-1]:,} tokens, T at {tol:.0%} {T:,.0f} "
                      f"({'inside' if converged else 'beyond'} the run), {row['train_seconds'] / 60:.1f} min of training",
                      flush=True)
            if converged or budget >= max_tokens // B * B:
                break
            budget = min(2 * budget, max_tokens) // B * B
        if "diverged" in row:
            table.append(row | dict(T=math.nan, T_low=math.nan, T_high=math.nan, curve_fit=None, converged=False))
            continue
        T, (low, high), curve_fit = converged_at(t, nmse, tol=tol, after=0.05 * t[-1], n_boot=n_boot)
        table.append(row | dict(T=T, T_low=low, T_high=high, curve_fit=curve_fit, converged=converged))
    return table


def _time_left(trained: list[tuple[dict, float]], to_go: list[dict], d_in: int) -> float | None:
    """Seconds the runs ``to_go`` (their options, on data of width ``d_in``) should take, from the ``(row, seconds)`` of those trained so far:
    a run of a size (``n_latents``, ``tokens``) trained before takes what the last such run took, any
    other its training compute (:func:`training_flops`) at the rate of the runs trained so far; the
    first run counts only while it is the only one (it carries the sweep's one-time costs: the first
    read of the cache, building the kernels). None before any run or where a run to go gives no ``tokens``."""
    if not trained or not to_go or any(not o.get("tokens") for o in to_go):
        return None
    rated = trained[1:] or trained
    last = {(row["n_latents"], row["tokens"]): seconds for row, seconds in rated}
    rate = sum(seconds for _, seconds in rated) / sum(row["flops"] for row, _ in rated)
    return sum(last.get((o["n_latents"], o["tokens"]), rate * training_flops(d_in, o["n_latents"], o["tokens"]))
               for o in to_go)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _run_one(source: BatchSource, options: dict, folder: Path, x_val: torch.Tensor | None) -> dict:
    """Train (or load) one run and measure it; the training time is kept in ``folder/sweep_result.json``.

    A run whose loss is not finite (a learning rate too high) is a row with ``diverged`` (the error)
    and NaN metrics, kept in the same file so that a later call does not train it again.
    """
    options = dict(options)
    n_latents, k = options.pop("n_latents"), options.pop("k", None)
    saved = folder / RESULT_FILE
    before = json.loads(saved.read_text()) if saved.exists() else None
    if before is not None and "diverged" in before and before["tokens"] == options.get("tokens"):
        return _diverged_row(folder, before, x_val)
    start = time.perf_counter()
    try:
        sae = fit(source, n_latents, k, out=folder, normalizer=getattr(source, "normalizer", None), progress=False,
                  **options)
    except FloatingPointError as error:
        if not (folder / "config.json").is_file():  # not from a training step
            raise
        result = {"diverged": str(error), "tokens": options.get("tokens"), "train_seconds": time.perf_counter() - start}
        atomic_write_text(saved, json.dumps(result))
        return _diverged_row(folder, result, x_val)
    seconds = time.perf_counter() - start
    config = json.loads((folder / "config.json").read_text())
    if before is not None and "diverged" not in before and before.get("tokens", config["tokens"]) == config["tokens"]:
        seconds = before["train_seconds"]
    else:  # trained now, from the start or on from a shorter run
        seconds += before["train_seconds"] if before is not None else 0.0
        atomic_write_text(saved, json.dumps({"train_seconds": seconds, "tokens": config["tokens"]}))
    row = _row(folder, seconds)
    last = row["curve"][-1]
    row |= {"train_nmse": last["nmse"], "train_l0": last["l0"], "dead_fraction": last["dead_fraction"]}
    if x_val is not None:
        row |= {f"val_{key}": value for key, value in reconstruction_metrics(sae, x_val).items()}
    return row


def _diverged_row(folder: Path, result: dict, x_val: torch.Tensor | None) -> dict:
    """The row of a run that diverged: its configuration, ``diverged`` (the error) and NaN metrics."""
    row = _row(folder, result["train_seconds"]) | dict.fromkeys(("train_nmse", "train_l0", "dead_fraction"), math.nan)
    if x_val is not None:
        row |= {f"val_{key}": math.nan for key in RECONSTRUCTION_KEYS}
    return row | {"diverged": result["diverged"]}


def _row(folder: Path, seconds: float) -> dict:
    """A run's configuration, training compute, time and learning curve, from its folder."""
    config = json.loads((folder / "config.json").read_text())
    return {"run": str(folder), **{key: config[key] for key in ("n_latents", "k", "arch", "seed", "auxk", "tied_init",
                                                                  "l1_coef", "tokens", "batch_size", "lr",
                                                                  "warmup_steps")},
            "d_in": config["d_in"], "flops": training_flops(config["d_in"], config["n_latents"], config["tokens"]),
            "dead_tokens": config["dead_tokens"], "train_seconds": seconds,
            "curve": read_metrics(folder) if (folder / "metrics.jsonl").is_file() else []}  # none: diverged before a log


def summarize(table: list[dict], by: list[str], metrics: list[str]) -> list[dict]:
    """Mean, standard deviation and 95% interval of ``metrics`` over rows that share the values of
    ``by`` (seeds).

    Returns one dict per group: the ``by`` values, ``runs`` (the group size), ``diverged`` (how many of
    them diverged) and for each metric ``m``, over its finite values: ``m`` (mean), ``m_std`` (sample
    standard deviation, 0 for one value), ``m_ci`` (half-width of the mean's 95% interval,
    :func:`saelib.stats.mean_interval`; 0 for one value) and ``m_runs`` (how many values were finite).
    """

    groups: dict[tuple, list[dict]] = {}
    for row in table:
        groups.setdefault(tuple(row[key] for key in by), []).append(row)
    out = []
    for values, rows in groups.items():
        summary = dict(zip(by, values), runs=len(rows), diverged=sum("diverged" in r for r in rows))
        for m in metrics:
            x = np.array([float(r[m]) for r in rows])
            x = x[np.isfinite(x)]
            summary[m], summary[f"{m}_ci"] = mean_interval(x)
            summary[f"{m}_std"] = float(x.std(ddof=1)) if len(x) > 1 else 0.0 if len(x) else math.nan
            summary[f"{m}_runs"] = len(x)
        out.append(summary)
    return out


def mean_curve(rows: list[dict], metrics: list[str]) -> list[dict]:
    """The learning curves of several runs (seeds of one config, logged at the same steps) averaged
    point by point: one dict per logged step with its ``tokens`` and the mean of each of ``metrics``.
    Curves logged at other tokens (another length or ``log_every``) are a ValueError."""
    tokens = [[p["tokens"] for p in row["curve"]] for row in rows]
    if any(t != tokens[0] for t in tokens):
        raise ValueError("mean_curve averages curves logged at the same tokens; these runs' curves differ "
                         f"(lengths {sorted({len(t) for t in tokens})}); average runs of one config and length.")
    steps = zip(*(row["curve"] for row in rows))
    return [{"tokens": points[0]["tokens"], **{m: sum(p[m] for p in points) / len(points) for m in metrics}}
            for points in steps]


def without_curves(table: list[dict]) -> list[dict]:
    """The table without the ``curve`` column (for compact JSON next to a figure)."""
    return [{key: value for key, value in row.items() if key != "curve"} for row in table]
