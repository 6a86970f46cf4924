"""The sparse autoencoder of Gao et al. (2024) and the variants it is compared with.

Maths (rows of ``W_enc`` and ``W_dec`` are latents; shapes in brackets)::

    pre     = W_enc (x - b_pre) + b_enc            (B, n_latents)   W_enc (n_latents, d_in)
    z       = ReLU(select(pre))                    (B, k) values + indices
    x_hat   = W_dec^T z + b_pre                    (B, d_in)        W_dec (n_latents, d_in)

``select`` is the architecture (the ``arch`` config field, never inferred from a class name):

- ``"topk"``: keep the ``k`` largest pre-activations per token (the paper's TopK).
- ``"multitopk"``: trained with ``L(k) + L(4k) / 8`` so that any ``k' <= 4k`` decodes well
  (``encode(x, k=k')``), a progressive code.
- ``"batchtopk"``: keep the ``k * B`` largest over the whole batch while training; at
  inference (``sae.eval()``) a global threshold estimated during training (running average of
  the smallest kept activation) replaces it, so L0 varies per token.
- ``"relu"``: the ReLU + L1 baseline, ``z = ReLU(pre)``, penalty ``l1_coef * sum z``. The
  decoder rows stay unit norm (like every arch here), which makes ``sum z`` equal to the
  "L1 times decoder row norm" penalty: the optimiser cannot shrink ``z`` by growing rows, and
  all archs share one decoder constraint.

``encoder_dtype="bfloat16"`` computes ``pre`` (the step's one dense GEMM) in bf16: it chooses
the latents and gives their values (bf16-rounded); the decoder, the loss and every gradient stay
in fp32. It is an execution setting, not saved with the SAE (a loaded SAE encodes in fp32, as
does the SAE ``fit`` returns).

Any SAE can be given an inference-time JumpReLU-style threshold,
``sae.set_threshold_for_l0(x, l0)``: then ``z = pre * (pre > threshold)`` with a single global
threshold chosen to hit the target L0 on a sample.

The public methods speak the model's units: ``encode``, ``decode``, ``sae(x)`` and
``set_threshold_for_l0`` take and return RAW activations, as SAELens, sparsify and OpenAI's code
do. Inside, ``sae.normalizer`` (the dataset mean and scale, saved with the SAE) maps ``x`` to the
normalised scale the weights live on, ``x_n = (x - mean) / scale``, and maps ``x_hat`` back, so the
maths above reads ``x_n`` for ``x``. Latent values and the loss terms stay on the normalised scale
(the paper reports its metrics there). ``train_forward`` is the trainer's step on batches it has
already normalised.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, StringConstraints, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .files import (atomic_write, atomic_write_text, available_memory, check_schema, load_safetensors, read_json,
                    sha256_file, shorten, writable_folder)
from .kernels import (LatentPattern, chained_row_gradients, dense_rows_decode, gather_preacts, release_row_gradients,
                      sparse_decode, sparse_rows_decode, topk_indices)
from .normalize import Normalizer
from .version import __version__

ARCHS = ("topk", "multitopk", "batchtopk", "relu")
# dtype of the encoder's (B, n_latents) GEMM; bfloat16 pays only where fast_bf16() (AMX, AVX512_BF16, GPUs)
ENCODER_DTYPES = ("float32", "bfloat16")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "sae.safetensors"
# the key of the weights file's safetensors header that holds the config it was saved with
HEADER_CONFIG = "saelib_config"
# running-average weight of each batch's smallest kept activation (BatchTopK threshold)
BATCHTOPK_THRESHOLD_MOMENTUM = 0.99
# BatchTopK searches the batch's k * B largest among each token's top CANDIDATES * k
BATCHTOPK_CANDIDATES = 4
# AuxK switches from sparse kernels to dense GEMMs over the dead rows when it keeps at least this
# share of them: on CPU a GEMM does a multiply-add about 7x faster than a gather (measured, 2 cores)
AUXK_DENSE_SHARE = 0.125
# with the compiled kernels (native.py) the sparse path wins up to this share instead (n 18432, B 4096,
# 2 cores, 288 kept: 825 against 859 ms per step at a share of 0.17, 811 against 784 at 0.26)
AUXK_NATIVE_SHARE = 0.2
# rows per block of the decoder-gradient projection (a (ROW_BLOCK, d_in) temporary stays in cache)
ROW_BLOCK = 512


@dataclass(frozen=True)
class Latents:
    """Sparse latent code: ``values`` and ``indices`` of shape ``(..., m)`` each.

    ``m`` is ``k`` for TopK; for threshold, BatchTopK and ReLU codes ``m`` is the largest
    number of active latents in the batch and shorter rows are padded with ``value == 0``.
    Unpacks as ``values, indices = latents``.
    """

    values: Tensor
    indices: Tensor
    n_latents: int | None = None
    # the indices grouped by latent, shared by the encoder's and the decoder's row gradients
    pattern: LatentPattern | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.values.shape != self.indices.shape:
            raise ValueError(f"Latents values {tuple(self.values.shape)} and indices {tuple(self.indices.shape)} "
                             "must have the same shape.")

    def __iter__(self) -> Iterator[Tensor]:
        return iter((self.values, self.indices))

    def to_dense(self, n_latents: int | None = None) -> Tensor:
        """``(..., n_latents)`` dense code (differentiable in ``values``)."""
        n = n_latents or self.n_latents
        if n is None:
            raise ValueError("Latents.to_dense needs n_latents: pass it, or build Latents with n_latents set.")
        dense = self.values.new_zeros(*self.values.shape[:-1], n)
        return dense.scatter(-1, self.indices, self.values)

    def l0(self) -> Tensor:
        """Mean number of non-zero latents per token (a scalar)."""
        return (self.values > 0).sum(-1).float().mean()


class ForwardOutput(NamedTuple):
    """What ``sae(x)`` and ``sae.train_forward(x_n)`` return: ``x_hat`` on the scale of their input
    (raw, normalised), latent values and losses (scalars) on the normalised scale."""

    x_hat: Tensor  # (..., d_in)
    latents: Latents
    loss: Tensor  # nmse + multik_nmse / 8 + auxk_coef * auxk_loss + l1_coef * l1
    nmse: Tensor  # ||x - x_hat||^2 / ||x - mean(x)||^2 over the batch
    auxk_loss: Tensor  # NMSE of the dead latents' reconstruction of the residual (0 if none dead)
    multik_nmse: Tensor  # NMSE at 4k for multitopk, else 0
    l1: Tensor  # mean over tokens of sum z (the relu penalty), reported for every arch
    l0: Tensor  # mean active latents per token


def nmse(x: Tensor, x_hat: Tensor) -> Tensor:
    """Normalised MSE over a batch: ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``, in float32 at least
    (float16's sums of squares overflow within a few tokens of raw activations)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    x = x.reshape(-1, x.shape[-1]).to(dtype)
    return (x - x_hat.reshape(x.shape).to(dtype)).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)


def _check_size(name: str, value, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}; {hint}.")


def check_fits(d_in: int, n_latents: int) -> None:
    """Refuse, before allocating them, parameters larger than the memory available (the SAE is built
    on the CPU; a failed allocation of terabytes would be a traceback or the kernel's OOM killer)."""
    needed = 4 * (2 * n_latents * d_in + n_latents + 2 * d_in + 1)  # float32 W_enc, W_dec, b_enc, b_pre, mean
    available = available_memory()
    if available is not None and needed > available:
        raise ValueError(f"An SAE with n_latents={n_latents} and d_in={d_in} needs {needed:,} bytes ({needed / 1e9:,.1f} GB) "
                         f"for its float32 parameters but {available:,} bytes ({available / 1e9:,.1f} GB) of memory are "
                         f"available; choose a smaller n_latents.")


class TopKSAE(nn.Module):
    """A k-sparse autoencoder (and its variants, chosen by ``arch``).

    ``encode(x)``, ``decode(z)`` and ``sae(x)`` take and return the model's raw activations
    ``(..., d_in)``: ``normalizer`` is applied inside (and inverted on ``x_hat``). Latent values
    and the losses of ``sae(x)`` are on the normalised scale; ``train_forward`` takes batches
    already normalised (the trainer's).

    Args:
        d_in: activation width.
        n_latents: dictionary size ``n``.
        k: active latents per token (TopK/Multi-TopK/BatchTopK); ``None`` is allowed for
            ``arch="relu"``, whose L0 is set by ``l1_coef`` instead.
        arch: one of ``"topk"``, ``"multitopk"``, ``"batchtopk"``, ``"relu"``.
        tied_init: ``W_enc = W_dec`` at init (the paper); ``False`` draws an independent
            random encoder (the dead-latent ablation).
        normalizer: the map from raw activations to the SAE's scale (identity if ``None``).
        metadata: free-form provenance (model, layer, site, context length, corpus...),
            saved in ``config.json``.
        generator: seeds the random init.
        encoder_dtype: ``"float32"`` (default) or ``"bfloat16"``, the dtype of the
            pre-activation GEMM (see the module docstring); not saved.

    Parameters: ``W_enc (n_latents, d_in)``, ``b_enc (n_latents,)``, ``W_dec (n_latents,
    d_in)`` with unit-norm rows, ``b_pre (d_in,)``. Buffers: ``normalizer_mean (d_in,)``,
    ``threshold ()`` (NaN when unset).
    """

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        k: int | None,
        *,
        arch: str = "topk",
        tied_init: bool = True,
        normalizer: Normalizer | None = None,
        metadata: dict | None = None,
        generator: torch.Generator | None = None,
        encoder_dtype: str = "float32",
    ):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}.")
        _check_size("d_in", d_in, "pass the activation width")
        _check_size("n_latents", n_latents, "pass the dictionary size")
        if not (arch == "relu" and k is None):
            _check_size("k", k, "pass the number of active latents per token, 1 <= k <= n_latents")
            if k > n_latents:
                raise ValueError(f"k={k} is larger than n_latents={n_latents}; choose k <= n_latents.")
        if arch == "multitopk" and 4 * k > n_latents:
            raise ValueError(f"multitopk trains with 4k={4 * k} latents but n_latents={n_latents}; choose k <= n_latents / 4.")
        if not isinstance(tied_init, bool):
            raise ValueError(f"tied_init must be True or False, got {tied_init!r}.")
        if encoder_dtype not in ENCODER_DTYPES:
            raise ValueError(f"encoder_dtype must be one of {', '.join(ENCODER_DTYPES)}, got {encoder_dtype!r}.")
        if metadata is not None and not isinstance(metadata, dict):
            raise ValueError(f"metadata must be a dict (saved in {CONFIG_FILE}), got {type(metadata).__name__} {metadata!r}.")
        try:
            json.dumps(metadata, allow_nan=False)
        except (TypeError, ValueError) as error:  # refused now, not when the finished SAE is saved
            raise ValueError(f"metadata cannot be saved in {CONFIG_FILE} ({error}); keep to strings, finite numbers, "
                             "booleans, None, lists and dicts.") from None
        check_fits(d_in, n_latents)
        self.d_in, self.n_latents, self.k, self.arch = d_in, n_latents, k, arch
        self.encoder_dtype = encoder_dtype
        self.metadata = dict(metadata or {})
        normalizer = normalizer or Normalizer.identity(d_in)
        if normalizer.mean.shape != (d_in,):
            raise ValueError(f"normalizer.mean has shape {tuple(normalizer.mean.shape)}, expected ({d_in},) for d_in={d_in}.")
        self.normalizer_scale = float(normalizer.scale)
        if not (math.isfinite(self.normalizer_scale) and self.normalizer_scale > 0):
            raise ValueError(f"normalizer.scale must be a positive finite number, got {normalizer.scale!r}; "
                             "fit one with Normalizer.fit(x).")

        W_dec = torch.randn(n_latents, d_in, generator=generator)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        W_enc = W_dec.clone() if tied_init else F.normalize(torch.randn(n_latents, d_in, generator=generator), dim=1)
        self.W_enc = nn.Parameter(W_enc)
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.W_dec = nn.Parameter(W_dec)
        self.b_pre = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("normalizer_mean", normalizer.mean.detach().float().clone())
        self.register_buffer("threshold", torch.tensor(float("nan")))

    @property
    def normalizer(self) -> Normalizer:
        """Raw activations <-> this SAE's scale (``apply`` / ``invert``)."""
        return Normalizer(self.normalizer_mean, self.normalizer_scale)

    def extra_repr(self) -> str:
        return f"arch={self.arch}, d_in={self.d_in}, n_latents={self.n_latents}, k={self.k}"

    # ---- encoding -------------------------------------------------------------------------

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.ndim == 0:
            raise ValueError(f"Input must be a (..., d_in={self.d_in}) tensor of activations, got "
                             f"{type(x).__name__}{' of shape ()' if isinstance(x, Tensor) else ''}.")
        if x.shape[-1] != self.d_in:
            raise ValueError(f"Input has last dimension {x.shape[-1]} but this SAE has d_in={self.d_in}.")

    def _normalised(self, x: Tensor) -> Tensor:
        """Raw ``x (..., d_in)`` on the SAE's scale; ``x`` itself under an identity normaliser (no
        batch-sized copy), so the input is checked here, before the normaliser broadcasts: its shape,
        a floating-point dtype and finite values (the public entry points; training checks its
        batches as it reads them)."""
        self._check_input(x)
        if not x.is_floating_point():
            raise ValueError(f"Input has dtype {x.dtype}; the SAE takes floating-point activations (x.float()).")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("Input contains NaN or Inf; clean the activations.")
        normalizer = self.normalizer
        return x if normalizer.is_identity() else normalizer.apply(x)

    def _raw(self, x_hat: Tensor) -> Tensor:
        """``x_hat (..., d_in)`` from the SAE's scale back to raw activations (itself under an identity)."""
        normalizer = self.normalizer
        return x_hat if normalizer.is_identity() else normalizer.invert(x_hat)

    def _preacts(self, x: Tensor, columns: Tensor | None = None) -> Tensor:
        """``pre = W_enc (x - b_pre) + b_enc`` without gradient, in ``encoder_dtype`` (the gradient
        flows through the chosen entries only, in ``gather_preacts``).

        ``columns``: ``(n_latents,)`` a permutation, the latent of each column of ``pre`` (AuxK puts
        the dead latents first, so that their top-k reads a slice instead of a copy); None: column
        ``i`` is latent ``i``.
        """
        self._check_input(x)
        with torch.no_grad():
            dtype = getattr(torch, self.encoder_dtype)  # float32: the parameters' own dtype
            rows = x.reshape(-1, self.d_in)
            out = self._workspace("pre", (len(rows), self.n_latents), dtype, x.device)
            b_enc = self.b_enc if columns is None else self.b_enc[columns]
            if len(rows) <= self.d_in:  # a few tokens: copying the weights would cost more than the bias
                W_enc = self.W_enc if columns is None else self.W_enc[columns]
                x_e, W, b = (t.to(dtype) for t in (rows - self.b_pre, W_enc, b_enc))
                pre = torch.addmm(b, x_e, W.T, out=out)
            else:
                # b_enc rides in the GEMM as the weight of an input column of ones: addmm's copy of
                # the broadcast bias into the (B, n_latents) output cost 6% of an fp32 GEMM and 25%
                # of a bf16 one (2 cores, B 4096, n 18432), the weight copy a tenth of that
                x_1 = self._workspace("x_1", (len(rows), self.d_in + 1), dtype, x.device)
                W_b = self._workspace("W_b", (self.n_latents, self.d_in + 1), dtype, x.device)
                x_1[:, :-1] = rows - self.b_pre
                x_1[:, -1] = 1
                if columns is None:
                    W_b[:, :-1] = self.W_enc
                elif dtype == self.W_enc.dtype:  # the rows straight into place (no (n, d_in) temporary)
                    torch.index_select(self.W_enc, 0, columns, out=W_b[:, :-1])
                else:
                    W_b[:, :-1] = self.W_enc[columns]
                W_b[:, -1] = b_enc
                pre = torch.mm(x_1, W_b.T, out=out)
            return pre.view(*x.shape[:-1], self.n_latents)

    def _workspace(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A tensor of ``shape`` in memory kept from the previous call with this ``name``: allocating a
        large buffer afresh each step costs the page faults of a new mapping (about a tenth of a CPU
        training step for ``pre`` at n 18432). Valid until the next call with the same name; callers
        must not keep it. The SAE keeps them: ``pre`` (B, n_latents), the encoder weights with the
        bias column (n_latents, d_in + 1) and the top-k's group maxima (B, n_latents / 8). Memory
        allocated under ``torch.inference_mode`` cannot be written outside it, so such a buffer is
        allocated again there."""
        numel = math.prod(shape)
        buffers = self.__dict__.setdefault("_workspaces", {})
        buffer = buffers.get(name)
        if (buffer is None or buffer.numel() < numel or buffer.dtype != dtype or buffer.device != device
                or (buffer.is_inference() and not torch.is_inference_mode_enabled())):
            buffer = buffers[name] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)

    def release_buffers(self) -> None:
        """Free what training keeps from step to step: the workspaces (:meth:`_workspace`), the
        parameters' gradients and their row-gradient memories. A batch of 16384 at n 32768 keeps
        2 GB in ``pre`` alone; the next encode allocates what it needs again."""
        self.__dict__.pop("_workspaces", None)
        for p in self.parameters():
            p.grad = None
            release_row_gradients(p)

    def _latents(self, x: Tensor, pre: Tensor, positions: Tensor, keep: Tensor | None = None,
                 columns: Tensor | None = None) -> Latents:
        """ReLU of the chosen pre-activations (the columns ``positions`` of ``pre``, the latents
        ``columns[positions]``), differentiable through the sparse kernel."""
        indices = positions if columns is None else columns[positions]
        pattern = LatentPattern(indices, self.n_latents)
        values = F.relu(gather_preacts(x, self.W_enc, self.b_enc, indices, pre, self.b_pre, pattern, positions))
        if keep is not None:
            values = values * keep
        return Latents(values, indices, self.n_latents, pattern)

    def _masked(self, x: Tensor, pre: Tensor, mask: Tensor, columns: Tensor | None = None) -> Latents:
        """Latents for an arbitrary boolean ``mask (..., n_latents)``, rows padded with zeros."""
        width = max(int(mask.sum(-1).max()), 1) if mask.numel() else 1
        chosen = pre.masked_fill(~mask, float("-inf")).topk(width, dim=-1)
        return self._latents(x, pre, chosen.indices, mask.gather(-1, chosen.indices), columns)

    def _topk(self, x: Tensor, pre: Tensor, k: int, columns: Tensor | None = None) -> Latents:
        return self._latents(x, pre, topk_indices(pre, k, workspace=self._workspace), columns=columns)

    def _batchtopk(self, x: Tensor, pre: Tensor, columns: Tensor | None = None) -> Latents:
        """The ``k * B`` largest positive pre-activations of the batch of ``B`` tokens.

        They are searched among each token's ``BATCHTOPK_CANDIDATES * k`` largest (a top-k per row,
        several times cheaper than one over all ``B * n`` entries). A token that keeps every one of
        its candidates may have more; then the search runs over all entries instead. Both give the
        same latents (up to the choice among equal values).
        """
        rows = pre.reshape(-1, self.n_latents)
        budget, width = self.k * len(rows), min(self.n_latents, BATCHTOPK_CANDIDATES * self.k)
        if width < self.n_latents:
            ids = topk_indices(rows, width, workspace=self._workspace)  # each row's largest first
            mask, smallest = _largest_positive(rows.gather(-1, ids), budget)
            if not bool(mask.all(-1).any()):
                self._track_threshold(smallest)
                used = int(mask.any(0).nonzero().max()) + 1 if bool(mask.any()) else 1
                shape = (*pre.shape[:-1], used)
                return self._latents(x, pre, ids[:, :used].reshape(shape), mask[:, :used].reshape(shape), columns)
        mask, smallest = _largest_positive(rows, budget)
        self._track_threshold(smallest)
        return self._masked(x, pre, mask.view_as(pre), columns)

    def _track_threshold(self, smallest: Tensor | None) -> None:
        """While training, the running average of each batch's smallest kept activation (the
        threshold BatchTopK uses at inference)."""
        if self.training and smallest is not None:
            if torch.isnan(self.threshold):
                self.threshold.copy_(smallest)
            else:
                self.threshold.lerp_(smallest.to(self.threshold.dtype), 1 - BATCHTOPK_THRESHOLD_MOMENTUM)

    def _select(self, x: Tensor, pre: Tensor, k: int | None, columns: Tensor | None = None) -> Latents:
        """The arch's latents from ``pre``; ``columns`` as in ``_preacts``."""
        if k is not None:
            _check_size("k", k, "pass the number of active latents per token")
            if k > self.n_latents:
                raise ValueError(f"k={k} is larger than n_latents={self.n_latents}; choose k <= n_latents.")
            return self._topk(x, pre, k, columns)
        if self.arch == "batchtopk" and (self.training or torch.isnan(self.threshold)):
            return self._batchtopk(x, pre, columns)
        if not torch.isnan(self.threshold):
            return self._masked(x, pre, pre > self.threshold, columns)
        if self.arch == "relu":
            return self._masked(x, pre, pre > 0, columns)
        return self._topk(x, pre, self.k, columns)

    def encode(self, x: Tensor, k: int | None = None) -> Latents:
        """Raw activations ``(..., d_in)`` -> ``Latents`` of shape ``(..., m)``, normalised first.

        The latent values are on the normalised scale (a peer export's are ``normalizer.scale``
        times larger). ``k`` overrides the arch with a per-token TopK of that size (for multitopk
        any ``k <= 4 * sae.k`` is what it was trained for). Otherwise a threshold set by
        ``set_threshold_for_l0`` applies, then the arch's own rule.
        """
        x = self._normalised(x)
        return self._select(x, self._preacts(x), k)

    def decode(self, z: Latents | Tensor) -> Tensor:
        """``Latents`` (sparse decode, sparse backward) or dense ``(..., n_latents)`` -> raw
        activations ``(..., d_in)``: ``normalizer.invert`` of ``W_dec^T z + b_pre``."""
        if not isinstance(z, (Latents, Tensor)):
            raise ValueError(f"decode takes the Latents of encode or a dense (..., n_latents) tensor, got {type(z).__name__}.")
        if isinstance(z, Latents) and z.indices.numel() and (
                z.indices.is_floating_point() or not 0 <= int(z.indices.min()) <= int(z.indices.max()) < self.n_latents):
            raise ValueError(f"Latents indices must be integers in [0, {self.n_latents}) for this SAE, got "
                             f"{z.indices.dtype} in [{z.indices.min().item()}, {z.indices.max().item()}].")
        if isinstance(z, Tensor):
            if not z.is_floating_point():
                raise ValueError(f"A dense code must be floating point, got {z.dtype} (z.float()).")
            z = z.to(self.W_dec.dtype)
        return self._raw(self._decode(z))

    def _decode(self, z: Latents | Tensor) -> Tensor:
        """``decode`` on the normalised scale."""
        if isinstance(z, Latents):
            return sparse_decode(z.values, z.indices, self.W_dec, z.pattern) + self.b_pre
        if z.ndim == 0 or z.shape[-1] != self.n_latents:
            raise ValueError(f"A dense code must have shape (..., {self.n_latents}) for this SAE's n_latents, got "
                             f"{tuple(z.shape)}.")
        return z @ self.W_dec + self.b_pre

    # ---- training loss --------------------------------------------------------------------

    def forward(self, x: Tensor, dead_mask: Tensor | None = None, **loss_options) -> ForwardOutput:
        """Reconstruct raw activations ``x (B, d_in)``: ``train_forward`` on ``normalizer.apply(x)``,
        with ``x_hat`` mapped back to raw activations; latents and losses stay on the normalised
        scale. ``dead_mask`` and ``loss_options`` are those of ``train_forward``."""
        if dead_mask is not None and not (isinstance(dead_mask, Tensor) and dead_mask.dtype == torch.bool
                                          and dead_mask.shape == (self.n_latents,)):
            got = (f"{dead_mask.dtype} of shape {tuple(dead_mask.shape)}" if isinstance(dead_mask, Tensor)
                   else type(dead_mask).__name__)
            raise ValueError(f"dead_mask must be a ({self.n_latents},) bool tensor, True for each dead latent, got {got}.")
        k_aux = loss_options.get("k_aux")
        if k_aux is not None and (isinstance(k_aux, bool) or not isinstance(k_aux, numbers.Integral) or k_aux < 1):
            raise ValueError(f"k_aux must be a positive integer (or None for min(512, d_in // 2)), got {k_aux!r}.")
        out = self.train_forward(self._normalised(x), dead_mask, **loss_options)
        return out._replace(x_hat=self._raw(out.x_hat))

    @chained_row_gradients()  # the main code's and AuxK's row gradients add into one tensor per weight
    def train_forward(
        self,
        x: Tensor,
        dead_mask: Tensor | None = None,
        *,
        k_aux: int | None = None,
        auxk_coef: float = 1 / 32,
        l1_coef: float = 0.0,
    ) -> ForwardOutput:
        """Reconstruct a batch already on the normalised scale, ``x (B, d_in)``, and compute the
        loss terms; ``x_hat`` stays on that scale (the trainer's step; ``sae(x)`` takes raw ones).

        Args:
            dead_mask: ``(n_latents,)`` bool, latents counted as dead; enables AuxK: the top
                ``k_aux`` dead pre-activations reconstruct the detached residual ``x - x_hat``.
            k_aux: AuxK width, default ``min(512, d_in // 2)``.
            auxk_coef: weight of the AuxK loss (the paper: 1/32).
            l1_coef: weight of the L1 penalty (used by ``arch="relu"`` only; ``l1`` is reported for all).
        """
        n_dead = int(dead_mask.sum()) if dead_mask is not None else 0
        # with AuxK the dead latents' columns come first in pre: their top-k then reads a slice
        columns = torch.cat([dead_mask.nonzero(), (~dead_mask).nonzero()]).squeeze(-1) if n_dead else None
        pre = self._preacts(x, columns)
        zero = x.new_zeros(())
        if n_dead:
            # AuxK's decode first: its ops come first in the chain of row gradients, so in the backward
            # the main code's write the gradient rows and AuxK's add to them (no zero-fill)
            k_aux = min(k_aux or min(512, self.d_in // 2), n_dead)
            aux_decode = self._auxk_decode(x, pre, columns, n_dead, k_aux)
        if self.arch == "relu" and torch.isnan(self.threshold):
            z = F.relu(F.linear(x - self.b_pre, self.W_enc, self.b_enc))  # dense: early ReLU codes are not sparse
            x_hat = self._decode(z)
            with torch.no_grad():
                latents = self._masked(x, pre, pre > 0, columns)
            l1 = z.sum(-1).mean()
        else:
            if self.arch == "multitopk":  # top-4k, sorted: its first k columns are the top-k
                wide = self._topk(x, pre, 4 * self.k, columns)
                latents = Latents(wide.values[..., : self.k], wide.indices[..., : self.k], self.n_latents)
            else:
                latents = self._select(x, pre, None, columns)
            x_hat = self._decode(latents)
            l1 = latents.values.sum(-1).mean()
        loss_nmse = nmse(x, x_hat)
        multik = nmse(x, self._decode(wide)) if self.arch == "multitopk" else zero
        auxk = zero
        if n_dead:
            auxk = nmse((x - x_hat).detach(), aux_decode)  # the dead latents model the residual
        # The L1 penalty belongs to the ReLU baseline only: TopK's sparsity comes from k.
        loss = loss_nmse + multik / 8 + auxk_coef * auxk + (l1_coef * l1 if self.arch == "relu" else zero)
        return ForwardOutput(x_hat, latents, loss, loss_nmse, auxk, multik, l1, latents.l0().detach())

    def _auxk_decode(self, x: Tensor, pre: Tensor, columns: Tensor, n_dead: int, k_aux: int) -> Tensor:
        """``(..., d_in)``: the top ``k_aux`` dead latents' reconstruction, without ``b_pre``.

        ``pre``'s first ``n_dead`` columns are the dead latents ``columns[:n_dead]`` (``_preacts``),
        so top-k runs over that slice only. On the CPU the compiled kernels (``sparse_rows_decode``)
        take it while the kept latents are less than ``AUXK_NATIVE_SHARE`` of the dead ones; without
        them, torch's sparse ops below ``AUXK_DENSE_SHARE``; beyond, dense GEMMs over the dead rows
        win. All give the same values and gradients, up to which of several equal pre-activations is
        kept (frequent with the bf16 encoder) and NaN pre-activations (the smallest value to the kernels,
        the largest to ``torch.topk``; the loss is NaN either way).
        """
        tokens = x.reshape(-1, self.d_in)
        if k_aux < AUXK_NATIVE_SHARE * n_dead:
            native = sparse_rows_decode(tokens, self.W_enc, self.b_enc, self.W_dec, self.b_pre, columns[:n_dead],
                                        pre.reshape(len(tokens), -1)[:, :n_dead], k_aux)
            if native is not None:
                return native[0].view(x.shape)
        # columns of the dead slice, which are also positions in dead_ids; unsorted is faster and
        # the order does not matter to a sum
        chosen = topk_indices(pre[..., :n_dead], k_aux, sorted=False, workspace=self._workspace)
        if k_aux < AUXK_DENSE_SHARE * n_dead:
            dead = self._latents(x, pre, chosen, columns=columns)
            return sparse_decode(dead.values, dead.indices, self.W_dec, dead.pattern)
        out = dense_rows_decode(tokens, self.W_enc, self.b_enc, self.W_dec, self.b_pre, columns[:n_dead],
                                chosen.reshape(len(tokens), k_aux), pre[..., :n_dead].reshape(len(tokens), n_dead))
        return out.view(x.shape)

    # ---- decoder constraint ---------------------------------------------------------------

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Project out of ``W_dec.grad`` the component along each (unit) decoder row."""
        if self.W_dec.grad is not None:
            # in blocks of rows: a whole (n_latents, d_in) product costs the page faults of its fresh
            # memory, 3x the arithmetic at n 18432; the projection is in place
            for grad, W in zip(self.W_dec.grad.split(ROW_BLOCK), self.W_dec.split(ROW_BLOCK)):
                grad.addcmul_(torch.linalg.vecdot(grad, W)[:, None], W, value=-1)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm."""
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def fold_decoder_norms(self) -> None:
        """Make decoder rows unit norm without changing ReLU/threshold reconstructions.

        Latent ``i`` with row norm ``s`` becomes ``s * z_i`` against the row ``W_dec[i] / s``
        (encoder row and bias scaled by ``s``). Used on EMA weights, whose rows drift from 1. A
        TopK code ranks the scaled pre-activations, so where two latents' pre-activations lie
        within that drift of each other the kept set can change.
        """
        s = self.W_dec.norm(dim=-1).clamp_min(1e-12)
        self.W_dec /= s[:, None]
        self.W_enc *= s[:, None]
        self.b_enc *= s

    # ---- inference threshold --------------------------------------------------------------

    def set_threshold(self, value: float | None) -> None:
        """Set (or clear with ``None``) the global inference threshold."""
        self.threshold.fill_(float("nan") if value is None else float(value))

    @torch.no_grad()
    def set_threshold_for_l0(self, x: Tensor, l0: float) -> float:
        """Choose the global threshold that gives mean L0 ``l0`` on the sample of raw activations
        ``x (N, d_in)``.

        Returns the threshold (on the normalised scale, like the latents); from then on ``encode``
        keeps ``pre > threshold`` (JumpReLU-style).
        """
        if not 0 < l0 <= self.n_latents:
            raise ValueError(f"target L0 must be in (0, n_latents={self.n_latents}], got {l0}.")
        pre = self._preacts(self._normalised(x).reshape(-1, self.d_in))
        if not len(pre):
            raise ValueError(f"set_threshold_for_l0 needs a sample of at least one token, got shape {tuple(x.shape)}.")
        flat = pre.flatten()
        n_keep = min(max(int(round(l0 * pre.shape[0])), 1), flat.numel() - 1)
        value = max(float(flat.topk(n_keep + 1).values[-1]), 0.0)
        self.set_threshold(value)
        return value

    # ---- files ----------------------------------------------------------------------------

    def config(self) -> dict:
        """What ``config.json`` holds besides the weights' SHA-256: everything but the tensors (the
        fields of :class:`SAEConfig`)."""
        return {
            "arch": self.arch,
            "d_in": self.d_in,
            "n_latents": self.n_latents,
            "k": self.k,
            "normalizer_scale": self.normalizer_scale,
            "metadata": self.metadata,
            "saelib_version": __version__,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path/sae.safetensors`` then ``path/config.json``, each atomically.

        The weights file's header also holds the config (under ``saelib_config``) and ``config.json``
        the weights file's SHA-256, so the SHA-256 covers the config as well: ``load_folder`` refuses
        a ``config.json`` that differs from the config the weights were saved with.
        """
        path = writable_folder(path, "path")
        path.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        config = self.config()
        atomic_write(path / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={HEADER_CONFIG: json.dumps(config)}))
        atomic_write_text(path / CONFIG_FILE, json.dumps({**config, "sha256": {WEIGHTS_FILE: sha256_file(path / WEIGHTS_FILE)}}, indent=2))
        return path


def _largest_positive(values: Tensor, budget: int) -> tuple[Tensor, Tensor | None]:
    """A mask of the ``budget`` largest positive entries of ``values`` (any shape), and the smallest
    of them (None if no entry is positive)."""
    flat = F.relu(values).flatten()
    kept = flat.topk(min(budget, flat.numel()))
    mask = torch.zeros_like(flat, dtype=torch.bool).index_fill_(0, kept.indices, True) & (flat > 0)
    positive = kept.values[kept.values > 0]
    return mask.view_as(values), positive.min() if len(positive) else None


Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class SAEConfig(BaseModel):
    """The schema of an SAE folder's ``config.json`` (what ``TopKSAE.config`` returns, plus ``sha256``).

    ``sha256`` maps ``sae.safetensors`` to its hex SHA-256; it is absent only from folders written
    before saelib recorded checksums (``load_folder`` tells those apart by the weights' header).
    ``normalizer_scale``, ``metadata`` and ``saelib_version`` are absent from the oldest folders.
    """

    model_config = ConfigDict(strict=True, extra="forbid")

    arch: Literal[ARCHS]
    d_in: PositiveInt
    n_latents: PositiveInt
    k: PositiveInt | None
    normalizer_scale: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0
    metadata: dict[str, Any] = {}
    saelib_version: str | None = None
    sha256: dict[Literal[WEIGHTS_FILE], Sha256] = None  # absent, not null: see the docstring

    @field_validator("k")
    @classmethod
    def _k_fits(cls, k: int | None, info: ValidationInfo) -> int | None:
        arch, n_latents = info.data.get("arch"), info.data.get("n_latents")
        if k is None and arch not in (None, "relu"):
            raise PydanticCustomError("k_missing", "a {arch} SAE needs a positive integer k", {"arch": arch})
        limit = n_latents // 4 if arch == "multitopk" and n_latents else n_latents
        if k is not None and limit is not None and k > limit:
            rule = "n_latents / 4 (multitopk)" if arch == "multitopk" else "n_latents"
            raise PydanticCustomError("k_range", "k must be at most {rule} = {limit}", {"rule": rule, "limit": limit})
        return k


def first_difference(found, recorded, key: str = "") -> tuple[str, Any, Any] | None:
    """``(dotted key, found value, recorded value)`` of the first place where two parsed JSON values
    differ (a missing key reads as ``"<absent>"``), or None if they are equal (NaN equals NaN)."""
    if isinstance(found, dict) and isinstance(recorded, dict):
        for name in [*recorded, *(name for name in found if name not in recorded)]:
            absent = "<absent>"
            shown = name if name.isprintable() else repr(name)  # the message stays one line
            difference = first_difference(found.get(name, absent), recorded.get(name, absent), f"{key}.{shown}" if key else shown)
            if difference:
                return difference
        return None
    return None if json.dumps(found) == json.dumps(recorded) else (key, found, recorded)


def check_recorded(path: Path, found: dict, source: Path, recorded: dict, fix: str) -> None:
    """A ValueError naming ``path``, the key and both values where ``found`` (read from ``path``)
    differs from ``recorded`` (what ``source``, a checksummed file, recorded when it was written)."""
    difference = first_difference(found, recorded)
    if difference:
        key, value, saved = difference
        shown = [shorten(repr(v)) for v in (value, saved)]
        raise ValueError(f"{path}: {key} is {shown[0]} but {source.name} was saved with {shown[1]}, so {path.name} was "
                         f"edited or damaged since; {fix}.")


def header_record(path: Path, fix: str) -> Any:
    """The JSON record that ``save`` (or an export) put in the header of the safetensors file ``path``,
    or None if it has none (a file from an earlier saelib); a ValueError naming ``path`` if it is unreadable."""
    with safe_open(str(path), "pt") as f:  # already read whole by load_safetensors: a readable header
        text = (f.metadata() or {}).get(HEADER_CONFIG)
    if text is None:
        return None
    try:
        record = json.loads(text)
    except ValueError as error:
        raise ValueError(f"{path}: the {HEADER_CONFIG} entry of its header is not JSON ({error}); {fix}.") from None
    return record


def check_tensors(path: Path, tensors: dict[str, Tensor], shapes: dict[str, tuple[int, ...]], fix: str,
                  others: bool = False) -> None:
    """A ValueError naming ``path`` and the tensor unless ``tensors`` holds floating-point tensors of
    ``shapes`` (and, unless ``others``, nothing else)."""
    for name, shape in shapes.items():
        if name not in tensors:
            raise ValueError(f"{path} has no tensor {name!r}; the file is incomplete or of another layout, {fix}.")
        tensor = tensors[name]
        if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
            what = f"a {tensor.dtype} tensor" if isinstance(tensor, Tensor) else f"a {type(tensor).__name__}"
            raise ValueError(f"{path}: {name} is {what}, not floating-point weights; {fix}.")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)} but the config implies {shape}; {fix}.")
    extra = sorted(set(tensors) - set(shapes))
    if extra and not others:
        raise ValueError(f"{path} has an unknown tensor {extra[0]!r} besides {', '.join(shapes)}; {fix}.")


def expected_shapes(d_in: int, n_latents: int) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in an SAE's state dict (and ``sae.safetensors``)."""
    return {
        "W_enc": (n_latents, d_in),
        "b_enc": (n_latents,),
        "W_dec": (n_latents, d_in),
        "b_pre": (d_in,),
        "normalizer_mean": (d_in,),
        "threshold": (),
    }


def load_folder(path: str | os.PathLike) -> TopKSAE:
    """The SAE in a folder written by ``sae.save`` (``config.json`` + ``sae.safetensors``), in eval mode;
    every problem is a ValueError (FileNotFoundError for a missing file) naming the file, the key and
    the value. ``saelib.load`` opens every other kind of path or name.

    ``config.json`` is checked against :class:`SAEConfig`, the weights against the SHA-256 it records
    and against the config saved in their header. A weights file without that header entry was
    written by an earlier saelib: its ``config.json`` is checked by the schema (and by its SHA-256
    where it has one) only.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"No SAE folder at {path}; pass a folder written by sae.save (config.json + sae.safetensors).")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            if (path / "checkpoints").is_dir() or (path / "metrics.jsonl").is_file():
                raise FileNotFoundError(f"{path} is a training run that has not finished (it has no sae/ folder yet); "
                                        "run the same training command again to resume it, or wait for it to end.")
            raise FileNotFoundError(f"{path / name} is missing; an SAE folder needs both {CONFIG_FILE} and {WEIGHTS_FILE}.")
    fix = "restore the folder from where it came, or save or download the SAE again"
    config = read_json(path / CONFIG_FILE, SAEConfig, fix)
    sha256 = (config.sha256 or {}).get(WEIGHTS_FILE)
    tensors = load_safetensors(path / WEIGHTS_FILE, sha256, fix)
    saved = header_record(path / WEIGHTS_FILE, fix)
    if saved is not None:
        if sha256 is None:
            raise ValueError(f"{path / CONFIG_FILE} has no sha256 of {WEIGHTS_FILE} (got {config.sha256!r}), which saelib "
                             f"records with every SAE it saves; {fix}.")
        saved = check_schema(saved, SAEConfig, f"{path / WEIGHTS_FILE} (its {HEADER_CONFIG} header)", fix)
        check_recorded(path / CONFIG_FILE, config.model_dump(exclude={"sha256"}), path / WEIGHTS_FILE,
                       saved.model_dump(exclude={"sha256"}), fix)
    check_tensors(path / WEIGHTS_FILE, tensors, expected_shapes(config.d_in, config.n_latents), fix)
    normalizer = Normalizer(tensors["normalizer_mean"], config.normalizer_scale)
    sae = TopKSAE(config.d_in, config.n_latents, config.k, arch=config.arch, normalizer=normalizer, metadata=config.metadata)
    sae.load_state_dict(tensors)
    return sae.eval()
