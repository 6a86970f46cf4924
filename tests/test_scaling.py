"""Scaling-law fits recover known coefficients from synthetic data, within their bootstrap intervals."""

import numpy as np
import pytest

from saelib import scaling


def noisy(y, rng, sigma=0.01):
    return y * np.exp(sigma * rng.standard_normal(len(y)))


def test_power_law_with_irreducible_term_is_recovered():
    rng = np.random.default_rng(1)  # a 95% interval misses 1 draw in 20; the draw with seed 0 is one
    n = np.repeat(2.0 ** np.arange(8, 16), 3)
    true = {"a": 1.0, "b": -0.4, "c": 0.05}
    fit = scaling.fit_power_law(n, noisy(np.exp(true["a"]) * n ** true["b"] + true["c"], rng), n_boot=60)
    for name, value in true.items():
        lo, hi = fit.ci[name]
        assert lo <= value <= hi, (name, value, fit.ci[name])
    assert fit.r2 > 0.99 and fit.rmse_log < 0.02
    assert np.allclose(fit.predict(n[:3]), np.exp(fit.params["a"]) * n[:3] ** fit.params["b"] + fit.params["c"])


def test_joint_law_recovers_the_papers_coefficients():
    rng = np.random.default_rng(1)
    n, k = (g.ravel() for g in np.meshgrid(2.0 ** np.arange(10, 18), [8.0, 16, 32, 64, 128]))
    true = scaling.PAPER["joint"]
    loss = noisy(scaling._joint(np.array(list(true.values())), n, k), rng, 0.003)
    fit = scaling.fit_joint_law(n, k, loss, n_boot=40)
    assert fit.r2 > 0.95
    for name, value in true.items():
        lo, hi = fit.ci[name]
        assert lo - 0.02 <= value <= hi + 0.02, (name, value, fit.ci[name])
    rows = scaling.comparison_table({"joint": fit})
    assert {r["coefficient"] for r in rows} == set(true) and all(r["paper"] == true[r["coefficient"]] for r in rows)


def test_compute_law_on_a_frontier():
    rng = np.random.default_rng(2)
    C = np.geomspace(1e10, 1e16, 25)
    loss = noisy(0.09 + 20.0 * C ** -0.2, rng, 0.005)
    fit = scaling.fit_compute_law(C, loss, n_boot=60)
    assert fit.ci["p"][0] <= 0.2 <= fit.ci["p"][1]
    assert fit.ci["c0"][0] <= 0.09 <= fit.ci["c0"][1]
    np.testing.assert_allclose(fit.predict(C), 0.09 + 20.0 * C ** -0.2, rtol=0.02)
    # frontier: lowest loss reached within each budget, falling
    fc, fl = scaling.compute_frontier(np.r_[C, C * 2], np.r_[loss, loss * 1.5], bins=10)
    assert np.all(np.diff(fl) < 0) and np.all(np.diff(fc) > 0)


def test_the_law_of_tokens_to_convergence_recovers_its_exponent():
    rng = np.random.default_rng(3)
    n = np.repeat([256.0, 512, 1024, 2048, 4096], 2)
    fit = scaling.fit_convergence(n, noisy(30.0 * n**0.6, rng, 0.02), n_boot=60)
    assert fit.ci["b"][0] <= 0.6 <= fit.ci["b"][1]


def test_tokens_to_convergence_from_a_fitted_curve_and_its_exponent_across_sizes():
    """Curves L(t) = exp(a) t^b + c whose T (within 1% of c) grows as n^0.6: each run's T is recovered
    within its interval, and the exponent through five sizes is recovered, its interval excluding 0."""
    rng = np.random.default_rng(4)
    t = np.arange(1, 801) * 4096.0
    n = np.array([256.0, 512, 1024, 2048, 4096])
    T_true = 3e5 * (n / 256) ** 0.6
    fits = []
    for T_n, c in zip(T_true, (0.30, 0.25, 0.21, 0.18, 0.16)):
        curve = c * (1 + 0.01 * T_n / t)  # exp(a) t^b + c with b = -1 and exp(a) T^b = 0.01 c
        T, (low, high), fit = scaling.converged_at(t, noisy(curve, rng, 0.005), tol=0.01, after=8192, n_boot=100)
        assert low <= T_n <= high and abs(T / T_n - 1) < 0.3, (T_n, T, low, high)
        fits.append(fit)
    law = scaling.convergence_exponent(n, fits, tol=0.01)
    assert law.ci["b"][0] <= 0.6 <= law.ci["b"][1] and law.ci["b"][0] > 0, law.ci
    assert abs(law.params["b"] - 0.6) < 0.1 and law.predict([256.0])[0] == pytest.approx(np.exp(law.params["a"]) * 256**law.params["b"])
    flat = scaling.fit_power_law(t, 0.2 + 0 * t + 1e-6 * rng.standard_normal(len(t)), n_boot=0)
    with pytest.raises(ValueError, match="finite T"):
        scaling.convergence_exponent(n[:2], [fits[0], flat])


def test_one_curve_of_few_points_gets_a_residual_bootstrap_interval():
    # 5 runs and 3 coefficients: too few points to resample them, so the residuals are resampled
    rng = np.random.default_rng(0)
    n = 2.0 ** np.arange(8, 13)
    true = {"a": 1.0, "b": -0.4, "c": 0.1}
    fit = scaling.fit_power_law(n, noisy(np.exp(true["a"]) * n ** true["b"] + true["c"], rng, 0.005), n_boot=200)
    assert fit.bootstrap == "residual" and fit.boot_failures < 100
    for name, value in true.items():
        lo, hi = fit.ci[name]
        assert lo <= fit.params[name] <= hi and lo <= value <= hi, (name, value, fit.ci[name])
    assert scaling.fit_power_law(np.repeat(n, 2), np.repeat(n ** -0.4, 2), n_boot=5).bootstrap == "case"


def test_bad_inputs_say_what_is_wrong():
    with pytest.raises(ValueError, match="positive"):
        scaling.fit_power_law([1, 2, 3, 4, 5], [1, 0, 1, 1, 1])
    with pytest.raises(ValueError, match="at least"):
        scaling.fit_power_law([1, 2, 3], [3, 2, 1])
    with pytest.raises(ValueError, match="2 values of k"):
        scaling.fit_joint_law([1, 2, 3, 4, 5, 6, 7], [4] * 7, [1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4])


def test_no_bootstrap_gives_the_fit_without_intervals():
    n = np.array([64, 128, 256, 512, 1024.0])
    fit = scaling.fit_power_law(n, 0.1 + 2 * n**-0.5, n_boot=0)
    assert abs(fit.params["b"] + 0.5) < 1e-6 and all(np.isnan(v).all() for v in fit.ci.values())


def test_the_best_multiple_is_the_vertex_of_the_grid_in_log_multiple():
    from saelib.scaling import best_multiple, loss_at_multiple

    grid = [1, 2, 4, 8, 16, 32, 64]
    loss = [0.2 + 0.01 * (np.log2(m) - np.log2(11.0)) ** 2 for m in grid]
    m, y = best_multiple(grid, loss)
    assert m == pytest.approx(11.0, rel=1e-6) and y == pytest.approx(0.2)
    order = [3, 0, 6, 1, 5, 2, 4]
    assert best_multiple([grid[i] for i in order], [loss[i] for i in order])[0] == pytest.approx(11.0)  # any order
    assert best_multiple(grid[:3], loss[:3]) == (4.0, pytest.approx(loss[2]))  # the best run at an end: itself
    between = loss_at_multiple(grid, loss, 11.0)
    assert min(loss) <= between <= max(loss[3], loss[4])  # read between 8x and 16x, never below the curve's min


def test_a_run_that_diverged_counts_as_worse_than_any_in_the_lr_grid():
    from saelib.scaling import best_multiple, loss_at_multiple, lr_grid_table

    grid, nan = [1, 2, 4, 8, 16], float("nan")
    loss = [0.30, 0.22, 0.20, nan, 0.25]
    assert best_multiple(grid, loss) == (4.0, 0.20)  # no parabola through the diverged neighbour
    assert best_multiple([1, 2, 4, 8, 16], [0.30, 0.22, 0.20, 0.21, 0.25])[0] != 4.0  # with it: the vertex
    assert loss_at_multiple(grid, loss, 3.0) == pytest.approx(0.2083, abs=1e-4)
    assert loss_at_multiple(grid, loss, 6.0) == loss_at_multiple(grid, loss, 8.0) == float("inf")
    assert loss_at_multiple(grid, loss, 16.0) == 0.25
    rows = [dict(n_latents=1024, steps=100, batch_size=256, k=32, lr_multiplier=m, val_nmse=v) for m, v in zip(grid, loss)]
    (row,) = lr_grid_table(rows, lambda steps, n, k, batch: 8.0)
    assert row["best_run_nmse"] == 0.20 and row["regret"] == float("inf")  # the rule chose a rate that diverged
    with pytest.raises(ValueError, match=r"Every run of the learning-rate grid \[1, 2\] diverged"):
        best_multiple([2, 1], [nan, float("inf")])


def test_compute_frontier_and_convergence_exponent_take_edge_inputs():
    C, L = scaling.compute_frontier([0, 1e3, 1e4, 1e5], [1.0, 0.5, 0.4, 0.3], bins=4)  # the untrained start is left out
    assert C.tolist() == [1e3, 1e4, 1e5] and L.tolist() == [0.5, 0.4, 0.3]
    with pytest.raises(ValueError, match="positive FLOPs"):
        scaling.compute_frontier([0.0], [1.0])
    t = np.geomspace(1e4, 1e6, 60)
    fits = [scaling.converged_at(t, 0.3 * (t / 1e4) ** -0.5 + c, n_boot=0)[2] for c in (0.2, 0.15, 0.1)]
    fit = scaling.convergence_exponent([128, 256, 512], fits)  # curves fitted without a bootstrap
    assert np.isfinite(fit.params["b"]) and all(np.isnan(v).all() for v in fit.ci.values())


def test_each_batch_size_of_a_run_size_gets_its_own_grid():
    from saelib.scaling import lr_grid_table

    grid = [2, 4, 8, 16, 32, 64]
    rows = [dict(n_latents=1024, steps=100, batch_size=b, k=k, lr_multiplier=m,
                 val_nmse=0.2 + 0.01 * (np.log2(m) - np.log2(best)) ** 2)
            for b, k, best in ((256, 32, 5.0), (4096, 32, 20.0), (4096, 8, 40.0)) for m in grid]
    table = lr_grid_table(rows, lambda steps, n, k, batch: 10.0 * 32 / k)
    assert [(t["batch_size"], t["k"], round(t["multiple"], 3)) for t in table] == [(256, 32, 5.0), (4096, 8, 40.0),
                                                                                     (4096, 32, 20.0)]
    assert [t["default_multiple"] for t in table] == [10.0, 40.0, 10.0]  # the rule is asked at each grid's k
    assert table[1]["regret"] < min(table[0]["regret"], table[2]["regret"])  # the k 8 grid's default is near its best


def test_the_lr_rule_is_recovered_and_the_default_follows_it():
    from saelib import config
    from saelib.scaling import fit_lr_rule

    steps, n = np.meshgrid([100, 400, 1600], [1024, 4096, 16384])
    truth = np.exp(5.0 - 0.5 * np.log(steps) + 0.3 * np.log(n / 2**14))
    fit = fit_lr_rule(steps.ravel(), n.ravel(), truth.ravel() * np.exp(0.01 * np.sin(np.arange(9))), n_boot=50)
    assert fit.params == pytest.approx({"a": 5.0, "b": -0.5, "c": 0.3}, abs=0.05)
    assert fit.ci["b"][0] < -0.5 < fit.ci["b"][1]
    assert config.lr_multiple(None, 4096) == 1.0 and config.lr_multiple(10**9, 4096) == 1.0  # never below the paper's
    short = config.LR_RULE_STEPS[0]
    assert config.lr_multiple(short // 4, 4096) == config.lr_multiple(short, 4096)  # not extrapolated below the sweeps
    resolved = config.TrainConfig(n_latents=4096, k=32, batch_size=1024, tokens=400 * 1024).resolved(576, None)
    assert resolved.lr == pytest.approx(config.lr_multiple(400, 4096, 32, 1024) * config.paper_lr(4096))
    assert config.TrainConfig(n_latents=4096, k=32, lr_multiplier=2).resolved(576, 10**6).lr == 2 * config.paper_lr(4096)


def test_the_k_and_batch_terms_are_recovered_and_the_default_follows_them(monkeypatch):
    from saelib import config
    from saelib.scaling import fit_lr_term

    k = np.array([8, 16, 64, 128, 8, 16, 64, 128])
    ratio = (k / 32) ** -0.4 * np.exp(0.02 * np.sin(np.arange(8)))
    fit = fit_lr_term(k, ratio, 32, "d", n_boot=50)
    assert fit.params["d"] == pytest.approx(-0.4, abs=0.03) and fit.ci["d"][1] - fit.ci["d"][0] < 0.1
    assert fit_lr_term(k * 32, ratio, 1024, "e", n_boot=20).params["e"] == pytest.approx(fit.params["d"])

    monkeypatch.setitem(config.LR_RULE, "d", -0.4)
    monkeypatch.setitem(config.LR_RULE, "e", 0.25)
    at_32 = config.lr_multiple(400, 4096, 32, 1024)
    assert config.lr_multiple(400, 4096, None) == at_32  # a ReLU SAE (no k), no batch size: the sweeps' 32 and 1024
    assert config.lr_multiple(400, 4096, 8, 1024) == pytest.approx(at_32 * 4**0.4)
    assert config.lr_multiple(400, 4096, 32, 4096) == pytest.approx(at_32 * 4**0.25)
    for lo, hi, args in ((*config.LR_RULE_K, lambda k: (k, 1024)), (*config.LR_RULE_BATCH, lambda b: (32, b))):
        assert config.lr_multiple(400, 4096, *args(lo // 2)) == config.lr_multiple(400, 4096, *args(lo))  # clamped
        assert config.lr_multiple(400, 4096, *args(hi * 2)) == config.lr_multiple(400, 4096, *args(hi))
    resolved = config.TrainConfig(n_latents=4096, k=8, batch_size=256, tokens=400 * 256).resolved(576, None)
    assert resolved.lr == pytest.approx(config.lr_multiple(400, 4096, 8, 256) * config.paper_lr(4096))


def test_a_coefficient_every_resample_gives_alike_has_no_interval():
    """Two points for one exponent: the resamples cannot move it, so a zero-width interval would claim
    it exact; with a third point that disagrees, the interval has width and holds the estimate."""
    import math

    from saelib.scaling import fit_lr_term

    for ratios in ([0.25**0.228, 4**0.228], [1.05 * 0.25**0.228, 4**0.228]):
        assert all(math.isnan(v) for v in fit_lr_term([256, 4096], ratios, 1024, "e").ci["e"])
    fit = fit_lr_term([256, 4096, 256], [1.05 * 0.25**0.228, 4**0.228, 0.25**0.2], 1024, "e")
    low, high = fit.ci["e"]
    assert low < fit.params["e"] < high


def test_a_coefficient_at_its_bound_is_the_bound_and_its_interval_holds_it():
    """L(k) without an irreducible term: c sits at its bound 0, as 0 (not the solver's 1e-20 beside it,
    which an interval starting at 5e-17 would seem to leave out)."""
    import numpy as np

    from saelib.scaling import fit_power_law

    k = np.array([8, 16, 32, 64, 128.0])
    y = np.exp(-0.46) * k**-0.24 * np.exp(np.random.default_rng(0).normal(0, 0.02, 5))
    fit = fit_power_law(k, y)
    low, high = fit.ci["c"]
    assert fit.params["c"] == 0.0 and low == 0.0 < high
