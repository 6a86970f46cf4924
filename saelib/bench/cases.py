"""The bench's workload: the grid of configurations, and the activations and initial weights every
implementation trains from."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import BENCH_GRIDS, paper_lr
from ..sae import TopKSAE


IMPLS = ("saelib", "saelib-bf16", "sparsify", "sae-lens", "sae-lens-sparse", "naive", "roofline", "roofline-bf16")
PEERS = ("sparsify", "sae-lens", "sae-lens-sparse")
ADAM_EPS = 6.25e-10  # the paper's; saelib and the naive step use it, peers keep their own default
AUXK_COEF = 1 / 32
GRAD_CLIP = 1.0
INSTALL_PEERS = "pip install 'saelib[peers]'"


@dataclass(frozen=True)
class BenchConfig:
    """One point of the grid. ``dead_fraction`` of the latents are marked dead (AuxK on if > 0)."""

    d_in: int
    n_latents: int
    k: int = 32
    batch_size: int = 4096
    dead_fraction: float = 0.25

    @property
    def k_aux(self) -> int:
        return max(1, min(512, self.d_in // 2, int(self.n_latents * self.dead_fraction)))

    def lr(self) -> float:
        return paper_lr(self.n_latents)


def grid(d_in=(576,), n_latents=(4608, 18432), k=(32,), batch_size=(4096,), dead_fraction=(0.25, 0.0)) -> list[BenchConfig]:
    """Every combination of the given values, as ``BenchConfig`` s."""
    return [BenchConfig(*values) for values in product(d_in, n_latents, k, batch_size, dead_fraction)]


PRESETS = BENCH_GRIDS  # saelib.config's grids, by the name `--preset` and older code use


# ---- data -----------------------------------------------------------------------------------


def synthetic_activations(n_tokens: int, d_in: int, seed: int = 0) -> Tensor:
    """``(n_tokens, d_in)`` float32 activations with sparse structure, on the SAE scale.

    Each token is a sum of 16 features from a dictionary of ``8 * d_in`` random unit
    directions, drawn with Zipf-like frequencies and exponential magnitudes, plus 5% noise;
    centred and scaled to unit mean squared norm per token (the recipe's normalisation).
    """
    g = torch.Generator().manual_seed(seed)
    n_features = 8 * d_in
    features = F.normalize(torch.randn(n_features, d_in, generator=g), dim=1)
    freq = 1.0 / torch.arange(10, n_features + 10, dtype=torch.float64) ** 1.1
    idx = torch.multinomial(freq, 16 * n_tokens, replacement=True, generator=g).view(n_tokens, 16)
    mags = torch.empty(n_tokens, 16).exponential_(generator=g)
    x = F.embedding_bag(idx, features, per_sample_weights=mags, mode="sum")
    x += 0.05 * x.norm(dim=1).mean() / d_in**0.5 * torch.randn(n_tokens, d_in, generator=g)
    x -= x.mean(0)
    return (x / x.pow(2).sum(1).mean().sqrt()).contiguous()


def initial_weights(cfg: BenchConfig, seed: int = 0) -> dict[str, Tensor]:
    """saelib's init (unit decoder rows, tied encoder, zero biases); every impl starts here."""
    sae = TopKSAE(cfg.d_in, cfg.n_latents, cfg.k, generator=torch.Generator().manual_seed(seed))
    return {name: p.detach().clone() for name, p in sae.named_parameters()}


def dead_mask(cfg: BenchConfig, seed: int = 0) -> Tensor | None:
    """A fixed random ``dead_fraction`` of the latents, or ``None`` (AuxK off)."""
    n_dead = int(cfg.n_latents * cfg.dead_fraction)
    if n_dead == 0:
        return None
    order = torch.randperm(cfg.n_latents, generator=torch.Generator().manual_seed(seed + 1))
    return torch.zeros(cfg.n_latents, dtype=torch.bool).index_fill_(0, order[:n_dead], True)
