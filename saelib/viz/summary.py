"""The visualizer's data layer: everything one would show about each latent, computed once over held-out text.

``summarize(run_or_sae, lm, preset)`` encodes the held-out tokens (the corpus's validation split,
or your own ``texts``) and keeps, per latent (``n`` latents, over ``N`` kept tokens):

- activation density (fraction of kept tokens where it fires), mean and max activation, and a
  histogram of its non-zero activations (``hist_bins`` bins from 0 to its max);
- example contexts: the ``n_top`` top-activating tokens, then ``per_quantile`` random tokens from
  each of ``n_quantiles`` equal-count slices of its other firing tokens ranked by activation (those
  outside the top examples' contexts, so that a quantile sample never repeats a top passage; top
  examples alone mislead: they hide what the latent does most of the time), each with the latent's
  activation on every token of its context (two top examples, or two quantile samples, may be
  tokens of one context);
- output effect: the tokens its decoder direction promotes and suppresses through the
  unembedding (:func:`logit_effects`, direct logit attribution) and, for a few latents, the
  measured effect of ablating it (:func:`ablation_effects`);
- its N2G explanation (:mod:`saelib.evals.n2g`: n-grams from the first half of the contexts)
  with precision and recall on the second half;
- its nearest latents by decoder cosine;
- and, for search, each token's latents with the highest mean activation on it.

The result is a :class:`Summary`, cached as ``summary.safetensors`` + ``summary.json`` (never
pickle) in ``RUN/viz_summary/<preset>/`` when a run folder is given. Both front ends (the static
site, :mod:`.static`, and the notebook browser, :mod:`.widget`) read it through
:meth:`Summary.latent`, :meth:`Summary.overview` and :meth:`Summary.search`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from .. import config
from ..data import pack
from ..evals.downstream import sae_reconstruct, splice
from ..evals.heldout import (encode, held_out, held_out_key, site_activations, trained_prepend_bos, trained_site,
                             trained_val_fraction)
from ..evals.n2g import explain_and_score, firing, sorted_join
from ..files import atomic_write, digest
from ..loading import load
from ..models import DEFAULT_MODEL

# 2: byte tokens as <0x..>, quantile examples outside the top contexts; 3: held-out text is the share of the
# corpus the SAE trained without (its val_fraction)
FORMAT_VERSION = 3
SUMMARY_DIR = "viz_summary"
DENSE_THRESHOLD = 0.1  # the paper's (and saelib.evals') "dense latent": fires on more than 10% of tokens
# What each number means, for the tooltips and legends of both front ends: the overview's columns,
# then the output effects (in logits: "Δ logit")
HELP = {
    "id": "the latent's index; click it to open the latent's page",
    "density": "activation density: share of the held-out tokens on which the latent fires",
    "mean_act": "mean activation over the tokens where it fires (the SAE's normalised input scale)",
    "max_act": "largest activation on the held-out tokens",
    "n2g_precision": "of the tokens where its n-gram explanation (N2G) predicts a firing, the share where it fires "
                     "(held-out half; 1 is best)",
    "n2g_recall": "of the tokens where it fires, the share its n-gram explanation (N2G) predicts (held-out half; "
                  "1 is best)",
    "top_token": "the token of its largest activation",
    "logit": "Δ logit: a change in a next-token logit (natural-log odds), centred over the vocabulary",
    "direct": "direct logit attribution: the change in the token's logit per unit of the latent's activation, "
              "through the direct path from this layer to the output (later layers skipped, the final norm's 1/RMS "
              "left out), centred over the vocabulary",
    "ablation": "measured change in the next-token logit when the latent's contribution is removed at its "
                "top-activating token (through every later layer), centred over the vocabulary",
}

# options of summarize() at each preset of saelib.config (one registry: PRESETS["ci"] is config.PRESETS["ci"]["view"])
PRESETS = config.section("view")


@dataclass
class Summary:
    """Per-latent visualizer data. ``tensors`` (saved as safetensors) and ``info`` (saved as JSON).

    Tensors (``n`` latents, ``E`` examples per latent, ``T`` context length, ``L`` logits):
    ``density, mean_act, max_act, n2g_precision, n2g_recall (n,)`` (NaN where undefined);
    ``hist (n, bins)``; ``ids (n_ctx, T)`` held-out tokens; ``ex_ctx, ex_pos (n, E)`` (-1: none)
    and ``ex_acts (n, E, T)``; ``logit_top_ids, logit_top, logit_bottom_ids, logit_bottom (n, L)``;
    ``neighbours, neighbour_cos (n, M)``; ``ablation_latents (a,)`` and ``ablation_top_ids,
    ablation_top, ablation_bottom_ids, ablation_bottom (a, L)``; ``search_ids (U,)`` token ids and
    ``search_latents, search_scores (U, S)`` (-1: none).

    ``info``: ``options``, ``metadata`` (the SAE's), ``n_latents, k, n_tokens, fingerprint``,
    ``groups`` (example slots: name, start, count), ``tokens`` (id -> text of every token
    referenced) and ``n2g`` (latent -> n-grams, each a list of token ids).
    """

    tensors: dict[str, Tensor]
    info: dict
    _search_index: dict | None = field(default=None, repr=False)

    @property
    def n_latents(self) -> int:
        return int(self.info["n_latents"])

    def text(self, token_id: int) -> str:
        return self.info["tokens"][str(int(token_id))]

    def check_latent(self, latent: int) -> int:
        if isinstance(latent, bool) or not isinstance(latent, int) or not 0 <= latent < self.n_latents:
            raise ValueError(f"Latent {latent!r} does not exist: this SAE has {self.n_latents} latents (0 to "
                             f"{self.n_latents - 1}).")
        return latent

    def latent(self, latent: int) -> dict:
        """Everything about one latent as a JSON-able dict (what both front ends render).

        Keys: ``id, density, mean_act, max_act, hist {edges, counts}, examples`` (list of
        ``{group, tokens, acts, center}``: a window of token texts around the example token,
        the latent's activation on each, and the example token's index in the window),
        ``promoted, suppressed`` (``[token, logit]`` lists), ``ablation`` (``{promoted,
        suppressed}`` or None), ``n2g {patterns, precision, recall}``, ``neighbours`` (``[id,
        cosine]``).
        """
        i = self.check_latent(latent)
        t, bins = self.tensors, self.info["options"]["hist_bins"]
        left, right = self.info["options"]["window"]
        max_act = float(t["max_act"][i])
        examples = []
        for group in self.info["groups"]:
            for e in range(group["start"], group["start"] + group["count"]):
                c, p = int(t["ex_ctx"][i, e]), int(t["ex_pos"][i, e])
                if c < 0:
                    continue
                lo, hi = max(0, p - left), min(t["ids"].shape[1], p + right + 1)
                examples.append({"group": group["name"], "center": p - lo,
                                 "tokens": [self.text(x) for x in t["ids"][c, lo:hi].tolist()],
                                 "acts": [_short(a) for a in t["ex_acts"][i, e, lo:hi].float().tolist()]})
        ablation = None
        rows = (t["ablation_latents"] == i).nonzero()
        if len(rows):
            r = int(rows[0])
            ablation = {"promoted": self._logits("ablation_top", r), "suppressed": self._logits("ablation_bottom", r)}
        patterns = self.info["n2g"].get(str(i), [])
        return {
            "id": i, "density": float(t["density"][i]), "mean_act": float(t["mean_act"][i]), "max_act": max_act,
            "hist": {"edges": [_short(max_act * b / bins, 4) for b in range(bins + 1)], "counts": t["hist"][i].tolist()},
            "examples": examples,
            "promoted": self._logits("logit_top", i), "suppressed": self._logits("logit_bottom", i),
            "ablation": ablation,
            "n2g": {"patterns": ["".join(self.text(x) for x in p) for p in patterns],
                    "precision": _finite(t["n2g_precision"][i]), "recall": _finite(t["n2g_recall"][i]),
                    # explained: whether N2G ran on it (a latent that fires on the explanation half, and at
                    # a preset with n2g_latents, one of that sample), so that no patterns says why
                    "explained": str(i) in self.info["n2g"], "sampled": self.info.get("options", {}).get("n2g_latents") is not None},
            "neighbours": [[int(j), _short(float(c), 4)] for j, c in zip(t["neighbours"][i], t["neighbour_cos"][i])],
        }

    def _logits(self, name: str, row: int) -> list:
        ids, vals = self.tensors[f"{name}_ids"][row], self.tensors[name][row]
        return [[self.text(x), _short(float(v), 4)] for x, v in zip(ids.tolist(), vals)]

    def overview(self) -> dict:
        """Overview data: SAE facts, counts of dead and dense latents, the log10-density histogram,
        and per-latent columns (``id, density, mean_act, max_act, n2g_precision, n2g_recall,
        top_token``) for a sortable table, with ``help``: what each column and output effect means."""
        t = self.tensors
        density = t["density"]
        alive = density[density > 0].log10()
        lo = math.floor(float(alive.min())) if len(alive) else -6
        counts, edges = torch.histogram(alive, bins=40, range=(float(lo), 0.0))
        top_token = [self.text(t["ids"][c, p]) if c >= 0 else "" for c, p in zip(t["ex_ctx"][:, 0].tolist(),
                                                                              t["ex_pos"][:, 0].tolist())]
        return {
            "metadata": self.info["metadata"], "n_latents": self.n_latents, "k": self.info["k"],
            "n_tokens": self.info["n_tokens"], "preset": self.info["options"].get("preset"),
            "dead": int((density == 0).sum()), "dense": int((density > DENSE_THRESHOLD).sum()),
            "dense_threshold": DENSE_THRESHOLD, "help": HELP,
            "density_hist": {"edges": edges.tolist(), "counts": counts.int().tolist()},
            "columns": {
                "id": list(range(self.n_latents)),
                "density": [_short(x, 4) for x in density.tolist()],
                "mean_act": [_short(x, 4) for x in t["mean_act"].tolist()],
                "max_act": [_short(x, 4) for x in t["max_act"].tolist()],
                "n2g_precision": [_finite(x, 3) for x in t["n2g_precision"]],
                "n2g_recall": [_finite(x, 3) for x in t["n2g_recall"]],
                "top_token": top_token,
            },
        }

    def search_index(self) -> dict[str, list]:
        """Token search: normalised token text -> ``[[latent, mean activation], ...]``, best first.

        The key is the token's text stripped and lower-cased, so " Paris" and "paris" meet; tokens
        with the same key are merged, keeping each latent's best score.
        """
        if self._search_index is None:
            merged: dict[str, dict[int, float]] = {}
            t = self.tensors
            for tok, lats, scores in zip(t["search_ids"].tolist(), t["search_latents"].tolist(),
                                         t["search_scores"].tolist()):
                key = normalise_query(self.text(tok))
                if not key:
                    continue
                best = merged.setdefault(key, {})
                for j, s in zip(lats, scores):
                    if j >= 0 and s > best.get(j, 0.0):
                        best[j] = _short(s, 4)
            self._search_index = {key: sorted(best.items(), key=lambda kv: -kv[1]) for key, best in merged.items()}
        return self._search_index

    def search(self, query: str, limit: int = 20) -> list[tuple[int, float]]:
        """Latents that fire most on a token: ``[(latent, mean activation on it)]``, best first.

        Matches tokens whose normalised text equals ``query``'s; if none does, those containing it.
        """
        key, index = normalise_query(query), self.search_index()
        if not key:
            return []
        keys = [key] if key in index else [k for k in index if key in k]
        best: dict[int, float] = {}
        for k in keys:
            for j, s in index[k]:
                best[j] = max(best.get(j, 0.0), s)
        return sorted(best.items(), key=lambda kv: -kv[1])[:limit]

    def save(self, folder: str | Path) -> Path:
        """Write ``summary.safetensors`` and ``summary.json`` into ``folder`` (replacing it whole)."""
        def write(tmp: str) -> None:
            Path(tmp).mkdir(parents=True)
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, Path(tmp) / "summary.safetensors")
            (Path(tmp) / "summary.json").write_text(json.dumps(self.info))

        return atomic_write(folder, write)

    @classmethod
    def load(cls, folder: str | Path) -> Summary:
        folder = Path(folder)
        if not (folder / "summary.json").exists():
            raise FileNotFoundError(f"No visualizer summary in {folder}; build one with saelib.viz.summarize(RUN).")
        return cls(load_file(folder / "summary.safetensors"), json.loads((folder / "summary.json").read_text()))


def _cached_preset(folder: Path, sae, lm) -> str | None:
    """The largest preset whose current summary of this SAE ``folder`` already holds (:func:`_current`)."""
    for name in reversed(PRESETS):
        info = folder / SUMMARY_DIR / name / "summary.json"
        try:
            cached = json.loads(info.read_text())
        except (OSError, ValueError):
            continue  # none, or unreadable: it would be rebuilt anyway
        opts = resolve_options(name, {})
        if _current(cached, sae, opts, _held_out(sae, lm, opts, None)):
            return name
    return None


def _current(info, sae, opts: dict, held: str | None) -> bool:
    """Whether a cached summary's ``info`` is of this SAE, written by this version, with these
    resolved options (a preset whose values have changed since is rebuilt), on these held-out
    contexts (``held``: :func:`_held_out`)."""
    return (isinstance(info, dict) and info.get("fingerprint") == fingerprint(sae) and info.get("version") == FORMAT_VERSION
            and info.get("options") == json.loads(json.dumps(opts)) and info.get("held_out") == held)


def _held_out(sae, lm, opts: dict, texts: list[str] | None) -> str | None:
    """What fixes the summary's text: the held-out cache's name (:func:`saelib.evals.heldout.held_out_key`:
    the model's and corpus file's digests, the split...), or None for given ``texts`` (their hash names
    the summary's folder) or an SAE that does not say where it was trained (refused when built)."""
    meta = dict(getattr(sae, "metadata", {}) or {})
    if texts is not None or "layer" not in meta:
        return None
    corpus = meta.get("corpus", "wikipedia")
    return held_out_key(lm.name if lm is not None else meta.get("model", DEFAULT_MODEL), int(meta["layer"]),
                        meta.get("site", "resid_post"), corpus, int(meta.get("ctx_len", 64)), opts["eval_tokens"],
                        trained_prepend_bos(sae), trained_val_fraction(sae, corpus),
                        tokenizer=lm.tokenizer if lm is not None else None)


def normalise_query(text: str) -> str:
    """How token texts and queries are compared in search: stripped and lower-cased."""
    return text.strip().lower()


def _short(x: float, digits: int = 3) -> float | int:
    """``x`` to ``digits`` significant digits (0 as the integer 0): compact JSON for the site that keeps
    tiny values (a density of 3e-6 is not rounded to 0)."""
    return float(f"{x:.{digits}g}") if x else 0


def _finite(x, digits: int = 4) -> float | None:
    x = float(x)
    return _short(x, digits) if math.isfinite(x) else None


# ----------------------------------------------------------------------------- building


def fingerprint(sae) -> str:
    """A hash of the SAE's weights: a cached summary is reused only for the same SAE."""
    weights = [part for name, tensor in sorted(sae.state_dict().items()) for part in (name, tensor)]
    return digest(*weights, repr(sae.normalizer.scale), new=functools.partial(hashlib.blake2b, digest_size=12))


def _as_sae(run_or_sae):
    """``(sae, folder or None)`` from an SAE, an SAE folder, a run folder or a released SAE's name (whose
    summary is not kept: it has no folder of its own to keep it in)."""
    if isinstance(run_or_sae, (str, os.PathLike)):
        path = Path(run_or_sae)
        return load(run_or_sae), path if path.exists() else None
    return run_or_sae, None


def resolve_options(preset: str, overrides: dict) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"Unknown visualizer preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    unknown = set(overrides) - set(PRESETS[preset])
    if unknown:
        raise ValueError(f"Unknown visualizer option(s) {', '.join(sorted(unknown))}; valid ones: "
                         f"{', '.join(PRESETS[preset])}.")
    opts = {**PRESETS[preset], **overrides, "preset": preset}
    opts["window"] = list(opts["window"])
    return opts


def summarize(run_or_sae, lm=None, preset: str | None = None, *, texts: list[str] | None = None, cache: bool = True,
              progress: bool = True, **overrides) -> Summary:
    """The visualizer summary of an SAE over held-out text (computed once, then read from the cache).

    Args:
        run_or_sae: a run folder (``saelib train --out RUN``), an SAE folder, a released SAE's name
            (``saelib.load``), or a loaded SAE whose ``metadata`` names ``model``, ``layer``, ``site``,
            ``ctx_len`` and ``corpus``.
        lm: the loaded LM (:func:`saelib.models.load_lm`); loaded from the SAE's metadata if None.
        preset: ``"ci"``, ``"lesson"``, ``"demo"`` or ``"full"`` (see :data:`PRESETS`); ``None``: the largest one
            a run folder already has a summary of for this SAE, else ``"ci"``.
        texts: summarise these documents instead of the corpus's validation split (packed into
            contexts of the SAE's ``ctx_len``; the incomplete tail is dropped).
        cache: for a folder, read/write ``RUN/viz_summary/<preset>[-<hash of options>]/`` (rebuilt
            when the SAE, the summary format or the preset's resolved values have changed).
        overrides: any key of a preset, e.g. ``eval_tokens=8192``.
    """
    sae, folder = _as_sae(run_or_sae)
    preset = preset or (folder is not None and _cached_preset(folder, sae, lm)) or "ci"
    opts = resolve_options(preset, overrides)
    cache_folder = None
    if folder is not None and cache:
        custom = dict(overrides) | ({"texts": texts} if texts is not None else {})
        suffix = "-" + hashlib.blake2b(json.dumps(custom, sort_keys=True).encode(), digest_size=4).hexdigest() if custom else ""
        cache_folder = folder / SUMMARY_DIR / f"{preset}{suffix}"
        if (cache_folder / "summary.json").exists():
            try:
                cached = Summary.load(cache_folder)
            except (OSError, ValueError, SafetensorError):  # damaged: built again below, and written over it
                cached = None
            if cached is not None and _current(cached.info, sae, opts, _held_out(sae, lm, opts, texts)):
                return cached
    summary = build_summary(sae, lm, opts, texts=texts, progress=progress)
    if cache_folder is not None:
        summary.save(cache_folder)
    return summary


@torch.no_grad()
def build_summary(sae, lm, opts: dict, texts: list[str] | None = None, progress: bool = True) -> Summary:
    """Compute a :class:`Summary` (no caching; :func:`summarize` is the usual entry point)."""
    meta = dict(getattr(sae, "metadata", {}) or {})
    lm, layer, site, ctx_len = trained_site(sae, lm, "summarise")
    sae.eval()
    steps = tqdm(total=6, desc="visualizer summary", disable=not progress)
    if texts is None:
        corpus = meta.get("corpus", "wikipedia")
        held = held_out(lm, layer, site, corpus, ctx_len, opts["eval_tokens"], progress=progress,
                        prepend_bos=trained_prepend_bos(sae), val_fraction=trained_val_fraction(sae, corpus))
    else:
        ids = pack(list(texts), lm.tokenizer, ctx_len, max_contexts=max(1, opts["eval_tokens"] // ctx_len),
                   prepend_bos=trained_prepend_bos(sae))
        held = site_activations(lm, ids, layer, site, progress=progress)
    steps.update()
    values, indices = encode(sae, held.acts)
    values = values * held.keep[..., None]  # excluded tokens (position 0, separators) show and count as 0
    n, (n_ctx, T) = sae.n_latents, held.ids.shape
    n_tokens = int(held.keep.sum())

    tok, lat, val = firing(values, indices)
    order, counts, starts = _rank_by_group(lat, val, n)
    tok, lat, val = tok[order], lat[order], val[order]

    tensors = _activation_stats(lat, val, counts, n, n_tokens, opts["hist_bins"])
    ex_ctx, ex_pos, groups = _pick_examples(tok, lat, counts, starts, T, opts)
    tensors |= {"ids": held.ids.int(), "ex_ctx": ex_ctx, "ex_pos": ex_pos,
                "ex_acts": _example_acts(tok, lat, val, ex_ctx, n_ctx, T)}
    steps.update()
    tensors |= dict(zip(("logit_top_ids", "logit_top", "logit_bottom_ids", "logit_bottom"),
                        logit_effects(sae, lm, opts["n_logits"])))
    tensors["neighbours"], tensors["neighbour_cos"] = nearest_latents(sae, opts["n_neighbours"])
    steps.update()
    tensors |= _token_search(tok, lat, val, held.ids, held.keep, n, opts["search_latents"])
    steps.update()
    patterns, tensors["n2g_precision"], tensors["n2g_recall"] = _n2g(tok, lat, val, n, held, opts)
    steps.update()
    alive = (counts > 0).nonzero().flatten().tolist()
    chosen = sorted(random.Random(opts["seed"]).sample(alive, min(opts["ablation_latents"], len(alive))))
    tensors |= ablation_effects(sae, lm, held, values, indices, chosen, opts["n_logits"], progress=progress)
    steps.update()
    steps.close()

    referenced = set(held.ids.flatten().tolist())
    for name in ("logit_top_ids", "logit_bottom_ids", "ablation_top_ids", "ablation_bottom_ids"):
        referenced |= set(tensors[name].flatten().tolist())
    info = {
        "version": FORMAT_VERSION, "options": opts, "metadata": meta, "n_latents": n, "k": sae.k,
        "n_tokens": n_tokens, "n_contexts": n_ctx, "fingerprint": fingerprint(sae), "groups": groups,
        "held_out": _held_out(sae, lm, opts, texts),
        "tokens": {str(x): token_text(lm.tokenizer, x) for x in sorted(referenced)},
        "n2g": patterns,
    }
    return Summary(tensors, info)


def token_text(tokenizer, token_id: int) -> str:
    """One token as text. A token that is part of a multi-byte character (byte-level BPE) shows its
    bytes, ``<0xE2 0x80>``, instead of the replacement character its lone decode gives."""
    text = tokenizer.decode([token_id])
    if "\ufffd" not in text:
        return text
    piece = tokenizer.convert_ids_to_tokens(token_id)
    decoder = _byte_decoder()
    if not piece or any(ch not in decoder for ch in piece):
        return piece or text  # not byte-level BPE: its own piece (e.g. SentencePiece's "<0xE2>")
    raw = bytes(decoder[ch] for ch in piece).decode("utf-8", "surrogateescape")  # bad bytes -> U+DC80..U+DCFF
    return re.sub("[\udc80-\udcff]+", lambda m: "<" + " ".join(f"0x{ord(c) - 0xDC00:02X}" for c in m[0]) + ">", raw)


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: printable character -> the byte it stands for."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {ch: b for b, ch in bytes_to_unicode().items()}


def _rank_by_group(group: Tensor, score: Tensor, n_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """Sort entries by group, then by descending score: ``(order, counts (n_groups,), starts (n_groups,))``."""
    order = torch.argsort(score, descending=True, stable=True)
    order = order[torch.argsort(group[order], stable=True)]
    counts = torch.bincount(group, minlength=n_groups)
    return order, counts, torch.cumsum(counts, 0) - counts


def _activation_stats(lat: Tensor, val: Tensor, counts: Tensor, n: int, n_tokens: int, bins: int) -> dict:
    """Density, mean and max activation, and a ``bins``-bin histogram from 0 to the max, per latent."""
    total = torch.zeros(n).index_add_(0, lat, val)
    max_act = torch.zeros(n).scatter_reduce_(0, lat, val, "amax")
    b = (val / max_act[lat] * bins).long().clamp_(max=bins - 1)
    hist = torch.bincount(lat * bins + b, minlength=n * bins).view(n, bins)
    return {"density": counts.float() / max(n_tokens, 1), "mean_act": total / counts.clamp_min(1),
            "max_act": max_act, "hist": hist.int()}


def _pick_examples(tok: Tensor, lat: Tensor, counts: Tensor, starts: Tensor, T: int,
                   opts: dict) -> tuple[Tensor, Tensor, list]:
    """Example tokens per latent from its firing tokens (``tok``, ``lat``: flat token index and
    latent, ranked by latent then activation): ``n_top`` top ones, then ``per_quantile`` spread at
    random over each of ``n_quantiles`` equal-count rank slices of those outside the top ones' contexts."""
    top_ctx, top_pos = _sample_ranks(tok, counts, starts, torch.arange(opts["n_top"])[None], T)
    n_ctx = int(tok.max()) // T + 1 if len(tok) else 1
    shown = (torch.arange(len(counts))[:, None] * n_ctx + top_ctx)[top_ctx >= 0]
    rest = ~torch.isin(lat.long() * n_ctx + tok // T, shown)
    counts = torch.bincount(lat[rest], minlength=len(counts))
    ctx, pos = _sample_ranks(tok[rest], counts, torch.cumsum(counts, 0) - counts, _quantile_ranks(counts, opts), T)
    groups = [{"name": "top activations", "start": 0, "count": opts["n_top"]}]
    Q, P = opts["n_quantiles"], opts["per_quantile"]
    for k in range(Q):
        groups.append({"name": f"activation quantile {k * 100 // Q}-{(k + 1) * 100 // Q}% from the top",
                       "start": opts["n_top"] + k * P, "count": P})
    return torch.cat([top_ctx, ctx], 1), torch.cat([top_pos, pos], 1), groups


def _quantile_ranks(counts: Tensor, opts: dict) -> Tensor:
    """``(n, Q * P)`` ranks (-1: none): ``P`` spread at random over each of ``Q`` equal-count slices of ``counts``."""
    n, Q, P = len(counts), opts["n_quantiles"], opts["per_quantile"]
    g = torch.Generator().manual_seed(opts["seed"])
    c = counts[:, None, None].double()
    q = torch.arange(Q)[None, :, None]
    lo, hi = (c * q / Q).floor(), (c * (q + 1) / Q).floor()
    width, j = hi - lo, torch.arange(P)[None, None, :]
    spread = lo + ((j + torch.rand(n, Q, P, generator=g, dtype=torch.float64)) * width / P).floor()
    ranks = torch.where(width >= P, spread, lo + j).long()
    return torch.where((width >= P) | (j < width), ranks, -1).view(n, -1)


def _sample_ranks(tok: Tensor, counts: Tensor, starts: Tensor, ranks: Tensor, T: int) -> tuple[Tensor, Tensor]:
    """``(ctx, pos)`` of each latent's firing tokens at ``ranks`` (``(n or 1, E)``), -1 where out of range."""
    ranks = ranks.expand(len(counts), -1)
    valid = (ranks >= 0) & (ranks < counts[:, None])
    flat = tok[(starts[:, None] + ranks).clamp(0, max(len(tok) - 1, 0))] if len(tok) else torch.zeros_like(ranks)
    return torch.where(valid, flat // T, -1).int(), torch.where(valid, flat % T, -1).int()


def _example_acts(tok: Tensor, lat: Tensor, val: Tensor, ex_ctx: Tensor, n_ctx: int, T: int) -> Tensor:
    """``(n, E)`` example contexts ``ex_ctx`` (-1: none) -> ``(n, E, T)`` float16: each latent's
    activation over each of its example contexts, from where the code fires (``tok``, ``lat``,
    ``val``: flat token index, latent, activation)."""
    n, E = ex_ctx.shape
    out = torch.zeros(n * E * T, dtype=torch.float16)
    slot_keys = (torch.arange(n)[:, None] * n_ctx + ex_ctx.long()).flatten()
    slot_keys[ex_ctx.flatten() < 0] = -1
    slot_keys, slots = slot_keys.sort()
    # each firing token goes to every example slot of its latent that shows its context
    entry, at = sorted_join(slot_keys, lat.long() * n_ctx + tok // T)
    out[slots[at] * T + tok[entry] % T] = val[entry].half()
    return out.view(n, E, T)


def _final_norm(lm):
    """The LM's final normalisation module (before the unembedding)."""
    for path in ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.final_layernorm"):
        module = lm.model
        for part in path.split("."):
            module = getattr(module, part, None)
        if module is not None:
            return module
    raise ValueError(f"Cannot find the final norm of {lm.name}; logit effects need a model with a standard layout.")


@torch.no_grad()
def _norm_gain(norm, d: int) -> Tensor:
    """``(d,)`` float32: the final norm's gain per channel. A LayerNorm's weight; for any other norm
    (RMSNorm's ``weight``, Gemma's ``1 + weight``, a norm without weights), its output on a vector of
    ones, whose RMS is 1, so that the gain is all that changes it."""
    if isinstance(norm, torch.nn.LayerNorm):
        return torch.ones(d) if norm.weight is None else norm.weight.detach().float().cpu()
    param = next(norm.parameters(), None)
    ones = torch.ones(1, d, dtype=param.dtype if param is not None else torch.float32,
                      device=param.device if param is not None else "cpu")
    return norm(ones)[0].detach().float().cpu()


@torch.no_grad()
def logit_effects(sae, lm, top: int = 10, chunk: int = 512) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Direct logit attribution of each latent's decoder direction: the tokens it promotes and suppresses.

    For latent ``i``: ``u = lm_head(g * (scale * W_dec[i]))`` (``(V,)``), where ``scale`` maps the
    SAE's normalised scale back to the raw residual (:class:`saelib.normalize.Normalizer`) and ``g``
    is the final norm's gain per channel (:func:`_norm_gain`); with a LayerNorm the direction is
    centred first. ``u`` is then
    centred over the vocabulary (softmax ignores a constant). The approximation: only the direct
    path from the SAE's layer to the logits (later layers are skipped), and the final norm is
    treated as linear (its division by the residual's RMS, a positive per-token factor, is left
    out: it rescales all of a latent's logits alike, so the ranking is exact for that path, the
    magnitudes are "per unit activation, before the norm's 1/RMS").

    Returns ``(top_ids, top_values, bottom_ids, bottom_values)``, each ``(n_latents, top)``.
    """
    norm, head = _final_norm(lm), lm.model.get_output_embeddings()
    weight, gain = head.weight.detach().float(), _norm_gain(norm, sae.d_in)
    out = []
    for s in range(0, sae.n_latents, chunk):
        d = sae.W_dec.detach()[s:s + chunk].float() * sae.normalizer.scale
        if isinstance(norm, torch.nn.LayerNorm):
            d = d - d.mean(-1, keepdim=True)
        d = d * gain
        logits = d.to(weight.device) @ weight.T
        logits = (logits - logits.mean(-1, keepdim=True)).cpu()
        hi, lo = logits.topk(top, -1), logits.topk(top, -1, largest=False)
        out.append((hi.indices.int(), hi.values, lo.indices.int(), lo.values))
    return tuple(torch.cat(parts) for parts in zip(*out))


@torch.no_grad()
def nearest_latents(sae, m: int = 8, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """The ``m`` latents whose decoder rows are closest by cosine to each latent's: ``(ids, cosines)``, ``(n, m)``."""
    W = torch.nn.functional.normalize(sae.W_dec.detach().float(), dim=-1)
    m = min(m, sae.n_latents - 1)
    ids, cos = [], []
    for s in range(0, sae.n_latents, chunk):
        sim = W[s:s + chunk] @ W.T
        sim[torch.arange(len(sim)), torch.arange(s, s + len(sim))] = -2.0
        best = sim.topk(m, -1)
        ids.append(best.indices.int().cpu())
        cos.append(best.values.cpu())
    return torch.cat(ids), torch.cat(cos)


def _token_search(tok: Tensor, lat: Tensor, val: Tensor, ids: Tensor, keep: Tensor, n: int, m: int) -> dict:
    """For each token id in the kept text: the ``m`` latents with the highest mean activation on it."""
    token_of = ids.flatten()[tok].long()
    pair = token_of * n + lat
    keys, inverse = torch.unique(pair, return_inverse=True)
    sums = torch.zeros(len(keys)).index_add_(0, inverse, val)
    occurrences = torch.bincount(ids[keep].long())
    tokens, lats = keys // n, keys % n
    mean = sums / occurrences[tokens]
    uniq, group = torch.unique(tokens, return_inverse=True)
    order, counts, starts = _rank_by_group(group, mean, len(uniq))
    rank = torch.arange(len(order)) - starts[group[order]]
    pick = order[rank < m]
    out_lat = torch.full((len(uniq), m), -1, dtype=torch.int32)
    out_score = torch.zeros(len(uniq), m)
    rows, cols = group[pick], rank[rank < m]
    out_lat[rows, cols] = lats[pick].int()
    out_score[rows, cols] = mean[pick]
    return {"search_ids": uniq.int(), "search_latents": out_lat, "search_scores": out_score}


def _n2g(tok, lat, val, n, held, opts) -> tuple[dict, Tensor, Tensor]:
    """N2G explanation of every latent that fires in the first half of the contexts (a sample of
    ``n2g_latents`` of them where set), and its precision/recall ``(n,)`` on the second half
    (:func:`saelib.evals.n2g.explain_and_score`; NaN for the latents not explained)."""
    n_ctx, T = held.ids.shape
    alive = torch.unique(lat[tok < n_ctx // 2 * T]).tolist()
    if opts["n2g_latents"] is not None:
        alive = sorted(random.Random(opts["seed"]).sample(alive, min(opts["n2g_latents"], len(alive))))
    precision, recall = torch.full((n,), float("nan")), torch.full((n,), float("nan"))
    found, p, r = explain_and_score(held.ids, held.keep, tok, lat, val, alive)
    precision[alive], recall[alive] = p.float(), r.float()
    return {str(i): [list(x) for x in f] for i, f in zip(alive, found)}, precision, recall


@torch.no_grad()
def ablation_effects(sae, lm, held, values: Tensor, indices: Tensor, latents: list[int], top: int = 10,
                     batch_size: int = 8, progress: bool = True) -> dict:
    """Measured output effect of ``latents``: at each one's top-activating token, the next-token
    logits with the SAE spliced in minus those with that latent's contribution removed (the
    latent's own effect, through every later layer), centred over the vocabulary.

    Returns ``ablation_latents (a,)`` and ``ablation_top_ids, ablation_top, ablation_bottom_ids,
    ablation_bottom`` ``(a, top)``.
    """
    T = held.ids.shape[1]
    reconstruct = sae_reconstruct(sae)
    rows = []
    for s in tqdm(range(0, len(latents), batch_size), desc="ablation effects", disable=not progress, leave=False):
        chunk = latents[s:s + batch_size]
        ctx, pos, delta = [], [], []
        for i in chunk:
            act = (values * (indices == i)).sum(-1)
            c, t = divmod(int(act.argmax()), T)
            ctx.append(c)
            pos.append(t)
            delta.append(float(act[c, t]) * sae.W_dec.detach()[i] * sae.normalizer.scale)
        ids, keep = held.ids[ctx], held.keep[ctx]
        r, p, delta = torch.arange(len(chunk)), torch.tensor(pos), torch.stack(delta)

        def ablated(x, r=r, p=p, delta=delta):
            out = reconstruct(x).clone()
            out[r, p] -= delta.to(out)
            return out

        base, _, acts = splice(lm, ids, held.layer, held.site, reconstruct, keep)
        without = splice(lm, ids, held.layer, held.site, ablated, keep, acts).logits
        effect = (base[r, p] - without[r, p]).float()
        rows.append(effect - effect.mean(-1, keepdim=True))
    effect = torch.cat(rows) if rows else torch.zeros(0, lm.model.get_output_embeddings().weight.shape[0])
    hi, lo = effect.topk(top, -1), effect.topk(top, -1, largest=False)
    return {"ablation_latents": torch.tensor(latents, dtype=torch.int32), "ablation_top_ids": hi.indices.int(),
            "ablation_top": hi.values, "ablation_bottom_ids": lo.indices.int(), "ablation_bottom": lo.values}
