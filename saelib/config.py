"""Run configuration: one dataclass, :class:`TrainConfig`, and the presets every part of saelib reads.

Each field of ``TrainConfig`` carries its default, its help text and its group
(``field.metadata``); ``saelib train`` flags and config-file keys are generated from them, and
``TrainConfig.__post_init__`` checks every value, so a bad one is refused in one sentence before
any heavy work starts. The groups:

- ``data``: where activations come from (model, corpus, layer, site, ctx_len, max_tokens, val_fraction);
- ``train``: the trainer's options, what :func:`saelib.fit` accepts and a run folder's ``config.json`` records;
- ``run``: how ``saelib train`` drives the trainer (epochs, latent_parallel).

A config file (``--config``: JSON or YAML, UTF-8) is a flat mapping of field names to values; a
``null`` stands for the field's default meaning even over a preset (``max_tokens: null``: all of
the split), ``1e-3`` is a number in YAML too, and a key written twice is an error.

Precedence (:func:`resolve`): defaults < preset < config file < explicit flags. Presets change
scale, never code paths; each holds a section per consumer: ``train`` (fields of ``TrainConfig``),
``eval`` (:func:`saelib.evals.evaluate`), ``view`` (:func:`saelib.viz.summarize`) and ``bench``
(the :data:`BENCH_GRIDS` grid that notebook 08 times):

- ``ci``: seconds on 2 CPU cores (what the tests run),
- ``lesson``: minutes, each notebook's default (sized for class time),
- ``demo``: the quickstart's reference run, about 0.93M training tokens x 2 epochs, n 4608, k 32,
- ``full``: a GPU-sized run on the same data.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
import sys
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
import yaml

from .models import LM_DTYPES, SITES
from .sae import ARCHS, ENCODER_DTYPES

B_PRE_INITS = ("geometric_median", "mean", "zero")
DECAYS = ("linear", "none")
GROUPS = ("data", "train", "run")

# the largest integer a field takes: counts of tokens and steps are int64 tensors or Python ints,
# sizes and indices become tensor dimensions and kernel indices, which are int32
INT64_MAX = 2**63 - 1
DIM_MAX = 2**31 - 1

# fields that change what is logged or saved, or how a step is computed, not the recipe: a run
# may resume with others (and resume folders written before a field existed)
BOOKKEEPING = {"log_every", "checkpoint_every_tokens", "encoder_dtype", "device"}


def extends(old: dict, new: dict) -> bool:
    """Whether a run with config record ``new`` may train on from one with ``old``: both at a constant
    learning rate (``decay="none"``, a schedule that does not depend on the budget) and ``new``'s
    budget of ``tokens`` at least ``old``'s."""
    return old.get("decay") == new.get("decay") == "none" and (old.get("tokens") or 0) <= (new.get("tokens") or 0)


def option(default, help: str, group: str = "train", **check):
    """A field with its help text, its group and what ``__post_init__`` checks beyond its type:
    ``bound="positive"`` or ``"non-negative"`` for numbers, ``most=`` the largest integer (default
    ``INT64_MAX``), ``choices=(...)`` for strings (other strings must not be blank)."""
    return field(default=default, metadata={"help": help, "group": group, **check})


@dataclass
class TrainConfig:
    """Every knob of a run; ``None`` means "derive from the paper's rule" (see ``resolved``)."""

    model: str = option("smollm2-135m", "embedded name (smollm2-135m), Hugging Face name or local folder", group="data")
    corpus: str = option("wikipedia", "wikipedia (embedded), mix (every offline text, ~4.3M tokens), a datasets "
                         "name, or a local .txt/.jsonl file", group="data")
    layer: int = option(12, "decoder layer to hook (0-based)", group="data", bound="non-negative", most=DIM_MAX)
    site: str = option("resid_post", "where in the layer activations are read", group="data", choices=tuple(SITES))
    ctx_len: int = option(64, "tokens per context (the paper: 64); at least 2", group="data", bound="positive",
                          most=DIM_MAX)
    max_tokens: int | None = option(None, "tokens of the train split to extract (default, or null in a config "
                                    "file: all of it)", group="data", bound="positive")
    val_fraction: float = option(0.1, "share of the corpus's documents held out as the validation split", group="data")
    lm_dtype: str | None = option(None, "dtype of the LM's forward that extracts the activations (default: bfloat16 "
                                  "where the device multiplies it fast: kernels.fast_bf16(), CPUs with AMX or AVX512_BF16 and CUDA "
                                  "GPUs of compute capability 8 or later; else float32)", group="data",
                                  choices=LM_DTYPES)

    n_latents: int = option(2**14, "number of latents n", bound="positive", most=DIM_MAX)
    k: int | None = option(32, "active latents per token (None only for arch relu, whose L0 is set by l1_coef)",
                           bound="positive", most=DIM_MAX)
    arch: str = option("topk", "the SAE: TopK (the paper), Multi-TopK, BatchTopK or the ReLU + L1 baseline",
                       choices=ARCHS)
    batch_size: int = option(4096, "tokens per step (the paper: 131,072; CPU runs use less)", bound="positive",
                             most=DIM_MAX)
    tokens: int | None = option(None, "training budget in tokens (default: epochs x the extracted tokens, or one "
                                "pass over the data for saelib.fit)", bound="positive")
    lr: float | None = option(None, "learning rate (default: lr_multiplier x 2e-4 / sqrt(n / 2^14))",
                              bound="positive")
    # runs too short for the paper's rule want more: the default multiple depends on the run's
    # length, n, k and batch size (lr_multiple, fitted to the sweeps of 09_learning_rate)
    lr_multiplier: float | None = option(None, "multiple of the paper's learning-rate rule (default: the best "
                                         "multiple for the run's steps, n, k and batch size, "
                                         "config.lr_multiple); ignored "
                                         "when lr is given", bound="positive")
    warmup_steps: int | None = option(None, "linear warmup steps (default: 5% of the steps, at most 1000)",
                                      bound="non-negative")
    decay: str = option("linear", "linear: decay to 0 at the end of the run (if its length is known); none: constant",
                        choices=DECAYS)
    grad_clip: float | None = option(1.0, "clip the gradient norm to this (0: no clipping)", bound="non-negative")
    adam_eps: float = option(6.25e-10, "Adam's epsilon", bound="non-negative")
    adam_betas: tuple[float, float] = option((0.9, 0.999), "Adam's two betas, each in [0, 1)")
    auxk: bool = option(True, "the AuxK loss: dead latents reconstruct the residual")
    k_aux: int | None = option(None, "dead latents in the AuxK loss (default: min(512, d_in / 2))", bound="positive",
                               most=DIM_MAX)
    auxk_coef: float = option(1 / 32, "weight of the AuxK loss", bound="non-negative")
    # The paper counts a latent dead after 10M tokens without firing; short runs scale that to a
    # tenth of the run, but never less than ten expected firings of an average latent.
    dead_tokens: int | None = option(None, "tokens without firing after which a latent is dead (default: min(10M, "
                                     "max(batch_size, tokens / 10, 10 n / k)))", bound="positive")
    ema: float | None = option(None, "decay of a parameter EMA, e.g. 0.999: the final SAE holds the "
                               "bias-corrected averages (default: no EMA)")
    l1_coef: float = option(0.05, "L1 penalty of arch relu", bound="non-negative")
    seed: int = option(0, "random seed of the init and the batch order", bound="non-negative")
    log_every: int = option(10, "steps between metrics.jsonl rows", bound="positive")
    checkpoint_every_tokens: int | None = option(None, "tokens between checkpoints (default: ten per run)",
                                                 bound="positive")
    geometric_median_samples: int = option(32768, "activations the b_pre init is computed from", bound="positive",
                                           most=DIM_MAX)
    tied_init: bool = option(True, "W_enc = W_dec at init (the paper); off: an independent random encoder")
    # recipe ablations: sparsify's nn.Linear init has encoder row norms of about 1/sqrt(3)
    b_pre_init: str = option("geometric_median", "b_pre at init: the sample's geometric median (the paper), "
                             "its mean or zero", choices=B_PRE_INITS)
    encoder_init_scale: float = option(1.0, "scale of the encoder rows at init (1: the paper's tied init)",
                                       bound="positive")
    # not saved with the SAE; its NMSE and delta CE against float32's in docs/performance.md
    encoder_dtype: str = option("float32", "dtype of the encoder GEMM; bfloat16 is fast where kernels.fast_bf16() "
                                "(CPUs with AMX or AVX512_BF16, CUDA GPUs of compute capability 8 or later)", choices=ENCODER_DTYPES)
    # Not part of the run's identity: a run started on one device resumes on another. (Under
    # torch.distributed only its type counts: cuda puts each rank on its own GPU, cpu every rank on the CPU.)
    device: str | None = option(None, "where the SAE trains: cpu, cuda or cuda:N (default: cuda if available, "
                                "else cpu)")

    epochs: float = option(1.0, "training budget in passes over the extracted tokens, used when tokens is not "
                           "given", group="run", bound="positive")
    latent_parallel: int = option(1, "with --nproc: shards of the latents (the rest of the ranks split the data)",
                                  group="run", bound="positive", most=DIM_MAX)

    def __post_init__(self):
        if isinstance(self.adam_betas, list):  # as JSON, YAML and argparse give it
            self.adam_betas = tuple(self.adam_betas)
        _validate(self)

    def group(self, name: str) -> dict:
        """The values of one field group (``"data"``, ``"train"`` or ``"run"``) as a dict."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["group"] == name}

    def check_one_batch(self) -> None:
        """Refuse, in one sentence, a budget of less than one batch: ``tokens`` or, without it,
        ``max_tokens`` times ``epochs`` (the most an extraction can give), against ``batch_size``. What
        runs it before extracting does so; ``fit`` checks once an iterable's batches set the size."""
        if self.tokens is not None and self.tokens < self.batch_size:
            raise ConfigError(("tokens", "batch_size"), f"tokens={self.tokens} is less than one batch of batch_size="
                              f"{self.batch_size}; raise tokens or lower batch_size.")
        if self.tokens is None and self.max_tokens is not None and self.max_tokens * self.epochs < self.batch_size:
            raise ConfigError(("max_tokens", "epochs", "batch_size"), f"max_tokens={self.max_tokens} times epochs="
                              f"{self.epochs} is less than one batch of batch_size={self.batch_size}; raise max_tokens "
                              "or lower batch_size.")

    def resolved(self, d_in: int, n_tokens: int | None) -> TrainConfig:
        """A copy with every ``None`` replaced by the value it stands for."""
        self.check_one_batch()
        B = self.batch_size
        if n_tokens is not None and n_tokens < B:
            raise ValueError(f"The data has {n_tokens} tokens, fewer than one batch of batch_size={B}; give more data "
                             "or lower batch_size.")
        tokens = self.tokens if self.tokens is not None else (n_tokens // B * B if n_tokens else None)
        steps = tokens // B if tokens else None
        typical_gap = 10 * self.n_latents // self.k if self.k else 0
        return replace(
            self,
            tokens=tokens,
            lr=self.lr or (self.lr_multiplier or lr_multiple(steps, self.n_latents, self.k, B)) * paper_lr(self.n_latents),
            lr_multiplier=1.0,  # folded into lr
            warmup_steps=self.warmup_steps if self.warmup_steps is not None else min(1000, (steps or 20_000) // 20),
            k_aux=self.k_aux or max(1, min(512, d_in // 2)),
            dead_tokens=self.dead_tokens or min(10_000_000, max(B, (tokens or 100_000_000) // 10, typical_gap)),
            checkpoint_every_tokens=self.checkpoint_every_tokens or max(B, (tokens or 10_000_000) // 10),
            device=str(resolve_device(self.device)),
        )


FIELDS = {f.name: f for f in fields(TrainConfig)}
TRAINER_FIELDS = tuple(name for name, f in FIELDS.items() if f.metadata["group"] == "train")
_HINTS = typing.get_type_hints(TrainConfig)


def field_type(name: str) -> tuple[type, bool]:
    """``(type, optional)`` of a field from its annotation: ``int | None`` gives ``(int, True)``,
    ``tuple[float, float]`` gives ``(tuple, False)``."""
    hint = _HINTS[name]
    args = typing.get_args(hint)
    if type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return typing.get_origin(hint) or hint, False


class ConfigError(ValueError):
    """A value :class:`TrainConfig` refuses, in one sentence; ``keys`` names the field at fault first,
    then any other field the check compared it with."""

    def __init__(self, keys: str | tuple[str, ...], message: str):
        super().__init__(message)
        self.keys = (keys,) if isinstance(keys, str) else keys


class _Short(reprlib.Repr):
    """``repr`` cut to about 60 characters: a config file may hold anything, an error shows one line of it."""

    def __init__(self):
        super().__init__()
        self.maxstring = self.maxlong = self.maxother = 60

    def repr_int(self, x, level):
        # repr raises past 4300 digits, and past 60 only the size tells the reader anything
        return super().repr_int(x, level) if abs(x) < 10**60 else f"an integer of {x.bit_length()} bits"


_show = _Short().repr


def _is_number(value) -> bool:
    """An int or a float (not a bool) that is finite as a float; an int beyond float's range is not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _validate(cfg: TrainConfig) -> None:
    """Refuse the first bad value of ``cfg`` in one sentence naming it (the only place values are checked)."""
    for name, f in FIELDS.items():
        value, (kind, optional) = getattr(cfg, name), field_type(name)
        if value is None and optional:
            continue
        if kind is bool and not isinstance(value, bool):
            raise ConfigError(name, f"{name} must be true or false, got {_show(value)}.")
        elif kind is str and not isinstance(value, str):
            raise ConfigError(name, f"{name} must be a string, got {_show(value)}.")
        elif name == "device":
            resolve_device(value)
        elif "choices" in f.metadata and value not in f.metadata["choices"]:
            raise ConfigError(name, f"{name} must be one of {', '.join(f.metadata['choices'])}, got {_show(value)}.")
        elif kind is str and not value.strip():
            raise ConfigError(name, f"{name} must not be blank, got {value!r}; give a name ({f.metadata['help']}).")
        elif kind in (int, float):
            bound, most = f.metadata.get("bound"), f.metadata.get("most", INT64_MAX)
            ok = _is_number(value) and (kind is float or isinstance(value, int))
            if not ok or (bound == "positive" and value <= 0) or (bound == "non-negative" and value < 0):
                what = f"{bound + ' ' if bound else ''}{'integer' if kind is int else 'finite number'}"
                raise ConfigError(name, f"{name} must be a {what}, got {_show(value)}.")
            if kind is int and value > most:
                largest = "tensor dimension, 2**31 - 1" if most == DIM_MAX else "64-bit integer"
                raise ConfigError(name, f"{name} must be at most {most} (the largest {largest}), got {_show(value)}.")
    betas = cfg.adam_betas
    if not (isinstance(betas, tuple) and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas)):
        raise ConfigError("adam_betas", f"adam_betas must be two numbers in [0, 1) such as (0.9, 0.999), got {_show(betas)}.")
    if cfg.ema is not None and not 0 < cfg.ema < 1:
        raise ConfigError("ema", f"ema must be None or a decay in (0, 1) such as 0.999, got {cfg.ema!r}.")
    if not 0 < cfg.val_fraction < 1:
        raise ConfigError("val_fraction", f"val_fraction must be a share in (0, 1) such as 0.1, got {cfg.val_fraction!r}.")
    if cfg.ctx_len < 2:
        raise ConfigError("ctx_len", f"ctx_len must be an integer >= 2, got {cfg.ctx_len!r}.")
    if cfg.max_tokens is not None and cfg.max_tokens < cfg.ctx_len:
        raise ConfigError(("max_tokens", "ctx_len"), f"max_tokens must be at least one context ({cfg.ctx_len} tokens), "
                          f"got {cfg.max_tokens!r}.")
    if cfg.k is None and cfg.arch != "relu":
        raise ConfigError(("k", "arch"), f"k must be a positive integer for arch={cfg.arch!r}, got None; only arch='relu' runs "
                          "without k.")
    if cfg.k is not None and cfg.k > cfg.n_latents:
        raise ConfigError(("k", "n_latents"), f"k={cfg.k} is larger than n_latents={cfg.n_latents}; choose k <= n_latents.")
    if cfg.arch == "multitopk" and 4 * cfg.k > cfg.n_latents:
        raise ConfigError(("k", "n_latents", "arch"), f"multitopk trains with 4k={4 * cfg.k} latents but "
                          f"n_latents={cfg.n_latents}; choose k <= n_latents / 4.")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device`` (None: CUDA if available, else the CPU), refused in one sentence
    if it is not a device name or names a GPU this machine does not have."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError("device", f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', "
                          f"got {_show(device)}.") from None
    if resolved.type == "cuda" and not (torch.cuda.is_available() and (resolved.index or 0) < torch.cuda.device_count()):
        found = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA device"
        raise ConfigError("device", f"device {device!r} was asked for but this machine has {found}; use device='cpu'.")
    if resolved.type not in ("cpu", "cuda"):
        raise ConfigError("device", f"device {device!r} is not supported; use 'cpu' or 'cuda'.")
    return resolved


def paper_lr(n_latents: int) -> float:
    """The paper's learning-rate rule ``2e-4 / sqrt(n_latents / 2**14)`` (tuned on long runs)."""
    return 2e-4 / math.sqrt(n_latents / 2**14)


# The best multiple of paper_lr for a run of `steps` steps of `batch_size` tokens, n latents and k active
# ones, exp(a) * steps^b * (n / 2^14)^c * (k / 32)^d * (batch_size / 1024)^e, fitted to sweeps of TopK SAEs
# on SmolLM2's residual stream (notebook 09_learning_rate, figures/09_*): a, b, c
# (saelib.scaling.fit_lr_rule) on n 1024 to 16384, 100 to 1600 steps of 1024 tokens, multiples 1 to 128,
# at k 32; d and e (saelib.scaling.fit_lr_term) on some of those run sizes again at k 8 to 128 and at
# batches of 256 and 4096.
LR_RULE = {"a": 4.968, "b": -0.297, "c": 0.288, "d": 0.137, "e": 0.205}
LR_RULE_STEPS = (100, 1600)  # the run lengths it was fitted on
LR_RULE_K = (8, 128)  # the k it was fitted on
LR_RULE_BATCH = (256, 4096)  # the batch sizes it was fitted on


def lr_multiple(steps: int | None, n_latents: int, k: int | None = None, batch_size: int | None = None) -> float:
    """The default multiple of :func:`paper_lr` for a run of ``steps`` steps of ``batch_size`` tokens,
    ``n_latents`` latents and ``k`` active ones (``LR_RULE``), never below 1 (the paper's rule is tuned
    on runs far longer than these). ``k`` None (a ReLU SAE) counts as the sweeps' 32 and ``batch_size``
    None as their 1024; runs shorter than the sweeps' shortest get its multiple, a ``k`` or batch size
    outside the swept range the nearest end's, and a run of unknown length 1."""
    if not steps:
        return 1.0
    from .scaling import LR_BATCH, LR_K, lr_law

    steps = max(steps, LR_RULE_STEPS[0])  # not extrapolated to shorter runs than the sweeps had
    k = min(max(k or LR_K, LR_RULE_K[0]), LR_RULE_K[1])
    batch_size = min(max(batch_size or LR_BATCH, LR_RULE_BATCH[0]), LR_RULE_BATCH[1])
    return max(1.0, float(lr_law(LR_RULE.values(), steps, n_latents, k, batch_size)))


# ---- presets --------------------------------------------------------------------------------

PRESETS = {
    "ci": {
        "train": dict(max_tokens=16_384, n_latents=1152, k=16, batch_size=1024, epochs=2.0, warmup_steps=5),
        # eval_tokens: held-out tokens for reconstruction, N2G and ablation (the first half of the
        # contexts explains N2G latents, the second scores them); downstream_contexts: contexts for
        # the spliced CE; probe_per_source: contexts per text source for the probe tasks.
        "eval": dict(eval_tokens=2048, downstream_contexts=4, probe_per_source=16, n2g_latents=16, ablation_latents=4),
        # eval_tokens: held-out tokens to summarise; n2g_latents: how many latents get an N2G
        # explanation (None: all that fire); ablation_latents: how many get measured ablation effects.
        "view": dict(eval_tokens=4096, n_top=8, n_quantiles=3, per_quantile=3, hist_bins=24, n_logits=10,
                     n_neighbours=8, search_latents=10, n2g_latents=None, ablation_latents=4, window=(20, 6), seed=0),
        "bench": "quick",
    },
    # Sized for class time: each notebook's default, its finding within about 5 minutes on 2 cores
    "lesson": {
        # 131,072 tokens: the train cache notebooks 01, 02 and 04 share; batches of 1024 give 256 steps
        "train": dict(max_tokens=131_072, n_latents=2304, k=32, batch_size=1024, epochs=2.0, warmup_steps=20,
                      decay="linear"),
        "eval": dict(eval_tokens=16_384, downstream_contexts=16, probe_per_source=32, n2g_latents=32,
                     ablation_latents=8),
        "view": dict(eval_tokens=16_384, n_top=12, n_quantiles=4, per_quantile=3, hist_bins=32, n_logits=10,
                     n_neighbours=8, search_latents=12, n2g_latents=None, ablation_latents=8, window=(24, 8), seed=0),
        "bench": "default",
    },
    "demo": {
        "train": dict(n_latents=4608, k=32, batch_size=4096, epochs=2.0, warmup_steps=50, decay="linear"),
        "eval": dict(eval_tokens=65_536, downstream_contexts=64, probe_per_source=128, n2g_latents=64,
                     ablation_latents=32),
        "view": dict(eval_tokens=65_536, n_top=16, n_quantiles=4, per_quantile=4, hist_bins=32, n_logits=12,
                     n_neighbours=10, search_latents=16, n2g_latents=None, ablation_latents=32, window=(24, 8), seed=0),
        "bench": "default",
    },
    "full": {
        "train": dict(n_latents=32768, k=32, batch_size=16384, epochs=8.0, warmup_steps=200, decay="linear",
                      ema=0.999),
        "eval": dict(eval_tokens=1_048_576, downstream_contexts=1024, probe_per_source=1024, n2g_latents=512,
                     ablation_latents=256),
        "view": dict(eval_tokens=1_048_576, n_top=24, n_quantiles=5, per_quantile=5, hist_bins=40, n_logits=16,
                     n_neighbours=12, search_latents=20, n2g_latents=4096, ablation_latents=256, window=(24, 8),
                     seed=0),
        "bench": "full",
    },
}

# ``saelib bench`` grids, another axis than the presets: every combination of these values is timed
BENCH_GRIDS = {
    # tiny sizes, seconds: for tests and a smoke check of the installed peers
    "quick": dict(d_in=(64,), n_latents=(512,), k=(8,), batch_size=(256,), dead_fraction=(0.25,)),
    # the headline configurations, a few minutes on 2 cores
    "default": dict(d_in=(576,), n_latents=(4608, 18432), k=(32,), batch_size=(4096,), dead_fraction=(0.25, 0.0)),
    # everything: both widths, three dictionary sizes, a larger batch (tens of minutes on 2 cores)
    "full": dict(d_in=(576, 768), n_latents=(4608, 18432, 65536), k=(32,), batch_size=(4096, 16384),
                 dead_fraction=(0.25, 0.0)),
}


def section(name: str) -> dict[str, dict]:
    """One consumer's part of every preset: ``section("eval")["ci"] is PRESETS["ci"]["eval"]``."""
    return {preset: parts[name] for preset, parts in PRESETS.items()}


# ---- resolving a run's configuration --------------------------------------------------------


class _YamlLoader(yaml.SafeLoader):
    """YAML as people write settings: ``1e-3`` is a number (YAML 1.2; PyYAML's YAML 1.1 reads it as
    text), and a key written twice is an error, not the last value silently winning."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"the key {key_node.value!r} is written twice",
                                                            key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                  list("-+0123456789"))


def _unique_keys(pairs: list[tuple]) -> dict:
    """A JSON object as a dict, refusing a key written twice (``json`` keeps the last one silently)."""
    keys = set()
    for key, _ in pairs:
        if key in keys:
            raise ValueError(f"the key {key!r} is written twice")
        keys.add(key)
    return dict(pairs)


def _syntax_error(error: Exception) -> str:
    """A parser's complaint in one line, with the line and column where it gives them."""
    if isinstance(error, json.JSONDecodeError):
        return f"{error.msg} at line {error.lineno}, column {error.colno}"
    mark = getattr(error, "problem_mark", None)
    if mark is not None:
        return f"{error.problem or error.context} at line {mark.line + 1}, column {mark.column + 1}"
    if "sys.set_int_max_str_digits" in str(error):  # Python's own advice would not help the user
        return f"an integer longer than {sys.get_int_max_str_digits()} digits"
    return " ".join(str(error).split()) or type(error).__name__


def read_config_file(path: str | Path) -> dict:
    """The settings of a ``.json`` or ``.yaml``/``.yml`` file (UTF-8): a flat mapping of field names to
    values, which :class:`TrainConfig` checks; anything else is a ValueError in one sentence naming the file."""
    path = Path(path)
    kind = {".json": "JSON", ".yaml": "YAML", ".yml": "YAML"}.get(path.suffix)
    if kind is None:
        raise ValueError(f"Config file {path} must end in .json, .yaml or .yml.")
    if path.exists() and not path.is_file():  # a folder, or a pipe that would block the read
        raise ValueError(f"Config file {path} is not a regular file; give a JSON or YAML file.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"Config file {path} is not UTF-8 text (byte {error.start} is {error.object[error.start]:#04x}); "
                         "save it as UTF-8.") from None
    except OSError as error:
        raise ValueError(f"Config file {path} cannot be read ({error.strerror or error}); give a JSON or YAML file.") from None
    if not text.strip():
        raise ValueError(f"Config file {path} is empty; write settings in it such as `n_latents: 4096`, or leave out --config.")
    try:
        cfg = json.loads(text, object_pairs_hook=_unique_keys) if kind == "JSON" else yaml.load(text, _YamlLoader)
    except RecursionError:
        raise ValueError(f"Config file {path} is nested too deeply to be settings; write a flat mapping.") from None
    except (ValueError, yaml.YAMLError) as error:  # ValueError: JSON syntax, a repeated key, an int over 4300 digits
        raise ValueError(f"Config file {path} is not valid {kind} ({_syntax_error(error)}); fix it and run again.") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"Config file {path} must hold a mapping of setting names to values such as `n_latents: 4096`, "
                         f"got {'nothing' if cfg is None else 'a ' + type(cfg).__name__}.")
    for key in cfg:
        if not isinstance(key, str):
            raise ValueError(f"Config file {path} has the key {_show(key)}, which is not a name; keys are the fields of "
                             "saelib.TrainConfig, listed by `saelib train --help` with dashes for underscores.")
    unknown = sorted(set(cfg) - set(FIELDS))
    if unknown:
        shown = ", ".join(map(_show, unknown[:5])) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise ValueError(f"Config file {path} has unknown key(s) {shown}; valid keys are the fields of "
                         "saelib.TrainConfig, listed by `saelib train --help` with dashes for underscores.")
    return cfg


def resolve(preset: str | None = None, config_file: str | Path | None = None, **overrides) -> TrainConfig:
    """The run configuration: defaults, then the preset, then the file, then ``overrides``.

    A ``null`` in the file stands for the field's default meaning, over the preset's value
    (``max_tokens: null``: all of the train split); a None override leaves the value as it was.
    A bad value is a :class:`ConfigError` naming it, and the file where it came from there."""
    if preset is not None and (not isinstance(preset, str) or preset not in PRESETS):
        raise ValueError(f"Unknown preset {_show(preset)}; choose one of {', '.join(PRESETS)}.")
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        raise ValueError(f"Unknown setting(s) {', '.join(unknown)}; valid ones are the fields of saelib.TrainConfig.")
    from_file = read_config_file(config_file) if config_file is not None else {}
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return TrainConfig(**{**(PRESETS[preset]["train"] if preset is not None else {}), **from_file, **given})
    except ConfigError as error:
        if any(key in from_file and key not in given for key in error.keys):
            raise ConfigError(error.keys, f"Config file {config_file}: {error}") from None
        raise


def split(cfg: TrainConfig) -> tuple[dict, dict]:
    """``(data options, trainer options)`` of a run configuration (the ``run`` group goes to neither)."""
    return cfg.group("data"), cfg.group("train")

