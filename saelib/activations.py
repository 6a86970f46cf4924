"""Activations: hook a site of a language model with nnsight, filter outlier tokens, cache and shuffle.

Pipeline: packed contexts ``(n_ctx, T)`` -> :func:`extract` (one forward per batch, stopped
after the last hooked layer; in bfloat16 where the device multiplies it fast) -> :func:`keep_mask` (drop position 0, special tokens and norm
outliers) -> either :func:`build_cache` (sharded safetensors on disk, resumable) and
:class:`CachedSource` (shuffled, normalised training batches), or :func:`shuffle` (a bounded
shuffling buffer over a live stream).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
import xxhash
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from . import data
from .files import atomic_write, atomic_write_text, exclusive, file_digest, read_json, sha256_file
from .kernels import fast_bf16
from .models import LM, LM_DTYPES, SITES, load_lm, load_tokenizer, model_digest
from .normalize import Normalizer
from .paths import cache_dir

# Shard checksums by their manifest key. xxh3_128 hashes at about 9 GB/s on one core here,
# SHA-256 (SHA-NI) at 1.2 GB/s: with SHA-256 the checksums were most of the first epoch's read.
# Caches written before the switch record SHA-256, which is still checked.
SHARD_CHECKSUMS = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}
SHARD_CHECKSUM = "xxh3_128"  # the one new shards record

CACHE_FORMAT = 2  # 2: manifests carry their own SHA-256, local corpora are keyed by their content
# Execution order of the sites inside one decoder block: nnsight must be asked for them in it.
_SITE_ORDER = {"attn_out": 0, "mlp_out": 1, "resid_post": 2}


def _site_output(envoy, lm: LM, layer: int, site: str):
    """The nnsight proxy of the output of ``site`` at ``layer``."""
    for part in lm.site_module_path(layer, site).split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    out = envoy.output
    # Attention (and, before transformers 5, decoder blocks) return (hidden, ...) tuples.
    return out[0] if isinstance(out, tuple) else out


def extraction_dtype(device: str | torch.device = "cpu") -> str:
    """The dtype the LM's forward runs in by default on ``device``: ``"bfloat16"`` where its matmuls are
    much faster than fp32 (``kernels.fast_bf16``: a GPU, a CPU with AMX or AVX512_BF16), else
    ``"float32"`` (an AVX2 CPU multiplies bf16 about 8x slower than fp32)."""
    return "bfloat16" if fast_bf16(device) else "float32"


def forward_dtype(device: torch.device, dtype: str) -> torch.autocast:
    """The context the LM's forward runs in: matmuls in bfloat16 under autocast for ``"bfloat16"``
    (the weights stay float32), unchanged for ``"float32"``."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=_check_dtype(dtype) == "bfloat16")


def extract(lm: LM, contexts: Tensor, layers: list[int], site: str = "resid_post", batch_size: int = 64,
            stop_early: bool = True, progress: bool = True, dtype: str | None = None) -> Iterator[tuple[int, dict[int, Tensor]]]:
    """Run the LM over contexts and yield the activations at ``site`` of each layer.

    Args:
        lm: a loaded :class:`~saelib.models.LM`.
        contexts: ``(n_ctx, T)`` token ids.
        layers: decoder layers to read, all in one forward pass.
        site: ``"resid_post"``, ``"mlp_out"`` or ``"attn_out"``.
        batch_size: contexts per forward pass.
        stop_early: stop the forward after the last hooked layer (later layers and the LM head
            are never computed); ``False`` runs the full model, for comparison.
        dtype: ``"float32"`` or ``"bfloat16"`` (matmuls under autocast; the weights stay float32);
            ``None``: :func:`extraction_dtype` of the model's device.

    Yields:
        ``(start, {layer: (b, T, d_model) float32})`` where ``start`` is the index of the first
        context of the batch.
    """
    if site not in SITES:
        raise ValueError(f"Unknown site {site!r}; choose one of {', '.join(SITES)}.")
    layers = sorted(set(layers))
    for layer in layers:
        lm.check_layer(layer)
    if contexts.shape[-1] > lm.max_context:
        raise ValueError(f"Context length {contexts.shape[-1]} exceeds what {lm.name} allows ({lm.max_context} tokens).")
    dtype = _check_dtype(extraction_dtype(lm.model.device) if dtype is None else dtype)
    from nnsight import NNsight

    model = NNsight(lm.model)
    bar = tqdm(total=contexts.numel(), unit="tok", desc=f"activations L{','.join(map(str, layers))} {site}",
               disable=not progress, leave=False)
    with torch.inference_mode(), forward_dtype(lm.model.device, dtype):
        for start in range(0, len(contexts), batch_size):
            ids = contexts[start:start + batch_size].to(lm.model.device)
            saved = {}
            with model.trace(ids) as tracer:
                for layer in layers:
                    saved[layer] = _site_output(model, lm, layer, site).save()
                if stop_early:
                    tracer.stop()
            acts = {layer: t.float().cpu() for layer, t in saved.items()}
            for layer, a in acts.items():
                if not torch.isfinite(a).all():
                    raise ValueError(f"NaN/Inf in the activations of layer {layer} {site}, batch of contexts "
                                     f"{start}-{start + len(ids) - 1}; the model or its inputs are broken.")
            bar.update(ids.numel())
            yield start, acts
    bar.close()


def _check_dtype(dtype: str) -> str:
    if dtype not in LM_DTYPES:
        raise ValueError(f"Unknown extraction dtype {dtype!r}; choose one of {', '.join(LM_DTYPES)} (or None: "
                         f"bfloat16 where the device multiplies it fast, else float32).")
    return dtype


@dataclass
class Exclusion:
    """Which tokens to leave out of training and metrics (they are never changed when splicing).

    Attributes:
        first_position: drop position 0 of every context (an attention sink with a huge norm; the
            begin-of-sequence token where contexts start with one).
        special_tokens: drop the tokenizer's special tokens (e.g. the separator between packed
            documents: under 1% of tokens, 99% of the squared norm at SmolLM2's layer 12).
        outlier_factor: drop tokens whose norm exceeds this many times the batch's median norm
            (``None`` keeps them).
    """

    first_position: bool = True
    special_tokens: bool = True
    outlier_factor: float | None = 10.0


def keep_mask(ids: Tensor, acts: Tensor, special_ids: list[int], rule: Exclusion = Exclusion()) -> tuple[Tensor, dict[str, int]]:
    """Which tokens to keep.

    Args:
        ids: ``(b, T)`` token ids.
        acts: ``(b, T, d)`` their activations.
        special_ids: ids of the tokenizer's special tokens.

    Returns:
        ``(b, T)`` bool mask and how many tokens each rule dropped (a token counts once, under
        the first rule that drops it: first position, then special token, then outlier).
    """
    keep = torch.ones_like(ids, dtype=torch.bool)
    dropped = {"first_position": 0, "special_token": 0, "outlier": 0}
    if rule.first_position:
        dropped["first_position"] = int(keep[:, 0].sum())
        keep[:, 0] = False
    if rule.special_tokens and special_ids:
        special = torch.isin(ids, torch.tensor(special_ids, device=ids.device)) & keep
        dropped["special_token"] = int(special.sum())
        keep &= ~special
    if rule.outlier_factor is not None and keep.any():
        norms = acts.norm(dim=-1)
        outlier = (norms > rule.outlier_factor * norms[keep].median()) & keep
        dropped["outlier"] = int(outlier.sum())
        keep &= ~outlier
    return keep, dropped


@dataclass
class CacheKey:
    """Everything that determines a cache's contents; caches are found and checked by it."""

    model: str
    layer: int
    site: str
    corpus: str
    split: str
    ctx_len: int
    max_tokens: int | None
    val_fraction: float = 0.1
    exclusion: dict = field(default_factory=lambda: asdict(Exclusion()))
    corpus_sha256: str | None = None  # data.corpus_sha256: of what the corpus name leaves open (a local file, a mix's Debian texts)
    format: int = CACHE_FORMAT
    prepend_bos: bool = False  # contexts start with the begin-of-sequence token (see saelib.data.pack)
    lm_dtype: str = "float32"  # of the LM's forward (see extract)
    model_digest: str | None = None  # a local folder's files or a hub commit (saelib.models.model_digest)

    def to_dict(self) -> dict:
        """The key as the manifest records it and :meth:`digest` hashes it; ``prepend_bos`` only when
        True, ``lm_dtype`` only when not float32 and ``model_digest`` only when set, so that a recorded
        key without them reads as the default and the caches made before them keep their folders."""
        key = asdict(self)
        if not self.prepend_bos:
            del key["prepend_bos"]
        if self.lm_dtype == "float32":
            del key["lm_dtype"]
        if self.model_digest is None:
            del key["model_digest"]
        return key

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def folder_name(self) -> str:
        safe = lambda s: "".join(c if c.isalnum() or c in "-_." else "_" for c in str(s))[-40:]  # noqa: E731
        return f"{safe(self.model)}-L{self.layer}-{self.site}-{safe(self.corpus)}-{self.split}-{self.digest()}"


HEX = "^[0-9a-f]+$"


class ShardEntry(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    file: Annotated[str, Field(pattern=r"^shard_\d{5}\.safetensors$")]
    rows: NonNegativeInt
    contexts: tuple[NonNegativeInt, NonNegativeInt]  # [first, end) contexts it was extracted from
    xxh3_128: Annotated[str, Field(pattern=HEX)] | None = None
    sha256: Annotated[str, Field(pattern=HEX)] | None = None


class NormalizerStats(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    mean: list[float]  # (d_in,)
    scale: Annotated[float, Field(gt=0)]


class Manifest(BaseModel):
    """``manifest.json``: the cache's key, its shards, and (once complete) the normaliser statistics;
    ``sha256`` is that of the rest (:func:`manifest_digest`), so an edited value is found."""

    model_config = ConfigDict(strict=True, extra="forbid")

    key: dict[str, Any]
    shards: list[ShardEntry]
    complete: bool
    d_in: PositiveInt | None = None
    total_tokens: NonNegativeInt
    dropped: dict[str, NonNegativeInt]
    normalizer: NormalizerStats | None = None
    contexts_sha256: Annotated[str, Field(pattern="^[0-9a-f]{64}$")] | None = None  # of contexts.safetensors
    sha256: Annotated[str, Field(pattern="^[0-9a-f]{64}$")]


def manifest_digest(manifest: dict) -> str:
    """SHA-256 of a manifest's content (less its own ``sha256``), as canonical JSON."""
    content = {key: value for key, value in manifest.items() if key != "sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def shard_checksum(path: Path, algorithm: str = SHARD_CHECKSUM) -> dict[str, str]:
    """``{algorithm: hex digest}`` of the shard at ``path``, for its manifest entry."""
    return {algorithm: file_digest(path, SHARD_CHECKSUMS[algorithm])}


def _checksum_matches(path: Path, entry: dict) -> bool:
    """Whether the shard at ``path`` has the checksum its manifest ``entry`` records."""
    algorithm = next((a for a in SHARD_CHECKSUMS if a in entry), None)
    if algorithm is None:
        raise ValueError(f"The manifest records no checksum for {path} (one of {list(SHARD_CHECKSUMS)}); "
                         f"delete {path.parent} and extract again.")
    return file_digest(path, SHARD_CHECKSUMS[algorithm]) == entry[algorithm]


class ActivationCache:
    """An on-disk activation cache: ``manifest.json``, ``contexts.safetensors`` and shards.

    Each shard ``shard_XXXXX.safetensors`` holds ``acts`` ``(rows, d)`` float32 and ``index``
    ``(rows,)`` int64 (flat token index ``context * T + position`` into ``contexts``). Shards
    are written atomically and recorded in the manifest with their row count and checksum
    (``SHARD_CHECKSUM``), so an interrupted build resumes after the last recorded shard and
    corruption is detected. The manifest records its own SHA-256 (:class:`Manifest`): an edited
    or damaged one is an error saying to delete the cache and extract again.
    """

    def __init__(self, folder: str | Path, key: CacheKey | None = None):
        self.folder = Path(folder)
        self.manifest_path = self.folder / "manifest.json"
        if self.manifest_path.exists():
            self.manifest = self._read_manifest()
            found = self.manifest["key"]
            if key is not None and found != key.to_dict():
                wanted = key.to_dict()
                diff = {k: (wanted.get(k), found.get(k)) for k in sorted(wanted.keys() | found.keys())
                        if wanted.get(k) != found.get(k)}
                raise ValueError(f"The activation cache at {self.folder} was built for another configuration "
                                 f"(wanted vs found: {diff}); delete it or point to another folder.")
        elif key is None:
            raise FileNotFoundError(f"No activation cache at {self.folder} (no manifest.json).")
        else:
            self.manifest = {"key": key.to_dict(), "shards": [], "complete": False,
                             "dropped": {"first_position": 0, "special_token": 0, "outlier": 0}, "total_tokens": 0}

    def _read_manifest(self) -> dict:
        """``manifest.json`` checked against its schema, its own SHA-256 and its shards' names."""
        fix = f"delete {self.folder} and extract again (it is a cache)"
        read_json(self.manifest_path, Manifest, fix)
        manifest = json.loads(self.manifest_path.read_bytes())
        if manifest_digest(manifest) != manifest.pop("sha256"):
            raise ValueError(f"{self.manifest_path} was edited or damaged (its content does not match the SHA-256 "
                             f"recorded in it); {fix}.")
        for i, entry in enumerate(manifest["shards"]):
            if entry["file"] != f"shard_{i:05d}.safetensors":
                raise ValueError(f"{self.manifest_path}: shards.{i}.file is {entry['file']!r}, expected "
                                 f"'shard_{i:05d}.safetensors'; {fix}.")
        stats = manifest.get("normalizer")
        if manifest["complete"] and not (manifest["shards"] and stats and len(stats["mean"]) == manifest.get("d_in")):
            raise ValueError(f"{self.manifest_path} says the cache is complete but has no shards, no d_in or no normalizer "
                             f"of d_in values; {fix}.")
        return manifest

    def save(self) -> None:
        """Write the manifest, with its SHA-256, atomically."""
        atomic_write_text(self.manifest_path, json.dumps({**self.manifest, "sha256": manifest_digest(self.manifest)}, indent=1))

    def add_shard(self, acts: Tensor, index: Tensor, contexts: tuple[int, int], tokens: int) -> None:
        """Write the next shard, ``acts (rows, d)`` float32 and their flat token ``index (rows,)``, extracted
        from ``tokens`` tokens of contexts ``[first, end)``; then record it in the manifest."""
        name = f"shard_{len(self.manifest['shards']):05d}.safetensors"
        atomic_write(self.folder / name, lambda tmp: save_file({"acts": acts.contiguous(), "index": index.contiguous()}, tmp))
        self.manifest["shards"].append({"file": name, "rows": len(acts), "contexts": list(contexts),
                                        **shard_checksum(self.folder / name)})
        self.manifest["d_in"] = acts.shape[1]
        self.manifest["total_tokens"] += tokens
        self.save()

    def finish(self) -> None:
        """Record the normaliser statistics over every shard and mark the cache complete."""
        self.manifest["normalizer"] = _streaming_normalizer(self).to_dict()
        self.manifest["complete"] = True
        self.save()

    @property
    def complete(self) -> bool:
        return self.manifest["complete"]

    @property
    def n_rows(self) -> int:
        return sum(s["rows"] for s in self.manifest["shards"])

    @property
    def d_in(self) -> int:
        return self.manifest["d_in"]

    @property
    def normalizer(self) -> Normalizer:
        if "normalizer" not in self.manifest:
            raise ValueError(f"The activation cache at {self.folder} is not complete; build it first.")
        return Normalizer.from_dict(self.manifest["normalizer"])

    def contexts(self) -> Tensor:
        """``(n_ctx, T)`` token ids the cache was extracted from, checked against the SHA-256 the
        manifest records (caches written before it was recorded are read as they are)."""
        path, recorded = self.folder / "contexts.safetensors", self.manifest.get("contexts_sha256")
        if recorded is not None and sha256_file(path) != recorded:
            raise ValueError(f"{path} was edited or damaged (its SHA-256 is not the one {self.manifest_path} "
                             f"records); delete {self.folder} and extract again (it is a cache).")
        return load_file(path)["contexts"]

    def write_contexts(self, contexts: Tensor) -> None:
        """Write ``contexts.safetensors`` and record its SHA-256 (saved with the next shard)."""
        path = atomic_write(self.folder / "contexts.safetensors", lambda tmp: save_file({"contexts": contexts.contiguous()}, tmp))
        self.manifest["contexts_sha256"] = sha256_file(path)

    def shard(self, i: int, verify: bool = True) -> dict[str, Tensor]:
        """Shard ``i`` as ``{"acts": (rows, d), "index": (rows,)}``; ``verify=False`` skips the checksum
        (of a shard already checked in this process)."""
        entry = self.manifest["shards"][i]
        path = self.folder / entry["file"]
        if not path.exists():
            raise FileNotFoundError(f"Activation cache shard {path} is missing; delete {self.folder} and extract again.")
        if verify and not _checksum_matches(path, entry):
            raise ValueError(f"Activation cache shard {path} is corrupt (checksum mismatch); delete {self.folder} and extract again.")
        try:
            data = load_file(path)
        except Exception as e:
            raise ValueError(f"Activation cache shard {path} cannot be read ({e}); delete {self.folder} and extract again.") from e
        acts, index = data.get("acts"), data.get("index")
        found = "no acts or index" if acts is None or index is None else f"acts {tuple(acts.shape)} {acts.dtype} and index {tuple(index.shape)}"
        if acts is None or index is None or acts.shape != (entry["rows"], self.manifest.get("d_in")) or acts.dtype != torch.float32 \
                or index.shape != (entry["rows"],):
            raise ValueError(f"Activation cache shard {path} holds {found} but the manifest says {entry['rows']} rows of "
                             f"d_in {self.manifest.get('d_in')} float32; delete {self.folder} and extract again.")
        return data

    def verify(self) -> None:
        """Check every shard against its recorded checksum."""
        for i in range(len(self.manifest["shards"])):
            self.shard(i, verify=True)

    def all_rows(self) -> Tensor:
        """Every cached row, ``(n_rows, d)``, in extraction order."""
        return torch.cat([self.shard(i)["acts"] for i in range(len(self.manifest["shards"]))])


def store_shard(caches: dict[int, ActivationCache], contexts: Tensor, lo: int, hi: int,
                batches: Iterable[tuple[int, dict[int, Tensor]]], special_ids: list[int], rule: Exclusion = Exclusion()) -> None:
    """Write the next shard of each layer's cache: the kept tokens of contexts ``[lo, hi)``.

    Args:
        caches: ``{layer: ActivationCache}``.
        contexts: ``(n_ctx, T)`` token ids of the whole cache.
        batches: :func:`extract`'s output over ``contexts[lo:hi]`` (``start`` counts from ``lo``).
        special_ids, rule: as in :func:`keep_mask`; each cache's manifest counts what it dropped.
    """
    parts = {layer: {"acts": [], "index": []} for layer in caches}
    T = contexts.shape[1]
    for start, acts in batches:
        n = len(next(iter(acts.values())))
        ids = contexts[lo + start:lo + start + n]
        flat = torch.arange(lo + start, lo + start + n)[:, None] * T + torch.arange(T)[None, :]
        for layer, cache in caches.items():
            keep, dropped = keep_mask(ids, acts[layer], special_ids, rule)
            parts[layer]["acts"].append(acts[layer][keep])
            parts[layer]["index"].append(flat[keep])
            for name, count in dropped.items():
                cache.manifest["dropped"][name] += count
    for layer, cache in caches.items():
        cache.add_shard(torch.cat(parts[layer]["acts"]), torch.cat(parts[layer]["index"]), (lo, hi), (hi - lo) * T)


def build_cache(lm: LM, contexts: Tensor, layers: list[int], site: str, key_of, rule: Exclusion = Exclusion(),
                batch_size: int = 64, shard_contexts: int = 256, progress: bool = True,
                stop_after_shards: int | None = None) -> dict[int, ActivationCache]:
    """Extract activations of several layers in one pass into one cache per layer; resume if interrupted.

    Args:
        lm, contexts, layers, site, rule, batch_size: as in :func:`extract` / :func:`keep_mask`.
        key_of: ``layer -> CacheKey``; the cache lives in ``$SAELIB_HOME/activations/<key folder>``; the
            LM's forward runs in the key's ``lm_dtype``.
        shard_contexts: contexts per shard (the unit of resumption).
        stop_after_shards: stop after writing this many new shards (to test interruption).

    Returns:
        ``{layer: ActivationCache}``, complete unless stopped early.

    Processes that ask for the same cache at once (two notebooks, a notebook and ``saelib train``)
    build it once: the first holds a lock on each of its folders (``.<folder>.lock`` beside it), and
    the others wait for it, then find it complete.
    """
    for layer in layers:
        lm.site_module_path(layer, site)  # fails early, with the valid choices, on a bad layer or site
    if contexts.shape[-1] > lm.max_context:
        raise ValueError(f"Context length {contexts.shape[-1]} exceeds what {lm.name} allows ({lm.max_context} tokens).")
    folders = [cache_dir("activations") / key_of(layer).folder_name() for layer in layers]
    with exclusive(folders, f"Waiting for another process to finish building the activation cache {folders[0].name}..."):
        return _build_cache(lm, contexts, layers, site, key_of, rule, batch_size, shard_contexts, progress,
                            stop_after_shards)


def _build_cache(lm: LM, contexts: Tensor, layers: list[int], site: str, key_of, rule: Exclusion, batch_size: int,
                 shard_contexts: int, progress: bool, stop_after_shards: int | None) -> dict[int, ActivationCache]:
    """:func:`build_cache` inside its locks."""
    caches = {}
    for layer in layers:
        key = key_of(layer)
        folder = cache_dir("activations") / key.folder_name()
        caches[layer] = ActivationCache(folder, key)
    todo = [c for c in caches.values() if not c.complete]
    if not todo:
        return caches
    # where each unfinished cache stopped: the end of its last shard's contexts (shards written with
    # another shard_contexts included)
    done = {c.manifest["shards"][-1]["contexts"][1] if c.manifest["shards"] else 0 for c in todo}
    if len(done) != 1:  # layers got out of step (e.g. one was deleted): rebuild them separately
        for layer, c in caches.items():
            if not c.complete:
                _build_cache(lm, contexts, [layer], site, key_of, rule, batch_size, shard_contexts, progress, None)
        return {layer: ActivationCache(c.folder) for layer, c in caches.items()}
    start, first_shard = done.pop(), len(todo[0].manifest["shards"])
    layers = [layer for layer in layers if not caches[layer].complete]  # complete caches are left alone
    for c in todo:
        c.folder.mkdir(parents=True, exist_ok=True)
        if start and (c.folder / "contexts.safetensors").exists():
            same = torch.equal(c.contexts(), contexts)
        else:  # a new cache, or one whose contexts file was lost: the recorded digest says if they are the same
            recorded = c.manifest.get("contexts_sha256") if start else None
            c.write_contexts(contexts)
            same = recorded in (None, c.manifest["contexts_sha256"])
        if not same:  # its shards index contexts that this build would not extract
            raise ValueError(f"The unfinished activation cache at {c.folder} was begun on other contexts (the tokenizer "
                             f"or the corpus changed since); delete {c.folder} and extract again.")
    written, starts = 0, range(start, len(contexts), shard_contexts)
    for lo in tqdm(starts, desc="caching activations", unit="shard", disable=not progress, initial=first_shard,
                   total=first_shard + len(starts)):
        hi = min(lo + shard_contexts, len(contexts))
        batches = extract(lm, contexts[lo:hi], layers, site, batch_size, progress=False, dtype=key_of(layers[0]).lm_dtype)
        store_shard({layer: caches[layer] for layer in layers}, contexts, lo, hi, batches, lm.special_ids, rule)
        written += 1
        if stop_after_shards is not None and written >= stop_after_shards and hi < len(contexts):
            return caches
    for c in caches.values():
        if not c.complete:
            if c.n_rows == 0:
                raise ValueError(f"Every token of the corpus was excluded as an outlier or special token; check the exclusion rule {rule}.")
            c.finish()
    return caches


def _streaming_normalizer(cache: ActivationCache) -> Normalizer:
    """Mean and scale over all rows of a cache, one shard at a time."""
    return Normalizer.fit_chunks(rows for i in range(len(cache.manifest["shards"]))
                                 for rows in cache.shard(i)["acts"].split(1024))


class CachedSource:
    """Shuffled, normalised training batches from an :class:`ActivationCache` (a ``BatchSource``).

    Every epoch visits each row once, in an order fixed by ``(seed, epoch)``: shards are
    permuted, then grouped, and rows are shuffled within a group. A cache that fits in
    ``memory_gb`` is one group (a full shuffle across all contexts), read once and resident for
    every epoch. A larger one is cut into groups of half the budget: while the trainer consumes
    one group, a background thread reads the next (at an epoch's end, the next epoch's first),
    so the trainer does not wait for the disk at group boundaries (``read_ahead=False``: each
    group is read when it is reached).
    """

    def __init__(self, cache: ActivationCache, normalizer: Normalizer | None = None, memory_gb: float = 4.0,
                 read_ahead: bool = True):
        if not cache.complete:
            raise ValueError(f"The activation cache at {cache.folder} is incomplete; finish building it first.")
        if not memory_gb > 0:
            raise ValueError(f"memory_gb must be a positive number of GB, got {memory_gb}.")
        self.cache = cache
        self.normalizer = cache.normalizer if normalizer is None else normalizer
        self.d_in = cache.d_in
        self.n_tokens = cache.n_rows
        budget = int(memory_gb * 2**30 / (4 * self.d_in))  # rows of float32
        largest = max(s["rows"] for s in cache.manifest["shards"])
        self.group_rows = max(largest, budget if self.n_tokens <= budget else budget // 2)
        self.read_ahead = read_ahead
        self._resident: tuple | None = None  # (shard ids, rows) of the group being consumed
        self._next: tuple | None = None  # (shard ids, Future of its rows) being read in the background
        self._reader: ThreadPoolExecutor | None = None  # one thread, started with the first read ahead
        self._verified: set[int] = set()  # shards whose checksum was checked in this process

    def _plan(self, seed: int, epoch: int) -> tuple[torch.Generator, list[list[int]]]:
        """The epoch's generator and its shard groups (shards permuted, then packed in order)."""
        g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)  # any int64 seed
        groups, current, size = [], [], 0
        for i in torch.randperm(len(self.cache.manifest["shards"]), generator=g).tolist():
            r = self.cache.manifest["shards"][i]["rows"]
            if current and size + r > self.group_rows:
                groups.append(current)
                current, size = [], 0
            current.append(i)
            size += r
        return g, groups + [current] if current else groups

    def _read(self, key: tuple[int, ...]) -> Tensor:
        """The rows of shards ``key``, concatenated ``(rows, d_in)`` float32, checksums checked once."""
        sizes = [self.cache.manifest["shards"][i]["rows"] for i in key]
        rows = torch.empty(sum(sizes), self.d_in, dtype=torch.float32)  # shards hold float32

        def read(i: int, part: Tensor) -> None:
            part.copy_(self.cache.shard(i, verify=i not in self._verified)["acts"])

        # shards are read and checksummed in parallel (hashing and file reads release the GIL),
        # each into its place in the group (no concatenated copy): the first epoch's supply on 2
        # cores went from about 225k to 270k tokens/s (3 runs each) with the threads
        with ThreadPoolExecutor(max_workers=max(1, min(len(key), os.cpu_count() or 1))) as pool:
            list(pool.map(read, key, rows.split(sizes)))
        self._verified.update(key)
        return rows

    def _load(self, group: list[int]) -> Tensor:
        """The rows of ``group``: resident already, read ahead, or read now."""
        key = tuple(sorted(group))
        if self._resident is None or self._resident[0] != key:
            self._resident = None  # the previous group's memory goes before the next one's is taken
            ahead, self._next = self._next, None
            self._resident = (key, ahead[1].result() if ahead is not None and ahead[0] == key else self._read(key))
        return self._resident[1]

    def _start_reading(self, group: list[int]) -> None:
        """Start reading ``group`` in the background unless it is resident or already on its way."""
        key = tuple(sorted(group))
        if not self.read_ahead or key in [held[0] for held in (self._resident, self._next) if held is not None]:
            return
        if self._reader is None:
            self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="saelib-read-ahead")
        self._next = (key, self._reader.submit(self._read, key))

    def batches(self, batch_size: int, *, seed: int, epoch: int, start: int = 0) -> Iterator[Tensor]:
        """One epoch of ``(batch_size, d_in)`` normalised batches, skipping the first ``start``."""
        if batch_size > self.n_tokens:
            raise ValueError(f"Batch size {batch_size} is larger than the {self.n_tokens} cached tokens; use a smaller batch or more data.")
        g, groups = self._plan(seed, epoch)
        emitted = 0
        for i, group in enumerate(groups):
            n_rows = sum(self.cache.manifest["shards"][s]["rows"] for s in group)
            perm = torch.randperm(n_rows, generator=g)  # drawn even when skipped: keeps `g` in step
            n_full = n_rows // batch_size  # batches stay inside a group; its last partial one is dropped
            if emitted + n_full <= start:
                emitted += n_full
                continue
            rows = self._load(group)
            self._start_reading(groups[i + 1] if i + 1 < len(groups) else self._plan(seed, epoch + 1)[1][0])
            for b in range(n_full):
                if emitted >= start:  # index_select and in-place normalising: 5x faster than rows[ids] and apply
                    yield self.normalizer.apply_(rows.index_select(0, perm[b * batch_size:(b + 1) * batch_size]))
                emitted += 1
            del rows  # so that only this group and the one read ahead are held while the next is loaded


def shuffle(batches: Iterable[Tensor], batch_size: int, capacity: int = 262_144, seed: int = 0) -> Iterator[Tensor]:
    """A shuffling buffer over a stream of ``(n_i, d)`` row blocks, with bounded memory.

    Rows accumulate until ``capacity``; the buffer is then shuffled and its first half is
    emitted as ``(batch_size, d)`` batches, so each batch mixes tokens from many contexts.
    The stream's tail is shuffled and emitted the same way (last partial batch dropped).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if capacity < 2 * batch_size:
        raise ValueError(f"Shuffle capacity {capacity} must be at least twice the batch size {batch_size}.")
    g = torch.Generator().manual_seed(seed)
    buffer: list[Tensor] = []
    size = 0

    def drain(rows: Tensor, n_out: int) -> Iterator[Tensor]:
        for b in range(n_out // batch_size):
            yield rows[b * batch_size:(b + 1) * batch_size]

    for block in batches:
        buffer.append(block)
        size += len(block)
        if size >= capacity:
            rows = torch.cat(buffer)
            rows = rows[torch.randperm(len(rows), generator=g)]
            half = (len(rows) // 2) // batch_size * batch_size
            yield from drain(rows, half)
            buffer, size = [rows[half:]], len(rows) - half
    if buffer:
        rows = torch.cat(buffer)
        yield from drain(rows[torch.randperm(len(rows), generator=g)], len(rows))


def stream(lm: LM, contexts: Tensor, layer: int, site: str = "resid_post", rule: Exclusion = Exclusion(),
           batch_size: int = 64, progress: bool = True, dtype: str | None = None) -> Iterator[Tensor]:
    """Live activations of one layer, outlier tokens removed: ``(n_kept, d)`` per forward pass."""
    for start, acts in extract(lm, contexts, [layer], site, batch_size, progress=progress, dtype=dtype):
        keep, _ = keep_mask(contexts[start:start + batch_size], acts[layer], lm.special_ids, rule)
        yield acts[layer][keep]


def cache_keys(model: str, site: str, corpus: str, split: str, ctx_len: int, max_tokens: int | None,
               val_fraction: float = 0.1, rule: Exclusion = Exclusion(), *, tokenizer=None, lm_dtype: str | None = None,
               device: str | torch.device = "cpu", prepend_bos: bool | None = None) -> Callable[[int], CacheKey]:
    """The key of each layer's cache (:func:`cached_activations`, whose arguments these are), without the
    LM's weights: its tokenizer is loaded where ``prepend_bos`` is None and none is given."""
    corpus_sha256 = data.corpus_sha256(corpus)
    if prepend_bos is None:
        prepend_bos = data.tokenizer_adds_bos(tokenizer if tokenizer is not None else load_tokenizer(model))
    dtype = _check_dtype(extraction_dtype(device) if lm_dtype is None else lm_dtype)
    weights = model_digest(model)

    def key_of(L: int) -> CacheKey:
        return CacheKey(model, L, site, corpus, split, ctx_len, max_tokens, val_fraction, asdict(rule), corpus_sha256,
                        prepend_bos=prepend_bos, lm_dtype=dtype, model_digest=weights)

    return key_of


def cached_activations(model: str, layer: int | list[int], site: str = "resid_post", corpus: str = "wikipedia",
                       split: str = "train", ctx_len: int = 64, max_tokens: int | None = None,
                       val_fraction: float = 0.1, rule: Exclusion = Exclusion(), lm: LM | None = None,
                       progress: bool = True, lm_dtype: str | None = None,
                       device: str | torch.device = "cpu", prepend_bos: bool | None = None
                       ) -> ActivationCache | dict[int, ActivationCache]:
    """The activation cache of a model/layer/site/corpus/split, extracted on first use.

    ``device``: where the model is loaded when ``lm`` is None. ``lm_dtype``: of the LM's forward, as
    ``dtype`` in :func:`extract` (``None``: :func:`extraction_dtype` of the LM's device); part of the key.
    ``prepend_bos``: contexts start with the begin-of-sequence token (:func:`saelib.data.pack`), part
    of the key; ``None`` follows the model's convention (:func:`saelib.data.tokenizer_adds_bos`).

    The language model is loaded only when something is left to extract (its tokenizer always,
    where ``prepend_bos`` is None). With a list of layers, all are extracted in one forward pass and a
    ``{layer: cache}`` dict is returned.
    """
    layers = [layer] if isinstance(layer, int) else list(layer)
    key_of = cache_keys(model, site, corpus, split, ctx_len, max_tokens, val_fraction, rule,
                        tokenizer=lm.tokenizer if lm is not None else None,
                        device=lm.model.device if lm is not None else device, lm_dtype=lm_dtype, prepend_bos=prepend_bos)
    caches = {L: ActivationCache(cache_dir("activations") / key_of(L).folder_name(), key_of(L)) for L in layers}
    if not all(c.complete for c in caches.values()):
        lm = lm or load_lm(model, device)
        ctx = data.contexts(corpus, lm.tokenizer, split, ctx_len, max_tokens, val_fraction, prepend_bos)
        caches = build_cache(lm, ctx, layers, site, key_of, rule, progress=progress)
    return caches[layer] if isinstance(layer, int) else caches


def extraction_throughput(lm: LM, contexts: Tensor, layer: int, site: str = "resid_post", batch_size: int = 64) -> dict:
    """Tokens/s of extracting ``layer`` with the forward stopped there, against a full forward pass."""
    import time

    result = {}
    for name, stop in (("early_stop_tokens_per_s", True), ("full_forward_tokens_per_s", False)):
        start = time.perf_counter()
        for _ in extract(lm, contexts, [layer], site, batch_size, stop_early=stop, progress=False):
            pass
        result[name] = contexts.numel() / (time.perf_counter() - start)
    result["speedup"] = result["early_stop_tokens_per_s"] / result["full_forward_tokens_per_s"]
    return result


def token_norms(lm: LM, contexts: Tensor, layer: int, site: str = "resid_post", rule: Exclusion = Exclusion(),
                batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """Norms of the kept tokens and of the excluded ones, ``(n_kept,)`` and ``(n_excluded,)``."""
    kept, excluded = [], []
    for start, acts in extract(lm, contexts, [layer], site, batch_size, progress=False):
        keep, _ = keep_mask(contexts[start:start + batch_size], acts[layer], lm.special_ids, rule)
        norms = acts[layer].norm(dim=-1)
        kept.append(norms[keep])
        excluded.append(norms[~keep])
    return torch.cat(kept), torch.cat(excluded)
