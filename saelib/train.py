"""Train a sparse autoencoder with the recipe of Gao et al. (2024): the one training loop.

    fit(activations, n_latents, k, tokens=..., out="runs/demo") -> TopKSAE

Recipe: random unit decoder rows, tied init ``W_enc = W_dec`` (then trained untied),
``b_pre`` = geometric median of a sample, ``b_enc = 0``; loss = NMSE + AuxK / 32, where AuxK
lets the top ``k_aux`` dead latents (not fired for ``dead_tokens`` tokens) reconstruct the
detached residual; Adam (eps 6.25e-10) with ``lr = 2e-4 / sqrt(n_latents / 2**14)`` (or a multiple
of it, ``lr_multiplier``, for short runs), linear warmup and optional linear decay to 0; gradient
clipping; decoder gradients projected orthogonal to the rows before each step and rows
renormalised after it; optional parameter EMA.

One process trains on the trivial grid; ``N`` processes under ``torch.distributed`` run the same
loop on a data x latent grid (:mod:`saelib.grid`; :func:`saelib.distributed.fit_distributed`).
Batches are normalised activations (the trainer's fast path); the SAE it returns speaks the
model's raw units.

A run folder (``out``) holds ``config.json`` (this ``TrainConfig``, resolved), ``metrics.jsonl``,
``checkpoints/step_*/`` (:mod:`saelib.checkpoint`, written atomically) and the final ``sae/``.
Calling ``fit`` again with the same ``out`` resumes from the last checkpoint (bit-identical on
CPU on the same grid; on another grid, to float rounding) or, when the run is finished, loads and
returns it. The folder records a fingerprint of a tensor's or a cache's data
(``sources.fingerprint``), so other activations of the same shape are refused, not resumed or
loaded. A run at a constant learning rate (``decay="none"``) given more ``tokens`` trains on from
its last checkpoint: bit for bit the longer run with the same ``lr``, ``warmup_steps`` and
``dead_tokens``, which keep the values they had (their defaults follow the budget, so a run given
the larger budget from the start with defaults would differ).

Faults: while ``fit`` trains into a run folder, rank 0 holds a lock on ``out/.lock`` (a second
trainer is refused; the OS drops the lock when the process dies, even by ``kill -9``); SIGINT or
SIGTERM on any rank finish the current step, write a checkpoint and exit with status 0 (:class:`Stopped`);
checkpoints carry the SHA-256 of their tensors, so a damaged one is an error naming the file,
never a silent load; a failed checkpoint write (disk full) removes the partial folder and leaves
the previous one.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import signal
import sys
import threading
import typing
from contextlib import contextmanager
from dataclasses import fields, replace
from pathlib import Path
from typing import Iterable, Iterator

import torch
from pydantic import BaseModel, ConfigDict, NonNegativeInt, PositiveInt, ValidationError, create_model
from torch import Tensor, nn
from tqdm.auto import tqdm

from .checkpoint import (TrainState, finished, latest_checkpoint, load_checkpoint, merge_shards, read_sae_rows,
                         save_checkpoint, write_shared_folder)
# paper_lr and resolve_device are imported by their old path, saelib.train, in notebooks and user code
from .config import BOOKKEEPING, TRAINER_FIELDS, TrainConfig, extends, paper_lr, resolve_device  # noqa: F401
from .files import atomic_write_text, describe, read_json, remove, writable_folder
from .grid import Grid, RankSlice, all_reduce, check_split, init_grid, init_shard, sharded_forward, sync_and_clip
from .normalize import Normalizer
from .sae import ForwardOutput, TopKSAE
from .sources import (BatchSource, InputClock, IterableSource, TensorSource, as_source, check_batch,  # noqa: F401
                      fingerprint, stream)

# ---- init and schedule ----------------------------------------------------------------------


def geometric_median(x: Tensor, iters: int = 200, tol: float = 1e-7) -> Tensor:
    """``(d,)`` point minimising the sum of Euclidean distances to the rows of ``x (N, d)``.

    Weiszfeld's iterations with the Vardi-Zhang correction, so an estimate that lands on a
    data point keeps moving when that point is not the median; computed in float64. Each
    iteration reads ``x`` twice, as two matrix-vector products: the distances from
    ``|x_i|^2 - 2 x_i.y + |y|^2``, exact again (a row difference) for the rows so near ``y``
    that the expansion loses digits, and the weighted mean.
    """
    x = x.double()
    sq = x.square().sum(1)  # (N,) |x_i|^2
    close = 1e-4 * float(sq.max().sqrt())  # the expansion's error is ~1e-8 of max |x_i|
    y = x.mean(0)
    for _ in range(iters):
        dist = (sq - 2 * (x @ y) + y @ y).clamp_min_(0).sqrt_()
        near = dist < close
        if bool(near.any()):
            dist[near] = (x[near] - y).norm(dim=1)
        away = dist > 1e-12
        w = torch.where(away, 1 / dist, 0)
        T = (w @ x) / w.sum()
        if bool(away.all()):
            y_new = T
        else:  # y sits on a data point: step towards T only if the pull of the others exceeds 1
            r = (w @ (x - y)).norm()
            coincident = float((~away).sum())
            y_new = y if r <= coincident else (1 - coincident / r) * T + (coincident / r) * y
        if (y_new - y).norm() <= tol * max(1.0, float(y.norm())):
            return y_new.float()
        y = y_new
    return y.float()


def initial_b_pre(sample: Tensor, how: str = "geometric_median") -> Tensor:
    """``(d,)`` start of ``b_pre`` from a ``(N, d)`` sample: its geometric median (the paper),
    its mean, or zero (``how``, one of ``B_PRE_INITS``)."""
    if how == "geometric_median":
        return geometric_median(sample)
    return sample.mean(0) if how == "mean" else torch.zeros(sample.shape[1])


def _sample(source: BatchSource, cfg: TrainConfig) -> Tensor:
    """The first ``geometric_median_samples`` rows of epoch 0, for the ``b_pre`` init."""
    rows, n = [], 0
    for index, x in enumerate(source.batches(cfg.batch_size, seed=cfg.seed, epoch=0)):
        rows.append(check_batch(x, source.d_in, 0, index))
        n += len(x)
        if n >= cfg.geometric_median_samples:
            break
    return torch.cat(rows)[: cfg.geometric_median_samples]


def learning_rate(cfg: TrainConfig, step: int, total_steps: int | None) -> float:
    """Linear warmup over ``warmup_steps``, then constant or linear decay to 0 at the end."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.decay == "linear" and total_steps:
        return cfg.lr * max(0.0, (total_steps - step) / max(1, total_steps - cfg.warmup_steps))
    return cfg.lr


def ema_start(module: nn.Module) -> dict[str, Tensor]:
    """Zeroed running averages of ``module``'s parameters; :func:`ema_apply` corrects their bias
    (as Adam does its moments), so an EMA of a short run is not pulled towards the zeros or the init."""
    return {name: torch.zeros_like(p) for name, p in module.named_parameters()}


def ema_update(ema: dict[str, Tensor], module: nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * params``, after each optimiser step."""
    for name, p in module.named_parameters():
        ema[name].lerp_(p.detach(), 1 - decay)


@torch.no_grad()
def ema_apply(ema: dict[str, Tensor], module: nn.Module, decay: float, steps: int) -> None:
    """Copy the bias-corrected averages ``ema / (1 - decay**steps)`` into ``module``'s parameters."""
    if steps > 0:
        for name, p in module.named_parameters():
            p.copy_(ema[name] / (1 - decay**steps))


# ---- the step -------------------------------------------------------------------------------


def make_optimizer(sae: TopKSAE, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam with the recipe's settings, fused where torch has the kernel (about 4x faster on CPU)."""
    params = list(sae.parameters())
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps, fused=fused)


def train_step(sae: TopKSAE, opt: torch.optim.Optimizer, x: Tensor, dead: Tensor | None, cfg: TrainConfig,
               grid: Grid | None = None) -> ForwardOutput:
    """One step of the recipe on a normalised batch ``x (B, d_in)`` (on a grid: this rank's rows of
    it, and ``sae`` this rank's latents): loss with AuxK over the ``dead`` latents if given,
    backward, gradients summed over the data group, decoder-gradient projection, clipping,
    ``opt.step()``, decoder renormalisation.

    Raises ``FloatingPointError`` before touching the weights if the loss is not finite.
    """
    grid = grid or Grid.single(x.device)
    if grid.world_size == 1:
        result = sae.train_forward(x, dead, k_aux=cfg.k_aux, auxk_coef=cfg.auxk_coef, l1_coef=cfg.l1_coef)
    else:
        result = sharded_forward(sae, x, dead, cfg, grid)
    if not bool(torch.isfinite(result.loss)):
        raise FloatingPointError(f"Loss is {result.loss.item()}")
    opt.zero_grad(set_to_none=True)
    result.loss.backward()
    sync_and_clip(sae, grid, cfg.grad_clip)
    opt.step()
    sae.normalize_decoder()
    return result


# ---- the training loop ----------------------------------------------------------------------


def fit(
    data: Tensor | BatchSource | Iterable[Tensor],
    n_latents: int,
    k: int | None,
    *,
    out: str | os.PathLike | None = None,
    normalizer: Normalizer | None = None,
    normalize: bool | None = None,
    metadata: dict | None = None,
    progress: bool = True,
    latent_parallel: int | None = None,
    **options,
) -> TopKSAE:
    """Train an SAE on activations and return it (in eval mode, on the CPU like a loaded one).

    Args:
        data: ``(N, d_in)`` tensor, an ``ActivationCache`` (shuffled batches, normalised with its
            statistics unless ``normalizer`` is given), a ``BatchSource``, or an iterable of
            ``(B, d_in)`` batches.
        n_latents, k: dictionary size and active latents per token.
        out: run folder (checkpoints, the final ``sae/`` and ``metrics.jsonl``: every ``log_every``
            steps NMSE, L0, dead fraction, AuxK loss, lr, ``tokens_per_s`` and ``input_wait``, the
            share of that time spent waiting for batches); re-running resumes it.
        normalizer: a ``Normalizer`` already applied to ``data``; stored in the SAE.
        normalize: for a raw tensor, fit and apply a ``Normalizer`` (default: yes, unless
            ``normalizer`` is given). Other data is used as is.
        metadata: provenance stored in the SAE's ``config.json``.
        progress: show a tqdm bar (NMSE, dead fraction) and say what happens.
        latent_parallel: ``None`` trains in this process alone; an integer ``L`` joins (or starts)
            the ``torch.distributed`` world and trains on its ``D x L`` grid
            (see :func:`saelib.distributed.fit_distributed`).
        **options: any trainer field of ``TrainConfig`` (``config.TRAINER_FIELDS``: ``tokens``,
            ``batch_size``, ``seed``, ``auxk``, ``device``...; not the data fields nor ``epochs``).
            Batches move to ``device`` one at a time; the data stays where it is.
    """
    unknown = sorted(set(options) - set(TRAINER_FIELDS))
    if unknown:
        raise ValueError(f"fit() got unknown option(s) {unknown}; options are TrainConfig's trainer fields: {list(TRAINER_FIELDS)}.")
    if out is not None and not str(out).strip():
        raise ValueError(f"out must name a run folder, got {str(out)!r}; pass a folder such as 'runs/my-sae', or None to keep no files.")
    if out is not None:
        writable_folder(out, "out")
    cfg = TrainConfig(n_latents=n_latents, k=k, **options)
    source, normalizer = as_source(data, normalizer, normalize, cfg.geometric_median_samples)
    if isinstance(source, IterableSource) and "batch_size" not in options:
        cfg = replace(cfg, batch_size=source.batch_size)  # the iterable's batches set the step size
    cfg = cfg.resolved(source.d_in, source.n_tokens)
    grid = Grid.single(torch.device(cfg.device)) if latent_parallel is None else init_grid(latent_parallel, cfg.device)
    sae = _make_sae(source.d_in, cfg, grid, normalizer, metadata)
    run = Path(out) if out is not None else None
    if run is None:
        return _train(source, sae, cfg, None, grid, progress, [])
    with _run_lock(run, grid), _deferred_signals() as stop:
        # every rank has read the run folder before rank 0 writes to it, and a refusal stops every rank
        given = {key for key, value in options.items() if value is not None}  # None: the default, as if not passed
        done, cfg, recorded = grid.together(lambda: _check_run_folder(run, cfg, source.d_in, fingerprint(source), given),
                                            f"check the run folder {run}")
        if not done:
            return _train(source, sae, cfg, run, grid, progress, stop)
        _say(progress and grid.rank == 0, f"{run} holds a finished run with this config; loading {run / 'sae'} without retraining.")
        if grid.latent_size == 1:
            trained = merge_shards(run / "sae")
            # a run written before runs recorded their data: its SAE's normaliser must be this data's
            if recorded is None and not _same_normalizer(trained.normalizer, normalizer):
                raise ValueError(f"{run} was trained on other activations (its SAE's normaliser is not this data's); use a "
                                 "new out folder, or give the run the data it was trained on.")
            return trained
        start = grid.latent_rank * sae.n_latents
        sae.load_state_dict(read_sae_rows(run / "sae", start, start + sae.n_latents))
        return sae.eval()


def _make_sae(d_in: int, cfg: TrainConfig, grid: Grid, normalizer: Normalizer, metadata: dict | None) -> TopKSAE:
    """The SAE (its latent shard on a grid), initialised from the seed where it is whole."""
    check_split(grid.world_size, grid.latent_size, n_latents=cfg.n_latents, batch_size=cfg.batch_size, arch=cfg.arch)
    if grid.latent_size == 1:
        return TopKSAE(d_in, cfg.n_latents, cfg.k, arch=cfg.arch, tied_init=cfg.tied_init, normalizer=normalizer,
                       metadata=metadata, generator=torch.Generator().manual_seed(cfg.seed), encoder_dtype=cfg.encoder_dtype)
    n_local = cfg.n_latents // grid.latent_size
    info = {"index": grid.latent_rank, "count": grid.latent_size, "n_latents": cfg.n_latents, "k": cfg.k}
    return TopKSAE(d_in, n_local, min(cfg.k, n_local), normalizer=normalizer, metadata={**(metadata or {}), "shard": info},
                   encoder_dtype=cfg.encoder_dtype)


def _train(source: BatchSource, sae: TopKSAE, cfg: TrainConfig, run: Path | None, grid: Grid, progress: bool,
           stop: list[str]) -> TopKSAE:
    """The training loop of ``fit``; a signal name appended to ``stop`` (on any rank) ends it after a checkpoint."""
    main = grid.rank == 0
    sae.to(grid.device)  # initialised on the CPU from the seed: the same weights on every device
    opt = make_optimizer(sae, cfg)
    state = TrainState(since_fired=torch.zeros(sae.n_latents, dtype=torch.int64, device=grid.device), ema=None)
    record = _config_record(cfg, source.d_in)
    checkpoint = latest_checkpoint(run) if run is not None else None
    if checkpoint is not None:
        # each rank reads its own rows: a damaged shard fails some ranks only, and every rank must stop
        grid.together(lambda: load_checkpoint(checkpoint, sae, opt, state, record, grid), f"load {checkpoint}")
        _say(progress and main, f"Resuming {run} from step {state.step} ({state.tokens} tokens)"
                                + (f" on a {grid.data_size} x {grid.latent_size} grid (data x latent)." if grid.world_size > 1 else "."))
    else:
        if grid.latent_size > 1:
            init_shard(sae, cfg.n_latents, grid.latent_rank * sae.n_latents, cfg.seed, cfg.tied_init)
        b_pre = grid.from_main(lambda: initial_b_pre(_sample(source, cfg), cfg.b_pre_init), torch.zeros(source.d_in))
        with torch.no_grad():
            sae.b_pre.copy_(b_pre)
            sae.W_enc.mul_(cfg.encoder_init_scale)
        state.ema = ema_start(sae) if cfg.ema else None
    if run is not None:
        recorded = {**record, "data": fingerprint(source)}
        grid.together(lambda: _start_run_folder(run, recorded, state.step) if main else None, f"start the run folder {run}")

    B = cfg.batch_size
    total_steps = cfg.tokens // B if cfg.tokens else None
    bar = tqdm(total=total_steps, initial=state.step, disable=not (progress and main), desc="fit", unit="step")
    batches = InputClock(stream(RankSlice(source, grid), B, cfg.seed, cfg.tokens is not None, state.epoch, state.batch))
    window_start = state.tokens
    for epoch, index, x in batches:
        if total_steps is not None and state.step >= total_steps:
            break
        lr = learning_rate(cfg, state.step, total_steps)
        for group in opt.param_groups:
            group["lr"] = lr

        dead = state.since_fired >= cfg.dead_tokens
        try:
            result = train_step(sae, opt, x, dead if cfg.auxk else None, cfg, grid)
        except FloatingPointError as error:
            where = "" if run is None else f" and a new out folder ({run} keeps the settings it started with)"
            raise FloatingPointError(f"{error} at step {state.step} (batch {index} of epoch {epoch}); train again with a "
                                     f"lower lr (now {lr:.3g}){where}.") from None

        if state.ema is not None:
            ema_update(state.ema, sae, cfg.ema)
        fired = torch.zeros(sae.n_latents, device=grid.device).index_fill_(0, result.latents.indices[result.latents.values > 0], 1)
        state.since_fired += B
        state.since_fired[all_reduce(fired, grid.data_group) > 0] = 0  # fired anywhere in the global batch
        state.step, state.epoch, state.batch, state.tokens = state.step + 1, epoch, index + 1, state.tokens + B

        bar.update()
        if state.step % cfg.log_every == 0 or state.step == total_steps:
            n_dead = int(all_reduce((state.since_fired >= cfg.dead_tokens).sum(), grid.latent_group))
            seconds, waited = batches.window()
            row = dict(step=state.step, tokens=state.tokens, nmse=result.nmse.item(), l0=result.l0.item(),
                       dead_fraction=n_dead / cfg.n_latents, auxk_loss=result.auxk_loss.item(), lr=lr,
                       tokens_per_s=(state.tokens - window_start) / seconds, input_wait=waited)
            grid.together(lambda: _log(run, bar, **row) if main else None, f"log step {state.step}")
            window_start = state.tokens
        every = cfg.checkpoint_every_tokens
        if run is not None and state.tokens // every != (state.tokens - B) // every:
            save_checkpoint(run, sae, opt, state, record, grid)
        if run is not None and grid.any(bool(stop)) and (total_steps is None or state.step < total_steps):
            bar.close()
            folder = save_checkpoint(run, sae, opt, state, record, grid)
            if main:
                print(f"Stopped by {stop[0] if stop else 'a signal to another rank'} after step {state.step} ({state.tokens} tokens); "
                      f"checkpoint written to {folder}. Run the same command again (or fit with out={str(run)!r}) to resume.",
                      file=sys.stderr)
            raise Stopped(stop[0] if stop else None)
    bar.close()

    if run is not None:
        save_checkpoint(run, sae, opt, state, record, grid)
    if state.ema is not None:
        ema_apply(state.ema, sae, cfg.ema, state.step)
        sae.fold_decoder_norms()
    if run is not None:
        write_shared_folder(run / "sae", grid, sae.save)
    sae.release_buffers()
    sae.encoder_dtype = "float32"  # how the steps ran, not the SAE: it encodes as a loaded one does
    return sae.cpu().eval()


def _log(run: Path | None, bar: tqdm, **row) -> None:
    """One ``metrics.jsonl`` line and the progress bar's NMSE / dead fraction."""
    bar.set_postfix(nmse=f"{row['nmse']:.4f}", dead=f"{row['dead_fraction']:.3f}")
    if run is not None:
        with open(run / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr)


@contextmanager
def _run_lock(run: Path, grid: Grid) -> Iterator[None]:
    """Rank 0 holds an exclusive ``flock`` on ``run/.lock``; the OS releases it when the process ends,
    however it ends. If it is taken, every rank raises."""
    run.mkdir(parents=True, exist_ok=True)
    with open(run / ".lock", "a+") as f:
        busy = False
        if grid.rank == 0:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                busy = True
        if grid.any(busy):
            f.seek(0)
            raise _in_use(run, f.read())
        if grid.rank == 0:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()}")
            f.flush()
        try:
            yield
        finally:
            if grid.rank == 0:
                fcntl.flock(f, fcntl.LOCK_UN)


def check_free(run: Path) -> None:
    """Raise if a trainer holds ``run`` now (what :func:`fit` would refuse), taking no lock."""
    try:
        f = open(run / ".lock")
    except (FileNotFoundError, NotADirectoryError):
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(run, f.read()) from None
        fcntl.flock(f, fcntl.LOCK_UN)


def _in_use(run: Path, holder: str) -> BlockingIOError:
    return BlockingIOError(f"{run} is in use by another trainer ({holder.strip() or 'unknown process'}); "
                           "wait for it to finish or pass another out folder.")


class Stopped(SystemExit):
    """What ``fit`` raises once a signal has stopped it with a checkpoint: exit status 0, as a
    scheduler and torchrun expect of a rank; ``signal`` names the signal (None where it reached
    another rank). ``saelib train`` exits with 128 + its number instead, as a shell expects."""

    def __init__(self, signal_name: str | None):
        super().__init__(0)
        self.signal = signal_name


@contextmanager
def _deferred_signals() -> Iterator[list[str]]:
    """Turn SIGINT / SIGTERM into a request to stop after the current step (the names land in the list).

    A second SIGINT interrupts at once. Signal handlers can only be set from the main thread;
    elsewhere signals keep their usual effect.
    """
    received: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def request_stop(signum, frame):
        received.append(signal.Signals(signum).name)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


# ---- run folder and checkpoints -------------------------------------------------------------


def _config_record(cfg: TrainConfig, d_in: int) -> dict:
    return json.loads(json.dumps({"d_in": d_in, **cfg.group("train")}))


# config.json of a run: the train fields of TrainConfig (their types; values are compared with the
# run's options), d_in and what it knows of the data (``sources.fingerprint``; None: nothing, as in
# runs written before it); a field added to TrainConfig after the run was written counts as its
# default, which keeps the old behaviour
_HINTS = typing.get_type_hints(TrainConfig)
RunConfig = create_model("RunConfig", __config__=ConfigDict(strict=True, extra="forbid", allow_inf_nan=False),
                         d_in=(PositiveInt, ...), data=(str | None, None),
                         **{f.name: (_HINTS[f.name], f.default) for f in fields(TrainConfig) if f.name in TRAINER_FIELDS})


class MetricsRow(BaseModel):
    """A ``metrics.jsonl`` line: the step it was logged at and its metrics."""

    model_config = ConfigDict(strict=True, extra="allow")

    step: NonNegativeInt


# the fields whose defaults follow the budget: an extended run keeps the values it started with
BUDGET_DEFAULTS = {"lr": {"lr", "lr_multiplier"}, "warmup_steps": {"warmup_steps"}, "dead_tokens": {"dead_tokens"}}


def _check_run_folder(run: Path, cfg: TrainConfig, d_in: int, data: str | None,
                      given: set[str]) -> tuple[bool, TrainConfig, str | None]:
    """Raise if ``run`` holds a run with another config, d_in or ``data`` (its fingerprint, where
    both know it); return whether it is finished, the config and the fingerprint it recorded.

    A run at a constant learning rate (``decay="none"``) asked for more ``tokens`` than it has is
    extended: its schedule does not depend on its length, so training on from its last checkpoint
    gives the run that the larger budget would have trained from the start with the same ``lr``,
    ``warmup_steps`` and ``dead_tokens``. Those fields, whose defaults follow the budget, keep the
    run's values unless ``given`` (the options passed) names them.
    """
    path = run / "config.json"
    if not path.is_file():
        return False, cfg, None
    saved = read_json(path, RunConfig, f"use a new out folder, or delete {run} to start the run again").model_dump(mode="json")
    if saved["d_in"] != d_in:
        raise ValueError(f"{run} was trained on activations with d_in={saved['d_in']} but the data has d_in={d_in}; use a new out folder.")
    trained_on = saved.pop("data")
    if None not in (trained_on, data) and trained_on != data:
        raise ValueError(f"{run} was trained on other activations ({trained_on}; given: {data}); use a new out folder, "
                         "or give the run the data it was trained on.")
    constant = extends(saved, {"decay": cfg.decay, "tokens": cfg.tokens})
    # a run without a budget trained until its data ended: how far it got is no budget to extend
    extend = constant and saved["tokens"] is not None and saved["tokens"] < (cfg.tokens or 0)
    if constant:  # loading or extending a run that may have been extended before
        cfg = replace(cfg, **{key: saved[key] for key, names in BUDGET_DEFAULTS.items() if not names & given})
    current = _config_record(cfg, d_in)
    changed = sorted(key for key in saved.keys() | current.keys()
                     if key not in BOOKKEEPING and saved.get(key) != current.get(key) and not (extend and key == "tokens"))
    if changed:
        diff = ", ".join(f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in changed)
        hint = "."
        if changed == ["tokens"] and saved["tokens"] is None:
            hint = " (a run that trained until its data ended cannot be given a budget)."
        elif changed == ["tokens"]:
            hint = (" (only a run at a constant learning rate, decay='none', can be extended to more tokens)."
                    if saved["tokens"] < (cfg.tokens or 0) else " (a run can be extended to more tokens, not cut to fewer).")
        raise ValueError(f"{run} holds a run with a different config ({diff}); use a new out folder or the same options{hint}")
    return not extend and finished(run), cfg, trained_on


def _same_normalizer(a: Normalizer, b: Normalizer) -> bool:
    """Whether two normalisers agree to float rounding (one fit again to the same data, on any device)."""
    return math.isclose(a.scale, b.scale, rel_tol=1e-6) and torch.allclose(a.mean, b.mean.to(a.mean.device), rtol=1e-6,
                                                                           atol=1e-6 * b.scale)


def _start_run_folder(run: Path, record: dict, step: int) -> None:
    """Write ``config.json``, drop metrics logged after the checkpoint being resumed and a final SAE
    left by a shorter run being extended (its last checkpoint holds its state)."""
    run.mkdir(parents=True, exist_ok=True)
    remove(run / "sae")
    if record.get("data") is None and (run / "config.json").is_file():  # data it cannot check now keeps what was recorded
        record = {**record, "data": json.loads((run / "config.json").read_text()).get("data")}
    atomic_write_text(run / "config.json", json.dumps(record, indent=2))
    metrics = run / "metrics.jsonl"
    if metrics.exists():
        atomic_write_text(metrics, "".join(line + "\n" for line, row in metrics_lines(metrics) if row["step"] <= step))


def metrics_lines(path: Path) -> list[tuple[str, dict]]:
    """The lines of a ``metrics.jsonl`` with their rows, in order. A partial last line (a process
    killed mid-write leaves one without its newline) is left out, blank lines are skipped, and any
    other line that is not a row is an error naming it."""
    *lines, _partial = path.read_text(encoding="utf-8", errors="replace").split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append((line, MetricsRow.model_validate_json(line).model_dump()))
        except ValidationError as error:
            raise ValueError(describe(f"{path} line {number}", error, "delete that line or the file, then run again")) from None
    return rows
