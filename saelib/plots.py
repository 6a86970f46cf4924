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


def training_curves(rows: list[dict], title: str) -> go.Figure:
    """NMSE and fraction of dead latents against training tokens, from ``RUN/metrics.jsonl`` rows."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("normalised MSE", "fraction of dead latents"))
    tokens = [r["tokens"] for r in rows]
    fig.add_scatter(x=tokens, y=[r["nmse"] for r in rows], mode="lines", name="NMSE", row=1, col=1)
    fig.add_scatter(x=tokens, y=[r["dead_fraction"] for r in rows], mode="lines", name="dead", row=1, col=2)
    fig.update_xaxes(title_text="training tokens")
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_layout(title=title, template="plotly_white", showlegend=False)
    return fig


def density_histogram(counts: torch.Tensor, edges: torch.Tensor, title: str) -> go.Figure:
    """Histogram over latents of log10(firing density), from :func:`saelib.evals.density_histogram`."""
    fig = go.Figure(go.Bar(x=((edges[:-1] + edges[1:]) / 2).tolist(), y=counts.tolist()))
    fig.update_layout(title=title, xaxis_title="log10(fraction of tokens the latent fires on)", yaxis_title="latents",
                      template="plotly_white")
    return fig
