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
