"""The paper's input normalisation: subtract the dataset mean, scale to unit mean-squared norm.

``x_norm = (x - mean) / scale`` with ``scale = sqrt(E ||x - mean||^2)``, so that
``E ||x_norm||^2 = 1`` per token. Metrics are reported on this scale; the statistics travel
with the SAE, which applies them to its raw inputs and inverts them on its reconstructions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Normalizer:
    """Affine map to the normalised scale.

    Attributes:
        mean: ``(d_in,)`` dataset mean.
        scale: root of the mean squared norm of ``x - mean``, a positive float.
    """

    mean: Tensor
    scale: float

    @classmethod
    def identity(cls, d_in: int) -> Normalizer:
        return cls(torch.zeros(d_in), 1.0)

    @classmethod
    def fit(cls, x: Tensor) -> Normalizer:
        """Statistics of a sample ``x`` of shape ``(N, d_in)``."""
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"Normalizer.fit needs a non-empty (N, d_in) sample, got shape {tuple(x.shape)}.")
        x = x.double()
        mean = x.mean(0)
        scale = (x - mean).pow(2).sum(-1).mean().sqrt().item()
        if not scale > 0:
            raise ValueError(f"The activations have zero (or non-finite) spread (scale {scale}); check the data.")
        return cls(mean.float(), float(scale))

    def is_identity(self) -> bool:
        """Mean 0 and scale 1: ``apply`` and ``invert`` leave every value as it is."""
        return self.scale == 1.0 and not bool(self.mean.any())

    def apply(self, x: Tensor) -> Tensor:
        """``(..., d_in)`` raw -> normalised."""
        return self.apply_(x.clone())

    def apply_(self, x: Tensor) -> Tensor:
        """``apply`` in place on ``x`` (no new batch-sized memory, whose page faults cost more than
        the arithmetic); returns ``x``."""
        return x.sub_(self.mean.to(x)).div_(self.scale)

    def invert(self, x: Tensor) -> Tensor:
        """``(..., d_in)`` normalised -> raw."""
        return x * self.scale + self.mean.to(x)

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "scale": self.scale}

    @classmethod
    def from_dict(cls, d: dict) -> Normalizer:
        return cls(torch.tensor(d["mean"], dtype=torch.float32), float(d["scale"]))
