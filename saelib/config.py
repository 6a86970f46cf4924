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
from pathlib import Path

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
    from .train import TrainConfig

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
