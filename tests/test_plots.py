"""Figures: PNG (through the local Chromium), HTML and JSON from one call."""

import json
import math
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from saelib import plots, scaling


def png_size(path):
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


def test_save_figure_writes_png_html_and_json_through_one_kept_chromium(tmp_path):
    from plotly.offline import get_plotlyjs

    (tmp_path / "figs").mkdir()
    (tmp_path / "figs" / "plotly.min.js").write_text("/* an older plotly's bundle */")  # plotly keeps one it finds
    for i, height in enumerate((500, 320)):
        fig = go.Figure(go.Scatter(x=[1, 2, 3], y=[1, 3, 2]))
        fig.update_layout(height=height if i else None)
        png = plots.save_figure(fig, tmp_path / "figs", f"fig{i}", data={"points": 3})
        assert png == tmp_path / "figs" / f"fig{i}.png" and png_size(png) == (900, height)
        assert "plotly" in (tmp_path / "figs" / f"fig{i}.html").read_text()
        assert json.loads((tmp_path / "figs" / f"fig{i}.json").read_text()) == {"points": 3}
    assert plots._png_server_started  # the second PNG went through the Chromium the first one started
    assert (tmp_path / "figs" / "plotly.min.js").read_text(encoding="utf-8") == get_plotlyjs()  # what the HTML expects


@pytest.mark.parametrize("browser, reason", [
    ("no-browser", "No Chrome or Chromium found for the PNG figures"),
    ("/bin/false", "The browser drawing the PNG figures failed to start or stopped"),
])
def test_without_a_working_browser_figures_are_html_and_json_with_one_warning(tmp_path, browser, reason):
    """Where kaleido finds no browser, or one that does not start (BROWSER_PATH is kaleido's override),
    its kept server dies and a PNG would wait for ever; save_figure writes the rest and says so once."""
    script = textwrap.dedent(f"""
        import warnings
        import plotly.graph_objects as go
        from saelib import plots
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pngs = [plots.save_figure(go.Figure(), {str(tmp_path)!r}, name, data={{"n": 1}}) for name in ("a", "b")]
        assert pngs == [None, None], pngs
        assert [str(w.message) for w in caught if w.category is RuntimeWarning] == [
            {reason!r} + ", so figures are written as HTML and JSON only; install Debian's chromium (apt-get "
            "install chromium) or Chrome, or run kaleido_get_chrome."], caught
    """)
    env = {**os.environ, "BROWSER_PATH": browser if browser.startswith("/") else str(tmp_path / browser)}
    (tmp_path / "a.png").write_bytes(b"a picture of an earlier run's numbers")  # removed: it would sit beside new ones
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.html", "a.json", "b.html", "b.json", "plotly.min.js"]


def test_figures_go_to_the_published_folder_only_at_published_presets(tmp_path):
    assert plots.figures_dir(tmp_path, "demo") == tmp_path
    assert plots.figures_dir(tmp_path, "lesson") == tmp_path / "lesson" and (tmp_path / "lesson").is_dir()
    assert plots.figures_dir(tmp_path, "ci") == tmp_path / "ci"


def test_published_numbers_are_read_back_and_absent_ones_are_none(tmp_path):
    plots.save_figure(go.Figure(), tmp_path, "01_x", data={"runs": [{"k": 8}]})
    assert plots.published("01_x", tmp_path) == {"runs": [{"k": 8}]}
    assert plots.published("02_y", tmp_path) is None


def test_log_axis_labels_each_value_once():
    axis = plots.log_axis([256, 1024, 512, 1024])
    assert axis["tickvals"] == [256.0, 512.0, 1024.0] and axis["ticktext"] == ["256", "512", "1,024"]
    fig = go.Figure(go.Scatter(x=[256, 1024], y=[1, 2])).update_xaxes(**axis)
    assert fig.layout.xaxis.type == "log" and fig.layout.xaxis.minor.ticks == ""


# ---- figures of notebooks 00-04, built from the published demo numbers in figures/

FIGURES = Path(__file__).resolve().parent.parent / "figures"
CODE_NAMES = ("delta_ce", "probe_loss", "n2g_", "ablation_sparsity", "val_nmse", "dead_fraction", "_baseline")


def demo(name):
    numbers = plots.published(name, FIGURES)
    assert numbers is not None, f"figures/{name}.json is part of the repository"
    return numbers


def legend_names(fig):
    return [t.name for t in fig.data if t.name and t.showlegend is not False]


def assert_human_legends(fig):
    names = legend_names(fig)
    assert names and not [n for n in names if any(code in n for code in CODE_NAMES)], names


def test_published_numbers_stay_out_of_a_published_run():
    assert plots.beside("01_frontier", "lesson", FIGURES) == demo("01_frontier")
    assert plots.beside("01_frontier", "demo", FIGURES) is None and plots.beside("01_frontier", "full", FIGURES) is None


def test_fraction_axis_starts_at_zero_even_when_nothing_dies():
    assert plots.fraction_axis([0.0, 0.0])["range"] == [0, 0.05]  # plotly alone draws -1..1 around a flat 0
    assert plots.fraction_axis([0.1, 0.8])["range"] == [0, 1]
    assert plots.fraction_axis([0.01, 0.1])["range"] == pytest.approx([0, 0.12])


def test_nice_log_axis_ticks_span_the_values_at_1_2_5():
    axis = plots.nice_log_axis([0.07, 0.9])
    assert axis["type"] == "log" and axis["tickvals"] == pytest.approx([0.05, 0.1, 0.2, 0.5, 1.0, 2.0])


@pytest.mark.parametrize("lo, hi", [(0.2, 0.41), (0.13, 0.4), (1.2, 3.5), (0.19, 0.21), (3, 30_000)])
def test_nice_log_axis_labels_at_least_three_ticks_inside_a_narrow_range(lo, hi):
    axis = plots.nice_log_axis([lo, hi])
    inside = [(v, t) for v, t in zip(axis["tickvals"], axis["ticktext"]) if lo <= v <= hi]
    assert len(inside) >= 3, axis
    assert all(float(t.replace(",", "")) == pytest.approx(v) for v, t in inside)  # 1.5 reads "1.5", not "2"
    assert len(inside) <= 8  # wide ranges: a label per decade, not at every 1, 2 and 5


def test_nice_log_axis_leaves_out_what_a_log_axis_cannot_show():
    nan = float("nan")
    assert plots.nice_log_axis([nan, 0.07, 0.0, 0.9]) == plots.nice_log_axis([0.07, 0.9])  # a diverged run, a zero
    assert plots.nice_log_axis([0, nan]) == {"type": "log"}


def test_nice_log_axis_uses_finer_mantissas_where_1_2_5_labels_one_tick():
    assert {0.2, 0.3, 0.4} <= set(plots.nice_log_axis([0.2, 0.41])["tickvals"])  # 1-2-5 labels 0.2 alone


def test_titles_say_sites_and_seeds_in_words():
    assert plots.site_name("resid_post", 12) == "residual stream after layer 12"
    assert plots.seeds_phrase(1) == "one seed" and plots.seeds_phrase(3) == "mean ± sd over 3 seeds"
    fig = plots.norm_histogram(torch.tensor([100.0, 120, 150, 130]), torch.tensor([2e4]), "t")
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis.minor.ticks == ""  # no "5 2 100 5 2" labels


def test_training_curves_draw_the_demo_run_and_a_zero_to_one_dead_panel():
    rows = demo("00_training")["rows"]
    mine = [dict(r, tokens=r["tokens"] // 4) for r in rows[:20]]
    nmse = demo("00_density")["report"]["nmse"]
    fig = plots.training_curves(mine, "t", published_rows=rows, published_nmse=nmse)
    # the demo's held-out NMSE is a reference line
    assert legend_names(fig) == ["this run", "published demo run", f"published demo run, held-out NMSE {nmse:.3f}"]
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis.minor.ticks == "" and fig.layout.xaxis.type == "log"
    assert fig.layout.yaxis2.range[0] == 0 and fig.layout.yaxis2.range[1] <= 1
    assert len(plots.training_curves(mine, "t").data) == 2  # without the published run: this run only


def test_density_histogram_writes_both_runs_dead_and_dense_fractions():
    report = demo("00_density")["report"]
    fig = plots.density_histogram(torch.tensor([1.0, 5.0, 2.0]), torch.tensor([-4.0, -3.0, -2.0, -1.0]), "d",
                                  report=report, published_report=report)
    (note,) = fig.layout.annotations
    assert note.text.count("never fire") == 2 and "published demo run" in note.text


def test_frontier_names_methods_and_draws_the_demo_dotted():
    summary = demo("01_frontier")["summary"]
    mine = [r for r in summary if r["arch"] != "batchtopk"]
    fig = plots.frontier(mine, "f", published_summary=summary)
    assert legend_names(fig) == ["TopK", "ReLU + L1", "TopK, published demo run", "BatchTopK, published demo run",
                                 "ReLU + L1, published demo run"]
    assert fig.layout.yaxis2.title.text == "Δ cross-entropy (nats)"
    assert fig.layout.xaxis.type == "log" and fig.layout.xaxis.minor.ticks == "" and "10" in fig.layout.xaxis.ticktext
    assert all(t.line.dash == "dot" for t in fig.data if "published" in t.name)
    assert all(t.error_y.visible for t in fig.data)
    one_seed = plots.frontier([dict(r, runs=1) for r in summary], "f")
    assert not any(t.error_y.visible or t.error_x.visible for t in one_seed.data)  # no ± bars at one seed


def test_dead_vs_n_reads_zero_to_one_with_readable_log_n():
    runs = demo("02_dead_vs_n")["runs"]
    mine = [r for r in runs if r["lr_multiplier"] in (4, 16) and r["n_latents"] <= 2048]
    fig = plots.dead_vs_n(mine, "d", published_rows=runs)
    assert [a.text for a in fig.layout.annotations] == ["lr = 4 x paper's rule", "lr = 16 x paper's rule"]
    assert all(list(fig.layout[f"yaxis{i}"].range) == [0, 1] for i in ("", "2"))
    assert list(fig.layout.xaxis.ticktext) == ["1,024", "2,048", "4,096"]
    # three seeds per cell: one point per n (their mean) with its interval as bars
    (line,) = [t for t in fig.data if t.name == "neither" and t.xaxis == "x"]
    assert list(line.x) == [1024, 2048] and line.error_y.visible and all(b > 0 for b in line.error_y.array)
    assert "AuxK + tied init (paper), published demo run" in legend_names(fig)


def test_dead_over_training_reads_zero_to_one():
    curves = demo("02_dead_over_training")["curves"]
    fig = plots.dead_over_training({"neither": curves["neither"][:50]}, "d", published_curves=curves)
    assert list(fig.layout.yaxis.range) == [0, 1] and len(fig.data) == 5


def test_convergence_marks_extrapolated_T_open_and_draws_the_papers_slope():
    published = demo("10_convergence")
    rng = np.random.default_rng(0)
    runs, fits = [], []
    for n, T_n in ((256, 3e5), (512, 4.5e5), (1024, 7e5), (2048, 1.05e6), (4096, 1.6e6)):
        tokens = np.arange(1, 401) * 8192.0
        nmse = 0.2 * (1 + 0.01 * T_n / tokens) * np.exp(0.003 * rng.standard_normal(400))
        T, (low, high), fit = scaling.converged_at(tokens, nmse, after=16384, n_boot=20)
        runs.append(dict(n_latents=n, tokens=tokens.tolist(), nmse=nmse.tolist(), curve_fit=fit.params, T=T, T_low=low,
                         T_high=high))
        fits.append(fit)
    runs[-1]["tokens"] = runs[-1]["tokens"][:100]  # this run stops before its T: drawn open
    fig = plots.convergence(runs, scaling.convergence_exponent([r["n_latents"] for r in runs], fits), 0.01,
                            published=published)
    (T_trace,) = [t for t in fig.data if (t.name or "").startswith("T (open")]
    assert list(T_trace.marker.symbol) == ["circle"] * 4 + ["circle-open"]
    assert "the paper's exponent" in legend_names(fig) and "T, published demo run" in legend_names(fig)
    assert "n^0.6" in fig.layout.title.text and fig.layout.yaxis2.type == "log"
    assert_human_legends(fig)


def test_loss_curves_draw_fits_and_the_demo_runs_of_the_same_k():
    runs = demo("03_loss_vs_n")["runs"]
    mine = [r for r in runs if r["n_latents"] <= 2048 and r["k"] in (8, 64)]
    n, k, L = (np.array([r[key] for r in mine], float) for key in ("n_latents", "k", "val_nmse"))
    fits = {kk: scaling.fit_power_law(n[k == kk], L[k == kk], n_boot=2) for kk in (8, 64)}
    fig = plots.loss_curves(n, k, L, fits, "n (latents)", "k", "t", published_rows=runs)
    assert legend_names(fig) == ["k=8", "k=8, published demo run", "k=64", "k=64, published demo run"]
    fit_line, published_line = fig.data[1].line, fig.data[2].line  # the run's fit solid, the published run dotted
    assert fit_line.dash is None and published_line.dash == "dot" and fit_line.color == published_line.color
    assert list(fig.layout.xaxis.ticktext) == ["256", "512", "1,024", "2,048", "4,096"]
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis.minor.ticks == ""


def test_joint_law_and_compute_figures_carry_the_demo_fit():
    runs = demo("03_loss_vs_n")["runs"]
    n, k, L = (np.array([r[key] for r in runs], float) for key in ("n_latents", "k", "val_nmse"))
    joint = scaling.fit_joint_law(n, k, L, n_boot=2)
    fig = plots.joint_law(n, k, L, joint.predict(n, k), joint.r2, joint.rmse_log, demo("03_joint_law")["fit"])
    assert "published demo run: R² 0.994" in fig.layout.title.text
    cc = demo("03_compute_law")
    C_f, L_f = np.array(cc["frontier"]["flops"]), np.array(cc["frontier"]["nmse"])
    compute = scaling.fit_compute_law(C_f, L_f, n_boot=2)
    curves = [dict(n=256, flops=[1e9, 1e10], nmse=[0.5, 0.3])]
    fig = plots.compute_law(curves, (C_f, L_f), compute, "c", published=cc)
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    assert all(fig.layout[axis].minor.ticks == "" for axis in ("xaxis", "yaxis"))  # no "2 3 4 5" labels
    assert "frontier, published demo run" in legend_names(fig)
    assert f"L(C) = {compute.params['c0']:.3g}" in fig.layout.title.text


def test_metrics_vs_size_legends_say_what_each_metric_is():
    runs = demo("04_metrics_vs_size")["runs"]
    fig = plots.metrics_vs_size(runs[::2], "m", published_rows=runs)
    assert_human_legends(fig)
    names = legend_names(fig)
    assert {"Δ cross-entropy (nats)", "probe loss, SAE latents", "probe loss, baseline (residual channels)",
            "N2G precision", "N2G recall"} <= set(names)
    assert sum("published demo run" in name for name in names) == 1  # one grey legend entry for the demo run
    grey = [t for t in fig.data if t.line.color == "grey"]
    assert len(grey) == 7 and {t.legendgroup for t in grey} == {"published demo run"}  # it toggles every grey line
    assert all(fig.layout[f"yaxis{i}"].title.text for i in ("", "2", "3", "4"))
    assert "N2G (n-gram)" in fig.layout.annotations[2].text
    assert list(fig.layout.xaxis.ticktext) == ["512", "1,024", "2,048", "4,096", "8,192"]
    assert not math.isnan(fig.data[0].y[0])

# ---- figures of notebooks 05-08, drawn from the published numbers in figures/


def assert_human_names(names):
    assert names and not any("_" in n or n in ("topk", "multitopk", "sae-lens", "naive") for n in names), names


def test_progressive_codes_draws_each_architecture_beside_the_published_run():
    demo = plots.published("05_progressive", FIGURES)
    fig = plots.progressive_codes(demo, demo)
    assert_human_names(legend_names(fig))
    assert {t.name for t in fig.data} == {"TopK", "Multi-TopK", "TopK (published demo run)",
                                          "Multi-TopK (published demo run)", "trained k = 32"}
    multitopk = next(t for t in fig.data if t.name == "Multi-TopK")
    assert list(multitopk.y) == [r["nmse"] for r in demo["summary"] if r["arch"] == "multitopk"]
    assert fig.layout.xaxis.type == "log" and list(fig.layout.xaxis.tickvals) == [8, 16, 32, 64, 128]
    assert len(plots.progressive_codes(demo).data) == 3


def test_toy_recovery_puts_the_published_heatmap_beside_the_run():
    demo = plots.published("06_recovery", FIGURES)
    run = {**demo, "runs": [r for r in demo["runs"] if r["k"] in (1, 4)], "setup": {**demo["setup"], "k": [1, 4]}}
    fig = plots.toy_recovery(run, demo)
    ours, published = fig.data
    assert len(ours.z) == 2 and len(published.z) == len(demo["setup"]["k"])
    best = max(demo["runs"], key=lambda r: r["mbc"])
    assert best["mbc"] in published.z[demo["setup"]["k"].index(best["k"])]
    assert "published demo run" in fig.layout.annotations[1].text and not ours.showscale


def test_recipe_ablation_shows_changes_from_the_reference_and_the_published_ones():
    demo = plots.published("07_recipe_ablation", FIGURES)
    fig = plots.recipe_ablation(demo, demo)
    bars = next(t for t in fig.data if t.type == "bar")
    ref = [r["val_nmse"] for r in demo["runs"] if r["variant"] == "reference"]
    no_auxk = next(r["val_nmse"] for r in demo["runs"] if r["variant"] == "no AuxK")
    assert bars.x[list(bars.y).index("no AuxK")] == 100 * (no_auxk / (sum(ref) / len(ref)) - 1)
    assert "reference" not in bars.y and list(bars.x) == sorted(bars.x)
    diamonds = next(t for t in fig.data if t.name == "published demo run" and t.xaxis == "x")
    assert list(diamonds.x) == list(bars.x)
    assert fig.layout.xaxis2.type == "log" and 1.0 in fig.layout.xaxis2.tickvals
    assert "%" in fig.layout.xaxis.title.text
    labels = next(t for t in fig.data if t.type == "scatter" and t.mode == "text")  # one column right of every bar and diamond
    assert len(set(labels.x)) == 1 and labels.x[0] >= max([*bars.x, *diamonds.x])
    assert "decoder bias b_pre = sample mean" in bars.y and "learning rate" in fig.layout.xaxis2.title.text
    assert "published demo run: NMSE against the learning rate" in legend_names(fig)
    assert "grey band" not in fig.layout.title.text


def test_throughput_draws_the_roofline_as_a_level_not_a_bar():
    demo = plots.published("08_throughput", FIGURES)
    fig = plots.throughput(demo, demo)
    assert "tokens per second" in fig.layout.title.text and "SAELens" in fig.layout.title.text
    assert not [t for t in fig.data if t.type == "bar" and "roofline" in t.name.lower()]
    assert "GEMM" not in fig.layout.title.text and "activation width d_in" in fig.layout.title.text
    # each group's roofline spans exactly its bars: category position ± 0.4 on that panel's axis
    roofs = [r for r in demo["rows"] if r["impl"] == "roofline"]
    lines = [s for s in fig.layout.shapes if s.xref == "x"]
    assert len(lines) == len(roofs) and [(s.x0, s.x1) for s in lines] == [(i - 0.4, i + 0.4) for i in range(len(roofs))]
    assert [s.y0 for s in lines] == [r["tokens_per_s"] for r in roofs]
    assert list(fig.layout.xaxis.categoryarray)[0] == next(t for t in fig.data if t.type == "bar").x[0]
    assert sum(bool(s.showlegend) for s in fig.layout.shapes) == 1
    assert_human_names(legend_names(fig))
    assert "SAELens" in legend_names(fig) and fig.layout.yaxis.type == "log"
    assert len(fig.layout.annotations) == 2 and len(plots.throughput(demo).layout.annotations) == 1
    assert demo["machine"]["cpu"] in fig.layout.annotations[1].text  # ratios compare within a machine only
    # an implementation measured only in the published run still gets its legend entry
    fp32_only = plots.throughput({"rows": [r for r in demo["rows"] if r["impl"] != "saelib-bf16"]}, demo)
    assert "saelib, bf16 encoder" in legend_names(fp32_only)
