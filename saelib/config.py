"""Run configuration: a flat dict of named values, presets that override a few, and files.

The data keys say where activations come from; every other key goes to the trainer
(:func:`saelib.train.fit`). Precedence: defaults < preset < config file < explicit flags.
Presets change scale, never code paths:

- ``ci``: seconds on 2 CPU cores (what the tests run),
- ``demo``: the issue-4 reference run, about 0.93M training tokens x 2 epochs, n 4608, k 32,
- ``full``: a GPU-sized run on the same data.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .sae import ENCODER_DTYPES

DATA_DEFAULTS = {
    "model": "smollm2-135m",
    "corpus": "wikipedia",
    "layer": 12,
    "site": "resid_post",
    "ctx_len": 64,
    "max_tokens": None,  # tokens of the train split to extract (None: all of it)
    "val_fraction": 0.1,
}
# Training budget in passes over the extracted tokens, used when "tokens" is not given.
# latent_parallel: latent shards of a distributed run (see saelib.distributed); 1 = none.
RUN_DEFAULTS = {**DATA_DEFAULTS, "epochs": 1.0, "latent_parallel": 1}

PRESETS = {
    "ci": {"max_tokens": 16_384, "n_latents": 1152, "k": 16, "batch_size": 1024, "epochs": 2.0, "warmup_steps": 5},
    # lr_multiplier: 4x the paper's rule 2e-4 / sqrt(n / 2^14), which under-trains a 454-step run
    # (validation NMSE 0.280 at 1x, 0.228 at 2x, 0.193 at 4x; see the README).
    "demo": {"n_latents": 4608, "k": 32, "batch_size": 4096, "epochs": 2.0, "warmup_steps": 50, "decay": "linear",
             "lr_multiplier": 4},
    "full": {"n_latents": 32768, "k": 32, "batch_size": 16384, "epochs": 8.0, "warmup_steps": 200, "decay": "linear",
             "ema": 0.999},
}


def read_config_file(path: str | Path) -> dict:
    """A flat mapping from a ``.json`` or ``.yaml``/``.yml`` file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Config file {path} does not exist.")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        cfg = yaml.safe_load(text)
    elif path.suffix == ".json":
        cfg = json.loads(text)
    else:
        raise ValueError(f"Config file {path} must end in .json, .yaml or .yml.")
    if not isinstance(cfg, dict):
        raise ValueError(f"Config file {path} must hold a flat mapping of names to values.")
    return cfg


def resolve(preset: str | None = None, config_file: str | Path | None = None, **overrides) -> dict:
    """The run configuration: defaults, then the preset, then the file, then ``overrides`` (None = unset)."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    cfg = dict(RUN_DEFAULTS)
    cfg.update(PRESETS.get(preset, {}))
    if config_file is not None:
        cfg.update(read_config_file(config_file))
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return cfg


def split(cfg: dict) -> tuple[dict, dict]:
    """``(data options, trainer options)`` of a run configuration (``epochs`` and
    ``latent_parallel`` go to neither)."""
    data = {k: cfg[k] for k in DATA_DEFAULTS}
    train = {k: v for k, v in cfg.items() if k not in RUN_DEFAULTS}
    return data, train


def check(cfg: dict) -> None:
    """Refuse an invalid run configuration with one sentence, before any heavy work starts."""
    import math
    from dataclasses import fields

    from .models import SITES
    from .sae import ARCHS

    if cfg["site"] not in SITES:
        raise ValueError(f"Unknown site {cfg['site']!r}; choose one of {', '.join(SITES)}.")
    for key in ("layer", "ctx_len"):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "layer" else 2):
            raise ValueError(f"{key} must be an integer {'>= 0' if key == 'layer' else '>= 2'}, got {value!r}.")
    if cfg["max_tokens"] is not None and (not isinstance(cfg["max_tokens"], int) or cfg["max_tokens"] < cfg["ctx_len"]):
        raise ValueError(f"max_tokens must be at least one context ({cfg['ctx_len']} tokens), got {cfg['max_tokens']!r}.")
    if not isinstance(cfg["epochs"], (int, float)) or not (0 < cfg["epochs"] and math.isfinite(cfg["epochs"])):
        raise ValueError(f"epochs must be a positive finite number, got {cfg['epochs']!r}.")
    _, train = split(cfg)
    unknown = sorted(set(train) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise ValueError(f"Unknown training option(s) {', '.join(unknown)}; valid ones are the fields of saelib.train.TrainConfig.")
    tc = TrainConfig(**train).resolved(d_in=1, n_tokens=None)
    if tc.arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {tc.arch!r}.")
    if tc.k is not None and tc.k > tc.n_latents:
        raise ValueError(f"k={tc.k} is larger than n_latents={tc.n_latents}; choose k <= n_latents.")


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
