"""Figures: plotly figures for the notebooks, saved as PNG (for reading), HTML (for exploring) and the
numbers behind them (JSON).

PNG export goes through kaleido, which drives a local Chromium (the project's set-up installs
Debian's). HTML files share one ``plotly.min.js`` next to them, so they open offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import plotly.graph_objects as go
import torch


def figures_dir(root: str | Path, preset: str) -> Path:
    """Where a notebook writes its figures: ``root`` for published presets, ``root/ci`` for tests."""
    folder = Path(root) / "ci" if preset == "ci" else Path(root)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_figure(fig: go.Figure, folder: str | Path, name: str, data: dict | None = None) -> Path:
    """Write ``name.png``, ``name.html`` and, with ``data``, ``name.json`` into ``folder``; return the PNG."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fig.write_html(folder / f"{name}.html", include_plotlyjs="directory")
    fig.write_image(folder / f"{name}.png", width=900, height=500, scale=1)
    if data is not None:
        (folder / f"{name}.json").write_text(json.dumps(data, indent=1))
    return folder / f"{name}.png"


def norm_histogram(kept: torch.Tensor, excluded: torch.Tensor, title: str) -> go.Figure:
    """Histogram of token norms, kept vs excluded, on a log axis (excluded tokens sit far to the right)."""
    fig = go.Figure()
    bins = torch.logspace(float(torch.cat([kept, excluded]).min().clamp_min(1e-3).log10()),
                          float(torch.cat([kept, excluded]).max().log10()) + 0.01, 60)
    for label, norms in (("kept", kept), ("excluded (position 0, separators, outliers)", excluded)):
        counts = torch.histogram(norms.float(), bins=bins).hist
        fig.add_bar(x=bins[:-1].tolist(), y=counts.tolist(), name=f"{label}: {len(norms)}")
    fig.update_layout(title=title, xaxis_title="activation norm", yaxis_title="tokens", barmode="overlay",
                      xaxis_type="log", yaxis_type="log", template="plotly_white")
    fig.update_traces(opacity=0.7)
    return fig
