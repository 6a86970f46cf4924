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
  where ``kernels.fast_bf16()`` (a CPU with AMX or AVX512_BF16, a CUDA GPU of compute capability 8
  or later), else its row says why.
- ``sparsify``: EleutherAI's ``SparseCoder`` as its trainer steps it (AuxK weight 1/32 when
  latents are dead; its default is AuxK off).
- ``sae-lens``: SAELens' ``TopKTrainingSAE`` with its default config, as its trainer steps it
  (gradient clipping, no renormalisation: it rescales by decoder norms instead).
- ``sae-lens-sparse``: the same with ``use_sparse_activations=True``.
- ``naive``: the saelib recipe written with dense PyTorch ops (``(B, n)`` codes).
- ``roofline``: ``B / t_gemm``; ``roofline-bf16`` the same GEMM in bf16 (the bound of
  ``saelib-bf16``, whose ``ratio_to_roofline`` is to it where it was measured).

A peer that is not installed or fails gets a row that says why (``status``, ``reason``).
Rows: ``impl, d_in, n_latents, k, batch_size, dead_fraction, tokens_per_s`` (median of the
timed steps after warm-up), ``ratio_to_best_peer`` (to the fastest of sparsify / SAELens on
the same configuration), ``ratio_to_roofline``, ``peak_rss_mb`` (the process's peak resident
memory while that implementation ran, reset before each), plus versions, threads and CPU.
``--device cuda`` runs them all on a GPU; rows then also give ``peak_device_mb``. The bench has
glibc's malloc reuse its heap for every block (``memory.reuse_heap``; ``--heap auto``, the default,
where the C library is glibc, or ``--heap reuse``): glibc's default maps a large block afresh and its
pages fault on first touch, which a step that allocates its temporaries anew pays at every step, and
that costs some implementations far more than others, so each runs at its best; ``--heap default``
measures glibc's default, and ``heap`` in each row says which ran.
``--pipeline`` times the whole pipeline instead, stage by stage, from text to a train step
(:mod:`.pipeline`: tokenise, forward, nnsight's hook, cache write, cache read + shuffle, train step),
and names the slowest stage; ``--preset quick`` runs it in seconds. It runs with glibc's default
heap, as ``saelib train`` does; it reads ``--preset``, ``--threads``, ``--device`` and ``--seed``
(``MODE_FLAGS``), and a grid flag given with it (``--heap reuse``) is refused, not ignored.
``--supply CACHE`` also times reading and shuffling an activation cache (``supply_rate``), and
``--supply-steps N`` how long a trainer on it waits for batches, with and without reading the
next group ahead (``input_wait``).

    saelib bench --preset quick --json
    saelib bench --heap default
    saelib bench --pipeline
    python -m saelib.bench --d-in 576 --n-latents 4608 18432 --dead-fraction 0.25 0 --out bench.json

The package: :mod:`.cases` (the grid and the shared activations and weights), :mod:`.peers` (each
implementation's step), :mod:`.memory` (peak memory, the machine), :mod:`.experiments` (the
activation supply, the trainer's wait, bf16 parity), :mod:`.pipeline` (every stage from text to a
train step), :mod:`.report` (table and figure); this
module times them (``run_bench``) and is the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
from dataclasses import asdict
from typing import Callable

import torch

from ..activations import ActivationCache, CachedSource
from ..config import resolve_device
from .cases import IMPLS, PEERS, PRESETS, BenchConfig, dead_mask, grid, initial_weights, synthetic_activations
from .experiments import bf16_parity, input_wait, supply_rate
from .memory import (HEAPS, _available_gb, _needed_gb, _peak_memory_mb, _reset_peak_memory, machine, resolve_heap,
                     reuse_heap)
from .peers import BUILDERS, NaiveTopK, Unavailable, _version, make_step, measure
from .pipeline import pipeline_rates, pipeline_table
from .report import COLUMNS, _format_row, markdown_table

# what notebooks, tests and the CLI use as saelib.bench.<name>
__all__ = ["IMPLS", "PEERS", "PRESETS", "BenchConfig", "grid", "synthetic_activations", "initial_weights", "dead_mask",
           "NaiveTopK", "Unavailable", "make_step", "machine", "HEAPS", "reuse_heap", "resolve_heap", "supply_rate",
           "input_wait", "bf16_parity", "COLUMNS", "markdown_table", "measure", "run_bench", "pipeline_rates",
           "pipeline_table", "run_elsewhere", "add_arguments", "run_from_args", "main"]


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
    if row["impl"].startswith("roofline"):
        row.update(loss_first=None, loss_last=None)


def _add_ratios(group: list[dict]) -> None:
    peers = [r["tokens_per_s"] for r in group if r["impl"] in PEERS and r["tokens_per_s"]]
    roofs = {r["impl"]: r["tokens_per_s"] for r in group if r["impl"].startswith("roofline")}
    for r in group:
        if r["tokens_per_s"]:
            # the bf16 encoder's step against the bf16 GEMM where that was measured
            roof = roofs.get("roofline-bf16") if r["impl"].endswith("bf16") else None
            roof = roof or roofs.get("roofline")
            r["ratio_to_best_peer"] = r["tokens_per_s"] / max(peers) if peers else None
            r["ratio_to_roofline"] = r["tokens_per_s"] / roof if roof else None


def run_elsewhere(python: str, preset: str = "default", *, warmup: int = 2, steps: int = 5,
                  interleave: bool = False, heap: str = "auto") -> list[dict]:
    """``run_bench`` over ``PRESETS[preset]`` in another interpreter, e.g. the one with the peers
    installed (``make peers``: ``.venv-peers/bin/python``), with ``heap`` as ``saelib bench --heap``
    takes it (which ``reuse_heap`` would change in this process for good); its rows, as ``saelib bench
    --json`` prints them. Its progress goes to this process's stderr."""
    if not os.path.exists(python):
        raise ValueError(f"Interpreter {python} does not exist; `make peers` creates .venv-peers/bin/python.")
    resolve_heap(heap)  # a wrong name is refused here, before the other interpreter starts
    cmd = [python, "-m", "saelib.bench", "--preset", preset, "--warmup", str(warmup), "--steps", str(steps),
           "--heap", heap, "--json"]
    result = subprocess.run(cmd + ["--interleave"] * interleave, stdout=subprocess.PIPE, text=True)
    if result.returncode:
        raise RuntimeError(f"`{' '.join(cmd)}` failed with exit code {result.returncode}; its error is above.")
    return json.loads(result.stdout)


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
    parser.add_argument("--heap", default="auto", choices=("auto", *HEAPS),
                        help="reuse: glibc's malloc serves every block from its reused heap, so no implementation pays "
                             "page faults for memory it allocates afresh each step (memory.reuse_heap; each at its best); "
                             "default: glibc's default; auto (the default): reuse where the C library is glibc")
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
    mode = parser.add_mutually_exclusive_group()  # the speed grid, or one of these instead
    mode.add_argument("--pipeline", action="store_true",
                      help="time every stage from text to a train step instead (tokenise, forward, hook, cache write, "
                           "cache read + shuffle, train step) and name the slowest; --preset quick: tiny sizes, seconds")
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON list on stdout")
    parser.add_argument("--out", help="also write the rows as JSON to this file")
    mode.add_argument("--quality", action="store_true",
                      help="instead of speed: reconstruction quality of saelib, sparsify and SAELens trained on the "
                           "same activations at a grid of learning rates (saelib.bench.quality)")
    # imported here, not at the top: the peers' interpreter runs saelib.bench.quality as a script,
    # which must not find it imported already by its package
    from . import quality

    quality.add_arguments(parser)


# the flags each mode reads (beside --out and --json): one that another mode reads, set, is refused
# rather than ignored
MODE_FLAGS = {
    "the speed grid": {"preset", "d_in", "n_latents", "k", "batch_size", "dead_fraction", "impl", "warmup", "steps",
                       "interleave", "threads", "heap", "device", "seed", "supply", "memory_gb", "supply_steps",
                       "drop_page_cache"},
    "--pipeline": {"preset", "threads", "device", "seed"},
    "--quality": {"budget", "scale", "lr_multipliers", "seeds", "libraries", "peers_python", "eval_preset"},
}


def _check_mode_flags(args: argparse.Namespace) -> None:
    """Refuse a flag set away from its default that the chosen mode would not read."""
    mode = "--quality" if args.quality else "--pipeline" if args.pipeline else "the speed grid"
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = vars(parser.parse_args([]))
    other = set().union(*MODE_FLAGS.values()) - MODE_FLAGS[mode]
    unread = [f"--{name.replace('_', '-')}" for name in sorted(other) if getattr(args, name, None) != defaults[name]]
    if unread:
        reads = ", ".join(f"--{name.replace('_', '-')}" for name in sorted(MODE_FLAGS[mode]))
        raise ValueError(f"{', '.join(unread)} {'does' if len(unread) == 1 else 'do'} not apply to {mode}, which reads "
                         f"{reads}; drop {'it' if len(unread) == 1 else 'them'}.")


def run_from_args(args: argparse.Namespace) -> int:
    """Run the bench as parsed by ``add_arguments``; prints a table (or JSON with ``--json``)."""
    _check_mode_flags(args)
    if args.out is not None and (not args.out.strip() or os.path.isdir(args.out)):
        raise ValueError(f"--out must name a file to write the rows to, got {args.out!r}.")
    if args.out is not None and not os.access(os.path.dirname(os.path.abspath(args.out)), os.W_OK):  # before the runs
        raise ValueError(f"--out {args.out!r} cannot be written: its folder {os.path.dirname(os.path.abspath(args.out))} "
                         "does not exist or is not writable; create it or name another file.")
    if args.quality:
        from . import quality  # see add_arguments

        return quality.run_from_args(args)
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be a positive integer, got {args.threads}.")
    resolve_device(args.device)  # an unknown or absent device is refused before anything runs
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.pipeline:  # the stages as a training process runs them, with glibc's default heap (no --heap)
        return _run_pipeline(args)
    if resolve_heap(args.heap) == "reuse":
        reuse_heap()
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
    if args.supply_steps < 0 or not args.memory_gb > 0 or args.memory_gb == float("inf"):
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


def _run_pipeline(args: argparse.Namespace) -> int:
    """``--pipeline``: one report (JSON object with ``--json``, else a table and the slowest stage)."""
    report = pipeline_rates("quick" if args.preset == "quick" else "default", device=resolve_device(args.device),
                            seed=args.seed)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{pipeline_table(report)}\n\nslowest: {report['slowest']}; stages in series: "
              f"{report['serial_tokens_per_s']:,.0f} tokens/s; nnsight over a bare hook: {report['hook_overhead']:+.1%}; "
              f"the {report['lm_dtype']} forward at {report['forward_speedup']:.2f}x float32's; "
              f"{report['cpu']}, {report['threads']} threads, load {report['load_avg_1m']:.1f}")
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
