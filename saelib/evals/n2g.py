"""Explainability: Neuron-to-Graph-style n-gram explanations of latents, scored on held-out text.

For a latent, the held-out contexts are split in two. On the first half, each of its top
activating tokens gets the shortest n-gram ending at that token (the token alone, then with 1, 2,
... preceding tokens, up to ``max_n``) whose occurrences in that half fire the latent at least
``min_precision`` of the time; the explanation is the set of these n-grams. On the second half the
explanation predicts "fires" wherever one of its n-grams ends, and is scored by

- precision: fraction of predicted tokens where the latent fires (undefined if none predicted);
- recall: fraction of firing tokens that were predicted (undefined if it never fires).

Means are over the sampled latents where each is defined. "Fires" means a non-zero activation.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..stats import mean_interval


def ngram_matches(ids: Tensor, pattern: tuple[int, ...]) -> Tensor:
    """``(n, T)`` bool: where ``pattern`` (oldest token first) ends."""
    match = ids == pattern[-1]
    for back, token in enumerate(reversed(pattern[:-1]), start=1):
        shifted = torch.zeros_like(match)
        shifted[:, back:] = ids[:, :-back] == token
        match &= shifted
    return match


def explain(ids: Tensor, acts: Tensor, keep: Tensor, top: int = 16, max_n: int = 4,
            min_precision: float = 0.5) -> list[tuple[int, ...]]:
    """N-gram explanation of one latent from ``ids``, its activations ``acts`` and ``keep``, each ``(n, T)``."""
    fires = (acts > 0) & keep
    score = acts.masked_fill(~fires, 0).flatten()
    patterns: list[tuple[int, ...]] = []
    for flat in score.topk(min(top, int(fires.sum()))).indices.tolist():
        c, t = divmod(flat, ids.shape[1])
        for n in range(1, min(max_n, t + 1) + 1):
            pattern = tuple(ids[c, t - n + 1:t + 1].tolist())
            if pattern in patterns:
                break
            match = ngram_matches(ids, pattern) & keep
            if fires[match].float().mean() >= min_precision:
                patterns.append(pattern)
                break
    return patterns


def score(patterns: list[tuple[int, ...]], ids: Tensor, acts: Tensor, keep: Tensor) -> tuple[float | None, float | None]:
    """``(precision, recall)`` of an explanation on ``ids``/``acts``/``keep`` ``(n, T)``; ``None`` where undefined."""
    predicted = torch.zeros_like(keep)
    for pattern in patterns:
        predicted |= ngram_matches(ids, pattern)
    predicted &= keep
    fires = (acts > 0) & keep
    hits = int((predicted & fires).sum())
    precision = hits / int(predicted.sum()) if predicted.any() else None
    recall = hits / int(fires.sum()) if fires.any() else None
    return precision, recall


def latent_activations(values: Tensor, indices: Tensor, latent: int) -> Tensor:
    """``(...)`` activation of one latent from a sparse code ``(..., m)``."""
    return (values * (indices == latent)).sum(-1)


def n2g(values: Tensor, indices: Tensor, ids: Tensor, keep: Tensor, sample: int = 32,
        seed: int = 0, progress: bool = True, **explain_options) -> dict:
    """Mean N2G precision and recall over a random sample of latents that fire in the first half.

    Args:
        values, indices: the SAE's sparse code of the held-out tokens, ``(n_ctx, T, m)`` each.
        ids, keep: ``(n_ctx, T)`` token ids and kept-token mask.
        sample: how many latents to explain.

    Returns ``n2g_precision, n2g_recall, n2g_latents`` (latents explained), and each mean's 95%
    interval over the sampled latents (``n2g_precision_ci``, ``n2g_recall_ci``: half-widths).
    """
    half = len(ids) // 2
    if half == 0:
        raise ValueError(f"N2G needs at least 2 contexts (got {len(ids)}): one half to explain, one to score.")
    fired = indices[:half][(values[:half] > 0) & keep[:half, :, None]].unique().tolist()
    latents = random.Random(seed).sample(fired, min(sample, len(fired)))
    precisions, recalls = [], []
    for latent in tqdm(latents, desc="N2G explanations", disable=not progress, leave=False):
        acts = latent_activations(values, indices, latent)
        patterns = explain(ids[:half], acts[:half], keep[:half], **explain_options)
        p, r = score(patterns, ids[half:], acts[half:], keep[half:])
        if p is not None:
            precisions.append(p)
        if r is not None:
            recalls.append(r)
    (precision, precision_ci), (recall, recall_ci) = mean_interval(precisions), mean_interval(recalls)
    return {"n2g_precision": precision, "n2g_precision_ci": precision_ci, "n2g_recall": recall,
            "n2g_recall_ci": recall_ci, "n2g_latents": len(latents)}
