"""Explainability: Neuron-to-Graph-style n-gram explanations of latents, scored on held-out text.

For a latent, the held-out contexts are split in two. On the first half, each of its top
activating tokens gets the shortest n-gram ending at that token (the token alone, then with 1, 2,
... preceding tokens, up to ``max_n``) whose occurrences in that half fire the latent at least
``min_precision`` of the time; the explanation is the set of these n-grams. On the second half the
explanation predicts "fires" wherever one of its n-grams ends, and is scored by

- precision: fraction of predicted tokens where the latent fires (undefined if none predicted);
- recall: fraction of firing tokens that were predicted (undefined if it never fires).

Means are over the sampled latents where each is defined. "Fires" means a non-zero activation.

Every latent is explained and scored at once: each n-gram of the text gets an id
(:func:`ngram_ids`), so that an n-gram's occurrences, and those where a latent fires, are counts
over ids rather than a scan of the text per n-gram.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor

from ..stats import mean_interval


def ngram_ids(ids: Tensor, max_n: int) -> Tensor:
    """``(max_n, n_ctx * T)`` int64: at each position, an id of the n-gram ending there (its length n
    and tokens, for n = 1 .. ``max_n``), the same for equal n-grams and distinct across lengths;
    -1 where the context holds fewer than n tokens up to the position. ``ids``: ``(n_ctx, T)``."""
    n_ctx, T = ids.shape
    ids = ids.long()
    out = torch.full((max_n, n_ctx, T), -1, dtype=torch.long)
    vocab, offset, prev = int(ids.max()) + 1 if ids.numel() else 1, 0, None
    for n in range(1, min(max_n, T) + 1):
        # the (n-1)-gram ending one position earlier, extended by this position's token
        key = ids if n == 1 else prev[:, :-1] * vocab + ids[:, n - 1:]
        uniq, prev = torch.unique(key, return_inverse=True)
        out[n - 1, :, n - 1:] = prev + offset
        offset += len(uniq)
    return out.view(max_n, -1)


def _sorted_counts(keys: Tensor, queries: Tensor) -> Tensor:
    """How many of ``keys`` (sorted) equal each of ``queries``."""
    return torch.searchsorted(keys, queries, right=True) - torch.searchsorted(keys, queries)


def sorted_join(keys: Tensor, queries: Tensor) -> tuple[Tensor, Tensor]:
    """Every pair ``(q, k)`` with ``queries[q] == keys[k]``, ``keys`` sorted: ``(pairs,)`` each."""
    lo = torch.searchsorted(keys, queries)
    size = torch.searchsorted(keys, queries, right=True) - lo
    q = torch.repeat_interleave(size)
    return q, torch.repeat_interleave(lo - torch.cumsum(size, 0) + size, size) + torch.arange(len(q))


def explain_and_score(ids: Tensor, keep: Tensor, tok: Tensor, lat: Tensor, val: Tensor, latents: list[int],
                      top: int = 16, max_n: int = 4, min_precision: float = 0.5) -> tuple[list[list[tuple[int, ...]]], Tensor, Tensor]:
    """N2G explanations of ``latents`` from the first half of the contexts, scored on the second.

    Args:
        ids, keep: ``(n_ctx, T)`` token ids and kept-token mask.
        tok, lat, val: ``(f,)`` where the code fires: the token (flat index into ``ids``), the latent
            and its activation (> 0), in any order; tokens ``keep`` excludes are ignored.
        latents: the latents to explain, each at most once.
        top: top-activating tokens of the first half that each get an n-gram.
        max_n: longest n-gram.
        min_precision: share of an n-gram's occurrences in the first half where the latent must fire.

    Returns:
        each latent's n-grams (token ids, oldest first; in the order its top tokens found them), and
        its precision and recall ``(len(latents),)`` float64, NaN where undefined.
    """
    n_ctx, T = ids.shape
    split = n_ctx // 2 * T
    grams, flat_keep = ngram_ids(ids, max_n), keep.flatten()
    slot = torch.full((max(int(lat.max()) if len(lat) else 0, max(latents, default=0)) + 1,), -1)
    slot[torch.as_tensor(latents, dtype=torch.long)] = torch.arange(len(latents))
    chosen = (slot[lat] >= 0) & flat_keep[tok]
    j, tok, val = slot[lat[chosen]], tok[chosen].long(), val[chosen]  # j: the latent's place in latents
    first = tok < split
    found, where = _explain(grams, flat_keep[:split], j[first], tok[first], val[first], len(latents), top, min_precision)
    precision, recall = _score(grams, flat_keep, split, j[~first], tok[~first], found)
    flat_ids = ids.flatten().tolist()
    return [[tuple(flat_ids[where[g][1] - where[g][0] + 1:where[g][1] + 1]) for g in f] for f in found], precision, recall


def _explain(grams: Tensor, keep: Tensor, j: Tensor, tok: Tensor, val: Tensor, n_sel: int, top: int,
             min_precision: float) -> tuple[list[list[int]], dict[int, tuple[int, int]]]:
    """The explaining half: each latent's n-gram ids, and for each n-gram ``(n, a position where it
    ends)``. ``grams (max_n, P)`` from :func:`ngram_ids`; ``keep (split,)`` the half's kept tokens;
    ``j, tok, val`` where the latents (their places ``j`` < ``n_sel``) fire in the half."""
    split = len(keep)
    # each latent's top tokens, best first (ties: earlier token first)
    order = torch.argsort(tok, stable=True)
    order = order[torch.argsort(-val[order], stable=True)]
    order = order[torch.argsort(j[order], stable=True)]
    j, tok = j[order], tok[order]
    count = torch.bincount(j, minlength=n_sel)
    best = torch.arange(len(j)) - (torch.cumsum(count, 0) - count)[j] < top
    jc, tc = j[best], tok[best]
    gc = grams[:, tc].T  # (candidates, max_n): the n-grams ending at each top token, shortest first
    # each n-gram's kept occurrences in the half, and those where the latent fires
    n_grams = int(grams.max()) + 1
    occurs = grams[:, :split][:, keep]
    occurs = torch.bincount(occurs[occurs >= 0], minlength=n_grams)
    fired = grams[:, tok]
    fired = (j * n_grams + fired)[fired >= 0].sort().values
    valid = gc >= 0
    fires = _sorted_counts(fired, (jc[:, None] * n_grams + gc)[valid])
    precise = torch.zeros_like(valid)
    precise[valid] = (fires.float() / occurs[gc[valid]].float()) >= min_precision
    # for each top token in turn, the shortest precise n-gram that no earlier token found
    found: list[list[int]] = [[] for _ in range(n_sel)]
    where: dict[int, tuple[int, int]] = {}
    for latent, t, row, ok in zip(jc.tolist(), tc.tolist(), gc.tolist(), precise.tolist()):
        patterns = found[latent]
        for n, (g, good) in enumerate(zip(row, ok), start=1):
            if g < 0 or g in patterns:
                break
            if good:
                patterns.append(g)
                where.setdefault(g, (n, t))
                break
    return found, where


def _score(grams: Tensor, keep: Tensor, split: int, j: Tensor, tok: Tensor, found: list[list[int]]) -> tuple[Tensor, Tensor]:
    """The scoring half (positions ``split`` on): precision and recall ``(len(found),)`` float64 of
    each latent's n-grams ``found``, from where it fires there (``j``, ``tok``)."""
    n_sel, n_pos = len(found), grams.shape[1]
    second = grams[:, split:].clone()
    second[:, ~keep[split:]] = -1
    g2, order = second.flatten().sort()
    p2 = torch.arange(split, n_pos).repeat(grams.shape[0])[order]
    pj = torch.tensor([i for i, patterns in enumerate(found) for _ in patterns], dtype=torch.long)
    pg = torch.tensor([g for patterns in found for g in patterns], dtype=torch.long)
    pattern, at = sorted_join(g2, pg)
    predicted = torch.unique(pj[pattern] * n_pos + p2[at])  # (latent, position) pairs, each once
    hit = torch.isin(predicted, j * n_pos + tok)  # pairs where the latent fires
    n_predicted = torch.bincount(predicted // n_pos, minlength=n_sel).double()
    hits = torch.bincount(predicted[hit] // n_pos, minlength=n_sel).double()
    n_fires = torch.bincount(j, minlength=n_sel).double()
    return (torch.where(n_predicted > 0, hits / n_predicted, float("nan")),
            torch.where(n_fires > 0, hits / n_fires, float("nan")))


def firing(values: Tensor, indices: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``tok, lat, val (f,)``: where a sparse code ``(n_ctx, T, m)`` fires (flat token index, latent,
    activation), the input of :func:`explain_and_score`."""
    fires = values > 0
    tok = torch.arange(fires.shape[0] * fires.shape[1]).view(*fires.shape[:2], 1).expand_as(fires)[fires]
    return tok, indices[fires], values[fires]


def n2g(values: Tensor, indices: Tensor, ids: Tensor, keep: Tensor, sample: int = 32, seed: int = 0,
        **explain_options) -> dict:
    """Mean N2G precision and recall over a random sample of latents that fire in the first half.

    Args:
        values, indices: the SAE's sparse code of the held-out tokens, ``(n_ctx, T, m)`` each.
        ids, keep: ``(n_ctx, T)`` token ids and kept-token mask.
        sample: how many latents to explain.
        explain_options: ``top``, ``max_n``, ``min_precision`` of :func:`explain_and_score`.

    Returns ``n2g_precision, n2g_recall, n2g_latents`` (latents explained), and each mean's 95%
    interval over the sampled latents (``n2g_precision_ci``, ``n2g_recall_ci``: half-widths).
    """
    half = len(ids) // 2
    if half == 0:
        raise ValueError(f"N2G needs at least 2 contexts (got {len(ids)}): one half to explain, one to score.")
    tok, lat, val = firing(values, indices)
    fired = torch.unique(lat[(tok < half * ids.shape[1]) & keep.flatten()[tok]]).tolist()
    latents = random.Random(seed).sample(fired, min(sample, len(fired)))
    _, precision, recall = explain_and_score(ids, keep, tok, lat, val, latents, **explain_options)
    (p, p_ci), (r, r_ci) = (mean_interval([x for x in v.tolist() if x == x]) for v in (precision, recall))
    return {"n2g_precision": p, "n2g_precision_ci": p_ci, "n2g_recall": r, "n2g_recall_ci": r_ci,
            "n2g_latents": len(latents)}
