"""Training throughput of saelib beside its peers and the GEMM roofline (``saelib bench``).

In a TopK step only the encoder's forward GEMM ``(B, d_in) @ (d_in, n_latents)`` is dense over
all latents: top-k keeps ``k`` of ``n`` latents per token, so the decoder forward, the decoder
gradient and the encoder gradient touch ``B * k`` rows each. One step therefore cannot beat
about ``B / t_gemm`` tokens/s, where ``t_gemm`` is that GEMM's measured time on the same
machine: the ``roofline`` row. Adam over ``2 * n * d_in`` parameters, the top-k selection and
AuxK's ``k_aux`` dead latents per token are the other costs.

Every implementation runs the same training step, in this process, on the same synthetic but
structured activations and the same initial weights: forward, loss (with AuxK when some
latents are marked dead), backward, optimiser step (Adam) and decoder renormalisation.

- ``saelib``: ``saelib.train.train_step`` (the step ``fit`` runs).
- ``saelib-bf16``: the same with ``encoder_dtype="bfloat16"`` (the encoder GEMM in bf16); only
  where ``kernels.fast_bf16()`` (a CPU with AMX, a GPU), else its row says why.
- ``sparsify``: EleutherAI's ``SparseCoder`` as its trainer steps it (AuxK weight 1/32 when
  latents are dead; its default is AuxK off).
- ``sae-lens``: SAELens' ``TopKTrainingSAE`` with its default config, as its trainer steps it
  (gradient clipping, no renormalisation: it rescales by decoder norms instead).
- ``sae-lens-sparse``: the same with ``use_sparse_activations=True``.
- ``naive``: the saelib recipe written with dense PyTorch ops (``(B, n)`` codes).
- ``roofline``: ``B / t_gemm``.

A peer that is not installed or fails gets a row that says why (``status``, ``reason``).
Rows: ``impl, d_in, n_latents, k, batch_size, dead_fraction, tokens_per_s`` (median of the
timed steps after warm-up), ``ratio_to_best_peer`` (to the fastest of sparsify / SAELens on
the same configuration), ``ratio_to_roofline``, ``peak_rss_mb`` (the process's peak resident
memory while that implementation ran, reset before each), plus versions, threads and CPU.
``--device cuda`` runs them all on a GPU; rows then also give ``peak_device_mb``.
``--supply CACHE`` also times reading and shuffling an activation cache (``supply_rate``), and
``--supply-steps N`` how long a trainer on it waits for batches, with and without reading the
next group ahead (``input_wait``).

    saelib bench --preset quick --json
    python -m saelib.bench --d-in 576 --n-latents 4608 18432 --dead-fraction 0.25 0 --out bench.json
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from itertools import product
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import native
from .files import cpu_info
from .config import paper_lr, resolve_device
from .sae import TopKSAE, nmse
from .config import BENCH_GRIDS, TrainConfig, paper_lr, resolve_device
from .version import __version__

IMPLS = ("saelib", "saelib-bf16", "sparsify", "sae-lens", "sae-lens-sparse", "naive", "roofline")
PEERS = ("sparsify", "sae-lens", "sae-lens-sparse")
ADAM_EPS = 6.25e-10  # the paper's; saelib and the naive step use it, peers keep their own default
AUXK_COEF = 1 / 32
GRAD_CLIP = 1.0
INSTALL_PEERS = "pip install 'saelib[peers]'"


@dataclass(frozen=True)
class BenchConfig:
    """One point of the grid. ``dead_fraction`` of the latents are marked dead (AuxK on if > 0)."""

    d_in: int
    n_latents: int
    k: int = 32
    batch_size: int = 4096
    dead_fraction: float = 0.25

    @property
    def k_aux(self) -> int:
        return max(1, min(512, self.d_in // 2, int(self.n_latents * self.dead_fraction)))

    def lr(self) -> float:
        return paper_lr(self.n_latents)


def grid(d_in=(576,), n_latents=(4608, 18432), k=(32,), batch_size=(4096,), dead_fraction=(0.25, 0.0)) -> list[BenchConfig]:
    """Every combination of the given values, as ``BenchConfig`` s."""
    return [BenchConfig(*values) for values in product(d_in, n_latents, k, batch_size, dead_fraction)]


PRESETS = BENCH_GRIDS  # saelib.config's grids, by the name `--preset` and older code use


# ---- data -----------------------------------------------------------------------------------


def synthetic_activations(n_tokens: int, d_in: int, seed: int = 0) -> Tensor:
    """``(n_tokens, d_in)`` float32 activations with sparse structure, on the SAE scale.

    Each token is a sum of 16 features from a dictionary of ``8 * d_in`` random unit
    directions, drawn with Zipf-like frequencies and exponential magnitudes, plus 5% noise;
    centred and scaled to unit mean squared norm per token (the recipe's normalisation).
    """
    g = torch.Generator().manual_seed(seed)
    n_features = 8 * d_in
    features = F.normalize(torch.randn(n_features, d_in, generator=g), dim=1)
    freq = 1.0 / torch.arange(10, n_features + 10, dtype=torch.float64) ** 1.1
    idx = torch.multinomial(freq, 16 * n_tokens, replacement=True, generator=g).view(n_tokens, 16)
    mags = torch.empty(n_tokens, 16).exponential_(generator=g)
    x = F.embedding_bag(idx, features, per_sample_weights=mags, mode="sum")
    x += 0.05 * x.norm(dim=1).mean() / d_in**0.5 * torch.randn(n_tokens, d_in, generator=g)
    x -= x.mean(0)
    return (x / x.pow(2).sum(1).mean().sqrt()).contiguous()


def initial_weights(cfg: BenchConfig, seed: int = 0) -> dict[str, Tensor]:
    """saelib's init (unit decoder rows, tied encoder, zero biases); every impl starts here."""
    sae = TopKSAE(cfg.d_in, cfg.n_latents, cfg.k, generator=torch.Generator().manual_seed(seed))
    return {name: p.detach().clone() for name, p in sae.named_parameters()}


def dead_mask(cfg: BenchConfig, seed: int = 0) -> Tensor | None:
    """A fixed random ``dead_fraction`` of the latents, or ``None`` (AuxK off)."""
    n_dead = int(cfg.n_latents * cfg.dead_fraction)
    if n_dead == 0:
        return None
    order = torch.randperm(cfg.n_latents, generator=torch.Generator().manual_seed(seed + 1))
    return torch.zeros(cfg.n_latents, dtype=torch.bool).index_fill_(0, order[:n_dead], True)


# ---- the implementations: each is ``step(x) -> loss`` (the loss before the update) ------------


class Unavailable(Exception):
    """An implementation cannot run here; the message says why and what to do."""


Step = Callable[[Tensor], Tensor]


def _saelib(cfg: BenchConfig, w: dict[str, Tensor], dead: Tensor | None, encoder_dtype: str = "float32") -> Step:
    from .config import TrainConfig
    from .kernels import fast_bf16
    from .train import make_optimizer, train_step

    device = w["W_enc"].device
    if encoder_dtype == "bfloat16" and not fast_bf16(device):
        missing = "this GPU has no fast bf16 matmul" if device.type == "cuda" else "this CPU has no fast bf16 matmul (AMX)"
        raise Unavailable(f"{missing}: fp32 stays the default here")
    sae = TopKSAE(cfg.d_in, cfg.n_latents, cfg.k, encoder_dtype=encoder_dtype).to(device)
    sae.load_state_dict({**sae.state_dict(), **w})
    train_cfg = TrainConfig(n_latents=cfg.n_latents, k=cfg.k, batch_size=cfg.batch_size, auxk=dead is not None,
                            k_aux=cfg.k_aux, lr=cfg.lr(), adam_eps=ADAM_EPS, grad_clip=GRAD_CLIP, l1_coef=0.0,
                            encoder_dtype=encoder_dtype)
    opt = make_optimizer(sae, train_cfg)

    def step(x: Tensor) -> Tensor:
        return train_step(sae, opt, x, dead, train_cfg).loss.detach()

    return step


class NaiveTopK(nn.Module):
    """The saelib recipe with dense ops: the code is a ``(B, n_latents)`` matrix."""

    def __init__(self, w: dict[str, Tensor], k: int, k_aux: int):
        super().__init__()
        self.k, self.k_aux = k, k_aux
        for name, t in w.items():
            setattr(self, name, nn.Parameter(t.clone()))

    def forward(self, x: Tensor, dead: Tensor | None) -> Tensor:
        x_c = x - self.b_pre
        pre = x_c @ self.W_enc.T + self.b_enc
        top = pre.topk(self.k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))
        x_hat = z @ self.W_dec + self.b_pre
        loss = nmse(x, x_hat)
        if dead is not None:
            aux = pre.masked_fill(~dead, float("-inf")).topk(self.k_aux, dim=-1)
            z_aux = torch.zeros_like(pre).scatter(-1, aux.indices, F.relu(aux.values))
            loss = loss + AUXK_COEF * nmse((x - x_hat).detach(), z_aux @ self.W_dec)
        return loss


def _naive(cfg: BenchConfig, w: dict[str, Tensor], dead: Tensor | None) -> Step:
    model = NaiveTopK(w, cfg.k, cfg.k_aux)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr(), eps=ADAM_EPS)

    def step(x: Tensor) -> Tensor:
        loss = model(x, dead)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            model.W_dec.grad -= (model.W_dec.grad * model.W_dec).sum(-1, keepdim=True) * model.W_dec
        nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        with torch.no_grad():
            model.W_dec /= model.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return loss.detach()

    return step


def _import(module: str, package: str):
    try:
        return __import__(module)
    except ImportError as error:
        raise Unavailable(f"{package} not installed ({error}): {INSTALL_PEERS}") from None


def _sparsify(cfg: BenchConfig, w: dict[str, Tensor], dead: Tensor | None) -> Step:
    _import("sparsify", "eai-sparsify")
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(cfg.d_in, SparseCoderConfig(num_latents=cfg.n_latents, k=cfg.k), device=w["W_enc"].device)
    with torch.no_grad():
        sae.encoder.weight.copy_(w["W_enc"])
        sae.encoder.bias.copy_(w["b_enc"])
        sae.W_dec.copy_(w["W_dec"])
        sae.b_dec.copy_(w["b_pre"])
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr())
    auxk_alpha = AUXK_COEF if dead is not None else 0.0

    def step(x: Tensor) -> Tensor:
        # sparsify's Trainer.fit, one step: renormalise, forward, backward, project, Adam
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x, dead_mask=dead)
        loss = out.fvu + auxk_alpha * out.auxk_loss
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    return step


def _sae_lens(cfg: BenchConfig, w: dict[str, Tensor], dead: Tensor | None, sparse: bool = False) -> Step:
    _import("sae_lens", "sae-lens")
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=cfg.d_in, d_sae=cfg.n_latents, k=cfg.k, use_sparse_activations=sparse,
                                                device=str(w["W_enc"].device)))
    with torch.no_grad():
        sae.W_enc.copy_(w["W_enc"].T)
        sae.b_enc.copy_(w["b_enc"])
        sae.W_dec.copy_(w["W_dec"])
        sae.b_dec.copy_(w["b_pre"])
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr())
    sae.train()

    def step(x: Tensor) -> Tensor:
        # SAETrainer._train_step without its logging and firing statistics
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead,
                                                       n_training_steps=0, is_logging_step=False))
        out.loss.backward()
        nn.utils.clip_grad_norm_(sae.parameters(), GRAD_CLIP)
        opt.step()
        opt.zero_grad()
        return out.loss.detach()

    return step


def _roofline(cfg: BenchConfig, w: dict[str, Tensor], dead: Tensor | None) -> Step:
    W_enc, b_enc = w["W_enc"], w["b_enc"]

    def step(x: Tensor) -> Tensor:
        with torch.no_grad():
            return F.linear(x, W_enc, b_enc)[0, 0]

    return step


BUILDERS: dict[str, Callable[[BenchConfig, dict, Tensor | None], Step]] = {
    "saelib": _saelib,
    "saelib-bf16": lambda cfg, w, dead: _saelib(cfg, w, dead, encoder_dtype="bfloat16"),
    "sparsify": _sparsify,
    "sae-lens": _sae_lens,
    "sae-lens-sparse": lambda cfg, w, dead: _sae_lens(cfg, w, dead, sparse=True),
    "naive": _naive,
    "roofline": _roofline,
}


def make_step(impl: str, cfg: BenchConfig, weights: dict[str, Tensor], dead: Tensor | None) -> Step:
    """``step(x) -> loss`` for ``impl`` starting from ``weights``; raises ``Unavailable`` with the reason."""
    if impl not in BUILDERS:
        raise ValueError(f"Unknown impl {impl!r}; choose from {', '.join(IMPLS)}.")
    return BUILDERS[impl](cfg, weights, dead)


# ---- measuring ------------------------------------------------------------------------------


def _version(impl: str) -> str | None:
    package = {"saelib": None, "saelib-bf16": None, "sparsify": "eai-sparsify", "sae-lens": "sae-lens", "sae-lens-sparse": "sae-lens"}.get(impl, "torch")
    if package is None:
        return __version__
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


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
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
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
                "saelib": 3 * dense, "saelib-bf16": 3 * dense, "sparsify": 3 * dense + 2 * sparse_rows}
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
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "saelib_version": __version__,
        # saelib's AuxK on the compiled CPU kernels (native.py) or why not; None off the CPU
        "native_kernels": None if device.type != "cpu" else "in use" if native.library() else native.unavailable(),
    }


def measure(step: Step, batches: list[Tensor], warmup: int, steps: int) -> tuple[list[float], list[float]]:
    """Run ``warmup`` then ``steps`` timed steps cycling over ``batches``; (seconds per step, losses)."""
    times, losses = [], []
    for i in range(warmup + steps):
        x = batches[i % len(batches)]
        start = time.perf_counter()
        loss = float(step(x))
        if i >= warmup:
            times.append(time.perf_counter() - start)
        losses.append(loss)
    return times, losses


def run_bench(
    configs: list[BenchConfig],
    impls: tuple[str, ...] | list[str] = IMPLS,
    *,
    warmup: int = 2,
    steps: int = 5,
    n_batches: int = 4,
    seed: int = 0,
    interleave: bool = False,
    device: str | torch.device = "cpu",
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Measure every impl on every config in this process; one row per (config, impl).

    Args:
        configs: the grid (``grid(...)`` or ``PRESETS``).
        impls: names from ``IMPLS``; ``roofline`` is always measured (the ratios need it).
        warmup, steps: untimed and timed steps; ``tokens_per_s`` is ``batch_size`` over the
            median step time.
        n_batches: distinct activation batches cycled through (each step sees fresh data).
        interleave: build and warm up every impl of a config first, then time them in turn,
            one step each per round, so that a load that changes during the run (a shared
            machine) falls on all of them alike; ``peak_rss_mb`` is then not measured (the
            impls are resident together).
        device: where every impl runs (``"cuda"``: the GPU path; each step ends with the loss
            read back to the host, which waits for the device, so the timings are complete).
            On a GPU ``peak_device_mb`` is each impl's peak allocated memory (not measured
            with ``interleave`` either).
        progress: called with a line per finished row (e.g. ``print`` to stderr).
    """
    unknown = [impl for impl in impls if impl not in BUILDERS]
    if unknown:
        raise ValueError(f"Unknown impl(s) {unknown}; choose from {', '.join(IMPLS)}.")
    impls = [*dict.fromkeys([*impls, "roofline"])]
    device = resolve_device(device)
    info = machine(device)
    rows: list[dict] = []
    for cfg in configs:
        data = synthetic_activations(n_batches * cfg.batch_size, cfg.d_in, seed).to(device)
        batches = list(data.split(cfg.batch_size))
        weights = {name: t.to(device) for name, t in initial_weights(cfg, seed).items()}
        dead = dead_mask(cfg, seed)
        dead = dead if dead is None else dead.to(device)
        group, live = [], {}
        for impl in impls:
            row = {"impl": impl, **asdict(cfg), "k_aux": cfg.k_aux if dead is not None else 0, "tokens_per_s": None,
                   "ratio_to_best_peer": None, "ratio_to_roofline": None, "peak_rss_mb": None, "peak_device_mb": None,
                   "step_s_median": None, "step_s_all": None, "loss_first": None, "loss_last": None, "status": "ok", "reason": None,
                   "impl_version": _version(impl), **info}
            available = _available_gb(device)
            if available is not None and _needed_gb(impl, cfg) > 0.8 * available:
                row.update(status="skipped", reason=f"needs about {_needed_gb(impl, cfg):.1f} GB, {available:.1f} GB available")
            else:
                _reset_peak_memory(device)
                try:
                    with contextlib.redirect_stdout(sys.stderr):  # peers print on import; stdout is for --json
                        step = make_step(impl, cfg, weights, dead)
                        times, losses = measure(step, batches, warmup, 0 if interleave else steps)
                except Exception as error:
                    _failed(row, error)
                else:
                    if interleave:
                        live[impl] = (step, times, losses)
                    else:  # and drop the step: each impl's peak memory is its own
                        _finish(row, cfg, times, losses, *_peak_memory_mb(device))
                    del step
            group.append(row)
            if progress and not interleave:
                progress(_format_row(row))
            gc.collect()
        if interleave:
            for i in range(warmup, warmup + steps):
                for impl, (step, times, losses) in list(live.items()):
                    try:
                        with contextlib.redirect_stdout(sys.stderr):
                            t, loss = measure(step, [batches[i % len(batches)]], 0, 1)
                    except Exception as error:
                        _failed(next(r for r in group if r["impl"] == impl), error)
                        del live[impl]
                    else:
                        times += t
                        losses += loss
            for row in group:
                if row["impl"] in live:
                    _finish(row, cfg, *live[row["impl"]][1:], None, None)
                if progress:
                    progress(_format_row(row))
        _add_ratios(group)
        rows += group
    return rows


def _failed(row: dict, error: Exception) -> None:
    """Record why an impl did not run: not installed, or an error (a result to report, not a crash)."""
    if isinstance(error, Unavailable):
        row.update(status="unavailable", reason=str(error))
    else:
        first = str(error).split(". ")[0].splitlines()[0] if str(error) else ""
        row.update(status="error", reason=f"{type(error).__name__}: {first}"[:300])


def _finish(row: dict, cfg: BenchConfig, times: list[float], losses: list[float], peak_rss_mb: float | None,
            peak_device_mb: float | None) -> None:
    median = statistics.median(times)
    row.update(tokens_per_s=cfg.batch_size / median, step_s_median=median, step_s_all=times, peak_rss_mb=peak_rss_mb,
               peak_device_mb=peak_device_mb, loss_first=losses[0], loss_last=losses[-1])
    if row["impl"] == "roofline":
        row.update(loss_first=None, loss_last=None)


def _add_ratios(group: list[dict]) -> None:
    peers = [r["tokens_per_s"] for r in group if r["impl"] in PEERS and r["tokens_per_s"]]
    roof = next((r["tokens_per_s"] for r in group if r["impl"] == "roofline"), None)
    for r in group:
        if r["tokens_per_s"]:
            r["ratio_to_best_peer"] = r["tokens_per_s"] / max(peers) if peers else None
            r["ratio_to_roofline"] = r["tokens_per_s"] / roof if roof else None


def run_elsewhere(python: str, preset: str = "default", *, warmup: int = 2, steps: int = 5,
                  interleave: bool = False) -> list[dict]:
    """``run_bench`` over ``PRESETS[preset]`` in another interpreter, e.g. the one with the peers
    installed (``make peers``: ``.venv-peers/bin/python``); its rows, as ``saelib bench --json`` prints them.
    Its progress goes to this process's stderr."""
    if not os.path.exists(python):
        raise ValueError(f"Interpreter {python} does not exist; `make peers` creates .venv-peers/bin/python.")
    cmd = [python, "-m", "saelib.bench", "--preset", preset, "--warmup", str(warmup), "--steps", str(steps), "--json"]
    result = subprocess.run(cmd + ["--interleave"] * interleave, stdout=subprocess.PIPE, text=True)
    if result.returncode:
        raise RuntimeError(f"`{' '.join(cmd)}` failed with exit code {result.returncode}; its error is above.")
    return json.loads(result.stdout)


def supply_rate(source, batch_size: int, *, epochs: int = 2, seed: int = 0) -> list[dict]:
    """How fast ``source`` (a ``train.BatchSource``, e.g. ``activations.CachedSource``) yields
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
    import tempfile

    from .activations import CachedSource
    from .runs import read_metrics
    from .train import fit

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
    ``validation (N, d_in)``, encoded in fp32 as a loaded SAE is.

    One row per encoder dtype: ``evals.reconstruction_metrics`` (``nmse``...), ``fit_seconds`` and
    ``rel_nmse_diff``, the NMSE relative to the fp32 run's (issue 8's goal: within 1%).
    """
    from .activations import CachedSource
    from .evals.reconstruction import reconstruction_metrics
    from .sae import ENCODER_DTYPES
    from .train import fit

    steps = epochs * (train.n_rows // batch_size)
    rows = []
    for dtype in ENCODER_DTYPES:
        start = time.perf_counter()
        sae = fit(CachedSource(train), n_latents, k, normalizer=train.normalizer, tokens=steps * batch_size,
                  batch_size=batch_size, seed=seed, encoder_dtype=dtype, progress=False)
        seconds = time.perf_counter() - start
        sae.encoder_dtype = "float32"
        metrics = reconstruction_metrics(sae, validation)
        rows.append({"encoder_dtype": dtype, "n_latents": n_latents, "k": k, "batch_size": batch_size, "steps": steps,
                     "train_tokens": train.n_rows, "validation_tokens": len(validation), **metrics,
                     "rel_nmse_diff": metrics["nmse"] / rows[0]["nmse"] - 1 if rows else 0.0, "fit_seconds": seconds})
    return rows


# ---- output ---------------------------------------------------------------------------------

COLUMNS = ("impl", "d_in", "n_latents", "k", "batch_size", "dead_fraction", "tokens_per_s", "ratio_to_best_peer",
           "ratio_to_roofline", "peak_rss_mb")


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"
    return str(value)


def _format_row(row: dict) -> str:
    text = "  ".join(f"{key}={_cell(row[key])}" for key in COLUMNS)
    return text if row["status"] == "ok" else f"{text}  [{row['status']}: {row['reason']}]"


def markdown_table(rows: list[dict]) -> str:
    """The rows as a Markdown table (the form docs/performance.md uses); a GPU run's rows add their
    peak device memory."""
    columns = COLUMNS + ("peak_device_mb",) * any(r.get("peak_device_mb") is not None for r in rows)
    head = "| " + " | ".join(columns) + " | note |"
    lines = [head, "|" + "---|" * (len(columns) + 1)]
    for r in rows:
        note = "" if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
        lines.append("| " + " | ".join(_cell(r[c]) for c in columns) + f" | {note} |")
    return "\n".join(lines)


def throughput_figure(rows: list[dict], title: str = "Training throughput of one TopK step"):
    """A plotly bar chart: tokens/s per implementation (bars) for each configuration (groups),
    log scale; implementations that could not run are left out of the bars (their rows say why)."""
    import plotly.graph_objects as go

    def label(r: dict) -> str:
        return f"d {r['d_in']}, n {r['n_latents']}, B {r['batch_size']}, dead {r['dead_fraction']:g}"

    fig = go.Figure()
    for impl in dict.fromkeys(r["impl"] for r in rows):
        ok = [r for r in rows if r["impl"] == impl and r["tokens_per_s"]]
        if ok:
            fig.add_bar(name=impl, x=[label(r) for r in ok], y=[r["tokens_per_s"] for r in ok],
                        text=[f"{r['ratio_to_roofline']:.2f} of roofline" for r in ok], textposition="none")
    fig.update_layout(title=title, yaxis_title="tokens/s (median step)", yaxis_type="log", barmode="group",
                      template="plotly_white", legend=dict(orientation="h", y=-0.25))
    return fig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``saelib bench`` flags (for the CLI's subparser)."""
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS),
                        help="grid: quick (tiny, seconds), default (d 576, n 4608/18432, minutes), full (tens of minutes)")
    parser.add_argument("--d-in", type=int, nargs="+", help="override the preset's activation widths")
    parser.add_argument("--n-latents", type=int, nargs="+", help="override the preset's dictionary sizes")
    parser.add_argument("--k", type=int, nargs="+", help="override the preset's k")
    parser.add_argument("--batch-size", type=int, nargs="+", help="override the preset's batch sizes (tokens)")
    parser.add_argument("--dead-fraction", type=float, nargs="+", help="fractions of latents marked dead (0: AuxK off)")
    parser.add_argument("--impl", nargs="+", default=list(IMPLS), choices=IMPLS, help="implementations to run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per implementation (median reported)")
    parser.add_argument("--interleave", action="store_true",
                        help="time the impls of a config in turn, a step each per round (fair under a changing load)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="where every impl runs: cpu (default), cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--supply", metavar="CACHE",
                        help="also time reading + shuffling this activation cache folder (activations.CachedSource)")
    parser.add_argument("--memory-gb", type=float, default=4.0,
                        help="--supply: the source's memory budget (a larger cache is read in groups of half of it)")
    parser.add_argument("--supply-steps", type=int, default=0, metavar="N",
                        help="--supply: also train N steps on the cache (first n_latents, k and batch), twice each "
                             "with and without reading the next group ahead, and print how long the trainer waited")
    parser.add_argument("--drop-page-cache", action="store_true",
                        help="--supply-steps: drop the page cache before each run, so the shards come from the disk (root)")
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON list on stdout")
    parser.add_argument("--out", help="also write the rows as JSON to this file")


def run_from_args(args: argparse.Namespace) -> int:
    """Run the bench as parsed by ``add_arguments``; prints a table (or JSON with ``--json``)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    axes = dict(PRESETS[args.preset])
    for name in ("d_in", "n_latents", "k", "batch_size", "dead_fraction"):
        if getattr(args, name) is not None:
            axes[name] = tuple(getattr(args, name))
    for name in ("d_in", "n_latents", "k", "batch_size"):
        if any(v <= 0 for v in axes[name]):
            raise ValueError(f"--{name.replace('_', '-')} must be positive integers, got {list(axes[name])}.")
    if any(not 0 <= v < 1 for v in axes["dead_fraction"]):
        raise ValueError(f"--dead-fraction must be in [0, 1), got {list(axes['dead_fraction'])}.")
    if args.warmup < 0 or args.steps < 1:
        raise ValueError(f"--warmup must be >= 0 and --steps >= 1, got {args.warmup} and {args.steps}.")
    if args.supply_steps < 0 or args.memory_gb <= 0:
        raise ValueError(f"--supply-steps must be >= 0 and --memory-gb positive, got {args.supply_steps} and {args.memory_gb}.")
    if not args.supply and (args.supply_steps or args.drop_page_cache):
        raise ValueError("--supply-steps and --drop-page-cache time training on --supply CACHE; name the cache folder.")
    configs = grid(**axes)
    bad = [c for c in configs if c.k > c.n_latents]
    if bad:
        raise ValueError(f"k={bad[0].k} is larger than n_latents={bad[0].n_latents}; choose k <= n_latents.")
    rows = run_bench(configs, args.impl, warmup=args.warmup, steps=args.steps, seed=args.seed, interleave=args.interleave,
                     device=args.device, progress=lambda line: print(line, file=sys.stderr))
    if args.supply:
        from .activations import ActivationCache, CachedSource

        cache = ActivationCache(args.supply)
        source = CachedSource(cache, memory_gb=args.memory_gb)
        for batch_size in axes["batch_size"]:
            for r in supply_rate(source, batch_size, seed=args.seed):
                print(f"supply: epoch {r['epoch']}, batch {batch_size}: {r['tokens_per_s']:,.0f} tokens/s "
                      f"({r['tokens']} tokens in {r['seconds']:.2f} s)", file=sys.stderr)
        for read_ahead in (False, True) * 2 if args.supply_steps else ():  # taking turns
            r = input_wait(cache, configs[0].n_latents, configs[0].k, configs[0].batch_size, steps=args.supply_steps,
                           memory_gb=args.memory_gb, read_ahead=read_ahead, seed=args.seed,
                           drop_page_cache=args.drop_page_cache)
            print(f"input wait, read ahead {'on ' if read_ahead else 'off'}: {r['waited_seconds']:.1f} s of "
                  f"{r['seconds']:.1f} s ({r['input_wait']:.1%}), {r['groups']} groups of the cache per epoch", file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    print(json.dumps(rows) if args.json else markdown_table(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m saelib.bench [flags]``; the same as ``saelib bench``."""
    parser = argparse.ArgumentParser(prog="saelib bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_from_args(args)
    except ValueError as error:
        print(f"saelib bench: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
