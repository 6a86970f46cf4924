"""Where training batches come from: any ``BatchSource``, one epoch at a time, and its clock.

A ``BatchSource`` yields shuffled ``(B, d_in)`` batches, deterministic in ``(seed, epoch)``, and
can start mid-epoch (to resume). ``TensorSource`` wraps a tensor, ``IterableSource`` any
iterable of batches; :class:`saelib.activations.CachedSource` streams an on-disk cache.
"""

from __future__ import annotations

import hashlib
import json
import time
from functools import cached_property
from itertools import chain, islice
from typing import Iterable, Iterator, Protocol, runtime_checkable

import numpy as np
import torch
import xxhash
from torch import Tensor

from .activations import ActivationCache, CachedSource, manifest_digest
from .normalize import Normalizer


@runtime_checkable
class BatchSource(Protocol):
    """Shuffled activations, one epoch at a time, deterministic in ``(seed, epoch)``.

    ``batches`` yields ``(batch_size, d_in)`` float32 tensors covering one epoch (the last
    partial batch dropped), skipping the first ``start`` batches (to resume mid-epoch).
    """

    d_in: int
    n_tokens: int | None  # rows per epoch; None when unknown

    def batches(self, batch_size: int, *, seed: int, epoch: int, start: int = 0) -> Iterator[Tensor]: ...


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A torch generator seeded from ``(seed, epoch)`` (independent streams per epoch)."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class TensorSource:
    """A ``(N, d_in)`` tensor as a ``BatchSource``: a fresh random permutation each epoch.

    ``raw``: the tensor ``x`` was normalised from, and ``normaliser``, a note on the normaliser
    given for it, which its :attr:`fingerprint` names instead of ``x`` (see :func:`as_source`)."""

    def __init__(self, x: Tensor, raw: Tensor | None = None, normaliser: str = ""):
        if x.ndim != 2 or len(x) == 0:
            raise ValueError(f"Activations must be a non-empty (N, d_in) tensor, got shape {tuple(x.shape)}.")
        self.x, self.d_in, self.n_tokens = x, x.shape[1], x.shape[0]
        self._raw, self._normaliser = x if raw is None else raw, normaliser

    @cached_property
    def fingerprint(self) -> str:
        """What a run records of this data (:func:`fingerprint`), hashed when first asked for."""
        return f"tensor {self.n_tokens} x {self.d_in}, {rows_digest(self._raw)}{self._normaliser}"

    def batches(self, batch_size: int, *, seed: int, epoch: int, start: int = 0) -> Iterator[Tensor]:
        order = torch.randperm(self.n_tokens, generator=epoch_generator(seed, epoch))
        for i in range(start, self.n_tokens // batch_size):
            yield self.x[order[i * batch_size : (i + 1) * batch_size]].to(torch.float32)


class IterableSource:
    """Any iterable of ``(B, d_in)`` batches as a ``BatchSource`` (order is the iterable's own).

    A re-iterable (list, DataLoader) is replayed each epoch; a one-shot iterator gives one
    epoch. The first ``head_rows`` rows are read ahead (for ``d_in`` and the ``b_pre`` sample)
    and replayed. ``batch_size`` is the first batch's; every batch must have the run's
    ``batch_size`` rows, but for a shorter last one, which is dropped (as a tensor's partial tail
    is). ``n_tokens`` is known for sized re-iterables. Resuming skips batches, which is exact only
    if the iterable repeats itself.
    """

    n_tokens = None

    def __init__(self, iterable: Iterable[Tensor], head_rows: int):
        self._iterable = iterable
        self._rest = iter(iterable)
        self._one_shot = self._rest is iterable
        self._head: list[Tensor] = []
        for x in self._rest:
            self._head.append(x)
            if sum(len(h) for h in self._head) >= head_rows:
                break
        if not self._head:
            raise ValueError("The iterable of activation batches is empty.")
        first = self._head[0]
        if not isinstance(first, Tensor):
            raise ValueError(f"The first batch is a {type(first).__name__}; give torch tensors (torch.from_numpy for "
                             "NumPy arrays).")
        _check_dtype(first, "The first batch has")
        if first.ndim != 2 or not len(first):
            raise ValueError(f"The first batch has shape {tuple(first.shape)}; give (B, d_in) batches of activations, B > 0.")
        self.d_in, self.batch_size = first.shape[-1], len(first)
        if not self._one_shot and hasattr(iterable, "__len__"):
            short_end = isinstance(iterable, (list, tuple)) and len(iterable[-1]) < self.batch_size  # dropped
            self.n_tokens = (len(iterable) - short_end) * self.batch_size

    def batches(self, batch_size: int, *, seed: int, epoch: int, start: int = 0) -> Iterator[Tensor]:
        if self._one_shot:
            stream = chain(self._head, self._rest) if epoch == 0 else iter(())
        else:
            stream = iter(self._iterable)
        stream = (x.to(torch.float32) if isinstance(x, Tensor) else x for x in islice(stream, start, None))  # checked later
        return _full_batches(stream, batch_size, epoch, start)


def _full_batches(stream: Iterator[Tensor], batch_size: int, epoch: int, start: int) -> Iterator[Tensor]:
    """The batches of ``stream`` (the first being batch ``start`` of ``epoch``), each of ``batch_size``
    rows: a shorter last one is dropped, any other batch of another size refused, naming it."""
    short = None  # (index, rows) of a shorter batch, which must be the last
    for index, x in enumerate(stream, start):
        if short is not None or len(x) > batch_size:
            at, rows = short or (index, len(x))
            raise ValueError(f"Batch {at} of epoch {epoch} has {rows} rows where batch_size is {batch_size}; give "
                             "batches of batch_size rows (a shorter last one is dropped), or leave batch_size out to "
                             "take the first batch's.")
        if len(x) < batch_size:
            short = (index, len(x))
        else:
            yield x


def fingerprint(source: BatchSource) -> str | None:
    """What a run records of its data, to refuse resuming it on other data: a digest of a raw
    tensor's rows (:func:`as_source` sets it, before normalising: ``x`` and ``2 * x`` normalise
    alike) or of a cache's manifest, and of the normaliser where it is given rather than fit to
    them; None (unchecked) for an iterable or a ``BatchSource`` of the caller's own, whose batches
    may differ from one pass to the next (a shuffling DataLoader)."""
    if isinstance(source, CachedSource):
        key = source.cache.manifest["key"]
        return (f"{cache_fingerprint(key['model'], key['layer'], key['site'], key['corpus'], key['split'])}, "
                f"manifest sha256 {manifest_digest(source.cache.manifest)[:16]}, {normaliser_digest(source.normalizer)}")
    return getattr(source, "fingerprint", None)


def cache_fingerprint(model: str, layer: int, site: str, corpus: str, split: str) -> str:
    """How a run's recorded :func:`fingerprint` of an activation cache begins: what it was extracted from."""
    return f"activation cache of {model} layer {layer} {site} on {corpus} {split}"


def normaliser_digest(normalizer: Normalizer) -> str:
    """The SHA-256 (16 hex digits) of a normaliser's mean and scale, as its JSON gives them."""
    return "normaliser sha256 " + hashlib.sha256(json.dumps(normalizer.to_dict()).encode()).hexdigest()[:16]


def rows_digest(x: Tensor, rows: int = 64) -> str:
    """A digest (16 hex digits) of ``x (N, d)``: of all its bytes on the CPU (xxh3, 0.13 s for the
    demo's 2.2 GB on 2 cores), of ``rows`` rows spread evenly over it elsewhere (copying all of a
    GPU tensor to the CPU would cost more than the check is worth)."""
    if x.device.type == "cpu":
        data = x.detach().contiguous()
        return f"{data.dtype} xxh3 " + xxhash.xxh3_128(data.view(-1).view(torch.uint8).numpy()).hexdigest()[:16]
    picked = x[torch.linspace(0, len(x) - 1, min(rows, len(x))).round().long().to(x.device)]
    data = picked.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return f"sha256 of {min(rows, len(x))} rows " + hashlib.sha256(data).hexdigest()[:16]


def as_source(data, normalizer: Normalizer | None, normalize: bool | None, head_rows: int) -> tuple[BatchSource, Normalizer]:
    """The data as a ``BatchSource`` on the normalised scale, and the normaliser it carries."""
    if normalize not in (None, True, False):
        raise ValueError(f"normalize must be True, False or None, got {normalize!r}.")
    if not isinstance(data, (Tensor, ActivationCache, BatchSource, Iterable)) or isinstance(data, (str, bytes)) \
            or type(data).__module__ == "numpy":
        hint = "; pass torch.from_numpy(x)" if type(data).__module__ == "numpy" else ""
        raise ValueError(f"The activations must be a (N, d_in) tensor, an activation cache or an iterable of (B, d_in) "
                         f"tensors, got {type(data).__name__}{hint}.")
    if isinstance(data, Tensor):
        _check_dtype(data, "The activations have")
        raw = data.detach()  # activations hooked with autograd on: train on their values
        given = "" if normalizer is None else f", {normaliser_digest(normalizer)}"
        if normalizer is None and normalize is not False:
            normalizer = Normalizer.fit(raw)
            data = normalizer.apply(raw)
        else:
            data = raw
        source = TensorSource(data, raw, given)
    elif isinstance(data, ActivationCache):  # shuffled batches on the cache's normalised scale
        source = CachedSource(data, normalizer)
        normalizer = source.normalizer
    elif isinstance(data, BatchSource):
        source = data
    else:
        source = IterableSource(data, head_rows)
    return source, normalizer or Normalizer.identity(source.d_in)


def check_batch(x: Tensor, d_in: int, epoch: int, index: int) -> Tensor:
    """``x`` if it is a finite ``(B, d_in)`` batch, else a ValueError naming the batch."""
    if not isinstance(x, Tensor):
        raise ValueError(f"Batch {index} of epoch {epoch} is a {type(x).__name__}; give torch tensors.")
    if x.ndim != 2 or x.shape[1] != d_in:
        raise ValueError(f"Batch {index} of epoch {epoch} has shape {tuple(x.shape)}; expected (B, {d_in}).")
    _check_dtype(x, f"Batch {index} of epoch {epoch} has")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"Batch {index} of epoch {epoch} contains NaN or Inf; clean the activations (checkpoints written so far are intact).")
    return x.detach()


def _check_dtype(x: Tensor, what: str) -> None:
    if not x.is_floating_point():
        raise ValueError(f"{what} dtype {x.dtype}; train on floating-point activations (x.float()).")


def stream(source: BatchSource, batch_size: int, seed: int, epochs_known: bool, epoch: int, start: int) -> Iterator[tuple[int, int, Tensor]]:
    """``(epoch, batch index, batch)`` from position ``(epoch, start)`` on, epoch after epoch while
    ``epochs_known`` (the run has a token budget), else for one pass."""
    while True:
        seen = 0
        for index, x in enumerate(source.batches(batch_size, seed=seed, epoch=epoch, start=start), start):
            seen += 1
            yield epoch, index, x
        if not epochs_known or (seen == 0 and start == 0):
            return  # one pass of an unsized iterable, or a source that has run dry
        epoch, start = epoch + 1, 0


class InputClock:
    """Iterates ``items``, timing how long each ``next`` takes. ``window()`` gives the seconds since
    its last call (or since the start) and the share of them the trainer spent waiting for its next
    batch, logged as ``input_wait``: near 0 means the supply keeps up."""

    def __init__(self, items: Iterable):
        self.items, self.waited, self.since = iter(items), 0.0, time.perf_counter()

    def __iter__(self) -> InputClock:
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self.items)
        finally:
            self.waited += time.perf_counter() - start

    def window(self) -> tuple[float, float]:
        now = time.perf_counter()
        seconds = max(now - self.since, 1e-9)
        share, self.waited, self.since = self.waited / seconds, 0.0, now
        return seconds, share
