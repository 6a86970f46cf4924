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


# ---- figures of notebooks 05-08

PUBLISHED_STYLE = dict(color="#9a9a9a")  # the published demo run, drawn beside a smaller one
ARCH_NAMES = {"topk": "TopK", "multitopk": "Multi-TopK", "batchtopk": "BatchTopK", "relu": "ReLU + L1"}
ARCH_COLORS = {"topk": "#1f77b4", "multitopk": "#d62728", "batchtopk": "#2ca02c", "relu": "#ff7f0e"}


def progressive_codes(data: dict, published: dict | None = None) -> go.Figure:
    """Held-out NMSE against the number of latents kept at test time, k', per architecture (mean ± sd over
    seeds), the trained k marked; the published demo run's curves in grey beside them.

    ``data`` (and ``published``): ``{"summary": [{arch, k_prime, nmse, nmse_std, runs}], "runs": [{k, n_latents,
    ...}]}``, what notebook 05 saves.
    """
    fig = go.Figure()
    k, n, seeds = data["runs"][0]["k"], data["runs"][0]["n_latents"], data["summary"][0]["runs"]
    k_primes = [r["k_prime"] for r in data["summary"]]
    for source, style, suffix in ((published, PUBLISHED_STYLE, " (published demo run)"), (data, {}, "")):
        if source is None:
            continue
        for arch in dict.fromkeys(r["arch"] for r in source["summary"]):
            s = [r for r in source["summary"] if r["arch"] == arch]
            fig.add_scatter(x=[r["k_prime"] for r in s], y=[r["nmse"] for r in s], mode="lines+markers",
                            name=ARCH_NAMES.get(arch, arch) + suffix,
                            line=dict(dash="dash" if suffix else None, **(style or {"color": ARCH_COLORS.get(arch)})),
                            marker=dict(symbol="circle-open" if arch == "topk" else "diamond-open") if suffix else None,
                            error_y=dict(array=[r["nmse_std"] for r in s], **style))
        k_primes += [r["k_prime"] for r in source["summary"]]
    nmse = [r["nmse"] for d in (data, published) if d for r in d["summary"]]
    fig.add_scatter(x=[k, k], y=[min(nmse), max(nmse)], mode="lines", name=f"trained k = {k}",
                    line=dict(dash="dot", color="black"))
    fig.update_xaxes(title_text="k' (latents kept at test time)", **log_axis(k_primes))
    fig.update_yaxes(title_text="held-out normalised MSE")
    fig.update_layout(title=f"Decoding at k' ≠ k: held-out NMSE (n = {n}, mean ± sd over {seeds} seed"
                            f"{'s' if seeds > 1 else ''})", template="plotly_white")
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
    from plotly.subplots import make_subplots

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
    fraction of dead latents), the grey band the reference's seed range, grey diamonds the published demo run.
    Right: held-out NMSE against the learning rate in multiples of the paper's rule, this run and the published.

    ``data`` (and ``published``): ``{"reference": {n_latents, k, tokens, lr}, "runs": [{variant, seed, lr,
    val_nmse, dead_fraction}]}``, what notebook 07 saves.
    """
    from plotly.subplots import make_subplots

    from .config import paper_lr

    deltas, ref_mean, ref_band = _ablation_deltas(data)
    order = sorted(deltas, key=deltas.get)
    dead = {r["variant"]: r["dead_fraction"] for r in data["runs"]}
    fig = make_subplots(rows=1, cols=2, column_widths=[0.62, 0.38], horizontal_spacing=0.3,
                        subplot_titles=("one change from the reference recipe",
                                        "learning rate (multiples of the paper's rule)"))
    fig.add_bar(y=order, x=[100 * deltas[v] for v in order], orientation="h", name="this run", marker_color="#1f77b4",
                row=1, col=1)
    # labels right of each bar or of zero: left of a negative bar they would cover the variant names
    fig.add_scatter(y=order, x=[max(0.0, 100 * deltas[v]) for v in order], mode="text", showlegend=False,
                    text=[f"  {100 * deltas[v]:+.1f}% · dead {dead[v]:.0%}" for v in order],
                    textposition="middle right", cliponaxis=False, row=1, col=1)
    fig.add_vrect(x0=100 * min(ref_band), x1=100 * max(ref_band), fillcolor="grey", opacity=0.25, line_width=0,
                  row=1, col=1)
    for source, name, style in ((data, "this run", dict(color="#1f77b4")), (published, "published demo run",
                                                                            PUBLISHED_STYLE)):
        if source is None:
            continue
        if style is PUBLISHED_STYLE:
            pub = _ablation_deltas(published)[0]
            shown = [v for v in order if v in pub]
            fig.add_scatter(y=shown, x=[100 * pub[v] for v in shown], mode="markers", name=name,
                            marker=dict(symbol="diamond", size=11, **style), row=1, col=1)
        rule = paper_lr(source["reference"]["n_latents"])
        lr_rows = sorted((r for r in source["runs"] if r["variant"].startswith("lr ")
                          or r["variant"] == "reference" and r["seed"] == source["runs"][0]["seed"]),
                         key=lambda r: r["lr"])
        fig.add_scatter(x=[r["lr"] / rule for r in lr_rows], y=[r["val_nmse"] for r in lr_rows], mode="lines+markers",
                        name=name, showlegend=False, marker_color=style["color"], row=1, col=2)
    multiples = [r["lr"] / paper_lr(d["reference"]["n_latents"]) for d in (data, published) if d for r in d["runs"]]
    ref = data["reference"]
    fig.update_xaxes(title_text="change in held-out NMSE from the reference (%)", row=1, col=1)
    fig.update_xaxes(title_text="lr / (2e-4 / sqrt(n / 2^14))", row=1, col=2, **log_axis(multiples))
    fig.update_yaxes(title_text="held-out normalised MSE", row=1, col=2)
    fig.update_layout(template="plotly_white", height=480, legend=dict(orientation="h", y=-0.2),
                      title=f"Recipe ablation at n = {ref['n_latents']}, k = {ref['k']}, {ref['tokens'] / 1e6:.2f}M "
                            f"tokens (reference NMSE {ref_mean:.3f}; grey band: its seed range)")
    return fig


CONFIG_NAMES = {"d_in": "d_in", "batch_size": "batch of"}
IMPL_NAMES = {"saelib": "saelib", "saelib-bf16": "saelib, bf16 encoder", "sparsify": "sparsify (EleutherAI)",
              "sae-lens": "SAELens", "sae-lens-sparse": "SAELens, sparse decoder", "naive": "dense PyTorch step"}


def throughput(data: dict, published: dict | None = None) -> go.Figure:
    """Tokens per second of one TopK training step (forward, loss with AuxK, backward, Adam, decoder
    renormalisation) per implementation (bars) and configuration (groups), log scale; the roofline (the
    encoder GEMM alone, the fastest any step can be) is a black dash over each group. With ``published``,
    the published demo run is a second panel on the same axis. Implementations that could not run have
    no bar (their rows say why).

    ``data`` (and ``published``): ``{"rows": [{impl, d_in, n_latents, batch_size, dead_fraction,
    tokens_per_s}]}``, what notebook 08 saves (``saelib bench --json`` rows).
    """
    from plotly.subplots import make_subplots

    panels = [(data, "this run")] + ([(published, "published demo run")] if published else [])
    every = [r for panel, _ in panels for r in panel["rows"]]
    # a group's label names what varies across the groups; the rest goes into the axis title
    varies = [key for key in ("d_in", "batch_size") if len({r[key] for r in every}) > 1]
    fixed = ", ".join(f"{CONFIG_NAMES[key]} {every[0][key]}" for key in ("d_in", "batch_size") if key not in varies)

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
        for impl in dict.fromkeys(r["impl"] for r in rows if r["impl"] != "roofline"):
            ok = [r for r in rows if r["impl"] == impl]
            fig.add_bar(name=IMPL_NAMES.get(impl, impl), x=[label(r) for r in ok], y=[r["tokens_per_s"] for r in ok],
                        marker_color=colors.get(impl), legendgroup=impl, showlegend=impl not in in_legend,
                        offsetgroup=impl,
                        hovertemplate="%{y:,.0f} tokens/s", row=1, col=col)
            in_legend.add(impl)
        roof = [r for r in rows if r["impl"] == "roofline"]
        fig.add_scatter(x=[label(r) for r in roof], y=[r["tokens_per_s"] for r in roof], mode="markers",
                        name="roofline: the encoder GEMM alone", legendgroup="roofline", showlegend=col == 1,
                        marker=dict(symbol="line-ew", size=560 // (len(panels) * max(1, len(roof))),
                                    line=dict(width=3, color="black")),
                        hovertemplate="roofline %{y:,.0f} tokens/s", row=1, col=col)
    fig.update_yaxes(type="log", dtick=1)  # a label per decade
    fig.update_yaxes(title_text="tokens per second (median step)", col=1)
    fig.update_layout(title="Training throughput: tokens per second of one TopK step, saelib vs sparsify vs SAELens"
                            f"<br><sup>forward, loss, backward, Adam; k {every[0]['k']}"
                            f"{', ' + fixed if fixed else ''}</sup>",
                      barmode="group", template="plotly_white", height=540, legend=dict(orientation="h", y=-0.28))
    return fig
