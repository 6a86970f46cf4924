"""Figures: plotly figures for the notebooks, saved as PNG (for reading), HTML (for exploring) and the
numbers behind them (JSON).

PNG export goes through kaleido, which drives a local Chromium (the project's set-up installs
Debian's); one Chromium serves every PNG of a process. HTML files share one ``plotly.min.js`` next to
them, so they open offline.
"""

from __future__ import annotations

import atexit
import json
import warnings
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import torch


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
    return dict(type="log", tickvals=ticks, ticktext=[f"{v:,.0f}" if v >= 1 else f"{v:g}" for v in ticks],
                minor=dict(ticks="", showgrid=False))


_png_server_started = False


def _start_png_server() -> None:
    """Keep one Chromium for this process's PNGs (stopped at exit): on its own, kaleido starts one
    per ``write_image``, 3 s each against 0.25 s through the kept one (2 cores)."""
    global _png_server_started
    if not _png_server_started:
        import kaleido

        kaleido.start_sync_server(silence_warnings=True)
        atexit.register(kaleido.stop_sync_server, silence_warnings=True)
        _png_server_started = True


def save_figure(fig: go.Figure, folder: str | Path, name: str, data: dict | None = None) -> Path:
    """Write ``name.png``, ``name.html`` and, with ``data``, ``name.json`` into ``folder``; return the PNG."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fig.write_html(folder / f"{name}.html", include_plotlyjs="directory")
    _start_png_server()
    with warnings.catch_warnings():  # plotly: "The kopts argument is ignored if using a server"
        warnings.filterwarnings("ignore", message="The kopts argument is ignored")
        fig.write_image(folder / f"{name}.png", width=900, height=fig.layout.height or 500, scale=1)
    if data is not None:
        (folder / f"{name}.json").write_text(json.dumps(data, indent=1))
    return folder / f"{name}.png"


def norm_histogram(kept: torch.Tensor, excluded: torch.Tensor, title: str) -> go.Figure:
    """Histogram of log10 token norms, kept vs excluded (excluded tokens sit far to the right)."""
    fig = go.Figure()
    logs = torch.cat([kept, excluded]).float().clamp_min(1e-6).log10()
    bins = torch.linspace(float(logs.min()), float(logs.max()) + 1e-3, 61)
    for label, norms in (("kept", kept), ("excluded (position 0, separators, outliers)", excluded)):
        counts = torch.histogram(norms.float().clamp_min(1e-6).log10(), bins=bins).hist
        fig.add_bar(x=((bins[:-1] + bins[1:]) / 2).tolist(), y=counts.tolist(), name=f"{label}: {len(norms)} tokens")
    fig.update_layout(title=title, xaxis_title="log10(activation norm)", yaxis_title="tokens", barmode="overlay",
                      yaxis_type="log", template="plotly_white", legend=dict(orientation="h", y=-0.2))
    fig.update_traces(opacity=0.7)
    return fig


# ---- figures of notebooks 00-04

# The published demo run is drawn beside a smaller run in the same colour, dotted and faded
PUBLISHED = dict(dash="dot", opacity=0.45, label="published demo run")
# The four dead-latent mitigations of notebook 02, and a colour for any other name
MITIGATION_COLORS = {"AuxK + tied init (paper)": "#1f77b4", "AuxK only": "#2ca02c", "tied init only": "#ff7f0e",
                     "neither": "#d62728"}
ARCH_NAMES = {"topk": "TopK", "batchtopk": "BatchTopK", "relu": "ReLU + L1"}
ARCH_COLORS = {"topk": "#1f77b4", "batchtopk": "#2ca02c", "relu": "#d62728"}


def fraction_axis(values) -> dict:
    """Axis settings for a fraction of latents: from 0, in percent, up to 1 when the values come near
    it and otherwise a little above the largest (never the -1..1 plotly draws around an all-zero line)."""
    top = max([0.0, *(float(v) for v in values)])
    return dict(range=[0, 1 if top > 0.5 else max(0.05, 1.2 * top)], tickformat=".0%")


def nice_log_axis(values) -> dict:
    """:func:`log_axis` with ticks at 1, 2 and 5 times the powers of ten that span ``values`` (for values
    that are measurements, not a small set of chosen sizes)."""
    lo, hi = min(float(v) for v in values), max(float(v) for v in values)
    decades = range(int(np.floor(np.log10(lo))) - 1, int(np.ceil(np.log10(hi))) + 1)
    ticks = [m * 10.0**d for d in decades for m in (1, 2, 5)]
    return log_axis([t for t in ticks if lo / 2.5 <= t <= hi * 2.5])


def decade_axis() -> dict:
    """Axis settings for a log axis over several decades (tokens, FLOPs): one label per power of ten,
    in SI units (10k, 1M), and no minor labels."""
    return dict(type="log", dtick=1, tickformat="~s", minor=dict(ticks="", showgrid=False))


def training_curves(rows: list[dict], title: str, published_rows: list[dict] | None = None,
                    published_nmse: float | None = None) -> go.Figure:
    """Training NMSE and fraction of dead latents (from 0) against training tokens (log axes: a short
    run's curve stays readable beside a long one), from ``RUN/metrics.jsonl`` rows; with the published
    demo run's rows and its held-out NMSE (a dashed reference line) beside them."""
    from plotly.subplots import make_subplots

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
    BatchTopK, ReLU + L1; each point a k or a λ, error bars ± one sd over seeds), from
    :func:`saelib.sweep.summarize` rows over ``arch, k, l1_coef``; the published demo run dotted beside."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("reconstruction vs sparsity", "downstream loss vs sparsity"))
    for source, rows, style in (("", summary, {}), (f", {PUBLISHED['label']}", published_summary or [],
                                                    dict(line_dash=PUBLISHED["dash"], opacity=PUBLISHED["opacity"]))):
        for arch, label in ARCH_NAMES.items():
            s = sorted((r for r in rows if r["arch"] == arch), key=lambda r: r["val_l0"])
            for col, metric in ((1, "val_nmse"), (2, "delta_ce")):
                if s:
                    fig.add_scatter(x=[r["val_l0"] for r in s], y=[r[metric] for r in s], mode="lines+markers",
                                    name=label + source, legendgroup=label + source, showlegend=col == 1,
                                    marker_color=ARCH_COLORS[arch], error_x=dict(array=[r["val_l0_std"] for r in s]),
                                    error_y=dict(array=[r[f"{metric}_std"] for r in s]),
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
    ``lr_multiplier``; the published demo run dotted beside, at the multipliers both have."""
    from plotly.subplots import make_subplots

    multipliers = sorted({r["lr_multiplier"] for r in rows})
    fig = make_subplots(rows=1, cols=len(multipliers), shared_yaxes=True,
                        subplot_titles=[f"lr = {m:g} x paper's rule" for m in multipliers])
    runs = [("", rows, {})]
    if published_rows:
        runs.append((f", {PUBLISHED['label']}", published_rows,
                     dict(line_dash=PUBLISHED["dash"], opacity=PUBLISHED["opacity"])))
    for col, m in enumerate(multipliers, 1):
        for source, table, style in runs:
            for mit in dict.fromkeys(r["mitigation"] for r in table):
                s = sorted((r for r in table if r["mitigation"] == mit and r["lr_multiplier"] == m),
                           key=lambda r: r["n_latents"])
                if s:
                    fig.add_scatter(x=[r["n_latents"] for r in s], y=[r["dead_fraction"] for r in s],
                                    mode="lines+markers", name=mit + source, legendgroup=mit + source,
                                    showlegend=col == 1, marker_color=MITIGATION_COLORS.get(mit, "grey"),
                                    row=1, col=col, **style)
    every = [r for _, table, _ in runs for r in table]
    fig.update_xaxes(title_text="n (latents)", **log_axis([r["n_latents"] for r in every]))
    fig.update_yaxes(range=[0, 1], tickformat=".0%")
    fig.update_yaxes(title_text="fraction dead at the end of training", row=1, col=1)
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
    (k or n) with its fitted law (``fits[value].predict``) dotted; the published demo runs at the same
    group values as faded open markers. ``x``, ``group``, ``loss``: arrays of one value per run."""
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
        fig.add_scatter(x=grid, y=fits[value].predict(grid), mode="lines", line=dict(color=color, dash="dot"),
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


def compute_and_convergence(curves: list[dict], frontier: tuple, compute_fit, convergence: tuple, convergence_fit,
                            title: str, published: dict | None = None) -> go.Figure:
    """Notebook 03's two panels: smoothed training NMSE against training FLOPs (``curves``: ``{"n", "flops",
    "nmse"}`` per run) with the compute-efficient ``frontier`` ``(flops, nmse)`` and its fit; and tokens
    to convergence against n (``convergence``: ``(n, tokens)``) with its fit; the published demo run's
    frontier and convergence points as faded open markers (``published``: its figure's JSON)."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        f"L(C) = {compute_fit.params['c0']:.3g} + c1 C^-{compute_fit.params['p']:.3g}",
        f"tokens to convergence ∝ n^{convergence_fit.params['b']:.2f}"))
    for r in curves:
        fig.add_scatter(x=r["flops"], y=r["nmse"], mode="lines", name=f"n={r['n']}", opacity=0.5, row=1, col=1)
    C_f, L_f = frontier
    fig.add_scatter(x=C_f, y=L_f, mode="markers", name="frontier", marker_color="black", row=1, col=1)
    fig.add_scatter(x=C_f, y=compute_fit.predict(C_f), mode="lines", name="fit of the frontier",
                    line=dict(color="black", dash="dot"), row=1, col=1)
    n_ref, T = convergence
    fig.add_scatter(x=n_ref, y=T, mode="markers", name="tokens to convergence", marker_color="crimson", row=1, col=2)
    fig.add_scatter(x=n_ref, y=convergence_fit.predict(n_ref), mode="lines", name="fit of tokens to convergence",
                    line=dict(color="crimson", dash="dot"), row=1, col=2)
    every_n, every_nmse = list(n_ref), [v for r in curves for v in r["nmse"]]
    if published:
        style = dict(mode="markers", opacity=PUBLISHED["opacity"])
        fig.add_scatter(x=published["frontier"]["flops"], y=published["frontier"]["nmse"],
                        name=f"frontier, {PUBLISHED['label']}", marker=dict(color="black", symbol="circle-open"),
                        row=1, col=1, **style)
        demo = published["tokens_to_convergence"]
        fig.add_scatter(x=demo["n"], y=demo["tokens"], name=f"tokens to convergence, {PUBLISHED['label']}",
                        marker=dict(color="crimson", symbol="circle-open", size=9), row=1, col=2, **style)
        every_n += demo["n"]
        every_nmse += published["frontier"]["nmse"]
    fig.update_xaxes(title_text="training FLOPs (6 d_in n tokens)", row=1, col=1, **decade_axis())
    fig.update_xaxes(title_text="n (latents)", row=1, col=2, **log_axis(every_n))
    fig.update_yaxes(title_text="training NMSE (smoothed)", row=1, col=1, **nice_log_axis(every_nmse))
    fig.update_yaxes(title_text="tokens", row=1, col=2, **decade_axis())
    fig.update_layout(template="plotly_white", title=title, legend=dict(font_size=10))
    return fig


# Notebook 04's panels: (title, [(metric, legend name, dash)]); the baselines are the residual channels
METRIC_PANELS = [
    ("downstream loss, lower better", [("delta_ce", "Δ cross-entropy (nats)", "solid")]),
    ("probe loss, lower better", [("probe_loss", "probe loss, SAE latents", "solid"),
                                  ("probe_loss_baseline", "probe loss, baseline (residual channels)", "dot")]),
    ("N2G explanations, higher better", [("n2g_precision", "N2G precision", "solid"),
                                         ("n2g_recall", "N2G recall", "dash")]),
    ("ablation sparsity, lower sparser", [("ablation_sparsity", "ablation sparsity, SAE latents", "solid"),
                                          ("ablation_sparsity_baseline",
                                           "ablation sparsity, baseline (residual channels)", "dot")]),
]


def metrics_vs_size(rows: list[dict], title: str, published_rows: list[dict] | None = None) -> go.Figure:
    """Notebook 04's four panels: Δ cross-entropy, probe loss, N2G precision and recall, ablation sparsity
    against n (log axis), each metric under its own name, the residual-channel baselines dotted; the
    published demo run's values in grey beside them. ``rows``: one :func:`saelib.evals.evaluate` dict per
    size, with ``n_latents``."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=2, subplot_titles=[title_ for title_, _ in METRIC_PANELS], vertical_spacing=0.18)
    runs = [("", rows, None)]
    if published_rows:
        runs.append((f", {PUBLISHED['label']}", published_rows, "grey"))
    colors = iter(["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf"])
    color = {metric: next(colors) for _, lines in METRIC_PANELS for metric, _, _ in lines}
    for i, (_, lines) in enumerate(METRIC_PANELS):
        row, col = divmod(i, 2)
        for source, table, grey in runs:
            s = sorted(table, key=lambda r: r["n_latents"])
            for metric, label, dash in lines:
                fig.add_scatter(x=[r["n_latents"] for r in s], y=[r[metric] for r in s], mode="lines+markers",
                                name=label + source, line=dict(dash=dash, color=grey or color[metric]),
                                opacity=PUBLISHED["opacity"] if grey else 1, showlegend=not grey or i == 0,
                                legendgroup=source or label, row=row + 1, col=col + 1)
    every = [r["n_latents"] for _, table, _ in runs for r in table]
    fig.update_xaxes(title_text="n (latents)", **log_axis(every))
    fig.update_layout(title=title, template="plotly_white", height=750, legend=dict(orientation="h", y=-0.15))
    return fig


def beside(name: str, preset: str, root: str | Path = "../figures") -> dict | None:
    """The published numbers of figure ``name`` to draw beside a run at ``preset`` (:func:`published`);
    None at the published presets themselves, whose run replaces them rather than sits beside them."""
    return None if preset in PUBLISHED_PRESETS else published(name, root)
