"""The ``saelib`` command line (also ``python -m saelib``).

    saelib extract [--preset P] [--model M --corpus C --layer L --site S ...]
    saelib train   [--config FILE] [--preset ci|demo|full] [--model M --corpus C --layer L --site S
                    --n-latents N --k K --tokens T --seed S ...] --out RUN
    saelib eval    RUN [--preset ci|demo|full] [--json]
    saelib view    RUN --out DIR [--preset ci|demo|full]
    saelib export  RUN --format saelens|sparsify|openai --out DIR
    saelib bench   [--preset quick|default|full] [--json]

Errors in the user's input end with one sentence on standard error and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from . import config

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
    cache = cached_activations(**cfg.group("data"), split=args.split)
    print(json.dumps({"cache": str(cache.folder), "rows": cache.n_rows, "dropped": cache.manifest["dropped"]}))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .activations import cached_activations
    from .distributed import launch, launched
    from .runs import train_run

    cfg = config.resolve(args.preset, args.config, **_overrides(args))
    if args.nproc > 1 and not launched():
        cached_activations(**cfg.group("data"), split="train")  # once, here, not by every rank
        argv = [a for i, a in enumerate(args.argv) if a != "--nproc" and args.argv[i - 1] != "--nproc"]
        return launch(args.nproc, argv)
    train_run(cfg, args.out, progress=os.environ.get("RANK", "0") == "0")
    if os.environ.get("RANK", "0") == "0":
        print(f"SAE written to {args.out}/sae; evaluate it with `saelib eval {args.out} --json`.")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evals import evaluate
    from .runs import load_run

    report = evaluate(load_run(args.run), preset=args.preset, progress=not args.json)
    if args.json:  # strict JSON: a metric that could not be computed (NaN) is null
        print(json.dumps({k: None if isinstance(v, float) and math.isnan(v) else v for k, v in report.items()}))
    else:
        width = max(map(len, report))
        for key, value in report.items():
            print(f"{key:<{width}}  {value:.6g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="saelib", description="TopK sparse autoencoders on language-model activations.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("extract", help="extract and cache activations of a model's layer on a corpus")
    p.add_argument("--preset", choices=sorted(config.PRESETS), help="scale: ci (seconds), demo, full (a GPU)")
    p.add_argument("--config", help="a JSON or YAML file of settings, keyed by the flags' names with underscores")
    p.add_argument("--split", default="train", choices=["train", "validation"])
    add_config_flags(p, ("data",))
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("train", help="train an SAE (resumes an interrupted RUN)")
    p.add_argument("--preset", choices=sorted(config.PRESETS), help="scale: ci (seconds), demo, full (a GPU)")
    p.add_argument("--config", help="a JSON or YAML file of settings, keyed by the flags' names with underscores")
    p.add_argument("--out", required=True, help="run folder: sae/, metrics.jsonl, checkpoints/")
    p.add_argument("--nproc", type=int, default=1, help="processes on this machine (torch.distributed, gloo/NCCL)")
    add_config_flags(p, config.GROUPS)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="the paper's metrics of a trained SAE on held-out text")
    p.add_argument("run", help="a run folder (RUN/sae inside) or an SAE folder")
    p.add_argument("--preset", default="ci", choices=sorted(config.PRESETS), help="evaluation scale")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("view", help="write a static, offline HTML visualizer of a trained SAE's latents")
    p.add_argument("run", help="a run folder (RUN/sae inside) or an SAE folder")
    p.add_argument("--out", required=True, help="folder for the site (index.html inside)")
    p.add_argument("--preset", default="ci", choices=sorted(config.PRESETS), help="how many tokens to summarise")
    p.set_defaults(func=cmd_view)

    from . import bench

    p = sub.add_parser("bench", help="training throughput beside sparsify, SAELens, a naive dense step and the GEMM roofline")
    bench.add_arguments(p)
    p.set_defaults(func=bench.run_from_args)

    p = sub.add_parser("export", help="write an SAE in SAELens, sparsify or OpenAI layout (saelib.load reads them back)")
    p.add_argument("run", help="a run folder (RUN/sae inside) or an SAE folder")
    p.add_argument("--format", required=True, choices=["saelens", "sparsify", "openai"])
    p.add_argument("--out", required=True, help="folder to write")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv
    except UsageError as e:
        print(f"saelib: error: {e}; see `saelib --help`.", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (ValueError, OSError, FloatingPointError) as e:  # OSError: a locked run folder, a failed write
        print(f"saelib {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"saelib {args.command}: interrupted; run the same command again to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
