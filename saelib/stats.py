"""The 95% interval of a mean, for metrics averaged over seeds, latents or tasks.

    mean, half = stats.mean_interval([0.10, 0.12, 0.14])   # 0.12 and 0.0497: [0.070, 0.170]
    shift, half, m = stats.paired_difference(small["probe_loss_by_task"], large["probe_loss_by_task"])

A Student-t interval of the mean, ``t(1 - (1 - level) / 2, m - 1) * sd / sqrt(m)`` over the ``m``
finite values: it states how far the mean of this sample of seeds, latents or tasks could lie from the
mean over all of them. It is 0 for a single value (no spread to measure) and NaN for none.
"""

from __future__ import annotations

import math

import numpy as np


def mean_interval(values, level: float = 0.95) -> tuple[float, float]:
    """``(mean, half-width)`` of the Student-t interval of the mean of the finite ``values``."""
    from scipy.stats import t as student_t

    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return math.nan, math.nan
    if len(x) == 1:
        return float(x[0]), 0.0
    half = student_t.ppf(1 - (1 - level) / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(half)


def paired_difference(a, b, level: float = 0.95) -> tuple[float, float, int]:
    """``(mean, half-width, m)`` of ``b - a`` item by item: two SAEs' values on the same tasks (dicts,
    paired by name) or the same contexts (lists, paired by position; None where a context has no
    value), so that the spread between items, which is far larger than the SAEs' difference, cancels.
    ``m``: the pairs where both are finite."""
    pairs = [(a[key], b[key]) for key in a if key in b] if isinstance(a, dict) else list(zip(a, b))
    diffs = [y - x for x, y in pairs if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
    return (*mean_interval(diffs, level), len(diffs))
