"""Sparse ops for a k-sparse autoencoder, each a custom autograd function with its backward.

A TopK SAE touches only ``k`` of its ``n_latents`` rows per token, so neither the decoder nor
the encoder's backward pass needs a dense ``(batch, n_latents)`` matrix:

- ``sparse_decode(values, indices, W)``: ``out[b] = sum_j values[b, j] * W[indices[b, j]]``.
- ``gather_preacts(x, W, b, indices, pre, b_pre)``: ``pre[b, indices[b, j]]`` where
  ``pre = (x - b_pre) W^T + b`` was already computed without gradient (to choose the indices);
  the gradient flows to ``x``, ``W``, ``b`` and ``b_pre`` through the chosen entries only. ``pre`` may be
  bfloat16 (the reduced-precision encoder): the values are then bf16-rounded, while every
  gradient is computed in ``x``'s dtype from the full-precision weights.
- ``topk_indices(pre, k)``: the top-k of each row through group maxima (faster than
  ``torch.topk`` on long rows).
- ``dense_rows_decode(x, W_enc, b_enc, W_dec, b_pre, rows, chosen, pre_rows)``: ``gather_preacts``,
  ReLU and ``sparse_decode`` in one, with dense GEMMs over a few rows: for codes that keep a large
  share of those rows (AuxK with few dead latents).
- ``fast_bf16(device)``: whether a bf16 matmul is much faster than fp32 there (AMX, AVX512_BF16, CUDA).

Both backwards write weight gradients only into the rows that were touched (a CSR sparse matmul
whose pattern, a ``LatentPattern``, the two share when they run over the same indices). Rows that
keep many of few latents (AuxK) run every product in cache-sized blocks of tokens or latents.
Within ``chained_row_gradients()`` the ops over one weight (the main code's and AuxK's) add their
row gradients into one tensor instead of each returning its own for autograd to sum.
Shapes: ``values, indices (B, m)`` (``m`` = active latents per row), ``W (n_latents, d)``,
``x (B, d)``; leading dimensions beyond one batch axis are flattened and restored.
These are the seams where a GPU kernel (Triton) can replace the torch reference.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from .files import cpu_info


# Rows that keep many latents (AuxK: 288 of the dead latents per token) run the sparse products
# in cache-sized blocks: from BLOCK_MIN_PER_ROW latents per row, when each row keeps at least
# 1/BLOCK_MAX_SPREAD of the latents the batch touches. Row gradients then take blocks of
# BLOCK_TOKENS tokens (their vectors stay in cache), the decode and its value gradients blocks of
# BLOCK_LATENTS touched latents (their weight rows stay in cache). 2 idle cores, B 4096, 288 of 4608
# dead latents per token, d 576: row gradient 54 -> 34 ms, decode 62 -> 26, value gradients 98 -> 47.
BLOCK_MIN_PER_ROW = 128
BLOCK_MAX_SPREAD = 32
BLOCK_TOKENS = 512
BLOCK_LATENTS = 512


class LatentPattern:
    """The entries of ``indices (B, m)`` grouped for the sparse products over them.

    ``csr()`` groups them by latent: the CSR pattern of the ``(n_rows, B)`` matrix whose row ``i``
    lists the tokens that chose latent ``i`` (the row gradients). Every row gradient over the
    same indices (the decoder's and the encoder's) has this pattern, so ``_SparseDecode`` and
    ``_GatherPreacts`` share one: its sort of the ``B * m`` ids runs once, on first use (in the
    backward; an inference-only forward never pays for it).

    ``blocked`` (rows keeping many of few latents, see ``BLOCK_MIN_PER_ROW``; decided from the
    indices): ``csr()`` comes in blocks of tokens, and ``by_token()`` gives the ``(B, n_rows)``
    pattern in blocks of latents for the decode and its value gradients.
    """

    def __init__(self, indices: Tensor, n_rows: int):
        self.indices, self.n_rows = indices.reshape(-1, indices.shape[-1]), n_rows
        m = self.indices.shape[-1]
        self._touched: Tensor | None = None
        self.blocked = m >= BLOCK_MIN_PER_ROW and m * BLOCK_MAX_SPREAD >= len(self.touched())
        self._csr: list[tuple[slice, Tensor, Tensor, Tensor]] | None = None
        self._by_token: list[tuple[slice, Tensor, Tensor, Tensor]] | None = None

    def touched(self) -> Tensor:
        """The ids of the latents that occur in ``indices``, increasing."""
        if self._touched is None:
            self._touched = torch.bincount(self.indices.flatten(), minlength=self.n_rows).nonzero().squeeze(-1)
        return self._touched

    def csr(self) -> list[tuple[slice, Tensor, Tensor, Tensor]]:
        """Per block of tokens (one block unless ``blocked``): the tokens (a slice of the batch),
        ``crow (n_rows + 1,)`` and ``tokens`` (int32, from the block's start) of the block's
        ``(n_rows, block)`` CSR pattern, and ``order``: the flat positions of its entries in
        ``indices``."""
        if self._csr is None:
            B, m = self.indices.shape
            T = max(BLOCK_TOKENS if self.blocked else B, 1)
            self._csr = []
            for start in range(0, max(B, 1), T):
                ids = self.indices[start : start + T].flatten()
                order = _stable_order(ids, self.n_rows)
                crow = torch.zeros(self.n_rows + 1, dtype=torch.int32, device=ids.device)
                crow[1:] = torch.bincount(ids, minlength=self.n_rows).cumsum(0)
                tokens = order.div(m, rounding_mode="floor").to(torch.int32)
                self._csr.append((slice(start, min(start + T, B)), crow, tokens, order + start * m))
        return self._csr

    def by_token(self) -> list[tuple[slice, Tensor, Tensor, Tensor]]:
        """Per block of latents (``blocked`` patterns only): the latents (a slice of the rows, with
        ``BLOCK_LATENTS`` touched ones), ``crow (B + 1,)`` and ``cols`` (int32, from the slice's
        start) of the block's ``(B, block)`` CSR pattern, and ``order`` as in ``csr``."""
        if self._by_token is None:
            B, m = self.indices.shape
            touched = self.touched()
            n_blocks = -(-len(touched) // BLOCK_LATENTS)
            block_of = torch.zeros(self.n_rows, dtype=torch.long, device=touched.device)
            block_of[touched] = torch.arange(len(touched), device=touched.device).div(BLOCK_LATENTS, rounding_mode="floor")
            ids, positions = _columns_sorted(self.indices)
            block = block_of[ids]  # (B, m)
            # the entries are in token order, so a stable sort by block alone orders them by (block, token)
            order = _stable_order(block.flatten(), n_blocks)
            crow = torch.zeros(n_blocks * B + 1, dtype=torch.int32, device=block.device)
            rows = block * B + torch.arange(B, device=block.device)[:, None]
            crow[1:] = torch.bincount(rows.flatten(), minlength=n_blocks * B).cumsum(0)
            cols = ids.flatten()[order]
            order = order if positions is None else positions[order]
            starts = touched[::BLOCK_LATENTS].tolist()  # each block spans the ids from its first touched one
            ends = starts[1:] + [int(touched[-1]) + 1] if starts else []
            self._by_token = []
            for b, (lo_id, hi_id) in enumerate(zip(starts, ends)):
                c = crow[b * B : (b + 1) * B + 1]
                lo, hi = int(c[0]), int(c[-1])
                self._by_token.append((slice(lo_id, hi_id), c - lo, (cols[lo:hi] - lo_id).to(torch.int32), order[lo:hi]))
        return self._by_token


def _sorts_columns(indices: Tensor) -> bool:
    """Whether the CSR patterns over ``indices`` list each row's columns in increasing order.
    cuSPARSE assumes they do (as PyTorch's CSR invariant states); the CPU kernels take any order,
    so the CPU skips the sort (2 ms a step at B 4096, m 32 on 2 cores)."""
    return indices.is_cuda


def _columns_sorted(indices: Tensor) -> tuple[Tensor, Tensor | None]:
    """``indices (B, m)`` with each row in increasing order where ``_sorts_columns``, and the flat
    positions ``(B * m,)`` in ``indices`` of its entries (None where ``indices`` is returned as it is)."""
    if not _sorts_columns(indices):
        return indices, None
    ids, perm = indices.sort(dim=-1)
    return ids, (perm + torch.arange(len(perm), device=perm.device)[:, None] * perm.shape[-1]).flatten()


def _stable_order(keys: Tensor, bound: int) -> Tensor:
    """The stable sort order of ``keys`` (integers in ``[0, bound)``), sorted in the narrowest
    integer dtype that holds them: radix sort passes scale with its width (1.2M keys on 2 cores:
    16 ms as int32, 7 as int16, 4 as uint8)."""
    dtype = torch.uint8 if bound <= 256 else torch.int16 if bound <= 2**15 else torch.int32 if bound <= 2**31 else keys.dtype
    return keys.to(dtype).sort(stable=True).indices


# the row-gradient memories of each weight (by id, dropped when the weight is), reused across steps
_ROW_GRAD_MEMORY: dict[int, list[Tensor]] = {}
# memories kept per weight: one per step inside chained_row_gradients (TopKSAE.train_forward), two when
# two unchained ops over one weight each return a gradient (which autograd then sums)
ROW_GRAD_MEMORIES = 2


def _row_grad_memory(W: Tensor, dtype: torch.dtype) -> Tensor:
    """An uninitialised ``(n_rows, d)`` tensor for ``W``'s gradient, in the memory of an earlier
    step's gradient when nothing refers to that memory any more.

    A fresh ``(n_rows, d)`` tensor costs the page faults of its new mapping: the sparse product
    that fills it took twice as long (n 18432, d 576: 20 ms against 10). A memory is handed out
    again only when its storage has no user but the kept tensor (torch's count of storage users,
    so a ``.grad`` still held, or any view or ``detach()`` of it, keeps it taken). Up to
    ``ROW_GRAD_MEMORIES`` are kept per weight (two ops over one weight outside
    ``chained_row_gradients``).
    """
    base = W._base  # a chained op's W is an alias of the weight: keep the memory with the weight
    if base is not None and base.shape == W.shape and base.data_ptr() == W.data_ptr():
        W = base
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:  # no way to tell whether a memory is free: always a fresh one
        return torch.empty(W.shape, dtype=dtype, device=W.device)
    if id(W) not in _ROW_GRAD_MEMORY:
        weakref.finalize(W, _ROW_GRAD_MEMORY.pop, id(W), None)
    kept = _ROW_GRAD_MEMORY.setdefault(id(W), [])
    kept[:] = [t for t in kept if t.dtype == dtype and t.shape == W.shape and t.device == W.device]
    for memory in kept:
        if use_count(memory.untyped_storage()._cdata) <= 2:  # the kept tensor and this call's storage object
            return memory.view(W.shape)  # as below
    memory = torch.empty(W.shape, dtype=dtype, device=W.device)
    if len(kept) < ROW_GRAD_MEMORIES:
        kept.append(memory)
    return memory.view(W.shape)  # a tensor of its own, which autograd can make the .grad without a copy


def release_row_gradients(W: Tensor) -> None:
    """Forget the row-gradient memories kept for ``W``: freed once nothing else holds them."""
    _ROW_GRAD_MEMORY.pop(id(W), None)


# the weights' latest aliases while chained_row_gradients() is open (by id of the weight), per thread
_CHAIN = threading.local()


@contextlib.contextmanager
def chained_row_gradients():
    """Within it, the sparse ops over one weight form a chain, so that its row gradients add into one
    tensor (``TopKSAE.train_forward`` opens it: its main code and AuxK's use both weights).

    Each op takes the previous op's alias of the weight as its input in place of the weight and
    gives an alias of its own (same data; the gradient flows back through it). In the backward
    the later ops run first, and each adds its rows into the gradient that reaches it through
    its alias, instead of returning a gradient of its own that autograd would sum out of place:
    a fresh ``(n_latents, d)`` tensor per weight and step (its page faults and the sum cost about
    30 ms with AuxK at 25% dead, n 18432, 2 cores). A backward over only part of the ops is still
    exact; ops without gradient (``torch.no_grad``) stay out of the chain.
    """
    outer = getattr(_CHAIN, "links", None)
    _CHAIN.links = {}
    try:
        yield
    finally:
        _CHAIN.links = outer


def _apply_chained(function, args: list, weights: tuple[int, ...], n_out: int = 1):
    """``function.apply(*args, chained)``; inside ``chained_row_gradients`` the ``args`` at the
    positions ``weights`` are replaced by their latest aliases and the function's extra outputs
    (aliases of them, in that order, after its ``n_out`` outputs) become the latest."""
    links = getattr(_CHAIN, "links", None)
    if links is None or not torch.is_grad_enabled():  # an alias made without gradient would cut the chain
        return function.apply(*args, False)
    keys = [id(args[i]) for i in weights]
    for i, key in zip(weights, keys):
        args[i] = links.get(key, args[i])
    outs = function.apply(*args, True)
    links.update(zip(keys, outs[n_out:]))
    return outs[0] if n_out == 1 else outs[:n_out]


def _csr(crow: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)


def _rows_outer_add(pattern: LatentPattern, weights: Tensor, vectors: Tensor, W: Tensor, later: Tensor | None) -> Tensor:
    """``W``'s gradient ``G (n_rows, d)`` with ``G[indices[b, j]] += weights[b, j] * vectors[b]``, added
    into ``later`` (the gradient of the chained ops after this one, see ``chained_row_gradients``)
    or else written into ``_row_grad_memory``.

    A sparse ``(n_rows, B)`` CSR matrix (``pattern``, in blocks of tokens when it is ``blocked``)
    times ``vectors (B, d)``: it adds into the touched rows without materialising the
    ``(B * m, d)`` outer products that ``index_add`` would need. On 2 idle cores (n 18432, B 4096)
    CSR beat COO 1.4x at m = 32 and 2.4x at m = 288. ``addmm`` into an uninitialised output with
    ``beta=0`` (which ignores its contents) skips the zero-fill that ``S @ vectors`` adds, and
    passing that output as ``out`` too skips addmm's copy of it: 7 ms against 36 ms at m = 32.
    """
    weights = weights.flatten().to(vectors.dtype)
    out = later if later is not None else _row_grad_memory(W, vectors.dtype)
    for i, (tokens, crow, cols, order) in enumerate(pattern.csr()):
        S = _csr(crow, cols, weights[order], (pattern.n_rows, tokens.stop - tokens.start))
        torch.addmm(out, S, vectors[tokens], beta=1 if later is not None or i else 0, out=out)
    return out


def _rows_dot(indices: Tensor, W: Tensor, vectors: Tensor, pattern: LatentPattern | None = None) -> Tensor:
    """``(B, m)`` with ``out[b, j] = W[indices[b, j]] . vectors[b]``.

    A sampled dense-dense matmul (only the ``B * m`` chosen entries of ``vectors @ W^T``): it
    never builds the ``(B, m, d)`` gathered rows, which on CPU cost more than the whole step.
    A ``blocked`` pattern runs it per block of latents.
    """
    B, m = indices.shape
    W, vectors = W.to(vectors.dtype), vectors.contiguous()
    zeros = vectors.new_zeros(B * m)  # the pattern's values, which beta=0 ignores
    if pattern is not None and pattern.blocked:
        out = vectors.new_empty(B * m)
        for latents, crow, cols, order in pattern.by_token():
            S = _csr(crow, cols, zeros[: len(order)], (B, latents.stop - latents.start))
            out[order] = torch.sparse.sampled_addmm(S, vectors, W[latents].T, beta=0.0).values()
        return out.view(B, m)
    ids, positions = _columns_sorted(indices)
    S = _csr(torch.arange(0, B * m + 1, m, device=indices.device), ids.flatten(), zeros, (B, W.shape[0]))
    dots = torch.sparse.sampled_addmm(S, vectors, W.T, beta=0.0).values()
    if positions is not None:
        dots = torch.empty_like(dots).index_copy_(0, positions, dots)
    return dots.view(B, m)


def _bag_sum(values: Tensor, indices: Tensor, W: Tensor, pattern: LatentPattern | None = None) -> Tensor:
    """``(B, d)``: weighted sum of the rows ``W[indices[b]]`` with weights ``values[b]``; a ``blocked``
    pattern sums per block of latents (a CSR product each)."""
    values = values.to(W.dtype)
    if pattern is not None and pattern.blocked:
        flat, out = values.flatten(), W.new_zeros(len(indices), W.shape[1])
        for latents, crow, cols, order in pattern.by_token():
            S = _csr(crow, cols, flat[order], (len(indices), latents.stop - latents.start))
            torch.addmm(out, S, W[latents], out=out)
        return out
    return F.embedding_bag(indices, W, per_sample_weights=values, mode="sum")


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, W: Tensor, pattern: LatentPattern | None, chained: bool):
        ctx.save_for_backward(values, indices, W)
        ctx.pattern = pattern
        ctx.set_materialize_grads(False)  # an unused output's gradient is None, not a tensor of zeros
        out = _bag_sum(values, indices, W, pattern)
        return (out, W) if chained else out

    @staticmethod
    def backward(ctx, grad_out: Tensor | None, grad_later: Tensor | None = None):
        values, indices, W = ctx.saved_tensors
        grad_values, grad_W = None, grad_later
        if grad_out is not None and ctx.needs_input_grad[0]:
            # d out[b] / d values[b, j] = W[indices[b, j]]
            grad_values = _rows_dot(indices, W, grad_out, ctx.pattern).to(values.dtype)
        if grad_out is not None and ctx.needs_input_grad[2]:
            grad_W = _rows_outer_add(ctx.pattern or LatentPattern(indices, W.shape[0]), values, grad_out, W, grad_later)
        return grad_values, None, grad_W, None, None


class _GatherPreacts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, W: Tensor, b: Tensor, indices: Tensor, chosen: Tensor, b_pre: Tensor | None,
                pattern: LatentPattern | None, chained: bool):
        ctx.save_for_backward(x, W, indices, b_pre)
        ctx.pattern = pattern
        ctx.set_materialize_grads(False)
        values = chosen.to(x.dtype)
        return (values, W) if chained else values

    @staticmethod
    def backward(ctx, grad_values: Tensor | None, grad_later: Tensor | None = None):
        if grad_values is None:  # only the chained ops after this one reached it
            return None, grad_later, None, None, None, None, None, None
        x, W, indices, b_pre = ctx.saved_tensors
        grad_x = grad_b = grad_b_pre = None
        grad_W = grad_later
        if ctx.needs_input_grad[0]:
            # the encoder's input gradient is a sparse decode through the encoder rows
            grad_x = _bag_sum(grad_values, indices, W, ctx.pattern)
        if ctx.needs_input_grad[1]:
            pattern = ctx.pattern or LatentPattern(indices, W.shape[0])
            grad_W = _rows_outer_add(pattern, grad_values, x if b_pre is None else x - b_pre, W, grad_later)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[5]:
            grad_b = grad_values.new_zeros(W.shape[0]).index_add_(0, indices.flatten(), grad_values.flatten())
        if ctx.needs_input_grad[5]:
            # d pre[b, i] / d b_pre = -W[i]: summed over tokens that is -grad_b @ W, a (n,) x (n, d)
            # product instead of the (B, d) sparse decode the input gradient costs
            grad_b_pre = -(grad_b @ W.to(grad_b.dtype))
        return grad_x, grad_W, grad_b if ctx.needs_input_grad[2] else None, None, None, grad_b_pre, None, None


class _DenseRowsDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_pre: Tensor, rows: Tensor,
                chosen: Tensor, pre_rows: Tensor, chained: bool):
        z = x.new_zeros(len(x), len(rows)).scatter_(-1, chosen, F.relu(pre_rows.gather(-1, chosen)).to(x.dtype))
        W_d = W_dec[rows]
        ctx.save_for_backward(x, W_enc, W_dec, b_pre, rows, z, W_d)
        ctx.n_rows = len(b_enc)
        ctx.set_materialize_grads(False)
        out = z @ W_d
        return (out, W_enc, W_dec) if chained else out

    @staticmethod
    def backward(ctx, grad_out: Tensor | None, later_enc: Tensor | None = None, later_dec: Tensor | None = None):
        x, W_enc, W_dec, b_pre, rows, z, W_d = ctx.saved_tensors
        grads: list[Tensor | None] = [None] * 9
        grads[1], grads[3] = later_enc, later_dec
        if grad_out is None:
            return tuple(grads)
        dz = (grad_out @ W_d.T).mul_(z > 0)  # z > 0: chosen and past the ReLU
        W_e = W_enc[rows] if ctx.needs_input_grad[0] or ctx.needs_input_grad[4] else None
        if ctx.needs_input_grad[0]:
            grads[0] = dz @ W_e
        if ctx.needs_input_grad[1]:
            grads[1] = _dense_rows_add(W_enc, rows, dz.T @ (x - b_pre), later_enc)
        db = dz.sum(0)
        if ctx.needs_input_grad[2]:
            grads[2] = x.new_zeros(ctx.n_rows).index_copy_(0, rows, db)
        if ctx.needs_input_grad[3]:
            grads[3] = _dense_rows_add(W_dec, rows, z.T @ grad_out, later_dec)
        if ctx.needs_input_grad[4]:
            grads[4] = -(db @ W_e)
        return tuple(grads)


def _dense_rows_add(W: Tensor, rows: Tensor, grad_rows: Tensor, later: Tensor | None) -> Tensor:
    """``W``'s gradient with ``grad_rows (r, d)`` in the (distinct) ``rows``, added to ``later``'s."""
    if later is None:
        return _row_grad_memory(W, grad_rows.dtype).zero_().index_copy_(0, rows, grad_rows)
    return later.index_add_(0, rows, grad_rows)


def dense_rows_decode(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_pre: Tensor, rows: Tensor,
                      chosen: Tensor, pre_rows: Tensor) -> Tensor:
    """``(B, d)``: ``sum_j ReLU(pre_rows[b, chosen[b, j]]) W_dec[rows[chosen[b, j]]]``, with dense GEMMs
    over the ``r`` rows: the decode of a code that keeps many of few latents (AuxK with few dead).

    Args:
        x: ``(B, d)`` encoder input; ``W_enc, W_dec (n_latents, d)``, ``b_enc (n_latents,)``,
            ``b_pre (d,)``: the SAE's parameters, which get the gradients of
            ``pre = (x - b_pre) W_enc^T + b_enc`` through the chosen entries.
        rows: ``(r,)`` the latents of the code's columns.
        chosen: ``(B, m)`` columns kept per token (distinct within a row).
        pre_rows: ``(B, r)`` those latents' pre-activations, computed without gradient (a slice of
            ``TopKSAE._preacts``, fp32 or bf16 like ``gather_preacts``'s ``pre``).

    The backward takes three ``(B, r, d)`` GEMMs (the value, decoder and encoder gradients) and
    writes the row gradients into kept memory; autograd through ``F.linear`` on gathered rows took
    six GEMMs and two zero-filled ``(n_latents, d)`` index gradients.
    """
    return _apply_chained(_DenseRowsDecode, [x, W_enc, b_enc, W_dec, b_pre, rows, chosen, pre_rows], (1, 3))


# tokens per block of the native AuxK kernels: the block's gradient and input rows (2 * 4 * d * T
# bytes) stay in L2 while each latent's rows stay in L1
NATIVE_BLOCK_TOKENS = 256


class _SparseRowsDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_pre: Tensor, rows: Tensor,
                pre_rows: Tensor, k: int, lib, chained: bool):
        B, r = pre_rows.shape
        n_threads, T = torch.get_num_threads(), NATIVE_BLOCK_TOKENS
        ctx.block_tokens = T  # the backward groups tokens as the forward did
        n_blocks = -(-B // T)
        chosen, values = x.new_empty(B, k, dtype=torch.long), x.new_empty(B, k)  # fp32 like x
        lib.saelib_select(pre_rows.data_ptr(), pre_rows.dtype == torch.bfloat16, B, pre_rows.stride(0), r, k,
                          chosen.data_ptr(), values.data_ptr(), n_threads)
        group = (x.new_empty(n_blocks * (r + 1), dtype=torch.int32), x.new_empty(B * k, dtype=torch.int32),
                 x.new_empty(n_blocks + 1, dtype=torch.long))
        lib.saelib_group(chosen.data_ptr(), values.data_ptr(), B, k, r, T, *(t.data_ptr() for t in group), n_threads)
        rows = rows.contiguous()
        out = x.new_empty(B, W_dec.shape[1])
        lib.saelib_decode(values.data_ptr(), W_dec.data_ptr(), rows.data_ptr(), B, k, r, T, out.shape[1],
                          *(t.data_ptr() for t in group), out.data_ptr(), n_threads)
        ctx.save_for_backward(x, W_enc, W_dec, b_pre, rows, values, *group)
        ctx.lib = lib
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(chosen)
        return (out, chosen, W_enc, W_dec) if chained else (out, chosen)

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernels' gradients have no graph of their own
    def backward(ctx, grad_out: Tensor | None, _chosen=None, later_enc: Tensor | None = None,
                 later_dec: Tensor | None = None):
        x, W_enc, W_dec, b_pre, rows, values, *group = ctx.saved_tensors
        grads: list[Tensor | None] = [None] * 10
        grads[1], grads[3] = later_enc, later_dec
        if grad_out is None:
            return tuple(grads)
        (B, k), d, n_threads = values.shape, x.shape[1], torch.get_num_threads()
        g, x_c = grad_out.contiguous().to(x.dtype), (x - b_pre).contiguous()
        dz, gb = torch.zeros_like(values), x.new_zeros(len(W_enc))
        G_enc = _rows_target(later_enc, W_enc, ctx.needs_input_grad[1])
        G_dec = _rows_target(later_dec, W_dec, ctx.needs_input_grad[3])
        ctx.lib.saelib_backward(values.data_ptr(), W_dec.data_ptr(), g.data_ptr(), x_c.data_ptr(), rows.data_ptr(), B, k,
                                len(rows), ctx.block_tokens, d, *(t.data_ptr() for t in group), dz.data_ptr(),
                                G_dec.data_ptr(), G_enc.data_ptr(), gb.data_ptr(), n_threads)
        if ctx.needs_input_grad[0]:  # the input gradient: dz decoded through the encoder rows
            grads[0] = x.new_empty(B, d)
            ctx.lib.saelib_decode(dz.data_ptr(), W_enc.data_ptr(), rows.data_ptr(), B, k, len(rows), ctx.block_tokens,
                                  d, *(t.data_ptr() for t in group), grads[0].data_ptr(), n_threads)
        grads[1] = G_enc if ctx.needs_input_grad[1] else later_enc
        grads[2] = gb if ctx.needs_input_grad[2] else None
        grads[3] = G_dec if ctx.needs_input_grad[3] else later_dec
        if ctx.needs_input_grad[4]:  # d pre[b, i] / d b_pre = -W_enc[i], summed over the dead rows
            grads[4] = -(gb[rows] @ W_enc[rows])
        return tuple(grads)


def _rows_target(later: Tensor | None, W: Tensor, needed: bool) -> Tensor:
    """The contiguous ``(n, d)`` tensor the kernel adds ``W``'s row gradients into: the later chained
    ops' gradient, else kept memory zeroed (a scratch tensor when ``W`` needs no gradient)."""
    if later is not None:
        return later.contiguous()  # the kernel writes rows through a pointer; a copy only if it is not
    return _row_grad_memory(W, W.dtype).zero_() if needed else torch.zeros_like(W)


def sparse_rows_decode(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_pre: Tensor, rows: Tensor,
                       pre_rows: Tensor, k: int) -> tuple[Tensor, Tensor] | None:
    """The decode of each token's top ``k`` of a few rows through the native kernels (``native.py``),
    or None where they do not apply (not a CPU, not fp32, not built: then use ``gather_preacts`` and
    ``sparse_decode``, the same maths).

    Returns ``(out, chosen)``: ``out (B, d) = sum_j ReLU(pre_rows[b, chosen[b, j]]) W_dec[rows[chosen[b, j]]]``
    and ``chosen (B, k)``, the kept columns of ``pre_rows`` (increasing; among equal values any).
    Arguments as in ``dense_rows_decode``, with ``pre_rows (B, r)`` a column slice of a row-major
    matrix and ``rows (r,)`` distinct int64 ids. The backward is one pass over the kept entries
    (value, decoder and encoder gradients; not differentiable again); the row gradients add into kept
    memory like the other ops' (``chained_row_gradients``). Shapes that do not fit one another are a
    ValueError, as the kernels read through raw pointers.
    """
    from . import native

    fp32 = all(t.dtype == torch.float32 for t in (x, W_enc, b_enc, W_dec, b_pre))
    if x.device.type != "cpu" or not fp32 or pre_rows.dtype not in (torch.float32, torch.bfloat16) \
            or not 1 <= k <= pre_rows.shape[-1]:  # a bad k: the torch ops name it
        return None
    _check_rows_shapes(x, W_enc, b_enc, W_dec, b_pre, rows, pre_rows)
    lib = native.library()
    if lib is None:
        native.warn_fallback()
        return None
    if pre_rows.stride(-1) != 1:
        pre_rows = pre_rows.contiguous()
    x, W_enc, W_dec = (t.contiguous() for t in (x, W_enc, W_dec))  # no copy: parameters and batches are
    out, chosen = _apply_chained(_SparseRowsDecode, [x, W_enc, b_enc, W_dec, b_pre, rows, pre_rows, k, lib], (1, 3),
                                 n_out=2)
    return out, chosen


def _check_rows_shapes(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_pre: Tensor, rows: Tensor,
                       pre_rows: Tensor) -> None:
    (n, d), (B, r) = W_dec.shape, pre_rows.shape
    wanted = {"x": (x.shape, (B, d)), "W_enc": (W_enc.shape, (n, d)), "b_enc": (b_enc.shape, (n,)),
              "b_pre": (b_pre.shape, (d,)), "rows": (rows.shape, (r,))}
    for name, (shape, want) in wanted.items():
        if tuple(shape) != want:
            raise ValueError(f"sparse_rows_decode: {name} has shape {tuple(shape)}, but W_dec {(n, d)} and pre_rows "
                             f"{(B, r)} need {want}.")
    if rows.dtype != torch.int64:
        raise ValueError(f"sparse_rows_decode: rows must be int64 latent ids, got {rows.dtype}; pass rows.long().")
    if r and (int(rows.min()) < 0 or int(rows.max()) >= n):  # distinctness is the caller's (a sort per step)
        raise ValueError(f"sparse_rows_decode: rows must be latent ids in [0, {n}), got {int(rows.min())} to {int(rows.max())}.")


def fast_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether bf16 matmuls run much faster than fp32 on ``device``: a CUDA GPU with bf16 tensor
    cores (compute capability 8.0 or later: Ampere, Hopper...; older cards emulate bf16), or a
    CPU with AMX (``amx_bf16`` in ``/proc/cpuinfo``; measured about 4-6x the fp32 GEMM here) or
    AVX512_BF16 (``avx512_bf16``: a bf16 dot product per fp32 lane, twice fp32's multiply-adds).
    An AVX2 CPU converts bf16 in software: about 8x slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    return bool({"amx_bf16", "avx512_bf16"} & set(cpu_info().get("flags", "").split()))


# topk_indices: columns per group (the first that leaves enough groups), and the fewest groups per
# kept latent for which grouping pays (2 threads, B 4096, against torch.topk: k 32 in groups of 8,
# 1.4x at n 4608, 2.2x at n 18432, 2.6-2.9x at n 65536; AuxK's k 288 of 4608 in groups of 4, 1.15x)
TOPK_GROUPS = (8, 4)
TOPK_MIN_GROUPS_PER_K = 4


def topk_indices(pre: Tensor, k: int, sorted: bool = True, workspace=None) -> Tensor:
    """``(..., k)`` int64 ids of the ``k`` largest entries of each row of ``pre (..., n)``.

    Through group maxima: column ``j`` is in group ``j mod (n / g)`` (``g``: the first of
    ``TOPK_GROUPS`` that divides ``n`` into at least ``TOPK_MIN_GROUPS_PER_K * k`` groups), so the maxima of all groups
    are one vectorised pass over ``pre``; the top-k of a row lie in its ``k`` groups with the
    largest maxima (found the same way, recursively), and a top-k over those ``k * g`` candidates
    finds them. The kept values are exactly ``torch.topk``'s (among equal values the ids may
    differ). Rows too short for it to pay use ``torch.topk``. ``pre`` may be a column slice of a
    wider matrix (AuxK's dead columns). ``sorted``: ids in decreasing order of value.
    ``workspace(name, shape, dtype, device)``: memory for the ``(B, n / g)`` group maxima kept
    between calls (``TopKSAE._workspace``; fresh memory's page faults cost a third of the pass in
    fp32), or None.
    """
    n = pre.shape[-1]
    g = next((g for g in TOPK_GROUPS if n % g == 0 and n // g >= TOPK_MIN_GROUPS_PER_K * k), None)
    if g is None:
        return pre.topk(k, dim=-1, sorted=sorted).indices
    G, rows = n // g, pre.reshape(-1, n)
    maxima = workspace("group_maxima", (len(rows), G), pre.dtype, pre.device) if workspace else None
    groups = topk_indices(torch.amax(rows.view(len(rows), g, G), 1, out=maxima), k, sorted=False)  # (B, k)
    cols = (groups.unsqueeze(-1) + G * torch.arange(g, device=pre.device)).flatten(1)  # (B, k * g)
    top = rows.gather(-1, cols).topk(k, dim=-1, sorted=sorted).indices
    return cols.gather(-1, top).view(*pre.shape[:-1], k)


def sparse_decode(values: Tensor, indices: Tensor, W: Tensor, pattern: LatentPattern | None = None) -> Tensor:
    """``(..., d)``: ``sum_j values[..., j] * W[indices[..., j]]`` with a sparse backward.

    Args:
        values: ``(..., m)`` latent activations.
        indices: ``(..., m)`` int64 latent ids, distinct within a row.
        W: ``(n_latents, d)`` decoder rows.
        pattern: ``LatentPattern(indices, n_latents)`` shared with ``gather_preacts`` over the same
            indices (one sort for both row gradients), or None for one of its own.
    """
    lead = values.shape[:-1]
    out = _apply_chained(_SparseDecode, [values.reshape(-1, values.shape[-1]), indices.reshape(-1, indices.shape[-1]), W,
                                         pattern], (2,))
    return out.reshape(*lead, W.shape[-1])


def gather_preacts(x: Tensor, W: Tensor, b: Tensor, indices: Tensor, pre: Tensor, b_pre: Tensor | None = None,
                   pattern: LatentPattern | None = None, positions: Tensor | None = None) -> Tensor:
    """``(..., m)``: the chosen pre-activations ``pre[..., indices]`` with a sparse backward.

    Args:
        x: ``(..., d)`` encoder input.
        W: ``(n_latents, d)`` encoder rows; b: ``(n_latents,)`` encoder bias.
        indices: ``(..., m)`` chosen latent ids.
        pre: ``(..., n_latents)`` ``(x - b_pre) W^T + b`` computed without gradient, in ``x``'s
            dtype or in bfloat16 (the values then carry its rounding; the gradients do not).
        b_pre: ``(d,)`` subtracted from ``x`` before the encoder, or None when ``x`` is already
            centred. Its gradient costs one ``(n,) x (n, d)`` product; when only ``b_pre`` (and
            not ``x``) needs a gradient, no ``(B, d)`` input gradient is computed at all.
        pattern: as in ``sparse_decode``.
        positions: ``(..., m)`` the columns of ``pre`` that hold those latents, when its columns
            are the latents in another order (``TopKSAE._preacts(x, columns)``); None: ``indices``.
    """
    lead = indices.shape[:-1]
    chosen = pre.gather(-1, indices if positions is None else positions)
    flat = _apply_chained(_GatherPreacts, [x.reshape(-1, x.shape[-1]), W, b, indices.reshape(-1, indices.shape[-1]),
                                           chosen.reshape(-1, chosen.shape[-1]), b_pre, pattern], (1,))
    return flat.reshape(*lead, indices.shape[-1])
