"""Figures: plotly figures for the notebooks, saved as PNG (for reading), HTML (for exploring) and the
numbers behind them (JSON).

PNG export goes through kaleido, which drives a local Chromium (the project's set-up installs
Debian's) or Chrome; one browser serves every PNG of a process. Where kaleido finds none, figures are
written without their PNG, with one warning. HTML files share one ``plotly.min.js`` next to them, so
they open offline.
"""

from __future__ import annotations

import atexit
import json
import math
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from .files import atomic_write_text


# Presets whose figures are the published ones in ``figures/``; the others write to ``figures/<preset>/``
PUBLISHED_PRESETS = ("demo", "full")


def figures_dir(root: str | Path, preset: str) -> Path:
    """Where a notebook writes its figures: ``root`` for published presets, ``root/<preset>`` for the
    class-time and test presets (``lesson``, ``ci``; ignored by git)."""
    folder = Path(root) if preset in PUBLISHED_PRESETS else Path(root) / preset
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def published(name: str, root: str | Path = "../figures") -> dict | None:
    """The numbers behind the published figure ``name`` (``root/name.json``, written at the ``demo``
    preset by ``make figures``), to draw beside a smaller run; None where the file is absent."""
    path = Path(root) / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def log_axis(values) -> dict:
    """Axis settings for a log axis over ``values`` (e.g. powers of 2): one labelled tick per value
    and no minor labels, which plotly otherwise prints as "5 6 7 8 9 1000 2 3 4" on short ranges."""
    ticks = sorted({float(v) for v in values})
    return dict(type="log", tickvals=ticks, ticktext=[f"{v:,.0f}" if v >= 1 and v == int(v) else f"{v:g}" for v in ticks],
                minor=dict(ticks="", showgrid=False))


# None until the first PNG; then whether this process writes PNGs (through its kept browser)
_png_server_started: bool | None = None
# seconds one PNG may take (0.25 s through a working browser) before PNGs are given up for the process
PNG_TIMEOUT_S = 120


def _start_png_server() -> bool:
    """Keep one browser for this process's PNGs (stopped at exit): on its own, kaleido starts one
    per ``write_image``, 3 s each against 0.25 s through the kept one (2 cores). False, with one
    warning, where kaleido finds no browser (its search: ``BROWSER_PATH``, ``PATH``, the usual
    places, its own download)."""
    global _png_server_started
    if _png_server_started is None:
        import kaleido
        from choreographer.browsers.chromium import Chromium

        browser = Chromium.find_browser(skip_local=False)
        if not (browser and Path(browser).is_file()):
            _no_png("No Chrome or Chromium found for the PNG figures")
        else:
            kaleido.start_sync_server(silence_warnings=True)
            atexit.register(kaleido.stop_sync_server, silence_warnings=True)
            _png_server_started = True
    return _png_server_started


def _no_png(reason: str) -> None:
    global _png_server_started
    _png_server_started = False
    warnings.warn(f"{reason}, so figures are written as HTML and JSON only; install Debian's chromium (apt-get "
                  "install chromium) or Chrome, or run kaleido_get_chrome.", RuntimeWarning, stacklevel=4)


def _write_png(fig: go.Figure, path: Path) -> bool:
    """``fig`` as a PNG at ``path`` through the kept browser; False (PNGs given up, one warning)
    where the browser failed: kaleido's server thread then dies, or waits on the browser, and a
    call into it would wait for ever, so the call runs in a thread of its own, watched."""
    import kaleido

    server = getattr(kaleido, "_global_server", None)  # kaleido's kept server and its thread
    thread = getattr(server, "_thread", None)
    opts = dict(format="png", width=900, height=fig.layout.height or 500, scale=1)
    result: list = []

    def draw() -> None:
        try:
            result.append(kaleido.calc_fig_sync(fig.to_dict(), opts=opts))
        except BaseException as e:  # re-raised in the caller's thread
            result.append(e)

    drawer = threading.Thread(target=draw, name="saelib-png", daemon=True)
    drawer.start()
    deadline = time.monotonic() + PNG_TIMEOUT_S
    while drawer.is_alive():
        drawer.join(0.1)
        if drawer.is_alive() and ((thread is not None and not thread.is_alive()) or time.monotonic() > deadline):
            if thread is not None and thread.is_alive():  # a hung browser: kaleido's close at exit would wait on it
                server._initialized = False
            _no_png("The browser drawing the PNG figures failed to start or stopped")
            return False
    if isinstance(result[0], BaseException):
        raise result[0]
    path.write_bytes(result[0])
    return True


def save_figure(fig: go.Figure, folder: str | Path, name: str, data: dict | None = None) -> Path | None:
    """Write ``name.png``, ``name.html`` and, with ``data``, ``name.json`` into ``folder``; return the
    PNG (None where no browser could draw it: see ``_start_png_server`` and ``_write_png``; an older
    ``name.png`` is removed then, so that no picture of other numbers stays beside the new ones)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.png").unlink(missing_ok=True)
    fig.write_html(folder / f"{name}.html", include_plotlyjs="directory")
    _current_plotlyjs(folder)
    if data is not None:
        (folder / f"{name}.json").write_text(json.dumps(data, indent=1))
    if not (_start_png_server() and _write_png(fig, folder / f"{name}.png")):
        return None
    return folder / f"{name}.png"


_PLOTLYJS_CHECKED: set[Path] = set()


def _current_plotlyjs(folder: Path) -> None:
    """Make ``folder/plotly.min.js`` the installed plotly's, once per folder and process: plotly writes
    it only where it is absent, so a folder written by an older plotly would keep that version's."""
    if folder in _PLOTLYJS_CHECKED:
        return
    from plotly.offline import get_plotlyjs

    bundled = get_plotlyjs()
    path = folder / "plotly.min.js"
    if path.read_text(encoding="utf-8") != bundled:
        atomic_write_text(path, bundled)
    _PLOTLYJS_CHECKED.add(folder)


# Where in a layer activations are read (:data:`saelib.models.SITES`), in words for titles
SITE_NAMES = {"resid_post": "residual stream after layer {layer}", "mlp_out": "MLP output of layer {layer}",
              "attn_out": "attention output of layer {layer}"}


def site_name(site: str, layer: int) -> str:
    """``site`` of ``layer`` in words, e.g. "residual stream after layer 12"."""
    return SITE_NAMES.get(site, site + " of layer {layer}").format(layer=layer)


def seeds_phrase(seeds: int) -> str:
    """How a figure's points combine seeds: "one seed", or "mean ± sd over 3 seeds"."""
    return "one seed" if seeds == 1 else f"mean ± sd over {seeds} seeds"


def norm_histogram(kept: torch.Tensor, excluded: torch.Tensor, title: str) -> go.Figure:
    """Histogram of log10 token norms, kept vs excluded (excluded tokens sit far to the right)."""
    fig, every = go.Figure(), []
    logs = torch.cat([kept, excluded]).float().clamp_min(1e-6).log10()
    bins = torch.linspace(float(logs.min()), float(logs.max()) + 1e-3, 61)
    for label, norms in (("kept", kept), ("excluded (position 0, separators, outliers)", excluded)):
        counts = torch.histogram(norms.float().clamp_min(1e-6).log10(), bins=bins).hist
        every += [c for c in counts.tolist() if c > 0]
        fig.add_bar(x=((bins[:-1] + bins[1:]) / 2).tolist(), y=counts.tolist(), name=f"{label}: {len(norms)} tokens")
    fig.update_layout(title=title, xaxis_title="log10(activation norm)", yaxis_title="tokens", barmode="overlay",
                      template="plotly_white", legend=dict(orientation="h", y=-0.2))
    fig.update_yaxes(**nice_log_axis(every or [1]))
    fig.update_traces(opacity=0.7)
    return fig


# ---- figures of notebooks 00-04

# The published demo run is drawn beside a smaller run in the same colour, dotted and faded
PUBLISHED = dict(dash="dot", opacity=0.45, label="published demo run", color="#9a9a9a")
# The four dead-latent mitigations of notebook 02, and a colour for any other name
MITIGATION_COLORS = {"AuxK + tied init (paper)": "#1f77b4", "AuxK only": "#2ca02c", "tied init only": "#ff7f0e",
                     "neither": "#d62728"}
ARCH_NAMES = {"topk": "TopK", "multitopk": "Multi-TopK", "batchtopk": "BatchTopK", "relu": "ReLU + L1"}
ARCH_COLORS = {"topk": "#1f77b4", "multitopk": "#9467bd", "batchtopk": "#2ca02c", "relu": "#d62728"}


def fraction_axis(values) -> dict:
    """Axis settings for a fraction of latents: from 0, in percent, up to 1 when the values come near
    it and otherwise a little above the largest (never the -1..1 plotly draws around an all-zero line)."""
    top = max([0.0, *(float(v) for v in values)])
    return dict(range=[0, 1 if top > 0.5 else max(0.05, 1.2 * top)], tickformat=".0%")


def nice_log_axis(values) -> dict:
    """:func:`log_axis` for values that are measurements, not a small set of chosen sizes: ticks at the
    powers of ten that span ``values``, or at 1, 2 and 5 times them, or at 1, 1.5, 2, 3, 4, 5, 6 and 8
    times them: the first of these with at least 3 ticks inside the values' range (else 3 ticks spread
    over it, to 2 significant digits). Values that are not finite and positive (a diverged run's
    NaN, a zero) are left out; with none left, the axis is plain log."""
    shown = [float(v) for v in values if math.isfinite(float(v)) and float(v) > 0]
    if not shown:
        return dict(type="log")
    lo, hi = min(shown), max(shown)
    decades = range(int(np.floor(np.log10(lo))) - 1, int(np.ceil(np.log10(hi))) + 1)
    for mantissas in ((1,), (1, 2, 5), (1, 1.5, 2, 3, 4, 5, 6, 8)):
        ticks = [float(f"{m * 10.0**d:.3g}") for d in decades for m in mantissas]
        if sum(lo <= t <= hi for t in ticks) >= 3:
            return log_axis([t for t in ticks if lo / 2.5 <= t <= hi * 2.5])
    return log_axis([float(f"{t:.2g}") for t in np.geomspace(lo, hi, 3)])


def decade_axis() -> dict:
    """Axis settings for a log axis over several decades (tokens, FLOPs): one label per power of ten,
    in SI units (10k, 1M), and no minor labels."""
    return dict(type="log", dtick=1, tickformat="~s", minor=dict(ticks="", showgrid=False))


def training_curves(rows: list[dict], title: str, published_rows: list[dict] | None = None,
                    published_nmse: float | None = None) -> go.Figure:
    """Training NMSE and fraction of dead latents (from 0) against training tokens (log axes: a short
    run's curve stays readable beside a long one), from ``RUN/metrics.jsonl`` rows; with the published
    demo run's rows and its held-out NMSE (a dashed reference line) beside them."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("normalised MSE (training batches)", "fraction of dead latents"))
    runs = [("this run", rows, {})]
    if published_rows:
        runs.append((PUBLISHED["label"], published_rows, dict(dash=PUBLISHED["dash"])))
    for i, (label, curve, line) in enumerate(runs):
        tokens = [r["tokens"] for r in curve]
        style = dict(mode="lines", name=label, legendgroup=label, line=dict(color="#1f77b4" if i == 0 else "grey", **line))
        fig.add_scatter(x=tokens, y=[r["nmse"] for r in curve], row=1, col=1, **style)
        fig.add_scatter(x=tokens, y=[r["dead_fraction"] for r in curve], row=1, col=2, showlegend=False, **style)
    every = [r for _, curve, _ in runs for r in curve]
    if published_nmse is not None:
        ends = [min(r["tokens"] for r in every), max(r["tokens"] for r in every)]
        fig.add_scatter(x=ends, y=[published_nmse] * 2, mode="lines", line=dict(color="grey", dash="dash"),
                        name=f"{PUBLISHED['label']}, held-out NMSE {published_nmse:.3f}", row=1, col=1)
    fig.update_xaxes(title_text="training tokens", **decade_axis())
    nmse = [r["nmse"] for r in every] + ([published_nmse] if published_nmse is not None else [])
    fig.update_yaxes(title_text="NMSE", row=1, col=1, **nice_log_axis(nmse))
    fig.update_yaxes(title_text="dead latents", row=1, col=2, **fraction_axis([r["dead_fraction"] for r in every]))
    fig.update_layout(title=title, template="plotly_white", legend=dict(orientation="h", y=-0.2))
    return fig


def density_histogram(counts: torch.Tensor, edges: torch.Tensor, title: str, report: dict | None = None,
                      published_report: dict | None = None) -> go.Figure:
    """Histogram over latents of log10(firing density), from :func:`saelib.evals.density_histogram`; with
    ``report`` (and the published demo run's), the dead and dense fractions written beside it."""
    fig = go.Figure(go.Bar(x=((edges[:-1] + edges[1:]) / 2).tolist(), y=counts.tolist(), name="this run"))
    notes = [f"{label}: {r['dead_fraction']:.1%} of latents never fire, {r['dense_fraction']:.2%} fire on over "
             f"a tenth of tokens" for label, r in (("this run", report), (PUBLISHED["label"], published_report)) if r]
    if notes:
        fig.add_annotation(text="<br>".join(notes), xref="paper", yref="paper", x=0, y=1.02, showarrow=False,
                           align="left", xanchor="left", yanchor="bottom")
    fig.update_layout(title=title, xaxis_title="log10(fraction of tokens the latent fires on)", yaxis_title="latents",
                      template="plotly_white")
    return fig


def frontier(summary: list[dict], title: str, published_summary: list[dict] | None = None) -> go.Figure:
    """Notebook 01's two panels: held-out NMSE and Δ cross-entropy against L0, one line per method (TopK,
    BatchTopK, ReLU + L1; each point a k or a λ, error bars ± one sd over seeds where there are several), from
    :func:`saelib.sweep.summarize` rows over ``arch, k, l1_coef``; the published demo run dotted beside."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("reconstruction vs sparsity", "downstream loss vs sparsity"))
    for source, rows, style in (("", summary, {}), (f", {PUBLISHED['label']}", published_summary or [],
                                                    dict(line_dash=PUBLISHED["dash"], opacity=PUBLISHED["opacity"]))):
        for arch, label in ARCH_NAMES.items():
            s = sorted((r for r in rows if r["arch"] == arch), key=lambda r: r["val_l0"])
            bars = any(r["runs"] > 1 for r in s)  # ± one sd over seeds; none at one seed
            for col, metric in ((1, "val_nmse"), (2, "delta_ce")):
                if s:
                    fig.add_scatter(x=[r["val_l0"] for r in s], y=[r[metric] for r in s], mode="lines+markers",
                                    name=label + source, legendgroup=label + source, showlegend=col == 1,
                                    marker_color=ARCH_COLORS[arch], error_x=dict(array=[r["val_l0_std"] for r in s], visible=bars),
                                    error_y=dict(array=[r[f"{metric}_std"] for r in s], visible=bars),
                                    text=[f"λ={r['l1_coef']}" if arch == "relu" else f"k={r['k']}" for r in s],
                                    row=1, col=col, **style)
    every = summary + (published_summary or [])
    fig.update_xaxes(title_text="L0 (active latents per held-out token)", **nice_log_axis([r["val_l0"] for r in every]))
    fig.update_yaxes(title_text="normalised MSE", row=1, col=1, **nice_log_axis([r["val_nmse"] for r in every]))
    fig.update_yaxes(title_text="Δ cross-entropy (nats)", row=1, col=2)
    fig.update_layout(title=title, template="plotly_white")
    return fig


def dead_vs_n(rows: list[dict], title: str, published_rows: list[dict] | None = None) -> go.Figure:
    """Notebook 02: the fraction of latents dead at the end of training (0 to 1) against n, one panel per
    learning-rate multiplier and one line per mitigation, from sweep rows with ``mitigation`` and
    ``lr_multiplier``: the mean over seeds, with the 95% interval of the mean as bars where a cell has
    several seeds; the published demo run dotted beside, at the multipliers both have."""
    from .sweep import summarize

    multipliers = sorted({r["lr_multiplier"] for r in rows})
    fig = make_subplots(rows=1, cols=len(multipliers), shared_yaxes=True,
                        subplot_titles=[f"lr = {m:g} x paper's rule" for m in multipliers])
    runs = [("", rows, {})]
    if published_rows:
        runs.append((f", {PUBLISHED['label']}", published_rows,
                     dict(line_dash=PUBLISHED["dash"], opacity=PUBLISHED["opacity"])))
    for col, m in enumerate(multipliers, 1):
        for source, table, style in runs:
            cells = summarize(table, ["mitigation", "lr_multiplier", "n_latents"], ["dead_fraction"])
            for mit in dict.fromkeys(r["mitigation"] for r in table):
                s = sorted((r for r in cells if r["mitigation"] == mit and r["lr_multiplier"] == m),
                           key=lambda r: r["n_latents"])
                if s:
                    fig.add_scatter(x=[r["n_latents"] for r in s], y=[r["dead_fraction"] for r in s],
                                    error_y=dict(array=[r["dead_fraction_ci"] for r in s],
                                                 visible=any(r["runs"] > 1 for r in s)),
                                    mode="lines+markers", name=mit + source, legendgroup=mit + source,
                                    showlegend=col == 1, marker_color=MITIGATION_COLORS.get(mit, "grey"),
                                    row=1, col=col, **style)
    every = [r for _, table, _ in runs for r in table]
    fig.update_xaxes(title_text="n (latents)", **log_axis([r["n_latents"] for r in every]))
    fig.update_yaxes(range=[0, 1], tickformat=".0%")
    fig.update_yaxes(title_text="fraction dead at the end of training (mean over seeds)", row=1, col=1)
    fig.update_layout(title=title, template="plotly_white", legend=dict(font_size=10))
    return fig


def dead_over_training(curves: dict[str, list[dict]], title: str,
                       published_curves: dict[str, list[dict]] | None = None) -> go.Figure:
    """Notebook 02: the fraction of dead latents (0 to 1) during training, one line per mitigation, from
    ``{mitigation: metrics rows}``; the published demo run's curves dotted beside."""
    fig = go.Figure()
    for source, table, style in (("", curves, {}), (f", {PUBLISHED['label']}", published_curves or {},
                                                   dict(line_dash=PUBLISHED["dash"], opacity=PUBLISHED["opacity"]))):
        for mit, curve in table.items():
            fig.add_scatter(x=[p["tokens"] for p in curve], y=[p["dead_fraction"] for p in curve], mode="lines",
                            name=mit + source, line_color=MITIGATION_COLORS.get(mit, "grey"), **style)
    fig.update_layout(title=title, template="plotly_white", xaxis_title="training tokens",
                      yaxis=dict(title="fraction dead", range=[0, 1], tickformat=".0%"), legend=dict(font_size=10))
    return fig


def loss_curves(x, group, loss, fits: dict, x_title: str, group_name: str, title: str,
                published_rows: list[dict] | None = None, published_x: str = "n_latents",
                published_group: str = "k") -> go.Figure:
    """Notebook 03: held-out NMSE against ``x`` (n or k, log axes), one colour per value of ``group``
    (k or n) with its fitted law (``fits[value].predict``) as a thin solid line; the published demo runs
    at the same group values dotted, faded, with open markers. ``x``, ``group``, ``loss``: arrays of one value per run."""
    x, group, loss = (np.asarray(v, dtype=float) for v in (x, group, loss))
    published_rows = published_rows or []
    fig = go.Figure()
    values = sorted(set(group.tolist()))
    for i, value in enumerate(values):
        sel = group == value
        color = f"hsl({200 + int(160 * i / max(1, len(values) - 1))}, 70%, 45%)"
        fig.add_scatter(x=x[sel], y=loss[sel], mode="markers", name=f"{group_name}={value:g}", marker_color=color,
                        legendgroup=str(value))
        grid = np.geomspace(x[sel].min(), x[sel].max(), 50)
        fig.add_scatter(x=grid, y=fits[value].predict(grid), mode="lines", line=dict(color=color, width=1.5),
                        legendgroup=str(value), showlegend=False)
        demo = sorted((r for r in published_rows if r[published_group] == value), key=lambda r: r[published_x])
        if demo:
            fig.add_scatter(x=[r[published_x] for r in demo], y=[r["val_nmse"] for r in demo], mode="lines+markers",
                            name=f"{group_name}={value:g}, {PUBLISHED['label']}", legendgroup=str(value),
                            opacity=PUBLISHED["opacity"], line=dict(color=color, dash=PUBLISHED["dash"]),
                            marker=dict(color=color, symbol="circle-open", size=9))
    every_x = x.tolist() + [r[published_x] for r in published_rows if r[published_group] in values]
    every_loss = loss.tolist() + [r["val_nmse"] for r in published_rows if r[published_group] in values]
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title="normalised MSE (held-out)",
                      template="plotly_white", legend=dict(font_size=10))
    fig.update_xaxes(**log_axis(every_x))
    fig.update_yaxes(**nice_log_axis(every_loss))
    return fig


def joint_law(n, k, loss, predicted, r2: float, rmse_log: float, published_fit: dict | None = None) -> go.Figure:
    """Notebook 03: measured against predicted NMSE of the joint law L(n, k), one point per run coloured
    by log2 k, with the diagonal; the published demo fit's R² and RMSE in the title."""
    n, k, loss, predicted = (np.asarray(v, dtype=float) for v in (n, k, loss, predicted))
    fig = go.Figure(go.Scatter(x=predicted, y=loss, mode="markers", text=[f"n={a:.0f}, k={b:.0f}" for a, b in zip(n, k)],
                               marker=dict(color=np.log2(k), colorscale="Viridis", size=9, colorbar=dict(title="log2 k"))))
    ends = [min(loss.min(), predicted.min()), max(loss.max(), predicted.max())]
    fig.add_scatter(x=ends, y=ends, mode="lines", line=dict(dash="dot", color="grey"))
    title = f"joint law: R² {r2:.3f}, RMSE(log L) {rmse_log:.3f}"
    if published_fit:
        title += f" (published demo run: R² {published_fit['r2']:.3f}, RMSE {published_fit['rmse_log']:.3f})"
    fig.update_layout(title=title, xaxis_title="predicted NMSE", yaxis_title="measured NMSE", template="plotly_white",
                      showlegend=False)
    fig.update_xaxes(**nice_log_axis(ends))
    fig.update_yaxes(**nice_log_axis(ends))
    return fig


def compute_law(curves: list[dict], frontier: tuple, compute_fit, title: str, published: dict | None = None) -> go.Figure:
    """Notebook 03's compute law: smoothed training NMSE against training FLOPs (``curves``: ``{"n",
    "flops", "nmse"}`` per run) with the compute-efficient ``frontier`` ``(flops, nmse)`` and its fit
    (``compute_fit``, in the title); the published demo run's frontier as faded open markers
    (``published``: its figure's JSON)."""
    fig = go.Figure()
    for r in curves:
        fig.add_scatter(x=r["flops"], y=r["nmse"], mode="lines", name=f"n={r['n']}", opacity=0.5)
    C_f, L_f = frontier
    fig.add_scatter(x=C_f, y=L_f, mode="markers", name="frontier", marker_color="black")
    fig.add_scatter(x=C_f, y=compute_fit.predict(C_f), mode="lines", name="fit of the frontier",
                    line=dict(color="black", dash="dot"))
    every_nmse = [v for r in curves for v in r["nmse"]]
    if published:
        fig.add_scatter(x=published["frontier"]["flops"], y=published["frontier"]["nmse"], mode="markers",
                        opacity=PUBLISHED["opacity"], name=f"frontier, {PUBLISHED['label']}",
                        marker=dict(color="black", symbol="circle-open"))
        every_nmse += published["frontier"]["nmse"]
    fig.update_xaxes(title_text="training FLOPs (6 d_in n tokens)", **decade_axis())
    fig.update_yaxes(title_text="training NMSE (smoothed)", **nice_log_axis(every_nmse))
    params = compute_fit.params
    fig.update_layout(template="plotly_white", legend=dict(font_size=10),
                      title=f"{title}: L(C) = {params['c0']:.3g} + c1 C^-{params['p']:.3g}")
    return fig


# Notebook 04's panels: (title, [(metric, legend name, dash)]); the baselines are the residual channels
# and each panel's y-axis title
METRIC_PANELS = [
    ("downstream loss, lower better", "Δ cross-entropy (nats)", [("delta_ce", "Δ cross-entropy (nats)", "solid")]),
    ("probe loss, lower better", "probe loss (nats)", [
        ("probe_loss", "probe loss, SAE latents", "solid"),
        ("probe_loss_baseline", "probe loss, baseline (residual channels)", "dot")]),
    ("N2G (n-gram) explanations, higher better", "fraction (0 to 1)", [
        ("n2g_precision", "N2G precision", "solid"), ("n2g_recall", "N2G recall", "dash")]),
    ("ablation sparsity, lower sparser", "effective share of logits (0 to 1)", [
        ("ablation_sparsity", "ablation sparsity, SAE latents", "solid"),
                                          ("ablation_sparsity_baseline",
                                           "ablation sparsity, baseline (residual channels)", "dot")]),
]


def metrics_vs_size(rows: list[dict], title: str, published_rows: list[dict] | None = None) -> go.Figure:
    """Notebook 04's four panels: Δ cross-entropy, probe loss, N2G precision and recall, ablation sparsity
    against n (log axis), each metric under its own name, the residual-channel baselines dotted; the
    published demo run's values in grey beside them, under one legend entry. ``rows``: one :func:`saelib.evals.evaluate` dict per
    size, with ``n_latents``; a metric's ``<metric>_ci`` (its 95% interval) is drawn as bars."""
    fig = make_subplots(rows=2, cols=2, subplot_titles=[panel[0] for panel in METRIC_PANELS], vertical_spacing=0.18)
    runs = [("", rows, None)]
    if published_rows:
        runs.append((f", {PUBLISHED['label']}", published_rows, "grey"))
    colors = iter(["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf"])
    color = {metric: next(colors) for _, _, lines in METRIC_PANELS for metric, _, _ in lines}
    for i, (_, y_title, lines) in enumerate(METRIC_PANELS):
        row, col = divmod(i, 2)
        fig.update_yaxes(title_text=y_title, row=row + 1, col=col + 1)
        for source, table, grey in runs:
            s = sorted(table, key=lambda r: r["n_latents"])
            for j, (metric, label, dash) in enumerate(lines):
                # the published run: one legend entry that shows or hides all its grey lines
                bars = [r.get(f"{metric}_ci", 0.0) for r in s]  # the 95% interval of a sampled metric
                fig.add_scatter(x=[r["n_latents"] for r in s], y=[r[metric] for r in s], mode="lines+markers",
                                error_y=dict(array=bars, visible=any(bars) and not grey),
                                name=PUBLISHED["label"] if grey else label, hovertext=label + source, hoverinfo="x+y+text",
                                line=dict(dash=dash, color=grey or color[metric]),
                                opacity=PUBLISHED["opacity"] if grey else 1, showlegend=not grey or i + j == 0,
                                legendgroup=PUBLISHED["label"] if grey else label, row=row + 1, col=col + 1)
    every = [r["n_latents"] for _, table, _ in runs for r in table]
    fig.update_xaxes(title_text="n (latents)", **log_axis(every))
    fig.update_layout(title=title, template="plotly_white", height=750, legend=dict(orientation="h", y=-0.15))
    return fig


def convergence(runs: list[dict], fit, tol: float, published: dict | None = None) -> go.Figure:
    """Notebook 10's two panels: each run's training NMSE against tokens (log-log, smoothed) with its fitted
    curve ``exp(a) t^b + c`` dotted and its tokens to convergence ``T`` marked; and ``T`` against n with
    its 95% interval and the fitted ``T = exp(a) n^b`` (``fit``, a :class:`saelib.scaling.Fit`), the paper's
    exponent drawn through the middle run for comparison. A ``T`` beyond a run's last token is an
    extrapolation of its fitted curve and is drawn as an open marker.

    ``runs``: one dict per run with ``n_latents``, ``tokens`` and ``nmse`` (the curve), ``curve_fit``
    (``{"a", "b", "c"}``), ``T``, ``T_low``, ``T_high``; ``published``: the published demo run's figure
    JSON, whose ``T`` against n is drawn beside in grey."""
    from .scaling import PAPER, smooth

    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.15, subplot_titles=(  # room for the right y title
        "learning curves (dotted: fitted; x: T)", "tokens to convergence T against n"))
    sizes = sorted(r["n_latents"] for r in runs)
    for r in sorted(runs, key=lambda r: r["n_latents"]):
        color = f"hsl({200 + int(160 * sizes.index(r['n_latents']) / max(1, len(sizes) - 1))}, 70%, 45%)"
        t = np.asarray(r["tokens"], float)
        fig.add_scatter(x=t, y=smooth(r["nmse"], 25), mode="lines", name=f"n={r['n_latents']:,}", line_color=color,
                        legendgroup=str(r["n_latents"]), row=1, col=1)
        p = r["curve_fit"]
        grid = np.geomspace(t[len(t) // 20], max(t[-1], min(r["T"], 10 * t[-1])), 100)
        fig.add_scatter(x=grid, y=np.exp(p["a"]) * grid ** p["b"] + p["c"], mode="lines", line=dict(color=color, dash="dot"),
                        legendgroup=str(r["n_latents"]), showlegend=False, row=1, col=1)
        if r["T"] <= grid[-1]:
            fig.add_scatter(x=[r["T"]], y=[(1 + tol) * p["c"]], mode="markers", marker=dict(color=color, symbol="x", size=9),
                            legendgroup=str(r["n_latents"]), showlegend=False, row=1, col=1)
    n = np.array([r["n_latents"] for r in runs], float)
    T = np.array([r["T"] for r in runs])
    inside = np.array([r["T"] <= r["tokens"][-1] for r in runs])
    bars = dict(type="data", symmetric=False, array=[r["T_high"] - r["T"] for r in runs],
                arrayminus=[r["T"] - r["T_low"] for r in runs])
    fig.add_scatter(x=n, y=T, mode="markers", name="T (open: beyond the run, extrapolated)", error_y=bars,
                    marker=dict(color="crimson", size=9, symbol=["circle" if i else "circle-open" for i in inside]),
                    row=1, col=2)
    grid = np.geomspace(n.min(), n.max(), 50)
    fig.add_scatter(x=grid, y=fit.predict(grid), mode="lines", name="fit T = exp(a) n^b",
                    line=dict(color="crimson", dash="dot"), row=1, col=2)
    middle = float(np.exp(np.log(n).mean()))
    fig.add_scatter(x=grid, y=float(fit.predict([middle])[0]) * (grid / middle) ** PAPER["convergence"]["b"],
                    mode="lines", name="the paper's exponent", line=dict(color="black", dash="dash", width=1), row=1, col=2)
    if published:
        fig.add_scatter(x=[r["n_latents"] for r in published["runs"]], y=[r["T"] for r in published["runs"]],
                        mode="markers", name=f"T, {PUBLISHED['label']}", opacity=PUBLISHED["opacity"],
                        marker=dict(color=PUBLISHED["color"], size=9), row=1, col=2)
    fig.update_xaxes(type="log", title_text="training tokens", row=1, col=1)
    fig.update_yaxes(type="log", title_text="training NMSE (smoothed)", row=1, col=1)
    fig.update_xaxes(title_text="n (latents)", row=1, col=2, **log_axis(n))
    fig.update_yaxes(type="log", title_text="tokens to convergence", row=1, col=2)
    fig.update_layout(template="plotly_white", height=500, legend=dict(font_size=10), title=dict(font_size=14, text=(
        f"T (fitted curve within {tol:.0%} of its asymptote) ∝ n^{fit.params['b']:.2f}, 95% interval "
        f"[{fit.ci['b'][0]:.2f}, {fit.ci['b'][1]:.2f}]; the paper: n^{PAPER['convergence']['b']:.1f}")))
    return fig


def beside(name: str, preset: str, root: str | Path = "../figures") -> dict | None:
    """The published numbers of figure ``name`` to draw beside a run at ``preset`` (:func:`published`);
    None at the published presets themselves, whose run replaces them rather than sits beside them."""
    return None if preset in PUBLISHED_PRESETS else published(name, root)


# ---- figures of notebooks 05-08

GREY = dict(color=PUBLISHED["color"])  # the published demo run where a figure draws it in grey


def progressive_codes(data: dict, published: dict | None = None) -> go.Figure:
    """Held-out NMSE against the number of latents kept at test time, k', per architecture (mean ± sd over
    seeds, or one seed without bars), the trained k marked; the published demo run's curves in grey beside them.

    ``data`` (and ``published``): ``{"summary": [{arch, k_prime, nmse, nmse_std, runs}], "runs": [{k, n_latents,
    ...}]}``, what notebook 05 saves.
    """
    fig = go.Figure()
    k, n, seeds = data["runs"][0]["k"], data["runs"][0]["n_latents"], data["summary"][0]["runs"]
    k_primes = [r["k_prime"] for r in data["summary"]]
    for source, style, suffix in ((published, GREY, " (published demo run)"), (data, {}, "")):
        if source is None:
            continue
        for arch in dict.fromkeys(r["arch"] for r in source["summary"]):
            s = [r for r in source["summary"] if r["arch"] == arch]
            fig.add_scatter(x=[r["k_prime"] for r in s], y=[r["nmse"] for r in s], mode="lines+markers",
                            name=ARCH_NAMES.get(arch, arch) + suffix,
                            line=dict(dash="dash" if suffix else None, **(style or {"color": ARCH_COLORS.get(arch)})),
                            marker=dict(symbol="circle-open" if arch == "topk" else "diamond-open") if suffix else None,
                            error_y=dict(array=[r["nmse_std"] for r in s], visible=seeds > 1, **style))
        k_primes += [r["k_prime"] for r in source["summary"]]
    nmse = [r["nmse"] for d in (data, published) if d for r in d["summary"]]
    fig.add_scatter(x=[k, k], y=[min(nmse), max(nmse)], mode="lines", name=f"trained k = {k}",
                    line=dict(dash="dot", color="black"))
    fig.update_xaxes(title_text="k' (latents kept at test time)", **log_axis(k_primes))
    fig.update_yaxes(title_text="held-out normalised MSE")
    fig.update_layout(title=f"Decoding at k' ≠ k: held-out NMSE (n = {n}, {seeds_phrase(seeds)})",
                      template="plotly_white")
    return fig


def _recovery_heatmap(data: dict) -> go.Heatmap:
    """One (k, n) heatmap of mean best cosine from notebook 06's data (runs, setup)."""
    setup, rows = data["setup"], data["runs"]
    m = setup["m"]
    n_values = sorted({r["n_latents"] for r in rows})
    mbc = {(r["n_latents"], r["k"]): r["mbc"] for r in rows}
    return go.Heatmap(z=[[mbc.get((n, k)) for n in n_values] for k in setup["k"]],
                      x=[f"n={n} ({n / m:g}m)" for n in n_values], y=[f"k={k}" for k in setup["k"]],
                      zmin=0, zmax=1, colorscale="Viridis", texttemplate="%{z:.2f}",
                      colorbar=dict(title="mean best<br>cosine"))


def toy_recovery(data: dict, published: dict | None = None) -> go.Figure:
    """Heatmaps of the mean best cosine of the learned decoder rows to the planted features over (n, k):
    this run, and beside it the published demo run.

    ``data`` (and ``published``): ``{"runs": [{n_latents, k, mbc}], "random_mbc": float, "setup": {m, s, k}}``,
    what notebook 06 saves.
    """
    def caption(d, name):
        s = d["setup"]
        return f"{name} (m {s['m']}, s {s['s']}; random dictionary {d['random_mbc']:.2f})"

    panels = [data] + ([published] if published else [])
    fig = make_subplots(rows=1, cols=len(panels), horizontal_spacing=0.12,
                        subplot_titles=[caption(data, "this run")] + ([caption(published, "published demo run")]
                                                                      if published else []))
    for col, panel in enumerate(panels, 1):
        fig.add_trace(_recovery_heatmap(panel), row=1, col=col)
    fig.update_traces(showscale=False)
    fig.data[-1].update(showscale=True)
    fig.update_annotations(font_size=12)
    fig.update_layout(title="Recovery of m planted features (about s per sample): mean best cosine of the decoder "
                            "rows<br>(1: every feature has a latent along it)",
                      template="plotly_white", height=460)
    return fig


def _ablation_deltas(data: dict) -> tuple[dict[str, float], float, list[float]]:
    """Notebook 07's data as relative changes: ``({variant: NMSE / reference mean - 1}, reference mean,
    [each reference seed's change])``."""
    ref = [r["val_nmse"] for r in data["runs"] if r["variant"] == "reference"]
    mean = sum(ref) / len(ref)
    return ({r["variant"]: r["val_nmse"] / mean - 1 for r in data["runs"] if r["variant"] != "reference"},
            mean, [v / mean - 1 for v in ref])


def recipe_ablation(data: dict, published: dict | None = None) -> go.Figure:
    """Left: each one-knob variant's held-out NMSE as a change (%) from the reference recipe (bars, with the
    fraction of dead latents, in a column right of them), the grey band the reference's seed range (at least
    1% of the axis wide), grey diamonds the published demo run.
    Right: held-out NMSE against the learning rate in multiples of the paper's rule, this run and the published.

    ``data`` (and ``published``): ``{"reference": {n_latents, k, tokens, lr}, "runs": [{variant, seed, lr,
    val_nmse, dead_fraction}]}``, what notebook 07 saves.
    """
    from .config import paper_lr

    deltas, ref_mean, ref_band = _ablation_deltas(data)
    order = sorted(deltas, key=deltas.get)
    names = [v.replace("b_pre", "decoder bias b_pre") for v in order]
    dead = {r["variant"]: r["dead_fraction"] for r in data["runs"]}
    pub = _ablation_deltas(published)[0] if published else {}
    fig = make_subplots(rows=1, cols=2, column_widths=[0.62, 0.38], horizontal_spacing=0.3,
                        subplot_titles=("one change from the reference recipe",
                                        "learning rate (multiples of the paper's rule)"))
    fig.add_bar(y=names, x=[100 * deltas[v] for v in order], orientation="h", name="this run", legendgroup="this run",
                marker_color="#1f77b4", row=1, col=1)
    # labels in one column right of every bar and diamond, so that none covers another or a variant's name
    right = 100 * max([0.0, *deltas.values(), *pub.values()])
    fig.add_scatter(y=names, x=[right] * len(order), mode="text", showlegend=False, hoverinfo="skip",
                    text=[f"   {100 * deltas[v]:+.1f}% · dead {dead[v]:.0%}" for v in order],
                    textposition="middle right", cliponaxis=False, row=1, col=1)
    if len(ref_band) > 1:  # the reference's seed range, at least 1% of the axis wide to stay visible
        span = 100 * (max([0.0, *deltas.values(), *pub.values()]) - min([0.0, *deltas.values(), *pub.values()]))
        low, high = 100 * min(ref_band), 100 * max(ref_band)
        pad = max(0.0, 0.01 * span - (high - low)) / 2
        fig.add_vrect(x0=low - pad, x1=high + pad, fillcolor="grey", opacity=0.25, line_width=0, row=1, col=1,
                      annotation_text="reference's seed range", annotation_position="bottom left",
                      annotation_font=dict(size=10, color="grey"))
    for source, name, style in ((data, "this run", dict(color="#1f77b4")), (published, "published demo run", GREY)):
        if source is None:
            continue
        if source is published:
            shown = [v for v in order if v in pub]
            fig.add_scatter(y=[names[order.index(v)] for v in shown], x=[100 * pub[v] for v in shown], mode="markers",
                            name=name, legendgroup=name, marker=dict(symbol="diamond", size=11, **style), row=1, col=1)
        rule = paper_lr(source["reference"]["n_latents"])
        lr_rows = sorted((r for r in source["runs"] if r["variant"].startswith("lr ")
                          or r["variant"] == "reference" and r["seed"] == source["runs"][0]["seed"]),
                         key=lambda r: r["lr"])
        fig.add_scatter(x=[r["lr"] / rule for r in lr_rows], y=[r["val_nmse"] for r in lr_rows], mode="lines+markers",
                        name=f"{name}: NMSE against the learning rate", legendgroup=name, marker_color=style["color"],
                        row=1, col=2)
    multiples = [r["lr"] / paper_lr(d["reference"]["n_latents"]) for d in (data, published) if d for r in d["runs"]]
    ref = data["reference"]
    fig.update_xaxes(title_text="change in held-out NMSE from the reference (%)", row=1, col=1)
    fig.update_xaxes(title_text="learning rate (× the paper's rule 2e-4/√(n/2¹⁴))", row=1, col=2,
                     **log_axis(multiples))
    fig.update_yaxes(title_text="held-out normalised MSE", row=1, col=2)
    fig.update_layout(template="plotly_white", height=480, legend=dict(orientation="h", y=-0.2),
                      title=f"Recipe ablation at n = {ref['n_latents']}, k = {ref['k']}, {ref['tokens'] / 1e6:.2f}M "
                            f"tokens (reference NMSE {ref_mean:.3f})")
    return fig


CONFIG_NAMES = {"d_in": "d_in", "batch_size": "batch of"}
IMPL_NAMES = {"saelib": "saelib", "saelib-bf16": "saelib, bf16 encoder", "sparsify": "sparsify (EleutherAI)",
              "sae-lens": "SAELens", "sae-lens-sparse": "SAELens, sparse decoder", "naive": "dense PyTorch step"}


def throughput(data: dict, published: dict | None = None) -> go.Figure:
    """Tokens per second of one TopK training step (forward, loss with AuxK, backward, Adam, decoder
    renormalisation) per implementation (bars) and configuration (groups), log scale; the roofline (the
    encoder's matrix multiply alone, the fastest any step can be) is a black line spanning its group. With ``published``,
    the published demo run is a second panel on the same axis. Implementations that could not run have
    no bar (their rows say why).

    ``data`` (and ``published``): ``{"rows": [{impl, d_in, n_latents, batch_size, dead_fraction,
    tokens_per_s}]}``, what notebook 08 saves (``saelib bench --json`` rows).
    """
    panels = [(data, "this run")] + ([(published, "published demo run")] if published else [])
    every = [r for panel, _ in panels for r in panel["rows"]]
    # a group's label names what varies across the groups; the rest goes into the axis title
    varies = [key for key in ("d_in", "batch_size") if len({r[key] for r in every}) > 1]
    fixed = ", ".join(f"{CONFIG_NAMES[key]} {every[0][key]}" for key in ("d_in", "batch_size") if key not in varies)
    fixed = fixed.replace("d_in", "activation width d_in") + (", d_in: activation width" if "d_in" in varies else "")

    def label(r: dict) -> str:
        auxk = f"AuxK, {r['dead_fraction']:.0%} dead" if r["dead_fraction"] else "no dead latents"
        return "<br>".join([f"n {r['n_latents']}", *(f"{CONFIG_NAMES[key]} {r[key]}" for key in varies), auxk])

    def caption(panel, name):  # the machine: only ratios within one panel compare
        machine = panel.get("machine")
        return f"{name} ({machine['cpu']}, load {machine['load_avg_1m']:.1f})" if machine else name

    fig = make_subplots(rows=1, cols=len(panels), shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=[caption(panel, name) for panel, name in panels])
    in_legend = set()
    colors = dict(zip(IMPL_NAMES, ("#1f77b4", "#6baed6", "#ff7f0e", "#2ca02c", "#98df8a", "#d62728")))
    for col, (panel, _) in enumerate(panels, 1):
        rows = [r for r in panel["rows"] if r["tokens_per_s"]]
        groups = list(dict.fromkeys(label(r) for r in rows))  # the x axis's categories, at positions 0, 1, ...
        fig.update_xaxes(categoryorder="array", categoryarray=groups, row=1, col=col)
        for impl in dict.fromkeys(r["impl"] for r in rows if not r["impl"].startswith("roofline")):
            ok = [r for r in rows if r["impl"] == impl]
            fig.add_bar(name=IMPL_NAMES.get(impl, impl), x=[label(r) for r in ok], y=[r["tokens_per_s"] for r in ok],
                        marker_color=colors.get(impl), legendgroup=impl, showlegend=impl not in in_legend,
                        offsetgroup=impl,
                        hovertemplate="%{y:,.0f} tokens/s", row=1, col=col)
            in_legend.add(impl)
        # the roofline of a group: a line over its bars, which span its category's position ± 0.4
        roof = [r for r in rows if r["impl"] == "roofline"]
        for i, r in enumerate(roof):
            at = groups.index(label(r))
            fig.add_shape(type="line", x0=at - 0.4, x1=at + 0.4, y0=r["tokens_per_s"], y1=r["tokens_per_s"],
                          line=dict(width=3, color="black"), name="roofline: the encoder's matrix multiply alone",
                          legendgroup="roofline", showlegend=col == 1 and i == 0, row=1, col=col)
    speeds = [r["tokens_per_s"] for r in every if r["tokens_per_s"]]  # room above the highest roofline
    fig.update_yaxes(type="log", dtick=1, tickformat="~s", range=[np.log10(min(speeds)) - 0.1, np.log10(max(speeds)) + 0.1])
    fig.update_yaxes(title_text="tokens per second (median step)", col=1)
    fig.update_layout(title="Training throughput: tokens per second of one TopK step, saelib vs sparsify vs SAELens"
                            f"<br><sup>forward, loss, backward, Adam; k {every[0]['k']}"
                            f"{', ' + fixed if fixed else ''}</sup>",
                      barmode="group", template="plotly_white", height=540, legend=dict(orientation="h", y=-0.28))
    return fig


LIBRARY_COLORS = {"saelib": "#1f77b4", "sparsify": "#ff7f0e", "sparsify-signum": "#bcbd22", "sae-lens": "#2ca02c"}


def peers_quality(rows: list[dict], published: list[dict] | None = None) -> go.Figure:
    """``saelib bench --quality``: held-out NMSE and delta CE against the learning rate (a multiple
    of each library's rule), one line per library through the mean over seeds, with the seeds' range
    as bars and the dead latents in the hover; ``published``: the published grid's rows, dotted and faded
    in each library's colour.

    ``rows``: :func:`saelib.bench.quality.run_quality`'s (those that failed are left out)."""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1,
                        subplot_titles=["normalised MSE (held-out)", "Δ CE with the SAE spliced in (nats)"])
    for grid, style in ((published or [], "published"), (rows, "run")):
        ok = [r for r in grid if r["status"] == "ok"]
        for library in dict.fromkeys(r["library"] for r in ok):
            cells: dict[float, list[dict]] = {}
            for r in ok:
                if r["library"] == library:
                    cells.setdefault(float(r["lr_multiplier"]), []).append(r)
            multiples = sorted(cells)
            for col, key in enumerate(("nmse", "delta_ce"), 1):
                mean = [float(np.mean([r[key] for r in cells[m]])) for m in multiples]
                low = [m_ - min(r[key] for r in cells[m]) for m, m_ in zip(multiples, mean)]
                high = [max(r[key] for r in cells[m]) - m_ for m, m_ in zip(multiples, mean)]
                dead = [f"{np.mean([r['dead_fraction'] for r in cells[m]]):.1%} dead, {len(cells[m])} seed(s)"
                        for m in multiples]
                line = dict(color=LIBRARY_COLORS.get(library, "#444"))  # the published grid: dotted and faded
                line |= dict(dash=PUBLISHED["dash"]) if style == "published" else {}
                fig.add_scatter(x=multiples, y=mean, text=dead, mode="lines+markers", line=line,
                                error_y=dict(type="data", array=high, arrayminus=low, visible=style == "run"),
                                name=library if style == "run" else f"{library}, {PUBLISHED['label']}",
                                legendgroup=f"{style}{library}", showlegend=col == 1,
                                opacity=PUBLISHED["opacity"] if style == "published" else 1, row=1, col=col)
    every = [r for r in rows + (published or []) if r["status"] == "ok"]
    for col, key in enumerate(("nmse", "delta_ce"), 1):
        fig.update_xaxes(title_text="lr / the library's rule", row=1, col=col,
                         **log_axis(sorted({float(f"{r['lr_multiplier']:.3g}") for r in every})))
        fig.update_yaxes(row=1, col=col, **nice_log_axis([r[key] for r in every]))
    first = rows[0]
    budget = first["budget"] + ("" if first["scale"] == 1 else f" x {first['scale']:g}")
    fig.update_layout(title=f"Quality at equal budget and equal tuning ({budget}: {first['steps']:,} steps of "
                            f"{first['batch_size']:,} tokens, n {first['n_latents']:,}, k {first['k']})",
                      template="plotly_white", height=440, legend=dict(orientation="h", y=-0.25))
    return fig


LR_BY = {"batch_size": ("batches of {:,}", "the batch size", "TopK, k {k}"),
         "k": ("k = {}", "k", "TopK, batches of {batch_size:,}")}


def lr_by(rows: list[dict], best: list[dict], rule, by: str = "batch_size") -> go.Figure:
    """Notebook 09: held-out NMSE against the learning rate (a multiple of the paper's rule) for one
    run size at several values of ``by`` (``"batch_size"`` or ``"k"``), one panel per
    (``n_latents``, ``steps``), one line per value with its best multiple starred, and the multiple
    ``rule(steps, n, k, batch_size)`` chooses as a dashed line of the same colour.

    ``rows``: sweep rows with ``n_latents``, ``steps``, ``k``, ``batch_size``, ``lr_multiplier``, ``val_nmse``;
    ``best``: their :func:`saelib.scaling.lr_grid_table`."""
    label, what, fixed = LR_BY[by]
    sizes = sorted({(r["n_latents"], r["steps"]) for r in rows})
    values = sorted({r[by] for r in rows})
    fig = make_subplots(rows=1, cols=len(sizes), horizontal_spacing=0.08,
                        subplot_titles=[f"n = {n:,}, {s:,} steps" for n, s in sizes])
    color = {v: f"hsl({20 + int(200 * i / max(1, len(values) - 1))}, 70%, 45%)" for i, v in enumerate(values)}
    for col, (n, s) in enumerate(sizes, 1):
        for v in values:
            line = sorted((r for r in rows if (r["n_latents"], r["steps"], r[by]) == (n, s, v)),
                          key=lambda r: r["lr_multiplier"])
            if not line:
                continue
            fig.add_scatter(x=[r["lr_multiplier"] for r in line], y=[r["val_nmse"] for r in line],
                            mode="lines+markers", name=label.format(v), legendgroup=str(v), showlegend=col == 1,
                            line_color=color[v], row=1, col=col)
            star = next(t for t in best if (t["n_latents"], t["steps"], t[by]) == (n, s, v))
            fig.add_scatter(x=[star["multiple"]], y=[star["nmse"]], mode="markers", legendgroup=str(v),
                            marker=dict(symbol="star", size=13, color=color[v]), showlegend=False, row=1, col=col)
            fig.add_vline(x=rule(s, n, line[0]["k"], line[0]["batch_size"]), line=dict(dash="dash", color=color[v]),
                          row=1, col=col)
        fig.update_xaxes(title_text="lr / paper's rule", row=1, col=col,  # ticks at the grid's whole multiples
                         **log_axis(sorted({r["lr_multiplier"] for r in rows if float(r["lr_multiplier"]).is_integer()})))
    fig.update_yaxes(title_text="normalised MSE (held-out)", row=1, col=1)
    fig.update_yaxes(**nice_log_axis([r["val_nmse"] for r in rows]))
    fig.update_layout(title=f"Does {what} move the best learning rate? ({fixed.format(**rows[0])}; dashed: "
                            "saelib's default for each)",
                      template="plotly_white", height=420, legend=dict(orientation="h", y=-0.25))
    return fig


def lr_sweep(rows: list[dict], best: list[dict], rule, fitted=None, published_best: list[dict] | None = None) -> go.Figure:
    """Notebook 09: held-out NMSE against the learning rate (a multiple of the paper's rule), one line
    per run length, one panel per n, each line's best multiple marked; and the best multiples against
    the run's steps, one shade per n, with ``rule`` (the library's default, ``(steps, n, k, batch) -> multiple``)
    drawn through them and the fit to this sweep's points (``fitted``, a :class:`saelib.scaling.Fit`)
    dotted.

    ``rows``: sweep rows with ``n_latents``, ``steps``, ``lr_multiplier``, ``val_nmse``; ``best``: one
    dict per (``n_latents``, ``steps``) with ``multiple`` and ``nmse`` (:func:`saelib.scaling.lr_grid_table`);
    ``published_best``: the published demo sweep's, drawn beside in grey."""
    sizes, lengths = sorted({r["n_latents"] for r in rows}), sorted({r["steps"] for r in rows})
    k, batch = rows[0]["k"], rows[0]["batch_size"]
    fig = make_subplots(rows=1, cols=len(sizes) + 1, horizontal_spacing=0.06,
                        subplot_titles=[f"n = {n:,}" for n in sizes] + ["best multiple against the run's length"])
    color = {s: f"hsl({200 + int(160 * i / max(1, len(lengths) - 1))}, 70%, 45%)" for i, s in enumerate(lengths)}
    for col, n in enumerate(sizes, 1):
        for s in lengths:
            line = sorted((r for r in rows if r["n_latents"] == n and r["steps"] == s), key=lambda r: r["lr_multiplier"])
            if not line:
                continue
            fig.add_scatter(x=[r["lr_multiplier"] for r in line], y=[r["val_nmse"] for r in line], mode="lines+markers",
                            name=f"{s:,} steps", legendgroup=str(s), showlegend=col == 1, line_color=color[s],
                            row=1, col=col)
            b = next(b for b in best if b["n_latents"] == n and b["steps"] == s)
            fig.add_scatter(x=[b["multiple"]], y=[b["nmse"]], mode="markers", marker=dict(symbol="star", size=13,
                            color=color[s]), legendgroup=str(s), showlegend=False, row=1, col=col)
    last = len(sizes) + 1
    span = np.geomspace(min(lengths), max(lengths), 40)
    shade = {n: f"hsl(0, 0%, {15 + int(50 * i / max(1, len(sizes) - 1))}%)" for i, n in enumerate(sizes)}
    for n in sizes:
        pts = sorted((b for b in best if b["n_latents"] == n), key=lambda b: b["steps"])
        fig.add_scatter(x=[b["steps"] for b in pts], y=[b["multiple"] for b in pts], mode="markers",
                        marker=dict(size=10, color=shade[n]), name=f"best multiple, n = {n:,}",
                        row=1, col=last)
        first = n == sizes[0]  # one legend entry for each kind of line
        fig.add_scatter(x=span, y=[rule(s, n, k, batch) for s in span], mode="lines", line=dict(color=shade[n]),
                        name="saelib's default, per n", showlegend=first, row=1, col=last)
        if fitted is not None:
            fig.add_scatter(x=span, y=fitted.predict(span, np.full_like(span, n)), mode="lines",
                            line=dict(color=shade[n], dash="dot"), name="fit to this sweep, per n", showlegend=first,
                            row=1, col=last)
    if published_best:
        fig.add_scatter(x=[b["steps"] for b in published_best], y=[b["multiple"] for b in published_best],
                        mode="markers", marker=dict(size=9, symbol="circle-open", **GREY), opacity=PUBLISHED["opacity"],
                        name=f"best multiples, {PUBLISHED['label']}", row=1, col=last)
    multiples = sorted({r["lr_multiplier"] for r in rows})
    for col in range(1, last):
        fig.update_xaxes(title_text="lr / paper's rule", row=1, col=col, **log_axis(multiples))
    fig.update_yaxes(title_text="normalised MSE (held-out)", row=1, col=1)
    fig.update_yaxes(**nice_log_axis([r["val_nmse"] for r in rows]), range=None)
    for col in range(1, last):
        fig.update_yaxes(range=[np.log10(min([r["val_nmse"] for r in rows] + [b["nmse"] for b in best])) - 0.03,
                                np.log10(min(1.0, 2 * max(b["nmse"] for b in best))) + 0.03], row=1, col=col)
    fig.update_xaxes(title_text="steps", row=1, col=last, **log_axis(lengths))
    fig.update_yaxes(title_text="best lr / paper's rule", row=1, col=last,
                     **nice_log_axis([b["multiple"] for b in best + (published_best or [])]
                                     + [rule(s, n, k, batch) for s in lengths for n in sizes]))
    fig.update_layout(title=f"The learning rate a run of a given length wants (TopK, k {k}, batches of "
                            f"{batch:,} tokens)", template="plotly_white", height=460,
                      legend=dict(orientation="h", y=-0.25))
    return fig
