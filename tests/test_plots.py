"""Figures: PNG (through the local Chromium), HTML and JSON from one call."""

import json
import struct

import plotly.graph_objects as go

from saelib import plots


def png_size(path):
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


def test_save_figure_writes_png_html_and_json_through_one_kept_chromium(tmp_path):
    for i, height in enumerate((500, 320)):
        fig = go.Figure(go.Scatter(x=[1, 2, 3], y=[1, 3, 2]))
        fig.update_layout(height=height if i else None)
        png = plots.save_figure(fig, tmp_path / "figs", f"fig{i}", data={"points": 3})
        assert png == tmp_path / "figs" / f"fig{i}.png" and png_size(png) == (900, height)
        assert "plotly" in (tmp_path / "figs" / f"fig{i}.html").read_text()
        assert json.loads((tmp_path / "figs" / f"fig{i}.json").read_text()) == {"points": 3}
    assert plots._png_server_started  # the second PNG went through the Chromium the first one started
