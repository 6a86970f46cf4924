"""Held-out evaluation data: validation contexts, their activations at the SAE's site, and the SAE's code.

Every metric runs on the ``validation`` split of a corpus (documents the SAE never trained on),
packed as training packed it (with the begin-of-sequence token in front or not:
:func:`trained_prepend_bos`). Tokens that training excluded (position 0, special tokens, norm
outliers; see :func:`saelib.activations.keep_mask`) are excluded from every metric here too.
The split's activations are extracted once, in float32, into an activation cache
(:func:`saelib.activations.cached_activations`), which every later evaluation, summary and
notebook reads; so are the probe tasks' contexts (:func:`cached_contexts`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..activations import ActivationCache, CacheKey, build_cache, cache_keys, cached_activations, extract, keep_mask
from ..data import MIXES
from ..files import digest
from ..models import LM, model_digest
from .probe_sources import TEXT_SOURCES


def trained_site(sae, lm: LM | None, purpose: str) -> tuple[LM, int, str, int]:
    """``(lm, layer, site, ctx_len)`` the SAE was trained on, from ``sae.metadata``; the LM is
    loaded from ``metadata["model"]`` when ``lm`` is None. The metrics run on the CPU, where the
    held-out activations are read: an LM or SAE elsewhere is refused in one sentence."""
    meta = dict(getattr(sae, "metadata", {}) or {})
    if "layer" not in meta:
        raise ValueError(f"sae.metadata has no 'layer'; set sae.metadata['layer'] (and 'model', 'site') to {purpose} it.")
    if meta.get("input_norm", "none") != "none":  # an import whose peer normalised each token
        raise ValueError(f"This SAE expects its inputs normalised token by token (metadata['input_norm'] is "
                         f"{meta['input_norm']!r}), which saelib's metrics and visualizer do not apply, so they cannot "
                         f"{purpose} it; apply saelib.formats.layer_norm to its inputs yourself (docs/interop.md).")
    if lm is None:
        from ..models import DEFAULT_MODEL, load_lm

        lm = load_lm(meta.get("model", DEFAULT_MODEL))
    elif meta.get("model") not in (None, lm.name):
        raise ValueError(f"The SAE was trained on {meta['model']}'s activations but the LM given is {lm.name}; pass "
                         f"load_lm({meta['model']!r}) (or lm=None), or set sae.metadata['model'] = {lm.name!r} if it is "
                         "the same model under another name.")
    if lm.d_model != sae.d_in:
        raise ValueError(f"The SAE takes d_in={sae.d_in} but {lm.name}'s activations have {lm.d_model}; pass the LM "
                         "it was trained on.")
    devices = {"the LM": lm.model.device, "the SAE": next(sae.parameters()).device}
    elsewhere = [f"{what} is on {device}" for what, device in devices.items() if device.type != "cpu"]
    if elsewhere:
        raise ValueError(f"saelib runs the LM and the SAE on the CPU to {purpose} an SAE, but {' and '.join(elsewhere)}; "
                         f"pass an LM loaded on the CPU (load_lm(name), its default) and sae.cpu().")
    return lm, int(meta["layer"]), meta.get("site", "resid_post"), int(meta.get("ctx_len", 64))


def trained_val_fraction(sae, corpus: str) -> float:
    """The share of ``corpus`` to hold out for evaluating the SAE, so that its validation split holds
    no training document: the SAE's own ``metadata["val_fraction"]`` for the corpus it trained on; for
    a corpus that shares documents with it (``mix`` and its parts, which split each document alike),
    the smaller of that and the default 0.1; the default for another corpus or an SAE that does not
    record it."""
    meta = getattr(sae, "metadata", {}) or {}
    trained, recorded = meta.get("corpus", "wikipedia"), float(meta.get("val_fraction", 0.1))
    if corpus == trained:
        return recorded
    return min(0.1, recorded) if _parts(corpus) & _parts(trained) else 0.1


def probe_held_out(sae) -> dict[str, float]:
    """The probe text sources that share documents with the SAE's training corpus (``mix`` holds them
    all), each with the share to hold out (:func:`trained_val_fraction`): the probes read only their
    validation split, documents the SAE never trained on."""
    trained = (getattr(sae, "metadata", {}) or {}).get("corpus", "wikipedia")
    return {name: trained_val_fraction(sae, name) for name in TEXT_SOURCES if _parts(name) & _parts(trained)}


def _parts(corpus: str) -> set[str]:
    """A corpus and, for a mix, the corpora it is made of (which split each document alike)."""
    return {corpus, *MIXES.get(corpus, ())}


def trained_prepend_bos(sae) -> bool | None:
    """Whether the SAE's training contexts started with the begin-of-sequence token
    (``metadata["prepend_bos"]``); for an SAE imported from a peer library, which does not record it,
    None: the model's convention (:func:`saelib.data.tokenizer_adds_bos`, e.g. Gemma's BOS); False
    for a saelib SAE that does not record it (saelib packed contexts without one before it did)."""
    meta = getattr(sae, "metadata", {}) or {}
    if "prepend_bos" in meta:
        return bool(meta["prepend_bos"])
    return None if "source_format" in meta else False


@dataclass
class HeldOut:
    """Validation contexts and their activations at one site.

    Attributes:
        ids: ``(n_ctx, T)`` token ids.
        acts: ``(n_ctx, T, d_model)`` raw activations at ``layer``/``site`` (zero at the excluded
            tokens where read from a cache, which keeps only the others).
        keep: ``(n_ctx, T)`` bool, tokens that count in metrics (and are spliced).
        layer, site: where ``acts`` come from.
    """

    ids: Tensor
    acts: Tensor
    keep: Tensor
    layer: int
    site: str

    @property
    def n_tokens(self) -> int:
        """Number of kept tokens (the ``eval_tokens`` of the report)."""
        return int(self.keep.sum())

    @classmethod
    def from_cache(cls, cache: ActivationCache) -> HeldOut:
        """The contexts of an activation cache with its kept tokens' activations in place."""
        ids = cache.contexts()
        acts = torch.zeros(ids.numel(), cache.d_in)
        keep = torch.zeros(ids.numel(), dtype=torch.bool)
        for i in range(len(cache.manifest["shards"])):
            shard = cache.shard(i)
            acts[shard["index"]] = shard["acts"]
            keep[shard["index"]] = True
        key = cache.manifest["key"]
        return cls(ids, acts.view(*ids.shape, -1), keep.view(ids.shape), key["layer"], key["site"])


def site_activations(lm: LM, ids: Tensor, layer: int, site: str, batch_size: int = 32,
                     progress: bool = True) -> HeldOut:
    """Activations of ``ids (n_ctx, T)`` at ``layer``/``site`` (forward stopped after the layer)."""
    acts = torch.empty(*ids.shape, lm.d_model)
    keep = torch.zeros(ids.shape, dtype=torch.bool)
    # float32 even where training extracts in bf16: metrics compare with the activations that splicing
    # replaces in the float32 model
    for start, batch in extract(lm, ids, [layer], site, batch_size, progress=progress, dtype="float32"):
        a = batch[layer]
        acts[start:start + len(a)] = a
        keep[start:start + len(a)] = keep_mask(ids[start:start + len(a)], a, lm.special_ids)[0]
    return HeldOut(ids, acts, keep, layer, site)


def cached_contexts(lm: LM, ids: Tensor, layer: int, site: str, name: str, progress: bool = True) -> HeldOut:
    """:func:`site_activations` of contexts that are no corpus split (the probe tasks'), through the
    activation cache: extracted in float32 on first use, then read from the cache, so every SAE
    evaluated on the same contexts shares one forward pass over them.

    ``name`` labels the cache's folder; its key holds the SHA-256 of ``ids (n_ctx, T)``, so other
    contexts get a cache of their own. Excluded tokens read as zero activations (see :class:`HeldOut`).
    """
    sha256 = digest(ids.to(torch.int64))
    key = CacheKey(lm.name, layer, site, name, "contexts", ids.shape[1], None, corpus_sha256=sha256,
                   model_digest=model_digest(lm.name))
    return HeldOut.from_cache(build_cache(lm, ids, [layer], site, lambda _: key, progress=progress)[layer])


def held_out(lm: LM, layer: int, site: str = "resid_post", corpus: str = "wikipedia", ctx_len: int = 64,
             max_tokens: int | None = 4096, progress: bool = True, prepend_bos: bool | None = None,
             val_fraction: float = 0.1) -> HeldOut:
    """The validation split of ``corpus`` (its ``val_fraction`` of documents), packed into contexts,
    with activations at ``layer``/``site``: extracted in float32 on first use, then read from the
    activation cache. An SAE's evaluation passes :func:`trained_val_fraction`.

    ``prepend_bos``: start contexts with the begin-of-sequence token (:func:`saelib.data.pack`);
    ``None`` follows the model's convention, an SAE's evaluation passes :func:`trained_prepend_bos`.
    """
    cache = cached_activations(lm.name, layer, site, corpus, "validation", ctx_len, max_tokens, val_fraction=val_fraction,
                               lm=lm, progress=progress, lm_dtype=HELD_OUT_DTYPE, prepend_bos=prepend_bos)
    return HeldOut.from_cache(cache)


# float32 even where training extracts in bf16: metrics compare with the activations that splicing
# replaces in the float32 model
HELD_OUT_DTYPE = "float32"


def held_out_key(model: str, layer: int, site: str, corpus: str, ctx_len: int, max_tokens: int | None,
                 prepend_bos: bool | None, val_fraction: float, tokenizer=None) -> str:
    """The folder name of :func:`held_out`'s activation cache for these arguments (which names what
    fixes its contexts: the model's digest, the corpus file's, the split, the exclusion rule), computed
    without the LM: what results computed on it are kept under."""
    return cache_keys(model, site, corpus, "validation", ctx_len, max_tokens, val_fraction, tokenizer=tokenizer,
                      lm_dtype=HELD_OUT_DTYPE, prepend_bos=prepend_bos)(layer).folder_name()


@torch.no_grad()
def encode(sae, x_raw: Tensor, batch_size: int = 4096) -> tuple[Tensor, Tensor]:
    """The SAE's sparse code of raw activations ``(..., d)``: ``(values, indices)``, each ``(..., m)``,
    values on the SAE's normalised scale; batched to bound memory.
    """
    flat = x_raw.reshape(-1, x_raw.shape[-1])
    values, indices = [], []
    width = 0
    for start in range(0, len(flat), batch_size):
        z = sae.encode(flat[start:start + batch_size])
        values.append(z.values)
        indices.append(z.indices)
        width = max(width, z.values.shape[-1])
    # Threshold/ReLU codes vary in width per batch: pad with zero values (index 0, ignored).
    values = torch.cat([torch.nn.functional.pad(v, (0, width - v.shape[-1])) for v in values])
    indices = torch.cat([torch.nn.functional.pad(i, (0, width - i.shape[-1])) for i in indices])
    return values.view(*x_raw.shape[:-1], width), indices.view(*x_raw.shape[:-1], width)


def dense_code(values: Tensor, indices: Tensor, n_latents: int) -> Tensor:
    """``(..., n_latents)`` dense latents from a sparse ``(values, indices)`` code."""
    return values.new_zeros(*values.shape[:-1], n_latents).scatter_add_(-1, indices, values)
