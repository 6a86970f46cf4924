"""Scaling-law fits of Gao et al. (2024), each with bootstrap confidence intervals and goodness of fit.

Laws (``L`` is the normalised MSE, ``n`` the number of latents, ``k`` the active latents,
``C`` the training compute of :func:`saelib.sweep.training_flops`, ``T`` training tokens):

- :func:`fit_power_law` -- ``L(x) = exp(a) * x^b + c``: a power law with an irreducible term
  ``c >= 0``; used for ``L(n)`` at fixed ``k`` and ``L(k)`` at fixed ``n`` (``b < 0``).
- :func:`fit_joint_law` -- the paper's joint law (its eq. for GPT-4 autoencoders)::

      L(n, k) = exp(a + b_k log k + b_n log n + g log k log n) + exp(z + e log k)

  the first term falls with ``n`` (its exponent ``b_n + g log k`` depends on ``k``), the second
  is an irreducible loss that depends on ``k`` only.
- :func:`fit_compute_law` -- ``L(C) = c0 + c1 * C^-p`` on the compute-efficient frontier
  (:func:`compute_frontier`: the lowest loss reached with at most ``C`` FLOPs over all runs).
- :func:`fit_convergence` -- tokens to convergence ``T(n) = exp(a) * n^b`` (paper: ``b ~ 0.6``
  on GPT-2), with :func:`converged_at` (a fitted curve at a constant learning rate, with an
  interval) giving each run's ``T``.
- :func:`fit_lr_rule` -- the best learning rate, as a multiple of the paper's rule, against the
  run's steps and ``n``: ``m = exp(a) * steps^b * (n / 2^14)^c``, each point the
  :func:`best_multiple` of a grid of runs (the default rule of :func:`saelib.config.lr_multiple`);
  :func:`fit_lr_term` -- its factors ``(k / 32)^d`` and ``(B / 1024)^e`` for runs at another ``k``
  or batch size ``B`` than the sweep's.

Every fit is a least-squares fit of ``log L`` (errors are relative, as on the paper's log-log
plots), the best of several starting points. Goodness of fit: ``r2`` and ``rmse_log``, both of
``log L``. Confidence intervals come from a bootstrap: the law is refitted (starting from the fit to
all points) to resampled data, and the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of
each coefficient are reported. With at least three points per coefficient the points are resampled
with replacement (a case bootstrap); with fewer (one curve of 4-5 runs), resampling points leaves too
few distinct ones to fit, so the residuals of ``log L`` are resampled instead, inflated by
``sqrt(points / (points - coefficients))`` for the degrees of freedom the fit used (a residual bootstrap).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
from scipy.optimize import least_squares

# The paper's coefficients (GPT-4 joint and compute laws; GPT-2 tokens-to-convergence exponent).
PAPER = {
    "joint": {"a": -0.50, "b_k": 0.26, "b_n": -0.017, "g": -0.042, "z": -1.32, "e": -0.085},
    "compute": {"c0": 0.09, "c1": 0.056, "p": 0.084},
    "convergence": {"b": 0.6},
}


@dataclass
class Fit:
    """A fitted law: coefficients, bootstrap intervals and goodness of fit.

    Attributes:
        law: a name (``"power"``, ``"joint"``, ``"compute"``, ``"convergence"``).
        params: coefficient name -> value.
        ci: coefficient name -> ``(low, high)`` bootstrap interval at ``level``.
        r2: coefficient of determination of ``log y``.
        rmse_log: root-mean-square residual of ``log y`` (0.01 is about 1% error).
        n_points: points fitted.
        level: confidence level of ``ci``.
        boot_failures: bootstrap resamples left out of ``ci`` (the fit failed, or the resample had
            no more distinct points than coefficients); when they are half or more, ``ci`` is NaN.
        bootstrap: ``"case"`` (points resampled) or ``"residual"`` (few points: residuals resampled).
    """

    law: str
    params: dict[str, float]
    ci: dict[str, tuple[float, float]]
    r2: float
    rmse_log: float
    n_points: int
    level: float = 0.95
    boot_failures: int = 0
    bootstrap: str = "case"
    _model: Callable = field(default=None, repr=False)
    samples: np.ndarray | None = field(default=None, repr=False)  # (resamples, coefficients) behind ``ci``

    def predict(self, *x) -> np.ndarray:
        """The law at ``x`` (one array per input, e.g. ``predict(n, k)`` for the joint law)."""
        return self._model(np.array([self.params[name] for name in self.params]), *map(np.asarray, x))

    def table(self, paper: dict[str, float] | None = None) -> list[dict]:
        """One row per coefficient: ``coefficient, ours, ci_low, ci_high`` and ``paper`` where known."""
        paper = paper or {}
        return [{"law": self.law, "coefficient": name, "ours": value, "ci_low": self.ci[name][0],
                 "ci_high": self.ci[name][1], "paper": paper.get(name), "r2": self.r2, "rmse_log": self.rmse_log,
                 "n_points": self.n_points} for name, value in self.params.items()]

    def to_dict(self) -> dict:
        return {"law": self.law, "params": self.params, "ci": {k: list(v) for k, v in self.ci.items()},
                "r2": self.r2, "rmse_log": self.rmse_log, "n_points": self.n_points, "level": self.level,
                "boot_failures": self.boot_failures, "bootstrap": self.bootstrap}


# ---- the generic fitter ---------------------------------------------------------------------


def _fit(law: str, names: list[str], model: Callable, xs: list[np.ndarray], y: np.ndarray,
         starts: list[np.ndarray], bounds: Callable | None = None, n_boot: int = 200, level: float = 0.95,
         seed: int = 0) -> Fit:
    """Least squares of ``log model(theta, *xs)`` against ``log y`` from several starts, then a bootstrap."""
    xs = [np.asarray(x, dtype=float) for x in xs]
    y = np.asarray(y, dtype=float)
    if y.ndim != 1 or any(x.shape != y.shape for x in xs):
        raise ValueError(f"Inputs must be 1-D arrays of one length; got shapes {[x.shape for x in xs]} and {y.shape}.")
    if len(y) <= len(names):
        raise ValueError(f"The {law} law has {len(names)} coefficients but only {len(y)} points were given; "
                         f"give at least {len(names) + 1}.")
    if not (np.all(np.isfinite(y)) and np.all(y > 0)):
        raise ValueError(f"The {law} law fits log(y): every y must be positive and finite, got min {y.min()!r}.")

    def solve(xs_, y_, starts_) -> np.ndarray | None:
        best, best_cost = None, math.inf
        for theta0 in starts_:
            lo, hi = bounds(y_) if bounds else (-np.inf, np.inf)
            theta0 = np.clip(theta0, lo, hi) if bounds else theta0

            def residual(theta):
                with np.errstate(all="ignore"):
                    r = np.log(model(theta, *xs_)) - np.log(y_)
                return np.where(np.isfinite(r), r, 1e3)

            try:
                result = least_squares(residual, theta0, bounds=(lo, hi), method="trf", x_scale="jac",
                                       max_nfev=100 * len(theta0))
            except ValueError:
                continue
            if result.cost < best_cost:
                # a coefficient at its bound is the bound, not the solver's 1e-20 beside it (an interval
                # printed beside 1.9e-20 would seem to leave its own estimate out)
                near = 1e-9 * max([1.0, *(abs(v) for v in np.ravel([lo, hi]) if np.isfinite(v))])
                best = np.where(np.abs(result.x - lo) <= near, lo, np.where(np.abs(hi - result.x) <= near, hi, result.x))
                best_cost = result.cost
        return best

    theta = solve(xs, y, starts)
    if theta is None:
        raise RuntimeError(f"The {law} law could not be fitted to these {len(y)} points.")
    resid = np.log(model(theta, *xs)) - np.log(y)
    total = np.sum((np.log(y) - np.log(y).mean()) ** 2)
    r2 = float(1 - np.sum(resid**2) / total) if total > 0 else float("nan")

    rng = np.random.default_rng(seed)
    boots, failures = [], 0
    bootstrap = "case" if len(y) >= 3 * len(names) else "residual"
    inflate = math.sqrt(len(y) / (len(y) - len(names)))
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if bootstrap == "residual":  # the fitted curve times resampled (inflated) residuals of log y
            t = solve(xs, model(theta, *xs) * np.exp(-inflate * resid[idx]), [theta])
        elif len(np.unique(idx)) <= len(names):
            failures += 1
            continue
        else:
            t = solve([x[idx] for x in xs], y[idx], [theta])  # resamples start from the fit itself
        if t is None:
            failures += 1
        else:
            boots.append(t)
    q = [(1 - level) / 2, (1 + level) / 2]
    # no interval without resamples (n_boot=0) or when most refits failed; nor for a coefficient that every
    # resample gives alike: with a few points the resamples can hold nothing that moves it (a law through
    # each of two points, or two points whose misfit the law cannot absorb), and a zero-width interval
    # would claim it exact
    if not boots or len(boots) <= n_boot / 2:
        ci = {name: (float("nan"), float("nan")) for name in names}
    else:
        boots = np.array(boots)
        ci = {name: tuple(float(v) for v in np.quantile(boots[:, i], q))
              if np.ptp(boots[:, i]) > 1e-9 * max(1.0, abs(theta[i])) else (float("nan"), float("nan"))
              for i, name in enumerate(names)}
    return Fit(law, {name: float(v) for name, v in zip(names, theta)}, ci, r2, float(np.sqrt(np.mean(resid**2))),
               len(y), level, failures, bootstrap, model, np.array(boots) if len(boots) else None)


# ---- the laws -------------------------------------------------------------------------------


def _power(theta, x):
    a, b, c = theta
    return np.exp(a + b * np.log(x)) + c


def fit_power_law(x, y, irreducible: bool = True, **options) -> Fit:
    """``y = exp(a) * x^b + c`` with ``0 <= c < min(y)`` (``c = 0`` when ``irreducible=False``).

    ``options``: ``n_boot`` (default 200), ``level`` (0.95), ``seed``.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    if not (np.all(np.isfinite(y)) and np.all(y > 0) and np.all(x > 0)):
        raise ValueError(f"A power law fits log(x) and log(y): every x and y must be positive and finite; "
                         f"got min x {x.min()!r}, min y {y.min()!r}.")
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    if not irreducible:
        return _fit("power", ["a", "b"], lambda t, x: np.exp(t[0] + t[1] * np.log(x)), [x], y,
                    [np.array([intercept, slope])], **options)
    starts = [np.array([intercept, slope, 0.0])]
    for frac in (0.3, 0.6, 0.9):  # irreducible term a fraction of the smallest loss
        c = frac * y.min()
        s, i = np.polyfit(np.log(x), np.log(np.clip(y - c, 1e-12, None)), 1)
        starts.append(np.array([i, s, c]))

    def bounds(y_):
        return np.array([-np.inf, -np.inf, 0.0]), np.array([np.inf, np.inf, y_.min() * (1 - 1e-9)])

    return _fit("power", ["a", "b", "c"], _power, [x], y, starts, bounds, **options)


def _joint(theta, n, k):
    a, b_k, b_n, g, z, e = theta
    lk, ln = np.log(k), np.log(n)
    return np.exp(a + b_k * lk + b_n * ln + g * lk * ln) + np.exp(z + e * lk)


def fit_joint_law(n, k, loss, **options) -> Fit:
    """The joint law ``L(n, k) = exp(a + b_k log k + b_n log n + g log k log n) + exp(z + e log k)``.

    Needs runs on a grid of at least 2 values of ``k`` and several of ``n`` (7 points or more).
    Starts from the paper's GPT-4 coefficients and from data-driven guesses.
    """
    n, k, loss = (np.asarray(v, float) for v in (n, k, loss))
    if len(np.unique(k)) < 2 or len(np.unique(n)) < 3:
        raise ValueError(f"The joint law needs at least 2 values of k and 3 of n; got k={sorted(set(k.tolist()))}, "
                         f"n={sorted(set(n.tolist()))}.")
    design = np.column_stack([np.ones_like(n), np.log(k), np.log(n), np.log(k) * np.log(n)])
    starts = [np.array(list(PAPER["joint"].values()))]
    for frac in (0.2, 0.5, 0.8):
        floor = frac * loss.min()
        coef = np.linalg.lstsq(design, np.log(np.clip(loss - floor, 1e-12, None)), rcond=None)[0]
        starts.append(np.array([*coef, np.log(floor), 0.0]))
    return _fit("joint", list(PAPER["joint"]), _joint, [n, k], loss, starts, **options)


def _compute(theta, C):
    c0, log_c1, p = theta
    return c0 + np.exp(log_c1 - p * np.log(C))


def fit_compute_law(flops, loss, **options) -> Fit:
    """``L(C) = c0 + c1 * C^-p`` (``c0 >= 0``, reported as ``c0, c1, p``); give frontier points.

    ``C`` is in FLOPs as given; ``c1`` depends on the unit, ``c0`` and ``p`` do not.
    """
    C, loss = np.asarray(flops, float), np.asarray(loss, float)
    fit = fit_power_law(C, loss, **options)
    a, b, c = fit.params["a"], fit.params["b"], fit.params["c"]
    params = {"c0": c, "c1": math.exp(a), "p": -b}
    ci = {"c0": fit.ci["c"], "c1": tuple(math.exp(v) for v in fit.ci["a"]), "p": (-fit.ci["b"][1], -fit.ci["b"][0])}

    def model(theta, C):
        c0, c1, p = theta
        return c0 + c1 * np.power(C, -p)

    return replace(fit, law="compute", params=params, ci=ci, _model=model, samples=None)  # goodness of fit and bootstrap as fitted


def compute_frontier(flops, loss, bins: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """The compute-efficient frontier: for ``bins`` log-spaced budgets ``C``, the lowest loss any point
    reached with at most ``C`` FLOPs. ``flops``/``loss`` are all points of all runs (e.g. every
    logged step of every learning curve); points at no compute (``C <= 0``) are left out, as a
    log-spaced axis has no place for them. Returns ``(C, L)`` with strictly falling ``L``.
    """
    C, L = np.asarray(flops, float), np.asarray(loss, float)
    C, L = C[C > 0], L[C > 0]
    if len(C) == 0:
        raise ValueError("compute_frontier needs points with positive FLOPs; every point given has none.")
    order = np.argsort(C)
    C, L = C[order], np.minimum.accumulate(L[order])
    edges = np.geomspace(C[0], C[-1], bins)
    idx = np.searchsorted(C, edges, side="right") - 1
    fc, fl = C[idx], L[idx]
    keep = np.concatenate([[True], np.diff(fl) < 0])
    return fc[keep], fl[keep]


def smooth(values, window: int = 5) -> np.ndarray:
    """Trailing moving average over ``window`` points (the first points average what exists)."""
    v = np.asarray(values, float)
    c = np.cumsum(np.insert(v, 0, 0.0))
    i = np.arange(1, len(v) + 1)
    lo = np.maximum(0, i - window)
    return (c[i] - c[lo]) / (i - lo)


def _within(theta, tol: float) -> float:
    """Tokens at which ``exp(a) t^b + c`` comes within ``1 + tol`` of ``c`` (``inf`` if it never falls to it)."""
    a, b, c = theta
    log_T = (math.log(tol * c) - a) / b if c > 0 and b < 0 else math.inf
    return math.exp(log_T) if log_T < 700 else math.inf


def converged_at(tokens, loss, tol: float = 0.01, after: float = 0.0, bins: int = 40,
                 **options) -> tuple[float, tuple[float, float], Fit]:
    """Tokens at which a learning curve comes within ``1 + tol`` of its asymptote, from a fitted curve.

    ``L(t) = exp(a) * t^b + c`` is fitted (:func:`fit_power_law`) to the curve's points after ``after``
    tokens (skip the warmup), averaged in ``bins`` log-spaced bins of tokens: each stretch of the curve
    weighs alike, and a bin's mean is precise enough near the end for the asymptote (which the fit
    keeps below the lowest point) to lie under it. The asymptote is ``c`` and the curve reaches ``(1 + tol) * c`` at
    ``T = (tol * c / exp(a))^(1 / b)``, which may lie beyond the curve's last point (an
    extrapolation: compare with ``max(tokens)``). Meant for runs at a constant learning rate, whose
    curves flatten towards ``c`` rather than bend down with a decaying one.

    Returns ``(T, (low, high), fit)``: the interval is the quantiles of ``T`` over the fit's bootstrap
    resamples (``fit.samples``; ``options``: ``n_boot``, ``level``, ``seed``); ``T`` is ``inf`` where
    the fitted curve does not fall towards a positive asymptote.
    """
    t, L = np.asarray(tokens, float), np.asarray(loss, float)
    t, L = t[t > after], L[t > after]
    which = np.digitize(t, np.geomspace(t[0], t[-1], bins + 1)[1:-1])
    t, L = (np.array([v[which == i].mean() for i in np.unique(which)]) for v in (t, L))
    fit = fit_power_law(t, L, **options)
    draws = [_within(theta, tol) for theta in fit.samples] if fit.samples is not None else []
    q = [(1 - fit.level) / 2, (1 + fit.level) / 2]
    low, high = (float(v) for v in np.quantile(draws, q)) if draws else (math.nan, math.nan)
    return _within(fit.params.values(), tol), (low, high), fit


def convergence_exponent(n, curve_fits: list[Fit], tol: float = 0.01, level: float = 0.95, seed: int = 0) -> Fit:
    """``T(n) = exp(a) * n^b`` through the runs' tokens to convergence (:func:`converged_at`), with an
    interval that carries each run's uncertainty as well as the scatter about the line.

    ``curve_fits``: each run's learning-curve fit (with bootstrap ``samples``), in the order of ``n``.
    The point fit is :func:`fit_convergence`'s (least squares of ``log T`` on ``log n``). Resample ``i`` takes every run's ``i``-th
    bootstrap draw of ``T`` and multiplies it by a resampled residual of the point fit (inflated for the
    two coefficients, as :func:`_fit`'s residual bootstrap), then refits; resamples where some run's
    curve does not converge are left out (``boot_failures``).
    """
    n = np.asarray(n, float)
    T = np.array([_within(f.params.values(), tol) for f in curve_fits])
    if not np.all(np.isfinite(T)):
        raise ValueError(f"Every run needs a finite T to fit T(n); got {T.tolist()} (a curve that does not fall "
                         "towards a positive asymptote: train longer or check its learning rate).")
    point = fit_convergence(n, T, n_boot=0, level=level)
    x = np.log(n)
    resid = np.log(T) - np.log(point.predict(n))
    resamples = min((0 if f.samples is None else len(f.samples)) for f in curve_fits)
    draws = np.array([[_within(theta, tol) for theta in (f.samples[:resamples] if resamples else [])]
                      for f in curve_fits]).reshape(len(n), -1)
    rng = np.random.default_rng(seed)
    inflate = math.sqrt(len(n) / max(1, len(n) - 2))
    boots, failures = [], 0
    for i in range(draws.shape[1]):
        Ti = draws[:, i]
        if not np.all(np.isfinite(Ti)) or not np.all(Ti > 0):
            failures += 1
            continue
        y = np.log(Ti) + inflate * resid[rng.integers(0, len(n), len(n))]
        boots.append(np.polyfit(x, y, 1)[::-1])
    q = [(1 - level) / 2, (1 + level) / 2]
    if not boots or failures >= len(boots):
        ci = {name: (math.nan, math.nan) for name in point.params}
    else:
        boots = np.array(boots)
        ci = {name: tuple(float(v) for v in np.quantile(boots[:, j], q)) for j, name in enumerate(point.params)}
    return replace(point, ci=ci, boot_failures=failures, bootstrap="curves and residuals",
                   samples=np.array(boots) if len(boots) else None)


def fit_convergence(n, tokens, **options) -> Fit:
    """Tokens to convergence against ``n``: ``T = exp(a) * n^b`` (paper, GPT-2: ``b ~ 0.6``)."""
    fit = fit_power_law(n, tokens, irreducible=False, **options)
    fit.law = "convergence"
    return fit


def comparison_table(fits: dict[str, Fit]) -> list[dict]:
    """Rows of every fit's coefficients next to the paper's (where the paper has that law)."""
    rows = []
    for name, fit in fits.items():
        rows += [{"fit": name, **row} for row in fit.table(PAPER.get(fit.law))]
    return rows


# ---- the learning rate against the run's length -------------------------------------------------


def best_multiple(multiples, loss) -> tuple[float, float]:
    """The loss-minimising learning-rate multiple of one run size, from a grid of runs.

    ``multiples``: the runs' learning rates as multiples of :func:`saelib.config.paper_lr`; ``loss``:
    their validation NMSE, NaN or infinite for a run that diverged (worse than any). The vertex of the
    parabola in ``log2(multiple)`` through the lowest run and its two neighbours; the lowest run itself
    where it lies at an end of the grid or beside a run that diverged. Returns ``(multiple, loss at it)``.
    """
    m, y = _lr_grid(multiples, loss)
    if not np.isfinite(y).any():
        raise ValueError(f"Every run of the learning-rate grid {sorted(multiples)} diverged; try lower multiples.")
    i = int(np.argmin(y))
    if i in (0, len(y) - 1) or not np.isfinite(y[i - 1:i + 2]).all():
        return float(2 ** m[i]), float(y[i])
    a, b, c = np.polyfit(m[i - 1:i + 2], y[i - 1:i + 2], 2)  # a > 0: the middle point is the lowest
    vertex = -b / (2 * a)
    return float(2**vertex), float(np.polyval([a, b, c], vertex))


def loss_at_multiple(multiples, loss, multiple: float) -> float:
    """The loss of one run size at ``multiple``, read off its grid by linear interpolation in
    ``log2(multiple)`` (above the convex curve between two runs, so a regret read this way is not
    understated); outside the grid, its nearest end; infinite at or next to a run that diverged (NaN
    or infinite ``loss``), which the multiple may reach."""
    m, y = _lr_grid(multiples, loss)
    x = np.log2(multiple)
    j = int(np.clip(np.searchsorted(m, x), 0, len(m) - 1))  # the first run at or above the multiple
    near = [j] if x <= m[0] or x >= m[-1] or x == m[j] else [j - 1, j]
    return float(np.interp(x, m, y)) if np.isfinite(y[near]).all() else math.inf


def _lr_grid(multiples, loss) -> tuple[np.ndarray, np.ndarray]:
    """``(log2(multiples), loss)`` sorted by multiple, a diverged run's NaN loss as infinite."""
    order = np.argsort(multiples)
    y = np.asarray(loss, float)[order]
    return np.log2(np.asarray(multiples, float)[order]), np.where(np.isnan(y), np.inf, y)


def lr_grid_table(rows: list[dict], rule: Callable[[int, int, int, int], float]) -> list[dict]:
    """One row per run size of a learning-rate sweep: ``n_latents``, ``steps``, ``batch_size``, ``k``,
    the grid's best ``multiple`` and the ``nmse`` there (:func:`best_multiple`), ``best_run_nmse``, the
    multiple that ``rule(steps, n_latents, k, batch_size)`` chooses (``default_multiple``), the NMSE read there
    (``default_nmse``, :func:`loss_at_multiple`) and ``regret``, that NMSE over the best run's minus 1.

    ``rows``: the sweep's runs, each with ``n_latents``, ``k``, ``batch_size``, ``steps``,
    ``lr_multiplier`` and ``val_nmse`` (NaN for a run that diverged; runs of another batch size or ``k``
    make grids of their own).
    """
    table = []
    for n, steps, batch, k in sorted({(r["n_latents"], r["steps"], r["batch_size"], r["k"]) for r in rows}):
        grid = [r for r in rows if (r["n_latents"], r["steps"], r["batch_size"], r["k"]) == (n, steps, batch, k)]
        multiples, losses = [r["lr_multiplier"] for r in grid], [r["val_nmse"] for r in grid]
        multiple, nmse = best_multiple(multiples, losses)
        default = rule(steps, n, k, batch)
        at_default, best_run = loss_at_multiple(multiples, losses, default), float(np.nanmin(losses))  # best_multiple refused a grid with none
        table.append(dict(n_latents=n, steps=steps, batch_size=batch, k=k, multiple=multiple, nmse=nmse,
                          best_run_nmse=best_run, default_multiple=default, default_nmse=at_default,
                          regret=at_default / best_run - 1))
    return table


LR_K, LR_BATCH = 32, 1024  # the k and batch size of the learning-rate sweeps that fit_lr_rule is fitted to


def lr_law(theta, steps, n_latents, k=LR_K, batch_size=LR_BATCH):
    """The law of the best learning-rate multiple,
    ``exp(a) * steps^b * (n / 2^14)^c * (k / 32)^d * (batch_size / 1024)^e`` at ``theta = (a, b, c, d, e)``
    (or ``(a, b, c)``: no k or batch term), on numbers or arrays: the library's default with
    :data:`saelib.config.LR_RULE` (:func:`saelib.config.lr_multiple`), and the law :func:`fit_lr_rule`
    and :func:`fit_lr_term` fit."""
    a, b, c, *rest = theta
    d, e = (*rest, 0.0, 0.0)[:2]
    return np.exp(a + b * np.log(steps) + c * np.log(np.divide(n_latents, 2**14))
                  + d * np.log(np.divide(k, LR_K)) + e * np.log(np.divide(batch_size, LR_BATCH)))


def fit_lr_rule(steps, n_latents, multiple, **options) -> Fit:
    """The best learning-rate multiple against the run's length and size, at the sweep's one ``k`` and
    batch size: ``multiple = exp(a) * steps^b * (n / 2^14)^c`` (``c = 0``: the paper's ``1 / sqrt(n)`` holds).

    ``steps``, ``n_latents``, ``multiple``: one point per run size, the last from :func:`best_multiple`.
    """
    steps, n, y = (np.asarray(v, float) for v in (steps, n_latents, multiple))
    A = np.stack([np.ones_like(steps), np.log(steps), np.log(n / 2**14)], 1)
    start = np.linalg.lstsq(A, np.log(y), rcond=None)[0]
    return _fit("lr", ["a", "b", "c"], lr_law, [steps, n], y, [start], **options)


def _lr_term(theta, relative):
    return np.power(relative, theta[0])


def fit_lr_term(values, ratio, reference: float, name: str, **options) -> Fit:
    """How one more quantity (``k``, the batch size) moves the best learning-rate multiple:
    ``ratio = (value / reference)^name``, where ``ratio`` is a run size's best multiple at ``value`` over
    its best multiple at the sweep's own ``reference`` (same steps and ``n``, everything else held), so
    that the exponent is measured alone (0: the quantity does not matter). The library's rule calls the
    exponent of ``k`` ``d`` and that of the batch size ``e``.

    ``values``, ``ratio``: one point per (run size, value), from two :func:`lr_grid_table` rows each.
    """
    x, y = np.asarray(values, float) / reference, np.asarray(ratio, float)
    start = np.atleast_1d(np.sum(np.log(x) * np.log(y)) / np.sum(np.log(x) ** 2))
    return _fit(f"lr {name}", [name], _lr_term, [x], y, [start], **options)
