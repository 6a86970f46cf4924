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


def figures_dir(root: str | Path, preset: str) -> Path:
    """Where a notebook writes its figures: ``root`` for published presets, ``root/ci`` for tests."""
    folder = Path(root) / "ci" if preset == "ci" else Path(root)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


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
