"""Reconstruction quality side by side (``saelib bench --quality``): saelib, sparsify and SAELens
trained on the same cached activations, in the same batch order, for the same number of steps, at a
shared grid of learning rates, and scored by one evaluation on the same held-out tokens.

The budget is a preset's run (``--budget demo``: ``saelib train --preset demo``'s cache, n, k,
batch size, steps, warm-up and decay; ``--scale 4`` trains 4x as many steps). Every library sees
the normalised batches saelib's trainer sees (the cache's mean subtracted, unit mean squared norm)
and keeps its own defaults otherwise:

- ``saelib``: :func:`saelib.train.fit`, the paper's recipe (tied init, geometric-median ``b_pre``,
  AuxK, Adam with eps 6.25e-10, gradient clipping, unit-norm decoder).
- ``sparsify``: EleutherAI's ``SparseCoder`` stepped as its trainer does (its init, ``b_dec`` set to
  the first batch's mean, unit-norm decoder with the parallel gradient removed, AuxK off), with its
  ``adam`` optimiser.
- ``sparsify-signum``: the same with sparsify's default optimiser, sign SGD in a schedule-free
  wrapper (momentum 0.95), at multiples of its own rule ``5e-3 / sqrt(n / 2**14)`` and no schedule.
- ``sae-lens``: SAELens' ``TopKTrainingSAE`` with its default config and trainer step (its init,
  zero ``b_dec``, Adam betas (0.9, 0.999), gradient clipping at 1).

The Adam libraries run at multiples of the paper's rule ``2e-4 / sqrt(n / 2**14)`` under the
budget's schedule (linear warm-up, then linear decay to 0). Every library trains on the CPU, on a
GPU machine too, so their speeds are comparable. The peers train in the interpreter that
has them (``make peers``: ``.venv-peers/bin/python``) and save in their own format, which saelib
imports (:func:`saelib.formats.import_sae`) with the cache's normaliser attached. Every SAE is then
scored here: NMSE, L0 and the fraction of latents that never fire on the held-out tokens, and
delta CE and loss recovered with the SAE spliced into the LM.

    saelib bench --quality --budget demo --lr-multipliers 1 4 16 32 --seeds 0 1 --out quality.json

Run again with the same ``--out``, a grid trains only the cells that file lacks: an interrupted grid
resumes, and another seed, library or learning rate is added to the same table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from .. import config
from ..activations import ActivationCache, CachedSource, cached_activations
from ..evals.downstream import downstream_loss
from ..evals.heldout import held_out
from ..evals.reconstruction import reconstruction_metrics
from ..files import atomic_write_text
from ..formats import import_sae
from ..models import load_lm
from ..normalize import Normalizer
from ..results import quality as quality_table
from ..sae import TopKSAE
from ..sources import stream
from ..train import fit, learning_rate
from .cases import BenchConfig
from .peers import Step, _sae_lens, _sparsify

# library -> its learning rate at 1x for n latents
RULES = {
    "saelib": config.paper_lr,
    "sparsify": config.paper_lr,
    "sparsify-signum": lambda n: 5e-3 / (n / 2**14) ** 0.5,
    "sae-lens": config.paper_lr,
}
LIBRARIES = tuple(RULES)
# the default grid of multiples of each rule: the Adam rule is tuned on long runs (short ones want
# more), sign SGD's own rule already sits near its best and diverges a few times above it
GRIDS = {**dict.fromkeys(LIBRARIES, (1, 4, 16, 32)), "sparsify-signum": (0.25, 0.5, 1, 2)}
SCHEDULE_FREE = ("sparsify-signum",)
REPLY = "saelib-peer-reply: "  # marks serve()'s answers among whatever the peers print


# ---- a peer's run, in the interpreter that has the peer -------------------------------------


def _peer_step(library: str, d_in: int, n_latents: int, k: int, batch_size: int, lr: float) -> Step:
    cfg = BenchConfig(d_in, n_latents, k, batch_size, dead_fraction=0.0)
    if library == "sae-lens":
        return _sae_lens(cfg, None, None, lr=lr)
    return _sparsify(cfg, None, None, lr=lr, optimizer="signum" if library == "sparsify-signum" else "adam")


def train_peer(library: str, cache: str | Path, n_latents: int, k: int, batch_size: int, steps: int,
               warmup_steps: int, lr: float, seed: int, out: str | Path) -> dict:
    """Train ``library`` on the normalised batches of the activation cache folder ``cache``, in the
    order saelib's trainer reads them with ``seed``, for ``steps`` steps; save it to ``out`` in the
    library's own format. Returns ``seconds`` and ``tokens_per_s`` of the training loop."""
    if library not in RULES or library == "saelib":
        raise ValueError(f"Unknown peer {library!r}; choose one of {', '.join(LIBRARIES[1:])}.")
    source = CachedSource(ActivationCache(cache))
    torch.manual_seed(seed)  # the peer's own init, from the run's seed
    step = _peer_step(library, source.d_in, n_latents, k, batch_size, lr)
    schedule = None if library in SCHEDULE_FREE else config.TrainConfig(
        n_latents=n_latents, k=k, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, decay="linear")
    start = time.perf_counter()
    for i, (_, _, x) in enumerate(stream(source, batch_size, seed, True, 0, 0)):
        if i == steps:
            break
        if i == 0 and library.startswith("sparsify"):
            step.model.b_dec.data = x.mean(0)  # sparsify's trainer: b_dec starts at the first batch's mean
        if schedule is not None:
            for group in step.optimizer.param_groups:
                group["lr"] = learning_rate(schedule, i, steps)
        step(x)
    seconds = time.perf_counter() - start
    save_peer(library, step, out)
    return {"seconds": seconds, "tokens_per_s": steps * batch_size / seconds}


def save_peer(library: str, step: Step, out: str | Path) -> None:
    """Save the model ``step`` trained to ``out`` in the peer's own format, as saelib imports it."""
    if library in SCHEDULE_FREE:
        step.optimizer.eval()  # the schedule-free average is the trained model
    if library == "sae-lens":
        # its default divides the latents by the decoder's row norms; fold them into the weights
        step.model.fold_W_dec_norm()
        step.model.cfg.rescale_acts_by_decoder_norm = False
        step.model.save_inference_model(out)
    else:
        step.model.save_to_disk(out)


def _with_normalizer(sae: TopKSAE, normalizer: Normalizer) -> TopKSAE:
    """``sae``, trained on normalised activations, as an SAE of raw ones."""
    out = TopKSAE(sae.d_in, sae.n_latents, sae.k, arch=sae.arch, normalizer=normalizer, metadata=sae.metadata)
    out.load_state_dict({**sae.state_dict(), "normalizer_mean": normalizer.mean})
    return out.eval()


# ---- the grid, here ----------------------------------------------------------------------------


def run_quality(budget: str = "demo", lr_multipliers=None, seeds=(0,), libraries=LIBRARIES, *,
                scale: float = 1.0, peers_python: str | None = None, eval_preset: str | None = None,
                out: str | Path | None = None, progress: bool = True) -> list[dict]:
    """Every (seed, lr multiple, library) cell at ``budget``: one row each (``library, lr_multiplier,
    lr, seed``, the budget, ``nmse, l0, dead_fraction, delta_ce, loss_recovered, tokens_per_s``...),
    ``status`` "failed" with the ``reason`` where a peer could not run. ``lr_multipliers``: one grid
    for every library (default: :data:`GRIDS`, each library's own); "default" in it is the multiple
    saelib chooses for this run (:func:`saelib.config.lr_multiple`) for the libraries on the paper's
    rule, and 1 (its own rule) for sparsify's sign SGD. Rows go to ``out`` (JSON) as
    they finish; where ``out`` already holds cells of the same budget, those are kept, not trained
    again, and returned with the new ones. ``eval_preset`` sets the held-out sample (default: the
    budget's)."""
    unknown = sorted(set(libraries) - set(LIBRARIES))
    if unknown:
        raise ValueError(f"Unknown libraries {unknown}; choose from {', '.join(LIBRARIES)}.")
    cfg = config.resolve(budget)
    data_opts, train_opts = config.split(cfg)
    cache = cached_activations(**data_opts, split="train", progress=progress)
    source = CachedSource(cache)
    steps = int(scale * cfg.epochs * source.n_tokens) // cfg.batch_size
    sample = config.PRESETS[eval_preset or budget]["eval"]
    lm = load_lm(cfg.model)
    held = held_out(lm, cfg.layer, cfg.site, cfg.corpus, cfg.ctx_len, sample["eval_tokens"], progress=progress,
                    prepend_bos=cache.manifest["key"].get("prepend_bos", False), val_fraction=cfg.val_fraction)
    ids = held.ids[:sample["downstream_contexts"]]
    grid = {"budget": budget, "scale": scale, "steps": steps, "tokens": steps * cfg.batch_size,
            "n_latents": cfg.n_latents, "k": cfg.k, "batch_size": cfg.batch_size, "eval_tokens": held.n_tokens}
    rows = _finished_rows(out, grid)
    done = {(r["library"], float(r["lr_multiplier"]), r["seed"]) for r in rows}
    with PeerWorker(peers_python or sys.executable) as peers:
        for library, multiple, seed in _cells(libraries, lr_multipliers, seeds, steps, cfg):
            if (library, float(multiple), seed) in done:
                continue
            lr = multiple * RULES[library](cfg.n_latents)
            row = {"library": library, "lr_multiplier": multiple, "lr": lr, "seed": seed, **grid}
            _say(progress, f"{library} at {multiple}x (lr {lr:.3g}), seed {seed}: {steps} steps")
            try:
                sae, speed = _train(library, source, cache.folder, cfg, train_opts, lr, seed, steps, peers)
            except (RuntimeError, ValueError, FloatingPointError) as error:  # FloatingPointError: saelib diverged
                rows.append({**row, "status": "failed", "reason": str(error)})
                continue
            scores = reconstruction_metrics(sae, held.acts[held.keep])
            loss = downstream_loss(sae, lm, ids, cfg.layer, cfg.site, progress=progress)
            rows.append({**row, "status": "ok", **speed, **scores, **loss})
            if out is not None:
                atomic_write_text(out, json.dumps({"rows": rows}, indent=1))
    return rows


def _cells(libraries, lr_multipliers, seeds, steps: int, cfg: config.TrainConfig):
    """``(library, multiple, seed)`` in the order a grid trains them: by seed, then the libraries in
    turn along their grids; "default" becomes the multiple saelib chooses for the run on the paper's
    rule, and 1 (its own rule) for a library with another."""
    grids = {library: tuple(lr_multipliers or GRIDS[library]) for library in libraries}
    for seed in seeds:
        for i in range(max(map(len, grids.values()))):
            for library in (library for library in libraries if i < len(grids[library])):
                multiple = grids[library][i]
                if multiple == "default":
                    on_rule = RULES[library] is config.paper_lr
                    multiple = config.lr_multiple(steps, cfg.n_latents, cfg.k, cfg.batch_size) if on_rule else 1
                yield library, multiple, seed


def _finished_rows(out: str | Path | None, grid: dict) -> list[dict]:
    """The finished cells already in ``out`` (a grid run again adds only its missing cells, and a
    failed cell trains again); an error if ``out`` holds another budget's grid."""
    if out is None or not Path(out).exists():
        return []
    try:
        rows = json.loads(Path(out).read_text())["rows"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{out} is not a quality grid's JSON; give --out a new file.") from None
    for r in rows:
        other = {key: r.get(key) for key in grid if r.get(key) != grid[key]}
        if other:
            this = {key: grid[key] for key in other}
            raise ValueError(f"{out} holds the grid of another budget ({other} where this one has {this}); "
                             "give --out another file.")
    return [r for r in rows if r.get("status") == "ok"]


def _train(library: str, source: CachedSource, cache: Path, cfg: config.TrainConfig, train_opts: dict, lr: float,
           seed: int, steps: int, peers: PeerWorker) -> tuple[TopKSAE, dict]:
    if library == "saelib":
        # on the CPU, where the peers' steps run (train_peer): one device for every library's speed
        opts = {**train_opts, "lr": lr, "lr_multiplier": 1.0, "seed": seed, "tokens": steps * cfg.batch_size,
                "device": "cpu"}
        start = time.perf_counter()
        sae = fit(source, normalizer=source.normalizer, progress=False, **opts)
        seconds = time.perf_counter() - start  # with the geometric-median init, which the peers do not run
        return sae, {"seconds": seconds, "tokens_per_s": steps * cfg.batch_size / seconds}
    with tempfile.TemporaryDirectory() as folder:
        speed = peers.train(library=library, cache=str(cache), n_latents=cfg.n_latents, k=cfg.k,
                            batch_size=cfg.batch_size, steps=steps, warmup_steps=cfg.warmup_steps, lr=lr, seed=seed,
                            out=folder)
        return _with_normalizer(import_sae(folder), source.normalizer), speed


class PeerWorker:
    """The peers' interpreter (``python``), started at a grid's first peer cell and kept for the rest:
    sparsify and SAELens are imported once per grid, not once per cell (about 8 s each on 2 cores).

    It runs :func:`serve`: one line of :func:`train_peer`'s options in, one reply line out. What else
    the peers print to stdout (sparsify's notices) is dropped; their errors reach this process's stderr.
    """

    def __init__(self, python: str):
        self.python, self.process = python, None

    def __enter__(self) -> PeerWorker:
        return self

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            self.process.stdin.close()  # serve() ends at the end of its input
            self.process.wait()
            self.process = None

    def train(self, **options) -> dict:
        """:func:`train_peer`'s result for ``options``; a RuntimeError if the peer failed or the interpreter died."""
        if self.process is None:
            try:
                self.process = subprocess.Popen([self.python, "-m", "saelib.bench.quality", "--serve"],
                                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            except OSError as error:
                raise RuntimeError(f"Cannot start {self.python} ({error}); `make peers` creates .venv-peers.") from None
        try:
            print(json.dumps(options), file=self.process.stdin, flush=True)
            for line in self.process.stdout:
                if line.startswith(REPLY):
                    reply = json.loads(line[len(REPLY):])
                    if "error" in reply:
                        raise RuntimeError(f"{options['library']} failed ({reply['error']}; its traceback is above).")
                    return reply
        except BrokenPipeError:
            pass
        code, self.process = self.process.wait(), None
        raise RuntimeError(f"{options['library']} failed (exit code {code}; its error is above); is it installed in "
                           f"{self.python}? `make peers` installs it in .venv-peers.")


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


# ---- command line --------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``saelib bench --quality``."""
    group = parser.add_argument_group("quality (--quality)")
    group.add_argument("--budget", default="demo", choices=sorted(config.PRESETS),
                       help="the preset whose run every library trains (cache, n, k, batch size, steps, schedule)")
    group.add_argument("--scale", type=float, default=1.0, help="train this many times the budget's steps")
    group.add_argument("--lr-multipliers", type=_multiple, nargs="+",
                       help="learning rates as multiples of each library's rule (default: 1 4 16 32 x the "
                            "paper's rule for the Adam libraries, 0.25 0.5 1 2 x sparsify's own for its sign SGD); "
                            "'default': the multiple saelib chooses for the run's steps and n")
    group.add_argument("--seeds", type=int, nargs="+", default=[0])
    group.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=LIBRARIES)
    group.add_argument("--peers-python", help="the interpreter with sparsify and SAELens (default: .venv-peers/bin/python "
                                              "where it exists, else this one)")
    group.add_argument("--eval-preset", choices=sorted(config.PRESETS), help="held-out sample (default: the budget's)")


def _multiple(text: str) -> float | str:
    if text == "default":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a learning-rate multiple is a number or 'default', got {text!r}") from None


def run_from_args(args: argparse.Namespace) -> int:
    peers = args.peers_python or (".venv-peers/bin/python" if Path(".venv-peers/bin/python").exists() else None)
    rows = run_quality(args.budget, args.lr_multipliers, args.seeds, args.libraries, scale=args.scale,
                       peers_python=peers, eval_preset=args.eval_preset, out=args.out, progress=True)
    print(json.dumps(rows) if args.json else quality_table({"rows": rows}))
    return 0


def serve() -> None:
    """Peer runs on request (what :class:`PeerWorker` starts in the peers' interpreter): each line of
    stdin holds :func:`train_peer`'s options as JSON; each run answers one line, ``REPLY`` and its
    speed (or its error) as JSON. Ends at the end of stdin."""
    for line in sys.stdin:
        try:
            reply = train_peer(**json.loads(line))
        except Exception as error:  # noqa: BLE001 - reported to the grid, which records the cell as failed
            traceback.print_exc()
            reply = {"error": f"{type(error).__name__}: {error}"}
        print(REPLY + json.dumps(reply), flush=True)


if __name__ == "__main__":
    if sys.argv[1:] != ["--serve"]:
        raise SystemExit("usage: python -m saelib.bench.quality --serve (run_quality starts it in the peers' interpreter)")
    serve()
