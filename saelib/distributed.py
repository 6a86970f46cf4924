"""Train one TopK SAE on many processes: data parallel, latent parallel, or both.

    torchrun --standalone --nproc-per-node 4 my_script.py   # my_script calls fit_distributed(...)
    fit_distributed(activations, n_latents, k, latent_parallel=2, out="runs/big") -> this rank's shard

Process grid: the world of ``W`` ranks is ``D x L`` with ``L = latent_parallel``; rank
``r = d * L + l`` reads data shard ``d`` of every batch and holds latent shard ``l``: rows
``[l * n/L, (l+1) * n/L)`` of ``W_enc``, ``b_enc``, ``W_dec`` (and their Adam state, EMA and dead
counters); ``b_pre`` is replicated. One step, for a global batch ``x (B, d_in)``, on rank ``(d, l)``
holding ``x_d (B/D, d_in)``::

    pre_l     = W_enc_l (x_d - b_pre) + b_enc_l                       (B/D, n/L)  no gradient, in encoder_dtype
    cand_l    = top-k of pre_l: values and global indices             (B/D, k)
    chosen    = top-k of all_gather_l(cand_l)                         (B/D, k)    the global top-k
    z_l       = ReLU(pre at the chosen latents that shard l owns)     (B/D, k)    zeros elsewhere
    x_hat     = all_reduce_l(W_dec_l^T z_l) + b_pre                   (B/D, d_in)
    loss_d    = sum ||x_d - x_hat||^2 / sum_{global batch} ||x - mean(x)||^2 + AuxK_d / 32

The denominators are global (two small all-reduces), so the per-rank losses add up to the
one-process loss exactly and gradients are summed, not averaged, over the data group. The
reconstruction's all-reduce has an identity backward (every shard computes the same loss
copy); ``b_pre``'s use in the encoder has an all-reduce backward (each shard sees only its
latents' share). AuxK repeats the same top-k over shards on the dead latents. Decoder-row
projection and renormalisation are per row, so per shard; the clipping norm is summed over
shards. Dead counters are per shard, with fired latents OR-ed over the data group.

Files: ``out/checkpoints/step_*/`` holds ``state.safetensors + state.json`` (``L = 1``, the
format of :mod:`saelib.train`, so ``fit`` and ``fit_distributed`` resume each other) or one
``shard_<l>_of_<L>/`` folder of them per latent shard; ``out/sae/`` is an SAE folder or one SAE
folder per shard. :func:`merge_shards` loads either as one ``TopKSAE``. A run resumes with any
grid whose ``L`` divides ``n_latents`` and whose ``D`` divides ``batch_size``.
See ``docs/distributed.md`` for the layout of a run of the paper's size.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from .kernels import LatentPattern, chained_row_gradients, gather_preacts, sparse_decode, topk_indices
from .normalize import Normalizer
from .sae import CONFIG_FILE, WEIGHTS_FILE, TopKSAE, check_sha256, load, sha256_file
from .train import (BatchSource, InputClock, IterableSource, TrainConfig, TrainState, _check_run_folder, _config_record, _log,
                    _sample, _say, _start_run_folder, _stream, as_source, check_batch, clip_to_norm, ema_apply,
                    ema_start, ema_update, initial_b_pre, latest_checkpoint, learning_rate)

LATENT_PARAMS = ("W_enc", "b_enc", "W_dec")  # split by rows over the latent group; b_pre is replicated
CHECKPOINT_TENSORS, CHECKPOINT_META = "state.safetensors", "state.json"
# rows of the random init drawn per call; a multiple of 16 keeps the CPU normal stream identical
# to one big draw, so every grid starts from TopKSAE's own init
INIT_CHUNK_ROWS = 4096


# ---- process grid ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """This rank's place in the ``D x L`` grid; a group is ``None`` when it has one rank."""

    rank: int
    data_rank: int
    data_size: int  # D
    latent_rank: int
    latent_size: int  # L
    data_group: dist.ProcessGroup | None
    latent_group: dist.ProcessGroup | None
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_grid(latent_parallel: int = 1) -> Grid:
    """Join (or start) the process group and split it into data and latent groups.

    Under torchrun the group comes from the environment; a plain process starts a world of one.
    NCCL with one GPU per rank when CUDA is available, gloo on CPU otherwise.
    """
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    world, rank = dist.get_world_size(), dist.get_rank()
    L = latent_parallel
    if isinstance(L, bool) or not isinstance(L, int) or L < 1 or world % L:
        raise ValueError(f"latent_parallel={L!r} must be a positive divisor of the world size {world}; "
                         f"choose one of {[i for i in range(1, world + 1) if world % i == 0]}.")
    D = world // L
    # every rank must create every group, in the same order
    latent_groups = [dist.new_group(list(range(d * L, (d + 1) * L))) for d in range(D)] if L > 1 else None
    data_groups = [dist.new_group(list(range(l, world, L))) for l in range(L)] if D > 1 else None
    d, l = divmod(rank, L)
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return Grid(rank, d, D, l, L, data_groups[l] if data_groups else None, latent_groups[d] if latent_groups else None, device)


def _all_reduce(t: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Sum ``t`` in place over ``group`` (nothing to do for a one-rank group)."""
    if group is not None:
        dist.all_reduce(t, group=group)
    return t


class _SumOverShards(torch.autograd.Function):
    """Forward: sum the shards' partial results. Backward: identity, because every shard
    computes the same loss from the summed result (Megatron's "reduce from model parallel")."""

    @staticmethod
    def forward(ctx, partial: Tensor, group) -> Tensor:
        return _all_reduce(partial.clone(), group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _CopyToShards(torch.autograd.Function):
    """Forward: identity on a replicated tensor. Backward: sum the shards' gradients, each of
    which covers only that shard's latents."""

    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        ctx.group = group
        return t.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_reduce(grad.clone(), ctx.group), None


# ---- the sharded forward pass ---------------------------------------------------------------


def global_topk(pre: Tensor, k: int, grid: Grid) -> tuple[Tensor, Tensor | None]:
    """The top ``k`` latents of the whole SAE per token, from each shard's top-k candidates.

    Args:
        pre: ``(B, n/L)`` this shard's pre-activations.
    Returns:
        ``indices (B, k)`` local row ids, and ``mine (B, k)`` bool, True where this shard owns
        the chosen latent (``None`` with one shard: it owns all; elsewhere ``indices`` is 0).
    """
    local = topk_indices(pre, min(k, pre.shape[-1]))
    if grid.latent_group is None:
        return local, None
    offset = grid.latent_rank * pre.shape[-1]
    local_values = pre.gather(-1, local).float()  # candidates travel in fp32 (a bf16 pre too)
    values = [torch.empty_like(local_values) for _ in range(grid.latent_size)]
    indices = [torch.empty_like(local) for _ in range(grid.latent_size)]
    dist.all_gather(values, local_values, group=grid.latent_group)
    dist.all_gather(indices, (local + offset).contiguous(), group=grid.latent_group)
    best = torch.cat(values, -1).topk(k, dim=-1).indices
    chosen = torch.cat(indices, -1).gather(-1, best)
    mine = (chosen >= offset) & (chosen < offset + pre.shape[-1])
    return torch.where(mine, chosen - offset, 0), mine


def _centred_sumsq(x: Tensor, grid: Grid, batch_tokens: int) -> Tensor:
    """``sum ||x - mean(x)||^2`` over the global batch (no gradient): the NMSE denominator."""
    with torch.no_grad():
        mean = _all_reduce(x.sum(0), grid.data_group) / batch_tokens
        return _all_reduce((x - mean).pow(2).sum(), grid.data_group).clamp_min(1e-12)


@dataclass
class ShardOutput:
    """One rank's share of a step. Errors are this rank's tokens' sums; ``scale``s are global."""

    loss: Tensor  # this rank's part: summed over the data group it is the one-process loss
    values: Tensor  # (B/D, k) this shard's latent values (0 where another shard owns the latent)
    indices: Tensor  # (B/D, k) local row ids
    error: Tensor  # sum ||x - x_hat||^2
    scale: Tensor  # global NMSE denominator
    auxk_error: Tensor
    auxk_scale: Tensor


@chained_row_gradients()  # the main code's and AuxK's row gradients add into one tensor per weight
def sharded_forward(shard: TopKSAE, x: Tensor, grid: Grid, cfg: TrainConfig, batch_tokens: int,
                    dead: Tensor | None, n_dead: int) -> ShardOutput:
    """The loss of ``TopKSAE.forward`` (arch ``topk``) with latents sharded over the latent group.

    Args:
        shard: this rank's rows (``n_latents = n/L``) plus the replicated ``b_pre``.
        x: ``(B/D, d_in)`` this rank's slice of the global batch of ``batch_tokens`` rows.
        dead: ``(n/L,)`` bool, this shard's dead latents (``None``: no AuxK); ``n_dead`` the
            number over all shards.
    """
    x_c = x - _CopyToShards.apply(shard.b_pre, grid.latent_group)
    pre = shard._preacts(x)  # no gradient, in the shard's encoder_dtype

    def code(pre: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        indices, mine = global_topk(pre, k, grid)
        pattern = LatentPattern(indices, shard.W_enc.shape[0])
        values = F.relu(gather_preacts(x_c, shard.W_enc, shard.b_enc, indices, pre, pattern=pattern))
        values = values if mine is None else values * mine
        return values, indices, _SumOverShards.apply(sparse_decode(values, indices, shard.W_dec, pattern),
                                                     grid.latent_group)

    values, indices, partial = code(pre, cfg.k)
    x_hat = partial + shard.b_pre
    error = (x - x_hat).pow(2).sum()
    scale = _centred_sumsq(x, grid, batch_tokens)
    loss = error / scale  # topk only: no L1 term (it belongs to the ReLU baseline)
    auxk_error = auxk_scale = x.new_zeros(())
    if dead is not None and n_dead > 0:
        dead_values, dead_indices, aux_hat = code(pre.masked_fill(~dead, float("-inf")), min(cfg.k_aux, n_dead))
        residual = (x - x_hat).detach()
        auxk_error, auxk_scale = (residual - aux_hat).pow(2).sum(), _centred_sumsq(residual, grid, batch_tokens)
        loss = loss + cfg.auxk_coef * auxk_error / auxk_scale
    return ShardOutput(loss, values, indices, error, scale, auxk_error, auxk_scale)


# ---- the optimiser step ---------------------------------------------------------------------


@torch.no_grad()
def sync_and_clip(shard: TopKSAE, grid: Grid, grad_clip: float | None) -> None:
    """Sum gradients over the data group, project decoder gradients, clip by the global norm.

    The norm is ``torch.nn.utils.clip_grad_norm_``'s over the whole SAE: the latent rows'
    squares summed over shards, plus the replicated ``b_pre`` once.
    """
    for p in shard.parameters():
        _all_reduce(p.grad, grid.data_group)
    shard.remove_parallel_grads()
    if grad_clip:
        rows = torch.stack([getattr(shard, name).grad.pow(2).sum() for name in LATENT_PARAMS]).sum()
        norm = (_all_reduce(rows, grid.latent_group) + shard.b_pre.grad.pow(2).sum()).sqrt()
        clip_to_norm(shard.parameters(), grad_clip, norm)


# ---- data -----------------------------------------------------------------------------------


class RankSlice:
    """A ``BatchSource`` that yields this data rank's rows ``[d * B/D, (d+1) * B/D)`` of each
    global batch, so the ``D`` slices of a step are the one-process batch. Batches are checked
    whole, so every rank stops at the same bad batch."""

    def __init__(self, source: BatchSource, grid: Grid):
        self.source, self.grid = source, grid
        self.d_in, self.n_tokens = source.d_in, source.n_tokens

    def batches(self, batch_size: int, *, seed: int, epoch: int, start: int = 0) -> Iterator[Tensor]:
        rows = batch_size // self.grid.data_size
        for index, x in enumerate(self.source.batches(batch_size, seed=seed, epoch=epoch, start=start), start):
            check_batch(x, self.d_in, epoch, index)
            yield x[self.grid.data_rank * rows : (self.grid.data_rank + 1) * rows].to(self.grid.device)


def _broadcast_from_main(compute, like: Tensor, grid: Grid) -> Tensor:
    """``compute()`` on rank 0, sent to every rank; if it raises there, every rank raises."""
    value, failure = like.clone(), None
    if grid.rank == 0:
        try:
            value = compute()
        except Exception as error:  # the other ranks must not wait forever on the broadcast
            value, failure = like.new_full(like.shape, float("nan")), error
    value = value.to(grid.device)
    dist.broadcast(value, src=0)
    if failure is not None:
        raise failure
    if grid.rank != 0 and bool(value.isnan().all()):
        raise RuntimeError("Rank 0 failed while computing a value for all ranks; its log has the error.")
    return value


# ---- init -----------------------------------------------------------------------------------


def _unit_rows(generator: torch.Generator, n: int, d: int, start: int, stop: int) -> Tensor:
    """Rows ``[start, stop)`` of ``normalize(randn(n, d))``, drawing in chunks (bounded memory)."""
    kept = []
    for first in range(0, n, INIT_CHUNK_ROWS):
        chunk = torch.randn(min(INIT_CHUNK_ROWS, n - first), d, generator=generator)
        kept.append(chunk[max(start - first, 0) : max(stop - first, 0)])
    rows = torch.cat(kept)
    return rows / rows.norm(dim=1, keepdim=True)


@torch.no_grad()
def init_shard(shard: TopKSAE, n_latents: int, start: int, seed: int, tied_init: bool, encoder_scale: float = 1.0) -> None:
    """Rows ``[start, start + shard.n_latents)`` of ``TopKSAE(..., generator=seed)``'s init,
    with the encoder rows scaled by ``encoder_scale`` (as ``fit`` does)."""
    g = torch.Generator().manual_seed(seed)
    stop = start + shard.n_latents
    shard.W_dec.copy_(_unit_rows(g, n_latents, shard.d_in, start, stop))
    shard.W_enc.copy_(shard.W_dec if tied_init else _unit_rows(g, n_latents, shard.d_in, start, stop))
    shard.W_enc.mul_(encoder_scale)
    shard.b_enc.zero_()


def _make_shard(d_in: int, cfg: TrainConfig, grid: Grid, normalizer: Normalizer, metadata: dict | None) -> TopKSAE:
    n_local = cfg.n_latents // grid.latent_size
    info = {"index": grid.latent_rank, "count": grid.latent_size, "n_latents": cfg.n_latents, "k": cfg.k}
    return TopKSAE(d_in, n_local, min(cfg.k, n_local), normalizer=normalizer, generator=torch.Generator(),
                   metadata={**(metadata or {}), "shard": info} if grid.latent_size > 1 else metadata,
                   encoder_dtype=cfg.encoder_dtype)


# ---- shard files ----------------------------------------------------------------------------


def _shard_name(index: int, count: int) -> str:
    return f"shard_{index:03d}_of_{count:03d}"


def _shard_files(folder: Path, filename: str, n_latents: int) -> list[tuple[Path, int, int]]:
    """``(file, first row, end row)`` per latent shard: ``folder/filename`` or ``shard_*`` folders."""
    if (folder / filename).is_file():
        return [(folder / filename, 0, n_latents)]
    subfolders = sorted(folder.glob("shard_*_of_*"))
    count = len(subfolders)
    if not count or any(p.name != _shard_name(i, count) or not (p / filename).is_file() for i, p in enumerate(subfolders)):
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


def _read_rows(files: list[tuple[Path, int, int]], start: int, stop: int) -> dict[str, Tensor]:
    """Every tensor of the shard files, latent-axis ones cut to rows ``[start, stop)``."""
    handles = [(safe_open(str(path), "pt"), a, b) for path, a, b in files]
    tensors = {}
    for key in handles[0][0].keys():
        if _is_latent_axis(key):
            parts = [h.get_slice(key)[max(start, a) - a : min(stop, b) - a] for h, a, b in handles if a < stop and start < b]
            tensors[key] = torch.cat(parts)
        else:
            tensors[key] = handles[0][0].get_tensor(key)
    return tensors


def _sae_layout(folder: Path) -> tuple[dict, dict, list[tuple[Path, int, int]]]:
    """``(config.json, shard info, files)`` of an SAE folder or a folder of SAE shard folders."""
    shards = sorted(folder.glob("shard_*_of_*"))
    if not (folder / CONFIG_FILE).is_file() and not shards:
        raise FileNotFoundError(f"No SAE at {folder}: it has neither {CONFIG_FILE} nor shard_*_of_* folders; "
                                f"pass an SAE folder or a run's sae/ folder.")
    config = json.loads(((folder if not shards else shards[0]) / CONFIG_FILE).read_text())
    config["metadata"] = dict(config.get("metadata") or {})
    info = config["metadata"].pop("shard", None) or {"n_latents": config["n_latents"], "k": config["k"]}
    return config, info, _shard_files(folder, WEIGHTS_FILE, info["n_latents"])


def merge_shards(folder: str | os.PathLike) -> TopKSAE:
    """One ``TopKSAE`` from an SAE folder or a folder of ``shard_<l>_of_<L>/`` SAE folders.

    ``fit_distributed`` writes ``out/sae`` in the second form when ``latent_parallel > 1``.
    """
    folder = Path(folder)
    if (folder / CONFIG_FILE).is_file():
        return load(folder)
    config, info, files = _sae_layout(folder)
    tensors = _read_rows(files, 0, info["n_latents"])
    normalizer = Normalizer(tensors["normalizer_mean"], float(config["normalizer_scale"]))
    sae = TopKSAE(config["d_in"], info["n_latents"], info["k"], arch=config["arch"], normalizer=normalizer,
                  metadata=config["metadata"], generator=torch.Generator())
    sae.load_state_dict(tensors)
    return sae.eval()


def _shared_folder(target: Path, grid: Grid, write) -> None:
    """Build ``target`` from every latent shard's ``write(folder)`` and rename it into place.

    Data rank 0 of each latent shard writes (into ``target`` itself when there is one shard);
    global rank 0 makes the temporary folder and renames it once all have written.
    """
    tmp = target.with_name(f".tmp-{target.name}")
    if grid.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    if grid.data_rank == 0:
        write(tmp if grid.latent_size == 1 else tmp / _shard_name(grid.latent_rank, grid.latent_size))
    dist.barrier()
    if grid.rank == 0:
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    dist.barrier()


def save_checkpoint(run: Path, shard: TopKSAE, opt: torch.optim.Optimizer, state: TrainState, config: dict,
                    grid: Grid) -> Path:
    """Write this step's checkpoint (one folder per latent shard) and remove older ones.

    Keys and JSON fields are those of :func:`saelib.train.save_checkpoint`; ``state.json`` also
    says which shard it holds.
    """
    root = run / "checkpoints"
    final = root / f"step_{state.step:09d}"
    if final.exists():
        return final

    def write(folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        optim = opt.state_dict()
        tensors = {f"model.{name}": t for name, t in shard.state_dict().items()}
        tensors |= {f"optim.{i}.{name}": t for i, s in optim["state"].items() for name, t in s.items()}
        tensors |= {f"ema.{name}": t for name, t in (state.ema or {}).items()}
        tensors |= {"since_fired": state.since_fired, "torch_rng": torch.get_rng_state()}
        save_file({key: t.detach().cpu().contiguous().clone() for key, t in tensors.items()}, str(folder / CHECKPOINT_TENSORS))
        meta = {"step": state.step, "epoch": state.epoch, "batch": state.batch, "tokens": state.tokens,
                "normalizer_scale": shard.normalizer_scale, "has_ema": state.ema is not None,
                "param_groups": optim["param_groups"], "python_rng": random.getstate(), "config": config,
                "shard": {"index": grid.latent_rank, "count": grid.latent_size, "n_latents": config["n_latents"]},
                "sha256": sha256_file(folder / CHECKPOINT_TENSORS)}
        (folder / CHECKPOINT_META).write_text(json.dumps(meta))

    _shared_folder(final, grid, write)
    if grid.rank == 0:
        for old in [*sorted(root.glob("step_*"))[:-1], *root.glob(".tmp-*")]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(folder: Path, shard: TopKSAE, opt: torch.optim.Optimizer, state: TrainState, n_latents: int,
                    grid: Grid) -> None:
    """Restore this rank's rows from a checkpoint written with any number of latent shards."""
    start = grid.latent_rank * shard.n_latents
    files = _shard_files(folder, CHECKPOINT_TENSORS, n_latents)
    for path, a, b in files:
        if a < start + shard.n_latents and start < b:
            meta = json.loads((path.parent / CHECKPOINT_META).read_text())
            check_sha256(path, meta.get("sha256"), f"delete {folder} to restart the run from the beginning")
    tensors = {key: t.to(grid.device) for key, t in _read_rows(files, start, start + shard.n_latents).items()}
    meta = json.loads((files[0][0].parent / CHECKPOINT_META).read_text())
    shard.load_state_dict({key[len("model."):]: t for key, t in tensors.items() if key.startswith("model.")})
    shard.normalizer_scale = meta["normalizer_scale"]
    optim_state: dict[int, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            optim_state.setdefault(int(i), {})[name] = t.cpu() if name == "step" else t
    groups = [{**g, "betas": tuple(g["betas"])} for g in meta["param_groups"]]
    opt.load_state_dict({"state": optim_state, "param_groups": groups})
    state.ema = {key[len("ema."):]: t for key, t in tensors.items() if key.startswith("ema.")} if meta["has_ema"] else None
    state.since_fired = tensors["since_fired"]
    state.step, state.epoch, state.batch, state.tokens = meta["step"], meta["epoch"], meta["batch"], meta["tokens"]


def _finished(run: Path) -> bool:
    return (run / "sae" / CONFIG_FILE).is_file() or any((run / "sae").glob("shard_*_of_*"))


# ---- the training loop ----------------------------------------------------------------------


def fit_distributed(
    data: Tensor | BatchSource | Iterable[Tensor],
    n_latents: int,
    k: int,
    *,
    latent_parallel: int = 1,
    out: str | os.PathLike | None = None,
    normalizer: Normalizer | None = None,
    normalize: bool | None = None,
    metadata: dict | None = None,
    progress: bool = True,
    **options,
) -> TopKSAE:
    """``saelib.fit`` on every rank of a ``torch.distributed`` world; returns this rank's shard.

    Every rank passes the same ``data`` and options (the batch order is the one-process order;
    each rank keeps its ``batch_size / D`` rows of every batch). With ``latent_parallel=1`` the
    returned shard is the whole SAE; otherwise load the result with ``merge_shards(out / "sae")``.

    Args:
        latent_parallel: ``L``, ranks sharing one SAE's latents; the other factor of the world
            size is data parallel. ``L`` must divide ``n_latents``; ``D`` must divide ``batch_size``.
        Others: as ``saelib.fit`` (``arch`` must be ``"topk"``).
    """
    grid = init_grid(latent_parallel)
    cfg = TrainConfig(n_latents=n_latents, k=k, **options)
    source, normalizer = as_source(data, normalizer, normalize, cfg.geometric_median_samples)
    if isinstance(source, IterableSource) and "batch_size" not in options:
        cfg = replace(cfg, batch_size=source.batch_size)
    cfg = cfg.resolved(source.d_in, source.n_tokens)
    if cfg.arch != "topk":
        raise ValueError(f"fit_distributed trains arch='topk' only, got arch={cfg.arch!r}; train other archs with saelib.fit.")
    if n_latents % grid.latent_size:
        raise ValueError(f"n_latents={n_latents} does not split into latent_parallel={grid.latent_size} equal shards; "
                         f"choose a latent_parallel that divides it.")
    if cfg.batch_size % grid.data_size:
        raise ValueError(f"batch_size={cfg.batch_size} does not split over {grid.data_size} data-parallel ranks; "
                         f"choose a batch_size divisible by {grid.data_size}.")
    main = grid.rank == 0
    run = Path(out) if out is not None else None
    shard = _make_shard(source.d_in, cfg, grid, normalizer, metadata)
    finished = run is not None and (_check_run_folder(run, cfg, source.d_in) or _finished(run))
    dist.barrier()  # every rank has read the run folder before rank 0 writes to it
    if finished:
        _say(progress and main, f"{run} holds a finished run with this config; loading {run / 'sae'} without retraining.")
        start = grid.latent_rank * shard.n_latents
        shard.load_state_dict(_read_rows(_sae_layout(run / "sae")[2], start, start + shard.n_latents))
        return shard.eval()
    shard.to(grid.device)

    opt = torch.optim.Adam(shard.parameters(), lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps)
    state = TrainState(since_fired=torch.zeros(shard.n_latents, dtype=torch.int64, device=grid.device), ema=None)
    checkpoint = latest_checkpoint(run) if run is not None else None
    if checkpoint is not None:
        load_checkpoint(checkpoint, shard, opt, state, n_latents, grid)
        _say(progress and main, f"Resuming {run} from step {state.step} ({state.tokens} tokens) on a "
                                f"{grid.data_size} x {grid.latent_size} grid (data x latent).")
    else:
        init_shard(shard, n_latents, grid.latent_rank * shard.n_latents, cfg.seed, cfg.tied_init, cfg.encoder_init_scale)
        b_pre = _broadcast_from_main(lambda: initial_b_pre(_sample(source, cfg), cfg.b_pre_init), torch.zeros(source.d_in), grid)
        with torch.no_grad():
            shard.b_pre.copy_(b_pre)
        state.ema = ema_start(shard) if cfg.ema else None
    record = _config_record(cfg, source.d_in)
    if run is not None and main:
        _start_run_folder(run, record, state.step)
    dist.barrier()

    B = cfg.batch_size
    total_steps = cfg.tokens // B if cfg.tokens else None
    bar = tqdm(total=total_steps, initial=state.step, disable=not (progress and main), desc="fit", unit="step")
    stream, window_start = InputClock(_stream(RankSlice(source, grid), cfg, state.epoch, state.batch)), state.tokens
    for epoch, index, x in stream:
        if total_steps is not None and state.step >= total_steps:
            break
        lr = learning_rate(cfg, state.step, total_steps)
        for group in opt.param_groups:
            group["lr"] = lr

        dead = state.since_fired >= cfg.dead_tokens
        n_dead = int(_all_reduce(dead.sum(), grid.latent_group)) if cfg.auxk else 0
        result = sharded_forward(shard, x, grid, cfg, B, dead if cfg.auxk else None, n_dead)
        # one small all-reduce: global errors (counted once per data rank), L0 and a finiteness flag
        once = float(grid.latent_rank == 0)
        stats = torch.stack([result.error * once, result.auxk_error * once, (result.values > 0).sum().to(x.dtype),
                             (~torch.isfinite(result.loss)).to(x.dtype)]).detach()
        dist.all_reduce(stats)
        error, auxk_error, active, bad = stats.tolist()
        if bad:
            raise FloatingPointError(f"Loss is not finite at step {state.step} (batch {index} of epoch {epoch}); "
                                     f"lower lr (now {lr:.3g}). The last checkpoint is intact.")
        opt.zero_grad(set_to_none=True)
        result.loss.backward()
        sync_and_clip(shard, grid, cfg.grad_clip)
        opt.step()
        shard.normalize_decoder()

        if state.ema is not None:
            ema_update(state.ema, shard, cfg.ema)
        fired = torch.zeros(shard.n_latents, device=grid.device).index_fill_(0, result.indices[result.values > 0], 1)
        state.since_fired += B
        state.since_fired[_all_reduce(fired, grid.data_group) > 0] = 0
        state.step, state.epoch, state.batch, state.tokens = state.step + 1, epoch, index + 1, state.tokens + B

        bar.update()
        if state.step % cfg.log_every == 0 or state.step == total_steps:
            n_dead_now = int(_all_reduce((state.since_fired >= cfg.dead_tokens).sum(), grid.latent_group))
            seconds, waited = stream.window()
            if main:
                _log(run, bar, step=state.step, tokens=state.tokens, nmse=error / result.scale.item(), l0=active / B,
                     dead_fraction=n_dead_now / n_latents, auxk_loss=auxk_error / result.auxk_scale.item() if auxk_error else 0.0,
                     lr=lr, tokens_per_s=(state.tokens - window_start) / seconds, input_wait=waited)
            window_start = state.tokens
        every = cfg.checkpoint_every_tokens
        if run is not None and state.tokens // every != (state.tokens - B) // every:
            save_checkpoint(run, shard, opt, state, record, grid)
    bar.close()

    if run is not None:
        save_checkpoint(run, shard, opt, state, record, grid)
    if state.ema is not None:
        ema_apply(state.ema, shard, cfg.ema, state.step)
        shard.fold_decoder_norms()
    if run is not None:
        _shared_folder(run / "sae", grid, shard.save)
    return shard.eval()


# ---- launching ------------------------------------------------------------------------------


def launched() -> bool:
    """Whether this process is one rank of a multi-process launch (torchrun sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m saelib *argv``."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive integer, got {nproc!r}.")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "saelib", *argv]


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``saelib *argv`` on ``nproc`` local ranks (torchrun, a free port); its exit status.

    Each rank gets ``OMP_NUM_THREADS = cores // nproc`` unless the caller set it.
    """
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc)), **os.environ}
    return subprocess.call(torchrun_command(nproc, argv), env=env)
