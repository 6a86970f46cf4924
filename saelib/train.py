"""Train a sparse autoencoder with the recipe of Gao et al. (2024), readable top to bottom.

    fit(activations, n_latents, k, tokens=..., out="runs/demo") -> TopKSAE

Recipe: random unit decoder rows, tied init ``W_enc = W_dec`` (then trained untied),
``b_pre`` = geometric median of a sample, ``b_enc = 0``; loss = NMSE + AuxK / 32, where AuxK
lets the top ``k_aux`` dead latents (not fired for ``dead_tokens`` tokens) reconstruct the
detached residual; Adam (eps 6.25e-10) with ``lr = 2e-4 / sqrt(n_latents / 2**14)`` (or a multiple
of it, ``lr_multiplier``, for short runs), linear
warmup and optional linear decay to 0; gradient clipping; decoder gradients projected
orthogonal to the rows before each step and rows renormalised after it; optional parameter EMA.

A run folder (``out``) holds ``config.json`` (this ``TrainConfig``, resolved), ``metrics.jsonl``,
``checkpoints/step_*/`` (safetensors + JSON, written atomically) and the final ``sae/``.
Calling ``fit`` again with the same ``out`` resumes from the last checkpoint (bit-identical on
CPU) or, when the run is finished, loads and returns it.

Faults: while ``fit`` trains into a run folder it holds a lock on ``out/.lock`` (a second trainer
is refused; the OS drops the lock when the process dies, even by ``kill -9``); SIGINT or SIGTERM
finish the current step, write a checkpoint and exit with status 0; checkpoints carry the
SHA-256 of their tensors, so a damaged one is an error naming the file, never a silent load; a
failed checkpoint write (disk full) removes the partial folder and leaves the previous one.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from itertools import chain, islice
from pathlib import Path
from typing import Iterable, Iterator, Protocol, runtime_checkable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from .normalize import Normalizer
from .sae import ENCODER_DTYPES, ForwardOutput, TopKSAE, load, load_safetensors, sha256_file

# ---- configuration --------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Every knob of a run; ``None`` means "derive from the paper's rule" (see ``resolved``)."""

    n_latents: int = 2**14
    k: int | None = 32
    arch: str = "topk"  # topk | multitopk | batchtopk | relu
    batch_size: int = 4096  # the paper: 131,072 tokens; CPU runs use less
    tokens: int | None = None  # training budget; None = one pass over the data
    lr: float | None = None  # None = lr_multiplier x paper_lr(n_latents)
    # a multiple of the paper's rule, for runs too short for it (07_recipe_ablation: about 16x
    # is best for a few hundred steps); ignored when lr is given
    lr_multiplier: float = 1.0
    warmup_steps: int | None = None  # None = 5% of the steps, at most 1000
    decay: str = "linear"  # "linear" to 0 at the end of the run (if its length is known), or "none"
    grad_clip: float | None = 1.0
    adam_eps: float = 6.25e-10
    adam_betas: tuple[float, float] = (0.9, 0.999)
    auxk: bool = True
    k_aux: int | None = None  # None = min(512, d_in // 2)
    auxk_coef: float = 1 / 32
    # The paper counts a latent dead after 10M tokens without firing. Short runs scale it:
    # None = min(10M, max(batch_size, tokens // 10, 10 * n_latents // k)), i.e. a tenth of
    # the run but never less than ten expected firings of an average latent.
    dead_tokens: int | None = None
    ema: float | None = None  # e.g. 0.999: the final SAE holds the (bias-corrected) EMA parameters
    l1_coef: float = 0.05  # ReLU baseline only
    seed: int = 0
    log_every: int = 10  # steps
    checkpoint_every_tokens: int | None = None  # None = ten checkpoints per run
    geometric_median_samples: int = 32768
    tied_init: bool = True  # False = independent random encoder (dead-latent ablation)
    # recipe ablations: b_pre from the geometric median (the paper), the mean or zero of the
    # sample; encoder rows scaled at init (1 = the paper's tied W_enc = W_dec; sparsify's
    # nn.Linear init has row norms of about 1/sqrt(3))
    b_pre_init: str = "geometric_median"
    encoder_init_scale: float = 1.0
    # dtype of the encoder GEMM, "float32" or "bfloat16" (fast where kernels.fast_bf16(): AMX
    # CPUs, GPUs; NMSE parity in docs/performance.md); not saved with the SAE
    encoder_dtype: str = "float32"
    # where the SAE trains: "cpu", "cuda", "cuda:1"...; None = CUDA if available, else the CPU.
    # Not part of the run's identity: a run started on one device resumes on another. (Runs under
    # torch.distributed put each rank on its own GPU, or the CPU, and ignore it.)
    device: str | None = None

    def resolved(self, d_in: int, n_tokens: int | None) -> TrainConfig:
        """A copy with every ``None`` replaced by the value it stands for."""
        for name in ("n_latents", "batch_size", "geometric_median_samples", "log_every") + (("k",) if self.k is not None else ()):
            _check_positive(name, getattr(self, name))
        for name in ("tokens", "warmup_steps", "k_aux", "dead_tokens", "checkpoint_every_tokens"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name), allow_zero=name == "warmup_steps")
        if self.b_pre_init not in B_PRE_INITS:
            raise ValueError(f"b_pre_init must be one of {', '.join(B_PRE_INITS)}, got {self.b_pre_init!r}.")
        if isinstance(self.encoder_init_scale, bool) or not isinstance(self.encoder_init_scale, (int, float)) \
                or not 0 < self.encoder_init_scale < math.inf:
            raise ValueError(f"encoder_init_scale must be a positive finite number, got {self.encoder_init_scale!r}.")
        if self.encoder_dtype not in ENCODER_DTYPES:
            raise ValueError(f"encoder_dtype must be one of {', '.join(ENCODER_DTYPES)}, got {self.encoder_dtype!r}.")
        device = resolve_device(self.device)
        if self.decay not in ("linear", "none"):
            raise ValueError(f"decay must be 'linear' or 'none', got {self.decay!r}.")
        if self.ema is not None and not 0 < self.ema < 1:
            raise ValueError(f"ema must be None or a decay in (0, 1) such as 0.999, got {self.ema!r}.")
        for name in ("lr", "lr_multiplier"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}.")
        for name in ("adam_eps", "auxk_coef", "l1_coef") + (("grad_clip",) if self.grad_clip is not None else ()):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a non-negative finite number, got {value!r}.")
        B = self.batch_size
        tokens = self.tokens if self.tokens is not None else (n_tokens // B * B if n_tokens else None)
        if tokens is not None and tokens < B:
            raise ValueError(f"The run has {tokens} tokens, fewer than one batch of {B}; give more data or lower batch_size.")
        steps = tokens // B if tokens else None
        typical_gap = 10 * self.n_latents // self.k if self.k else 0
        return replace(
            self,
            tokens=tokens,
            adam_betas=tuple(self.adam_betas),
            lr=self.lr or self.lr_multiplier * paper_lr(self.n_latents),
            lr_multiplier=1.0,  # folded into lr
            warmup_steps=self.warmup_steps if self.warmup_steps is not None else min(1000, (steps or 20_000) // 20),
            k_aux=self.k_aux or max(1, min(512, d_in // 2)),
            dead_tokens=self.dead_tokens or min(10_000_000, max(B, (tokens or 100_000_000) // 10, typical_gap)),
            checkpoint_every_tokens=self.checkpoint_every_tokens or max(B, (tokens or 10_000_000) // 10),
            device=str(device),
        )


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device`` (None: CUDA if available, else the CPU), refused in one sentence
    if it is not a device name or names a GPU this machine does not have."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got {device!r}.") from None
    if resolved.type == "cuda" and not (torch.cuda.is_available() and (resolved.index or 0) < torch.cuda.device_count()):
        found = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA device"
        raise ValueError(f"device {device!r} was asked for but this machine has {found}; use device='cpu'.")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported; use 'cpu' or 'cuda'.")
    return resolved


B_PRE_INITS = ("geometric_median", "mean", "zero")


def paper_lr(n_latents: int) -> float:
    """The paper's learning-rate rule ``2e-4 / sqrt(n_latents / 2**14)`` (tuned on long runs)."""
    return 2e-4 / math.sqrt(n_latents / 2**14)


# fields that change what is logged or saved, or how a step is computed, not the recipe: a run
# may resume with others (and resume folders written before a field existed)
BOOKKEEPING = {"log_every", "checkpoint_every_tokens", "encoder_dtype", "device"}


def _check_positive(name: str, value, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} integer, got {value!r}.")


# ---- data -----------------------------------------------------------------------------------


@runtime_checkable
class BatchSource(Protocol):
    """Shuffled activations, one epoch at a time, deterministic in ``(seed, epoch)``.

    ``batches`` yields ``(batch_size, d_in)`` float32 tensors covering one epoch (the last
    partial batch dropped), skipping the first ``start`` batches (to resume mid-epoch).
    """

    d_in: int
    n_tokens: int | None  # rows per epoch; None when unknown

    def batches(self, batch_size: int, *, seed: int, epoch: int, start: int = 0) -> Iterator[Tensor]: ...


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A torch generator seeded from ``(seed, epoch)`` (independent streams per epoch)."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class TensorSource:
    """A ``(N, d_in)`` tensor as a ``BatchSource``: a fresh random permutation each epoch."""

    def __init__(self, x: Tensor):
        if x.ndim != 2:
            raise ValueError(f"Activations must be a (N, d_in) tensor, got shape {tuple(x.shape)}.")
        self.x, self.d_in, self.n_tokens = x, x.shape[1], x.shape[0]

    def batches(self, batch_size: int, *, seed: int, epoch: int, start: int = 0) -> Iterator[Tensor]:
        order = torch.randperm(self.n_tokens, generator=epoch_generator(seed, epoch))
        for i in range(start, self.n_tokens // batch_size):
            yield self.x[order[i * batch_size : (i + 1) * batch_size]].to(torch.float32)


class IterableSource:
    """Any iterable of ``(B, d_in)`` batches as a ``BatchSource`` (order is the iterable's own).

    A re-iterable (list, DataLoader) is replayed each epoch; a one-shot iterator gives one
    epoch. The first ``head_rows`` rows are read ahead (for ``d_in`` and the ``b_pre`` sample)
    and replayed. ``batch_size`` is the first batch's; ``n_tokens`` is known for sized
    re-iterables. Resuming skips batches, which is exact only if the iterable repeats itself.
    """

    n_tokens = None

    def __init__(self, iterable: Iterable[Tensor], head_rows: int):
        self._iterable = iterable
        self._rest = iter(iterable)
        self._one_shot = self._rest is iterable
        self._head: list[Tensor] = []
        for x in self._rest:
            self._head.append(x)
            if sum(len(h) for h in self._head) >= head_rows:
                break
        if not self._head:
            raise ValueError("The iterable of activation batches is empty.")
        self.d_in, self.batch_size = self._head[0].shape[-1], len(self._head[0])
        if not self._one_shot and hasattr(iterable, "__len__"):
            self.n_tokens = len(iterable) * self.batch_size

    def batches(self, batch_size: int, *, seed: int, epoch: int, start: int = 0) -> Iterator[Tensor]:
        if self._one_shot:
            stream = chain(self._head, self._rest) if epoch == 0 else iter(())
        else:
            stream = iter(self._iterable)
        return (x.to(torch.float32) for x in islice(stream, start, None))


def as_source(data, normalizer: Normalizer | None, normalize: bool | None, head_rows: int) -> tuple[BatchSource, Normalizer]:
    """The data as a ``BatchSource`` on the normalised scale, and the normaliser it carries."""
    if isinstance(data, Tensor):
        if normalizer is None and normalize is not False:
            normalizer = Normalizer.fit(data)
            data = normalizer.apply(data)
        source = TensorSource(data)
    elif isinstance(data, BatchSource):
        source = data
    else:
        source = IterableSource(data, head_rows)
    return source, normalizer or Normalizer.identity(source.d_in)


def check_batch(x: Tensor, d_in: int, epoch: int, index: int) -> Tensor:
    """``x`` if it is a finite ``(B, d_in)`` batch, else a ValueError naming the batch."""
    if x.ndim != 2 or x.shape[1] != d_in:
        raise ValueError(f"Batch {index} of epoch {epoch} has shape {tuple(x.shape)}; expected (B, {d_in}).")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"Batch {index} of epoch {epoch} contains NaN or Inf; clean the activations (checkpoints written so far are intact).")
    return x


def _stream(source: BatchSource, cfg: TrainConfig, epoch: int, start: int) -> Iterator[tuple[int, int, Tensor]]:
    """``(epoch, batch index, batch)`` from position ``(epoch, start)`` on, epoch after epoch."""
    while True:
        seen = 0
        for index, x in enumerate(source.batches(cfg.batch_size, seed=cfg.seed, epoch=epoch, start=start), start):
            seen += 1
            yield epoch, index, x
        if cfg.tokens is None or (seen == 0 and start == 0):
            return  # one pass of an unsized iterable, or a source that has run dry
        epoch, start = epoch + 1, 0


class InputClock:
    """Iterates ``items``, timing how long each ``next`` takes. ``window()`` gives the seconds since
    its last call (or since the start) and the share of them the trainer spent waiting for its next
    batch, logged as ``input_wait``: near 0 means the supply keeps up."""

    def __init__(self, items: Iterable):
        self.items, self.waited, self.since = iter(items), 0.0, time.perf_counter()

    def __iter__(self) -> InputClock:
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self.items)
        finally:
            self.waited += time.perf_counter() - start

    def window(self) -> tuple[float, float]:
        now = time.perf_counter()
        seconds = max(now - self.since, 1e-9)
        share, self.waited, self.since = self.waited / seconds, 0.0, now
        return seconds, share


# ---- init and schedule ----------------------------------------------------------------------


def geometric_median(x: Tensor, iters: int = 200, tol: float = 1e-7) -> Tensor:
    """``(d,)`` point minimising the sum of Euclidean distances to the rows of ``x (N, d)``.

    Weiszfeld's iterations with the Vardi-Zhang correction, so an estimate that lands on a
    data point keeps moving when that point is not the median; computed in float64.
    """
    x = x.double()
    y = x.mean(0)
    for _ in range(iters):
        dist = (x - y).norm(dim=1)
        away = dist > 1e-12
        w = 1 / dist[away]
        T = (w[:, None] * x[away]).sum(0) / w.sum()
        if bool(away.all()):
            y_new = T
        else:  # y sits on a data point: step towards T only if the pull of the others exceeds 1
            r = (w[:, None] * (x[away] - y)).sum(0).norm()
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


@dataclass
class TrainState:
    """Everything besides the model and optimiser that a resumed run needs."""

    since_fired: Tensor  # (n_latents,) int64 tokens since each latent last fired
    ema: dict[str, Tensor] | None
    step: int = 0
    epoch: int = 0
    batch: int = 0  # next batch index within the epoch
    tokens: int = 0


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
    **options,
) -> TopKSAE:
    """Train an SAE on activations and return it (in eval mode, on the CPU like a loaded one).

    Args:
        data: ``(N, d_in)`` tensor, a ``BatchSource``, or an iterable of ``(B, d_in)`` batches.
        n_latents, k: dictionary size and active latents per token.
        out: run folder (checkpoints, the final ``sae/`` and ``metrics.jsonl``: every ``log_every``
            steps NMSE, L0, dead fraction, AuxK loss, lr, ``tokens_per_s`` and ``input_wait``, the
            share of that time spent waiting for batches); re-running resumes it.
        normalizer: a ``Normalizer`` already applied to ``data``; stored in the SAE.
        normalize: for a raw tensor, fit and apply a ``Normalizer`` (default: yes, unless
            ``normalizer`` is given). Other data is used as is.
        metadata: provenance stored in the SAE's ``config.json``.
        progress: show a tqdm bar (NMSE, dead fraction) and say what happens.
        **options: any ``TrainConfig`` field (``tokens``, ``batch_size``, ``seed``, ``auxk``,
            ``device``...). Batches move to ``device`` one at a time; the data stays where it is.
    """
    unknown = sorted(set(options) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise ValueError(f"fit() got unknown option(s) {unknown}; options are TrainConfig fields: {[f.name for f in fields(TrainConfig)]}.")
    cfg = TrainConfig(n_latents=n_latents, k=k, **options)
    source, normalizer = as_source(data, normalizer, normalize, cfg.geometric_median_samples)
    if isinstance(source, IterableSource) and "batch_size" not in options:
        cfg = replace(cfg, batch_size=source.batch_size)  # the iterable's batches set the step size
    cfg = cfg.resolved(source.d_in, source.n_tokens)
    sae = TopKSAE(source.d_in, n_latents, k, arch=cfg.arch, tied_init=cfg.tied_init, normalizer=normalizer,
                  metadata=metadata, generator=torch.Generator().manual_seed(cfg.seed), encoder_dtype=cfg.encoder_dtype)
    sae.to(cfg.device)  # initialised on the CPU from the seed, the same weights on every device
    run = Path(out) if out is not None else None
    if run is None:
        return _train(source, sae, cfg, None, progress, [])
    with _run_lock(run), _deferred_signals() as stop:
        if _check_run_folder(run, cfg, source.d_in):
            _say(progress, f"{run} holds a finished run with this config; loading {run / 'sae'} without retraining.")
            return load(run / "sae")
        return _train(source, sae, cfg, run, progress, stop)


def make_optimizer(sae: TopKSAE, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam with the recipe's settings, fused where torch has the kernel (about 4x faster on CPU)."""
    params = list(sae.parameters())
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps, fused=fused)


def clip_to_norm(parameters, grad_clip: float, norm: Tensor) -> None:
    """Scale the gradients as ``clip_grad_norm_`` does, given their total ``norm``: by
    ``grad_clip / (norm + 1e-6)`` where that is below 1. Where it is not, no pass over them
    (``clip_grad_norm_`` multiplies every gradient by 1)."""
    if bool(norm + 1e-6 > grad_clip):
        nn.utils.clip_grads_with_norm_(parameters, grad_clip, norm)


def train_step(sae: TopKSAE, opt: torch.optim.Optimizer, x: Tensor, dead: Tensor | None, cfg: TrainConfig) -> ForwardOutput:
    """One step of the recipe on a batch ``x (B, d_in)``: loss (AuxK over ``dead`` latents if given),
    backward, decoder-gradient projection, clipping, ``opt.step()``, decoder renormalisation.

    Raises ``FloatingPointError`` before touching the weights if the loss is not finite.
    """
    result = sae.train_forward(x, dead, k_aux=cfg.k_aux, auxk_coef=cfg.auxk_coef, l1_coef=cfg.l1_coef)
    if not bool(torch.isfinite(result.loss)):
        raise FloatingPointError(f"Loss is {result.loss.item()}")
    opt.zero_grad(set_to_none=True)
    result.loss.backward()
    sae.remove_parallel_grads()
    if cfg.grad_clip:
        grads = [p.grad for p in sae.parameters() if p.grad is not None]
        clip_to_norm(sae.parameters(), cfg.grad_clip, nn.utils.get_total_norm(grads))
    opt.step()
    sae.normalize_decoder()
    return result


def _train(source: BatchSource, sae: TopKSAE, cfg: TrainConfig, run: Path | None, progress: bool, stop: list[str]) -> TopKSAE:
    """The training loop of ``fit``; a signal name appended to ``stop`` ends it after a checkpoint."""
    opt = make_optimizer(sae, cfg)
    device = sae.W_enc.device
    state = TrainState(since_fired=torch.zeros(cfg.n_latents, dtype=torch.int64, device=device), ema=None)
    checkpoint = latest_checkpoint(run) if run is not None else None
    if checkpoint is not None:
        load_checkpoint(checkpoint, sae, opt, state)
        _say(progress, f"Resuming {run} from step {state.step} ({state.tokens} tokens).")
    else:
        with torch.no_grad():
            sae.b_pre.copy_(initial_b_pre(_sample(source, cfg), cfg.b_pre_init))
            sae.W_enc.mul_(cfg.encoder_init_scale)
        state.ema = ema_start(sae) if cfg.ema else None
    record = _config_record(cfg, source.d_in)
    if run is not None:
        _start_run_folder(run, record, state.step)

    total_steps = cfg.tokens // cfg.batch_size if cfg.tokens else None
    bar = tqdm(total=total_steps, initial=state.step, disable=not progress, desc="fit", unit="step")
    stream, window_start = InputClock(_stream(source, cfg, state.epoch, state.batch)), state.tokens
    for epoch, index, x in stream:
        if total_steps is not None and state.step >= total_steps:
            break
        x = check_batch(x, source.d_in, epoch, index).to(device, non_blocking=True)
        lr = learning_rate(cfg, state.step, total_steps)
        for group in opt.param_groups:
            group["lr"] = lr

        dead = state.since_fired >= cfg.dead_tokens
        try:
            result = train_step(sae, opt, x, dead if cfg.auxk else None, cfg)
        except FloatingPointError as error:
            raise FloatingPointError(f"{error} at step {state.step} (batch {index} of epoch {epoch}); lower lr (now {lr:.3g}). The last checkpoint is intact.") from None

        if state.ema is not None:
            ema_update(state.ema, sae, cfg.ema)
        fired = result.latents.indices[result.latents.values > 0]
        state.since_fired += len(x)
        state.since_fired[fired] = 0
        state.step, state.epoch, state.batch, state.tokens = state.step + 1, epoch, index + 1, state.tokens + len(x)

        bar.update()
        if state.step % cfg.log_every == 0 or state.step == total_steps:
            seconds, waited = stream.window()
            _log(run, bar, step=state.step, tokens=state.tokens, nmse=result.nmse.item(), l0=result.l0.item(),
                 dead_fraction=(state.since_fired >= cfg.dead_tokens).float().mean().item(),
                 auxk_loss=result.auxk_loss.item(), lr=lr, tokens_per_s=(state.tokens - window_start) / seconds,
                 input_wait=waited)
            window_start = state.tokens
        every = cfg.checkpoint_every_tokens
        if run is not None and state.tokens // every != (state.tokens - len(x)) // every:
            save_checkpoint(run, sae, opt, state, record)
        if stop and (total_steps is None or state.step < total_steps):
            bar.close()
            folder = save_checkpoint(run, sae, opt, state, record)
            print(f"Stopped by {stop[0]} after step {state.step} ({state.tokens} tokens); checkpoint written to {folder}. "
                  f"Run the same command again (or fit with out={str(run)!r}) to resume.", file=sys.stderr)
            raise SystemExit(0)
    bar.close()

    if run is not None:
        save_checkpoint(run, sae, opt, state, record)
    if state.ema is not None:
        ema_apply(state.ema, sae, cfg.ema, state.step)
        sae.fold_decoder_norms()
    if run is not None:
        sae.save(run / "sae")
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
def _run_lock(run: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``run/.lock``; the OS releases it when the process ends, however it ends."""
    import fcntl

    run.mkdir(parents=True, exist_ok=True)
    with open(run / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise BlockingIOError(f"{run} is in use by another trainer ({f.read().strip() or 'unknown process'}); "
                                  "wait for it to finish or pass another out folder.") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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
    return json.loads(json.dumps({"d_in": d_in, **asdict(cfg)}))


def _check_run_folder(run: Path, cfg: TrainConfig, d_in: int) -> bool:
    """Raise if ``run`` holds a run with another config or d_in; True if it is finished."""
    path = run / "config.json"
    if not path.is_file():
        return False
    try:
        saved, current = json.loads(path.read_text()), _config_record(cfg, d_in)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); delete {run} to start the run again.") from None
    if saved.get("d_in") != d_in:
        raise ValueError(f"{run} was trained on activations with d_in={saved.get('d_in')} but the data has d_in={d_in}; use a new out folder.")
    # a field added to TrainConfig after the run was written counts as its default (which keeps the old behaviour)
    saved = {**{f.name: f.default for f in fields(TrainConfig) if f.name in current and f.name not in saved}, **saved}
    changed = sorted(key for key in saved.keys() | current.keys() if key not in BOOKKEEPING and saved.get(key) != current.get(key))
    if changed:
        diff = ", ".join(f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in changed)
        raise ValueError(f"{run} holds a run with a different config ({diff}); use a new out folder or the same options.")
    return (run / "sae" / "config.json").is_file()


def _start_run_folder(run: Path, record: dict, step: int) -> None:
    """Write ``config.json`` and drop metrics logged after the checkpoint being resumed."""
    run.mkdir(parents=True, exist_ok=True)
    tmp = run / ".config.json.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, run / "config.json")
    metrics = run / "metrics.jsonl"
    if metrics.exists():
        # a process killed mid-write leaves a partial last line: dropped with the rows after `step`
        kept = [line for line in metrics.read_text().splitlines() if line.endswith("}") and json.loads(line)["step"] <= step]
        tmp = metrics.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, metrics)


def latest_checkpoint(run: Path) -> Path | None:
    """The newest complete ``run/checkpoints/step_*`` folder (temp folders are ignored)."""
    folders = sorted((run / "checkpoints").glob("step_*"))
    return folders[-1] if folders else None


def save_checkpoint(run: Path, sae: TopKSAE, opt: torch.optim.Optimizer, state: TrainState, config: dict) -> Path:
    """Atomically write model, optimiser, EMA, dead counters, RNG states and data position.

    Tensors go to ``state.safetensors``, the rest to ``state.json``; the folder is built under
    a temporary name and renamed, and older checkpoints are removed afterwards.
    """
    root = run / "checkpoints"
    final = root / f"step_{state.step:09d}"
    if final.exists():
        return final
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    optim = opt.state_dict()
    tensors = {f"model.{name}": t for name, t in sae.state_dict().items()}
    tensors |= {f"optim.{i}.{name}": t for i, s in optim["state"].items() for name, t in s.items()}
    tensors |= {f"ema.{name}": t for name, t in (state.ema or {}).items()}
    tensors |= {"since_fired": state.since_fired, "torch_rng": torch.get_rng_state()}
    try:
        save_file({key: t.detach().to("cpu", copy=True).contiguous() for key, t in tensors.items()},
                  str(tmp / "state.safetensors"))
        meta = {"step": state.step, "epoch": state.epoch, "batch": state.batch, "tokens": state.tokens,
                "normalizer_scale": sae.normalizer_scale, "has_ema": state.ema is not None,
                "param_groups": optim["param_groups"], "python_rng": random.getstate(), "config": config,
                "sha256": sha256_file(tmp / "state.safetensors")}
        (tmp / "state.json").write_text(json.dumps(meta))
        os.replace(tmp, final)
    except (OSError, SafetensorError) as error:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run)
        kept = f"the previous checkpoint {previous} is intact" if previous else "there is no earlier checkpoint"
        raise OSError(f"Could not write the checkpoint of step {state.step} to {final} ({error}); {kept}. "
                      "Free disk space and run again to resume.") from error
    for old in [*sorted(root.glob("step_*"))[:-1], *root.glob(".tmp-*")]:  # older and half-written ones
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(folder: Path, sae: TopKSAE, opt: torch.optim.Optimizer, state: TrainState) -> None:
    """Restore what ``save_checkpoint`` wrote, in place; a damaged checkpoint is a ValueError naming the file."""
    fix = f"delete {folder} to restart the run from the beginning"
    try:
        meta = json.loads((folder / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{folder / 'state.json'} cannot be read ({error}); {fix}.") from None
    # checkpoints written before checksums were recorded have none
    tensors = load_safetensors(folder / "state.safetensors", meta.get("sha256"), fix)
    sae.load_state_dict({key[len("model."):]: t for key, t in tensors.items() if key.startswith("model.")})
    sae.normalizer_scale = meta["normalizer_scale"]
    optim_state: dict[int, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            optim_state.setdefault(int(i), {})[name] = t
    groups = [{**g, "betas": tuple(g["betas"])} for g in meta["param_groups"]]
    opt.load_state_dict({"state": optim_state, "param_groups": groups})
    device = sae.W_enc.device
    state.ema = {key[len("ema."):]: t.to(device) for key, t in tensors.items() if key.startswith("ema.")} if meta["has_ema"] else None
    state.since_fired = tensors["since_fired"].to(device)
    state.step, state.epoch, state.batch, state.tokens = meta["step"], meta["epoch"], meta["batch"], meta["tokens"]
    torch.set_rng_state(tensors["torch_rng"])
    version, internal, gauss = meta["python_rng"]
    random.setstate((version, tuple(internal), gauss))
