"""The one checkpoint format, and SAE folders split by latent rows.

A run of ``L`` latent shards keeps each shard's files in ``shard_<l>_of_<L>/``; a run of one
shard (every one-process run) keeps them in the folder itself: the one-process layout is the
one-shard case. Either is read back by any grid whose ``L`` divides ``n_latents``::

    RUN/checkpoints/step_<step>/[shard_<l>_of_<L>/]state.safetensors + state.json
    RUN/sae/[shard_<l>_of_<L>/]config.json + sae.safetensors

``state.safetensors`` holds the model (``model.*``), Adam's moments (``optim.<i>.*``), the EMA
(``ema.*``) and the dead-latent counters (``since_fired``); ``state.json`` the step, the data
position, Adam's settings, the run's config, the shard and the SHA-256 of the tensors. Training
draws only from its own seeded generators, so no global RNG state is kept, and resuming leaves
the caller's alone. A checkpoint folder is built under a
temporary name and renamed into place (by rank 0 once every shard has written), so a run
killed at any moment leaves its previous checkpoint whole.

Nothing read back is trusted: ``state.json`` is checked against its schema (:class:`CheckpointMeta`)
and against the run, and its content (less the SHA-256) is also stored in the header of
``state.safetensors``, whose bytes the SHA-256 covers, so an edited value is an error naming its key.
Checkpoints written before that copy existed have no metadata there and are checked by the schema only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .config import BOOKKEEPING, extends
from .files import check_sha256, read_json, remove, replace, sha256_file, shorten, temp_path
from .grid import LATENT_PARAMS, Grid
from .sae import CONFIG_FILE, WEIGHTS_FILE, TopKSAE, load_folder

TENSORS, META = "state.safetensors", "state.json"


@dataclass
class TrainState:
    """Everything besides the model and optimiser that a resumed run needs."""

    since_fired: Tensor  # (n_latents of this shard,) int64 tokens since each latent last fired
    ema: dict[str, Tensor] | None
    step: int = 0
    epoch: int = 0
    batch: int = 0  # next batch index within the epoch
    tokens: int = 0


class ShardInfo(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    index: NonNegativeInt
    count: PositiveInt
    n_latents: PositiveInt


class ParamGroup(BaseModel):
    """One of Adam's parameter groups; torch adds keys of its own, which vary by version."""

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)

    params: list[NonNegativeInt]
    lr: Annotated[float, Field(ge=0)]
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]]
    eps: Annotated[float, Field(ge=0)]


class CheckpointMeta(BaseModel):
    """``state.json``: where a checkpoint is in the run and what it was written with."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    step: NonNegativeInt
    epoch: NonNegativeInt
    batch: NonNegativeInt  # next batch index within the epoch
    tokens: NonNegativeInt
    normalizer_scale: Annotated[float, Field(gt=0)]
    has_ema: bool
    param_groups: Annotated[list[ParamGroup], Field(min_length=1)]
    # random.getstate() of the writing process, in checkpoints that recorded it; not restored: training
    # draws from its own seeded generators, and a resumed fit leaves the caller's global RNGs alone
    python_rng: tuple[Literal[3], Annotated[list[Annotated[int, Field(ge=0, lt=2**32)]], Field(min_length=625, max_length=625)],
                      float | None] | None = None
    config: dict[str, Any]  # the run's config.json record, checked against the run
    shard: ShardInfo
    sha256: Annotated[str, Field(pattern="^[0-9a-f]{64}$")]


# ---- shard files ----------------------------------------------------------------------------


def shard_name(index: int, count: int) -> str:
    return f"shard_{index:03d}_of_{count:03d}"


def _shard_files(folder: Path, filename: str, n_latents: int) -> list[tuple[Path, int, int]]:
    """``(file, first row, end row)`` per latent shard: ``folder/filename`` or ``shard_*`` folders."""
    if (folder / filename).is_file():
        return [(folder / filename, 0, n_latents)]
    subfolders = sorted(folder.glob("shard_*_of_*"))
    count = len(subfolders)
    if not count or any(p.name != shard_name(i, count) or not (p / filename).is_file() for i, p in enumerate(subfolders)):
        raise FileNotFoundError(f"{folder} holds neither {filename} nor a complete set of shard_<i>_of_<count>/{filename}; "
                                f"pass a folder written by saelib (found {[p.name for p in subfolders]}).")
    size = n_latents // count
    return [(p / filename, i * size, (i + 1) * size) for i, p in enumerate(subfolders)]


def _is_latent_axis(key: str) -> bool:
    """Whether a saved tensor is split by latent rows (model/EMA rows, their Adam moments, counters)."""
    parts = key.split(".")
    if key == "since_fired" or parts[-1] in LATENT_PARAMS:
        return True
    # optim.<i>.<moment>: parameter i in TopKSAE's order (W_enc, b_enc, W_dec, b_pre)
    return parts[0] == "optim" and int(parts[1]) < len(LATENT_PARAMS) and parts[2] != "step"


def _read_rows(files: list[tuple[Path, int, int]], start: int, stop: int, fix: str) -> dict[str, Tensor]:
    """Every tensor of the shard files, latent-axis ones cut to rows ``[start, stop)``; an unreadable
    file is a ValueError naming it and what to do (``fix``)."""
    handles = []
    for path, a, b in files:
        if a < stop and start < b:
            try:
                handles.append((safe_open(str(path), "pt"), a, b))
            except (SafetensorError, OSError) as error:
                raise ValueError(f"{path} cannot be read as safetensors ({error}); the file is truncated or corrupt, "
                                 f"{fix}.") from None
    tensors = {}
    for key in handles[0][0].keys():
        if _is_latent_axis(key):
            tensors[key] = torch.cat([h.get_slice(key)[max(start, a) - a : min(stop, b) - a] for h, a, b in handles])
        else:
            tensors[key] = handles[0][0].get_tensor(key)
    return tensors


def is_sharded(folder: Path) -> bool:
    """Whether ``folder`` is an SAE folder split into ``shard_*_of_*`` folders."""
    return not (folder / CONFIG_FILE).is_file() and any(folder.glob("shard_*_of_*"))


def _sae_layout(folder: Path) -> tuple[dict, dict, list[tuple[Path, int, int]]]:
    """``(config.json, shard info, files)`` of an SAE folder split into shard folders."""
    shards = sorted(folder.glob("shard_*_of_*"))
    config = json.loads((shards[0] / CONFIG_FILE).read_text())
    config["metadata"] = dict(config.get("metadata") or {})
    info = config["metadata"].pop("shard")
    return config, info, _shard_files(folder, WEIGHTS_FILE, info["n_latents"])


def read_sae_rows(folder: Path, start: int, stop: int) -> dict[str, Tensor]:
    """Rows ``[start, stop)`` of the SAE in ``folder`` (one folder or shard folders), as a state dict."""
    if (folder / CONFIG_FILE).is_file():
        n_latents = json.loads((folder / CONFIG_FILE).read_text())["n_latents"]
        files = _shard_files(folder, WEIGHTS_FILE, n_latents)
    else:
        files = _sae_layout(folder)[2]
    return _read_rows(files, start, stop, "train the run again")


def merge_shards(folder: str | os.PathLike) -> TopKSAE:
    """One ``TopKSAE`` from an SAE folder or a folder of ``shard_<l>_of_<L>/`` SAE folders (what a
    latent-sharded run writes to ``RUN/sae``); every shard is checked as an SAE folder is."""
    folder = Path(folder)
    if not is_sharded(folder):
        return load_folder(folder)
    paths = sorted(folder.glob("shard_*_of_*"))
    shards = [load_folder(path) for path in paths]
    for i, (path, shard) in enumerate(zip(paths, shards)):
        info = shard.metadata.get("shard")
        if path.name != shard_name(i, len(paths)) or not isinstance(info, dict) or \
                (info.get("index"), info.get("count")) != (i, len(paths)):
            raise ValueError(f"{path} is not shard {i} of the {len(paths)} in {folder} (its config.json says "
                             f"{info!r}); train the run again.")
    first = shards[0]
    sae = TopKSAE(first.d_in, info["n_latents"], info["k"], arch=first.arch, normalizer=first.normalizer,
                  metadata={key: value for key, value in first.metadata.items() if key != "shard"},
                  generator=torch.Generator())
    rows = {name: torch.cat([getattr(shard, name).detach() for shard in shards]) for name in LATENT_PARAMS}
    sae.load_state_dict({**first.state_dict(), **rows})
    return sae.eval()


def finished(run: Path) -> bool:
    """Whether ``run`` holds its final SAE (``RUN/sae``, whole or in shards)."""
    return (run / "sae" / CONFIG_FILE).is_file() or any((run / "sae").glob("shard_*_of_*"))


# ---- writing --------------------------------------------------------------------------------


def write_shared_folder(target: Path, grid: Grid, write: Callable[[Path], object]) -> None:
    """Build ``target`` from every latent shard's ``write(folder)``, atomically.

    Data rank 0 of each latent shard writes (into the folder itself when there is one shard);
    global rank 0 makes the temporary folder and renames it into place once all have written.
    """
    tmp = temp_path(target, "shared")  # one name for every rank
    grid.together(lambda: _fresh_folder(tmp) if grid.rank == 0 else None, f"make {tmp}")
    failure = None
    if grid.data_rank == 0:
        try:
            write(tmp if grid.latent_size == 1 else tmp / shard_name(grid.latent_rank, grid.latent_size))
        except Exception as error:  # noqa: BLE001 - every rank learns of it, and the folder goes
            failure = error
    if grid.any(failure is not None):
        if grid.rank == 0:
            remove(tmp)
        if failure is not None and not isinstance(failure, (OSError, SafetensorError)):
            raise failure
        raise OSError(f"Could not write {target} ({failure or 'on another rank'})") from failure
    grid.together(lambda: replace(tmp, target) if grid.rank == 0 else None, f"move {tmp} to {target}")


def _fresh_folder(path: Path) -> None:
    remove(path)
    path.mkdir(parents=True)


def save_checkpoint(run: Path, sae: TopKSAE, opt: torch.optim.Optimizer, state: TrainState, config: dict,
                    grid: Grid) -> Path:
    """Write this step's checkpoint (one folder per latent shard) and remove the older ones.

    A failed write (disk full) removes the partial folder, keeps the previous checkpoint and
    raises an OSError saying so.
    """
    root = run / "checkpoints"
    final = root / f"step_{state.step:09d}"
    if final.exists():
        return final

    def write(folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        optim = opt.state_dict()
        tensors = {f"model.{name}": t for name, t in sae.state_dict().items()}
        tensors |= {f"optim.{i}.{name}": t for i, s in optim["state"].items() for name, t in s.items()}
        tensors |= {f"ema.{name}": t for name, t in (state.ema or {}).items()}
        tensors |= {"since_fired": state.since_fired}
        meta = {"step": state.step, "epoch": state.epoch, "batch": state.batch, "tokens": state.tokens,
                "normalizer_scale": sae.normalizer_scale, "has_ema": state.ema is not None,
                "param_groups": optim["param_groups"], "config": config,
                "shard": {"index": grid.latent_rank, "count": grid.latent_size, "n_latents": config["n_latents"]}}
        save_file({key: t.detach().to("cpu", copy=True).contiguous() for key, t in tensors.items()}, str(folder / TENSORS),
                  metadata={META: json.dumps(meta)})
        (folder / META).write_text(json.dumps({**meta, "sha256": sha256_file(folder / TENSORS)}))

    try:
        write_shared_folder(final, grid, write)
    except OSError as error:
        previous = latest_checkpoint(run)
        kept = f"the previous checkpoint {previous} is intact" if previous else "there is no earlier checkpoint"
        raise OSError(f"Could not write the checkpoint of step {state.step} to {final} ({error.__cause__ or error}); "
                      f"{kept}. Free disk space and run again to resume.") from error
    def remove_older() -> None:
        for old in [*_by_step(root)[:-1], *root.glob(".*.tmp-*")]:  # older and half-written ones
            remove(old)

    grid.together(remove_older if grid.rank == 0 else lambda: None, f"remove the checkpoints older than {final}")
    return final


# ---- reading --------------------------------------------------------------------------------


def _by_step(root: Path) -> list[Path]:
    """The ``root/step_<n>`` folders in the order of ``n`` (their names' zero padding ends at 10**9)."""
    steps = [(int(folder.name[5:]), folder) for folder in root.glob("step_*") if folder.name[5:].isdigit()]
    return [folder for _, folder in sorted(steps)]


def latest_checkpoint(run: Path) -> Path | None:
    """The newest complete ``run/checkpoints/step_*`` folder (temporary folders are ignored)."""
    folders = _by_step(run / "checkpoints")
    return folders[-1] if folders else None


def load_checkpoint(folder: Path, sae: TopKSAE, opt: torch.optim.Optimizer, state: TrainState, config: dict,
                    grid: Grid) -> None:
    """Restore this rank's rows, in place, from a checkpoint written with any number of latent
    shards of the run whose config record is ``config``; a damaged or foreign checkpoint is a
    ValueError naming the file (and the key)."""
    fix = f"delete {folder} to restart the run from the beginning"
    n_latents = config["n_latents"]
    start, stop = grid.latent_rank * sae.n_latents, (grid.latent_rank + 1) * sae.n_latents
    try:
        files = _shard_files(folder, TENSORS, n_latents)
    except FileNotFoundError as error:
        raise ValueError(f"{error} ({fix})") from None
    metas = {path: read_json(path.parent / META, CheckpointMeta, fix)
             for path, a, b in files if a < stop and start < b or path == files[0][0]}
    for index, (path, *_) in enumerate(files):
        if path in metas:  # before the tensors are parsed: any damaged byte is named as such
            check_sha256(path, metas[path].sha256, fix)
            _check_meta(path.parent / META, metas[path], index, config, len(files), fix)
    tensors = {key: t.to(sae.W_enc.device) for key, t in _read_rows(files, start, stop, fix).items()}
    meta = metas[files[0][0]]
    sae.load_state_dict({key[len("model."):]: t for key, t in tensors.items() if key.startswith("model.")})
    sae.normalizer_scale = meta.normalizer_scale
    optim_state: dict[int, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            optim_state.setdefault(int(i), {})[name] = t.cpu() if name == "step" else t
    opt.load_state_dict({"state": optim_state, "param_groups": [g.model_dump() for g in meta.param_groups]})
    state.ema = {key[len("ema."):]: t for key, t in tensors.items() if key.startswith("ema.")} if meta.has_ema else None
    state.since_fired = tensors["since_fired"]
    state.step, state.epoch, state.batch, state.tokens = meta.step, meta.epoch, meta.batch, meta.tokens


def _check_meta(path: Path, meta: CheckpointMeta, index: int, config: dict, n_shards: int, fix: str) -> None:
    """Refuse a ``state.json`` (of shard ``index`` of ``n_shards``) that differs from the copy in its
    ``state.safetensors`` header (naming the first differing key) or that does not fit this run."""
    with safe_open(str(path.with_name(TENSORS)), "pt") as f:
        stored = (f.metadata() or {}).get(META)
    if stored is not None:  # checkpoints written before the copy have none: schema and run checks only
        written = {key: value for key, value in json.loads(path.read_bytes()).items() if key != "sha256"}
        try:
            copy = json.loads(stored)
        except ValueError:
            copy = {}
        for key in sorted(written.keys() | (copy.keys() if isinstance(copy, dict) else set())):
            if not isinstance(copy, dict) or written.get(key) != copy.get(key):
                raise ValueError(f"{path}: {key} is {_short(written.get(key))} but the copy written with the tensors says "
                                 f"{_short(copy.get(key) if isinstance(copy, dict) else copy)}; the file was edited or "
                                 f"damaged, {fix}.")
    # a key the run's record has and the checkpoint's lacks is a field newer than the checkpoint
    # a run at a constant learning rate may be extended: its checkpoints from before count toward more tokens
    extended = extends(meta.config, config)
    checks = [(f"config.{key}", value, config.get(key)) for key, value in sorted(meta.config.items())
              if key not in BOOKKEEPING and not (extended and key == "tokens")]
    checks += [("shard.index", meta.shard.index, index), ("shard.count", meta.shard.count, n_shards),
               ("shard.n_latents", meta.shard.n_latents, config["n_latents"]),
               ("tokens", meta.tokens, meta.step * config["batch_size"]),
               ("has_ema", meta.has_ema, config.get("ema") is not None)]
    for key, found, expected in checks:
        if found != expected:
            raise ValueError(f"{path}: {key} is {_short(found)} but this run has {_short(expected)}; "
                             f"the checkpoint belongs to another run or was edited, {fix}.")
    if meta.epoch > meta.step or meta.batch > meta.step:
        raise ValueError(f"{path}: epoch {meta.epoch} and batch {meta.batch} cannot follow step {meta.step}; {fix}.")


def _short(value) -> str:
    return shorten(json.dumps(value))
