"""The ``saelib`` command line (also ``python -m saelib``).

    saelib extract [--preset P] [--model M --corpus C --layer L --site S ...]
    saelib train   [--config FILE] [--preset ci|lesson|demo|full] [--model M --corpus C --layer L --site S
                    --n-latents N --k K --tokens T --seed S ...] --out RUN [--dry-run]
    saelib eval    RUN [--preset ci|lesson|demo|full] [--json]
    saelib view    RUN --out DIR [--preset ci|lesson|demo|full]
    saelib export  RUN --format saelens|sparsify|openai --out DIR
    saelib bench   [--preset quick|default|full] [--pipeline | --quality] [--json]
    saelib --version

Every expected failure (bad input, a missing or damaged file, a locked run folder, a failed write)
ends with one sentence on standard error and exit status 2; anything else with one line naming
the traceback saved under ``$SAELIB_HOME/errors/`` and exit status 1; Ctrl-C with status 130 (a
training run first finishes its step and writes a checkpoint; after SIGTERM it exits with 143).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time
import traceback

from . import config
from .paths import cache_dir
from .version import __version__

def add_config_flags(parser: argparse.ArgumentParser, groups: tuple[str, ...]) -> None:
    """A flag for every ``TrainConfig`` field of ``groups`` (``n_latents`` -> ``--n-latents``), with its
    help text and a type from its annotation. Unset flags stay out of the namespace, so a preset or a
    config file keeps its value unless a flag is given."""
    for name, f in config.FIELDS.items():
        if f.metadata["group"] not in groups:
            continue
        kind, _ = config.field_type(name)
        # a None default's meaning is spelled out in the help text itself
        shown = "" if f.default is None else f" (default: {f.default})"
        help_ = (f.metadata["help"] + shown).replace("%", "%%")
        kwargs = dict(default=argparse.SUPPRESS, help=help_)
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind is tuple:
            kwargs.update(type=float, nargs=2, metavar=("B1", "B2"))
        else:
            kwargs.update(type=kind, choices=f.metadata.get("choices"))
        parser.add_argument(f"--{name.replace('_', '-')}", **kwargs)


def _overrides(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in config.FIELDS if hasattr(args, name)}


def cmd_extract(args: argparse.Namespace) -> int:
    from .activations import cached_activations

    cfg = config.resolve(args.preset, args.config, **_overrides(args))
    cache = cached_activations(**cfg.group("data"), split=args.split, device=config.resolve_device(cfg.device))
    print(json.dumps({"cache": str(cache.folder), "rows": cache.n_rows, "dropped": cache.manifest["dropped"]}))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .distributed import launch, launched
    from .grid import check_split, rank_device
    from .data import check_corpus
    from .runs import check_model, check_out, train_activations, train_run
    from .train import Stopped

    cfg = config.resolve(args.preset, args.config, **_overrides(args))
    if args.nproc > 1:  # before any extraction (each rank checks its grid again)
        check_split(args.nproc, cfg.latent_parallel, n_latents=cfg.n_latents, batch_size=cfg.batch_size, arch=cfg.arch)
    if args.dry_run:
        cfg.check_one_batch()
        if not check_model(cfg, local_only=True):
            print(f"saelib train: {cfg.model}'s config is not on this machine, so the layer and the SAE's size are "
                  "checked once it is downloaded.", file=sys.stderr)
        if not check_corpus(cfg.corpus):
            print(f"saelib train: {cfg.corpus!r} is not a local corpus, so it is looked up as a datasets name when "
                  "the extraction starts.", file=sys.stderr)
        check_out(cfg, args.out)
        print(json.dumps(dataclasses.asdict(cfg)))
        return 0
    if not launched():  # extract once, here, not by every rank
        check_out(cfg, args.out)
        rank_device(config.resolve_device(cfg.device), args.nproc - 1)  # a GPU for each rank, before the extraction
        cache = train_activations(cfg)
        amount = "all" if cfg.max_tokens is None else f"at most {cfg.max_tokens:,} tokens"
        print(f"saelib train: {cache.n_rows:,} tokens of activations ({amount} of {cfg.corpus}'s train split, "
              f"max_tokens={cfg.max_tokens}) in {cache.folder}.", file=sys.stderr)
        if args.nproc > 1:
            argv = [a for i, a in enumerate(args.argv) if a != "--nproc" and args.argv[i - 1] != "--nproc"]
            return launch(args.nproc, argv)
    try:
        train_run(cfg, args.out, progress=os.environ.get("RANK", "0") == "0")
    except Stopped as stopped:  # a signal stopped the run after a checkpoint, which it said
        if launched() or stopped.signal is None:
            raise  # a rank: status 0, as torchrun expects
        return 128 + signal.Signals[stopped.signal]
    if os.environ.get("RANK", "0") == "0":
        print(f"SAE written to {args.out}/sae; evaluate it with `saelib eval {args.out} --json`.")
    return 0


def _nan_to_null(value):
    """``value`` with every float NaN in it, inside dicts and lists too, replaced by None."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _nan_to_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_null(item) for item in value]
    return value


def cmd_eval(args: argparse.Namespace) -> int:
    from .evals import evaluate
    from .runs import load_run

    # progress goes to stderr, so --json's standard output stays one JSON object
    report = evaluate(load_run(args.run), preset=args.preset, progress=True)
    if args.json:  # strict JSON: a metric that could not be computed (NaN), here or inside a list, is null
        print(json.dumps(_nan_to_null(report), allow_nan=False))
    else:
        width = max(map(len, report))
        for key, value in report.items():  # a metric's 95% interval (key_ci, a half-width) beside it
            ci = f" ± {report[key + '_ci']:.2g}" if key + "_ci" in report else ""
            if not key.endswith("_ci") and not isinstance(value, (dict, list)):  # per task or context: --json
                print(f"{key:<{width}}  {value:.6g}{ci}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    return 0


def cmd_view(args: argparse.Namespace) -> int:
    from .viz import write_site

    index = write_site(args.run, args.out, preset=args.preset)
    print(f"Visualizer written to {index}; open it in a browser (it works from disk, offline).")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .formats import export
    from .runs import load_run

    print(f"{args.format} export written to {export(load_run(args.run), args.format, args.out)}.")
    return 0


class UsageError(Exception):
    """A command line argparse cannot parse; reported in one sentence, not as usage text."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(self.prog, message)


def out_folder(text: str) -> str:
    """An ``--out`` value: a folder to write (made if missing), never blank (the current folder) nor a file."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must name a folder to write, got {text!r}")
    if os.path.lexists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a folder; name a new or existing folder")
    return text


def positive_int(text: str) -> int:
    """A flag's value that must be an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="saelib", description="TopK sparse autoencoders on language-model activations.")
    parser.add_argument("--version", action="version", version=f"saelib {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("extract", help="extract and cache activations of a model's layer on a corpus")
    p.add_argument("--preset", choices=sorted(config.PRESETS), help="scale: ci (seconds), lesson (minutes), demo, full (a GPU)")
    p.add_argument("--config", help="a JSON or YAML file of settings, keyed by the flags' names with underscores")
    p.add_argument("--split", default="train", choices=["train", "validation"])
    add_config_flags(p, ("data",))
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("train", help="train an SAE (resumes an interrupted RUN)")
    p.add_argument("--preset", choices=sorted(config.PRESETS), help="scale: ci (seconds), lesson (minutes), demo, full (a GPU)")
    p.add_argument("--config", help="a JSON or YAML file of settings, keyed by the flags' names with underscores")
    p.add_argument("--out", required=True, type=out_folder, help="run folder: sae/, metrics.jsonl, checkpoints/")
    p.add_argument("--nproc", type=positive_int, default=1, help="processes on this machine (torch.distributed, gloo/NCCL)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the settings (and the layer, from the model's config where it is on this machine), print them "
                        "as one JSON object and stop before extracting or training")
    add_config_flags(p, config.GROUPS)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="the paper's metrics of a trained SAE on held-out text")
    p.add_argument("run", help="a run folder (RUN/sae inside), an SAE folder or a released SAE's name")
    p.add_argument("--preset", default="demo", choices=sorted(config.PRESETS),
                   help="evaluation scale: ci (seconds; too few tokens for stable numbers), lesson (16,384 held-out "
                        "tokens), demo (the default: 65,536 held-out tokens, minutes on 2 cores) or full; the JSON "
                        "records it with the sample sizes")
    p.add_argument("--json", action="store_true", help="print one JSON object (progress still goes to stderr)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("view", help="write a static, offline HTML visualizer of a trained SAE's latents")
    p.add_argument("run", help="a run folder (RUN/sae inside), an SAE folder or a released SAE's name")
    p.add_argument("--out", required=True, type=out_folder, help="folder for the site (index.html inside)")
    p.add_argument("--preset", choices=sorted(config.PRESETS),
                   help="how many tokens to summarise (default: the largest summary the run already has, else ci)")
    p.set_defaults(func=cmd_view)

    from . import bench

    p = sub.add_parser("bench", help="training throughput beside sparsify, SAELens, a naive dense step and the GEMM roofline")
    bench.add_arguments(p)
    p.set_defaults(func=bench.run_from_args)

    p = sub.add_parser("export", help="write an SAE in SAELens, sparsify or OpenAI layout (saelib.load reads them back)")
    p.add_argument("run", help="a run folder (RUN/sae inside) or an SAE folder")
    p.add_argument("--format", required=True, choices=["saelens", "sparsify", "openai"])
    p.add_argument("--out", required=True, type=out_folder, help="folder to write")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = "saelib"
    try:
        args, unknown = build_parser().parse_known_args(argv)
        if unknown:  # named by the subcommand they were given to, not by the top-level parser
            raise UsageError(f"saelib {args.command}", f"unrecognized arguments: {' '.join(unknown)}")
        args.argv, command = argv, f"saelib {args.command}"
        return args.func(args)
    except UsageError as e:
        print(f"{e.prog}: error: {_one_line(e)}; see `{e.prog} --help`.", file=sys.stderr)
        return 2
    except (ValueError, OSError, FloatingPointError) as e:  # OSError: a locked run folder, a failed write
        print(f"{command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{command}: interrupted; run the same command again to resume.", file=sys.stderr)
        return 130
    except Exception as e:
        print(f"{command}: unexpected error ({type(e).__name__}: {_one_line(e)[:200]}); {_save_traceback(command, argv)}",
              file=sys.stderr)
        return 1


def _one_line(error: BaseException) -> str:
    """An exception's message as one line (a message from a library may span several)."""
    return " ".join(line.strip() for line in str(error).strip().splitlines()) or type(error).__name__


def _save_traceback(command: str, argv: list[str]) -> str:
    """Write the current exception's traceback under ``$SAELIB_HOME/errors/``; where it went, as a sentence."""
    text = f"saelib {' '.join(map(repr, argv))}\n\n{traceback.format_exc()}"
    try:
        path = cache_dir("errors") / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{command.replace(' ', '-')}.txt"
        path.write_text(text, encoding="utf-8")
    except OSError as error:  # no writable home: the terminal is the only place left
        print(text, file=sys.stderr)
        return f"the traceback above could not be saved ({_one_line(error)}); please report it."
    return f"the full traceback is in {path}; please report it with that file."


if __name__ == "__main__":
    sys.exit(main())
