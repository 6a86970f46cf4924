"""Reconstruction metrics on held-out activations: NMSE, explained variance, L0, dead and dense latents.

All on the SAE's normalised scale, over kept tokens only:

- ``nmse = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` (error against predicting the mean);
- ``explained_variance = 1 - sum_d Var(x_d - x_hat_d) / sum_d Var(x_d)``;
- ``l0``: mean number of non-zero latents per token;
- latent density: fraction of tokens on which each latent is non-zero; ``dead_fraction``: latents
  that never fire on the eval tokens; ``dense_fraction``: latents firing on more than 10% of them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..sae import Latents
from .heldout import encode

DENSE_THRESHOLD = 0.1


@torch.no_grad()
def latent_density(sae, x_raw: Tensor) -> Tensor:
    """``(n_latents,)`` fraction of the tokens ``x_raw (..., d)`` on which each latent is non-zero."""
    return _density(*encode(sae, x_raw), sae.n_latents)


def _density(values: Tensor, indices: Tensor, n_latents: int) -> Tensor:
    fired = values > 0
    counts = torch.zeros(n_latents).index_add_(0, indices[fired], torch.ones(int(fired.sum())))
    return counts / values.shape[:-1].numel()  # tokens, whatever the leading shape


def density_histogram(density: Tensor, bins: int = 50) -> tuple[Tensor, Tensor]:
    """Histogram of ``log10(density)`` over latents that fired: ``(counts (bins,), edges (bins + 1,))``."""
    alive = density[density > 0].log10()
    lo = float(alive.min()) if len(alive) else -6.0
    return torch.histogram(alive, bins=bins, range=(lo, 0.0))


RECONSTRUCTION_KEYS = ("nmse", "explained_variance", "l0", "dead_fraction", "dense_fraction")


@torch.no_grad()
def reconstruction_metrics(sae, x_raw: Tensor, batch_size: int = 4096) -> dict:
    """NMSE, explained variance, L0, dead and dense fractions of ``sae`` on raw activations ``(N, d)``
    (the keys of :data:`RECONSTRUCTION_KEYS`)."""
    x = sae.normalizer.apply(x_raw)  # the metrics' scale (the SAE itself takes raw activations)
    values, indices = encode(sae, x_raw, batch_size)
    x_hat = sae.normalizer.apply(torch.cat([sae.decode(Latents(values[s:s + batch_size], indices[s:s + batch_size]))
                                            for s in range(0, len(x_raw), batch_size)]))
    err = x - x_hat
    total = (x - x.mean(0)).pow(2).sum()
    density = _density(values, indices, sae.n_latents)
    return {
        "nmse": float(err.pow(2).sum() / total),
        "explained_variance": float(1 - (err - err.mean(0)).pow(2).sum() / total),
        "l0": float((values > 0).sum(-1).float().mean()),
        "dead_fraction": float((density == 0).float().mean()),
        "dense_fraction": float((density > DENSE_THRESHOLD).float().mean()),
    }
