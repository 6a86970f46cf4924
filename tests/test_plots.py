"""Figures: PNG (through the local Chromium), HTML and JSON from one call."""

import json
import struct
from pathlib import Path

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


# ---- figures of notebooks 05-08, drawn from the published numbers in figures/

FIGURES = Path(__file__).resolve().parents[1] / "figures"


def legend_names(fig):
    return [t.name for t in fig.data if t.showlegend is not False and t.name]


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


def test_throughput_draws_the_roofline_as_a_level_not_a_bar():
    demo = plots.published("08_throughput", FIGURES)
    fig = plots.throughput(demo, demo)
    assert "tokens per second" in fig.layout.title.text and "SAELens" in fig.layout.title.text
    assert not [t for t in fig.data if t.type == "bar" and "roofline" in t.name.lower()]
    roofline = [t for t in fig.data if t.type == "scatter"]
    assert len(roofline) == 2 and roofline[0].mode == "markers" and roofline[0].marker.symbol == "line-ew"
    assert max(roofline[0].y) == max(r["tokens_per_s"] for r in demo["rows"] if r["impl"] == "roofline")
    assert_human_names(legend_names(fig))
    assert "SAELens" in legend_names(fig) and fig.layout.yaxis.type == "log"
    assert len(fig.layout.annotations) == 2 and len(plots.throughput(demo).layout.annotations) == 1
    assert demo["machine"]["cpu"] in fig.layout.annotations[1].text  # ratios compare within a machine only
    # an implementation measured only in the published run still gets its legend entry
    fp32_only = plots.throughput({"rows": [r for r in demo["rows"] if r["impl"] != "saelib-bf16"]}, demo)
    assert "saelib, bf16 encoder" in legend_names(fp32_only)
