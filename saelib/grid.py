"""The process grid of a training run: data parallel, latent parallel, or both, and its sharded step.

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

Files: a distributed run writes the run folder of :func:`saelib.train.fit`, the one-process run
being the one-shard case of the layout (see :mod:`saelib.checkpoint`); a run resumes with any grid
whose ``L`` divides ``n_latents`` and whose ``D`` divides ``batch_size``. The training loop itself
is :func:`saelib.train.fit`'s: this module holds the grid, its collectives and the sharded step.
See ``docs/distributed.md`` for the layout of a run of the paper's size.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .config import TrainConfig
from .kernels import LatentPattern, chained_row_gradients, gather_preacts, sparse_decode, topk_indices
from .sae import ForwardOutput, Latents, TopKSAE
from .sources import BatchSource, check_batch

LATENT_PARAMS = ("W_enc", "b_enc", "W_dec")  # split by rows over the latent group; b_pre is replicated
# rows of the random init drawn per call; a multiple of 16 keeps the CPU normal stream identical
# to one big draw, so every grid starts from TopKSAE's own init
INIT_CHUNK_ROWS = 4096
T = TypeVar("T")


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

    @classmethod
    def single(cls, device: torch.device) -> Grid:
        """The trivial grid of one process, with no process group: every collective is a no-op."""
        return cls(0, 0, 1, 0, 1, None, None, device)

    @property
    def world_size(self) -> int:
        return self.data_size * self.latent_size

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (every rank gets the same answer)."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def together(self, action: Callable[[], T], what: str) -> T:
        """``action()`` on this rank (a rank with nothing to do passes one that does nothing), and what
        it returns; if it raises on any rank, every rank raises, the others naming ``what``, so that
        none is left waiting at the next collective. Every rank returns only when all have run theirs."""
        result, failure = None, None
        try:
            result = action()
        except Exception as error:
            failure = error
        if self.any(failure is not None):
            if failure is not None:
                raise failure
            raise RuntimeError(f"Another rank failed to {what}; its log has the error.")
        return result

    def from_main(self, compute, like: Tensor) -> Tensor:
        """``compute()`` on rank 0, sent to every rank; if it raises there, every rank raises."""
        if self.world_size == 1:
            return compute()
        value, failure = like.clone(), None
        if self.rank == 0:
            try:
                value = compute()
            except Exception as error:  # the other ranks must not wait forever on the broadcast
                value, failure = like.new_full(like.shape, float("nan")), error
        value = value.to(self.device)
        dist.broadcast(value, src=0)
        if failure is not None:
            raise failure
        if self.rank != 0 and bool(value.isnan().all()):
            raise RuntimeError("Rank 0 failed while computing a value for all ranks; its log has the error.")
        return value


def rank_device(device: str | torch.device, local_rank: int) -> torch.device:
    """Where the rank ``local_rank`` of this machine trains when the run asks for ``device``: its own
    GPU, ``cuda:local_rank``, for a CUDA device; the CPU otherwise. Refused in one sentence where the
    machine has fewer GPUs than that."""
    if torch.device(device).type != "cuda":
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(f"{local_rank + 1} processes on this machine need {local_rank + 1} GPUs, one each, but it has "
                         f"{count}; launch at most {count} (--nproc {count}) or train on the CPU (device='cpu').")
    return torch.device("cuda", local_rank)


def _destroy_at_exit() -> None:
    """Destroy the process group :func:`init_grid` started, if it is still there, before the interpreter
    exits: left to C++'s exit-time destructors, a rank of a finished gloo run could end with SIGABRT
    ("terminate called without an active exception") instead of status 0."""
    if dist.is_initialized():
        dist.destroy_process_group()


def check_split(world: int, latent_parallel: int, *, n_latents: int | None = None, batch_size: int | None = None,
                arch: str = "topk") -> None:
    """Refuse, in one sentence, a run that ``world`` processes cannot split: ``latent_parallel`` must
    divide ``world`` and ``n_latents`` (equal shards of latents), the ``world / latent_parallel``
    data-parallel ranks must divide ``batch_size``, and only ``arch="topk"`` trains on several."""
    L = latent_parallel
    if isinstance(L, bool) or not isinstance(L, int) or L < 1 or world % L:
        raise ValueError(f"latent_parallel={L!r} must be a positive divisor of the world size {world}; "
                         f"choose one of {[i for i in range(1, world + 1) if world % i == 0]}.")
    if world > 1 and arch != "topk":
        raise ValueError(f"Training on {world} processes supports arch='topk' only, got arch={arch!r}; "
                         "train other archs in one process.")
    if n_latents is not None and n_latents % L:
        raise ValueError(f"n_latents={n_latents} does not split into latent_parallel={L} equal shards; "
                         f"choose a latent_parallel that divides it.")
    if batch_size is not None and batch_size % (world // L):
        raise ValueError(f"batch_size={batch_size} does not split over {world // L} data-parallel ranks; "
                         f"choose a batch_size divisible by {world // L}.")


def init_grid(latent_parallel: int = 1, device: str | torch.device = "cpu") -> Grid:
    """Join (or start) the process group and split it into data and latent groups.

    Under torchrun the group comes from the environment; a plain process starts a world of one.
    A group started here follows ``device``: NCCL with one GPU per rank (:func:`rank_device`) for
    a CUDA device, gloo on the CPU otherwise, and it stays for later calls until the interpreter
    exits, which destroys it (:func:`_destroy_at_exit`); a group the caller started keeps its
    backend, and the ranks of an NCCL group take their GPUs.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not dist.is_initialized():
        device = rank_device(device, local_rank)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)  # no port to pick
        atexit.register(_destroy_at_exit)
    else:
        device = rank_device("cuda" if dist.get_backend() == "nccl" else "cpu", local_rank)
    world, rank = dist.get_world_size(), dist.get_rank()
    L = latent_parallel
    check_split(world, L)
    D = world // L
    # every rank must create every group, in the same order
    latent_groups = [dist.new_group(list(range(d * L, (d + 1) * L))) for d in range(D)] if L > 1 else None
    data_groups = [dist.new_group(list(range(l, world, L))) for l in range(L)] if D > 1 else None
    d, l = divmod(rank, L)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Grid(rank, d, D, l, L, data_groups[l] if data_groups else None, latent_groups[d] if latent_groups else None, device)


def all_reduce(t: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Sum ``t`` in place over ``group`` (nothing to do for a one-rank group)."""
    if group is not None:
        dist.all_reduce(t, group=group)
    return t


class _SumOverShards(torch.autograd.Function):
    """Forward: sum the shards' partial results. Backward: identity, because every shard
    computes the same loss from the summed result (Megatron's "reduce from model parallel")."""

    @staticmethod
    def forward(ctx, partial: Tensor, group) -> Tensor:
        return all_reduce(partial.clone(), group)

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
        return all_reduce(grad.clone(), ctx.group), None


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
        mean = all_reduce(x.sum(0), grid.data_group) / batch_tokens
        return all_reduce((x - mean).pow(2).sum(), grid.data_group).clamp_min(1e-12)


@chained_row_gradients()  # the main code's and AuxK's row gradients add into one tensor per weight
def sharded_forward(shard: TopKSAE, x: Tensor, dead: Tensor | None, cfg: TrainConfig, grid: Grid) -> ForwardOutput:
    """``TopKSAE.train_forward`` (arch ``topk``) with latents sharded over the latent group.

    Args:
        shard: this rank's rows (``n_latents = n/L``) plus the replicated ``b_pre``.
        x: ``(B/D, d_in)`` this rank's slice of the global batch of ``cfg.batch_size`` rows.
        dead: ``(n/L,)`` bool, this shard's dead latents (``None``: no AuxK).
    Returns:
        ``loss`` is this rank's part (summed over the data group it is the one-process loss);
        ``nmse``, ``auxk_loss`` and ``l0`` are the global batch's, from one small all-reduce.
        ``latents`` are this shard's (value 0 where another shard owns the chosen latent).
    Raises:
        FloatingPointError on every rank if the loss is not finite on any of them.
    """
    batch_tokens = cfg.batch_size
    n_dead = int(all_reduce(dead.sum(), grid.latent_group)) if dead is not None else 0
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
    if n_dead > 0:
        _, _, aux_hat = code(pre.masked_fill(~dead, float("-inf")), min(cfg.k_aux, n_dead))
        residual = (x - x_hat).detach()
        auxk_error, auxk_scale = (residual - aux_hat).pow(2).sum(), _centred_sumsq(residual, grid, batch_tokens)
        loss = loss + cfg.auxk_coef * auxk_error / auxk_scale
    # one small all-reduce: global errors (counted once per data rank), L0 and a finiteness flag
    once = float(grid.latent_rank == 0)
    stats = torch.stack([error * once, auxk_error * once, (values > 0).sum().to(x.dtype),
                         (~torch.isfinite(loss)).to(x.dtype)]).detach()
    dist.all_reduce(stats)
    error, auxk_error, active, bad = stats.unbind()
    if bool(bad):
        raise FloatingPointError("Loss is not finite")
    zero = x.new_zeros(())
    auxk = auxk_error / auxk_scale if n_dead > 0 else zero
    return ForwardOutput(x_hat, Latents(values, indices, shard.n_latents), loss, error / scale, auxk, zero, zero,
                         active / batch_tokens)


# ---- the optimiser step ---------------------------------------------------------------------


def clip_to_norm(parameters, grad_clip: float, norm: Tensor) -> None:
    """Scale the gradients as ``clip_grad_norm_`` does, given their total ``norm``: by
    ``grad_clip / (norm + 1e-6)`` where that is below 1. Where it is not, no pass over them
    (``clip_grad_norm_`` multiplies every gradient by 1)."""
    if bool(norm + 1e-6 > grad_clip):
        nn.utils.clip_grads_with_norm_(parameters, grad_clip, norm)


@torch.no_grad()
def sync_and_clip(shard: TopKSAE, grid: Grid, grad_clip: float | None) -> None:
    """Sum gradients over the data group, project decoder gradients, clip by the global norm.

    The norm is ``torch.nn.utils.clip_grad_norm_``'s over the whole SAE; with latent shards, the
    latent rows' squares summed over shards plus the replicated ``b_pre`` once.
    """
    for p in shard.parameters():
        if p.grad is not None:
            all_reduce(p.grad, grid.data_group)
    shard.remove_parallel_grads()
    if grad_clip:
        if grid.latent_group is None:
            norm = nn.utils.get_total_norm([p.grad for p in shard.parameters() if p.grad is not None])
        else:
            rows = torch.stack([getattr(shard, name).grad.pow(2).sum() for name in LATENT_PARAMS]).sum()
            norm = (all_reduce(rows, grid.latent_group) + shard.b_pre.grad.pow(2).sum()).sqrt()
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
            x = x[self.grid.data_rank * rows : (self.grid.data_rank + 1) * rows]
            # asynchronous only from the CPU: a copy off a GPU would be read before it lands
            yield x.to(self.grid.device, non_blocking=x.device.type == "cpu")


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
