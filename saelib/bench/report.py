"""The bench's rows as a markdown table and a plotly figure."""

from __future__ import annotations





# ---- output ---------------------------------------------------------------------------------

COLUMNS = ("impl", "d_in", "n_latents", "k", "batch_size", "dead_fraction", "tokens_per_s", "ratio_to_best_peer",
           "ratio_to_roofline", "peak_rss_mb")


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"
    return str(value)


def _format_row(row: dict) -> str:
    text = "  ".join(f"{key}={_cell(row[key])}" for key in COLUMNS)
    return text if row["status"] == "ok" else f"{text}  [{row['status']}: {row['reason']}]"


def markdown_table(rows: list[dict]) -> str:
    """The rows as a Markdown table (the form docs/performance.md uses); a GPU run's rows add their
    peak device memory."""
    columns = COLUMNS + ("peak_device_mb",) * any(r.get("peak_device_mb") is not None for r in rows)
    head = "| " + " | ".join(columns) + " | note |"
    lines = [head, "|" + "---|" * (len(columns) + 1)]
    for r in rows:
        note = "" if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
        lines.append("| " + " | ".join(_cell(r[c]) for c in columns) + f" | {note} |")
    return "\n".join(lines)


def throughput_figure(rows: list[dict], title: str = "Training throughput of one TopK step"):
    """A plotly bar chart: tokens/s per implementation (bars) for each configuration (groups),
    log scale; implementations that could not run are left out of the bars (their rows say why)."""
    import plotly.graph_objects as go

    def label(r: dict) -> str:
        return f"d {r['d_in']}, n {r['n_latents']}, B {r['batch_size']}, dead {r['dead_fraction']:g}"

    fig = go.Figure()
    for impl in dict.fromkeys(r["impl"] for r in rows):
        ok = [r for r in rows if r["impl"] == impl and r["tokens_per_s"]]
        if ok:
            fig.add_bar(name=impl, x=[label(r) for r in ok], y=[r["tokens_per_s"] for r in ok],
                        text=[f"{r['ratio_to_roofline']:.2f} of roofline" for r in ok], textposition="none")
    fig.update_layout(title=title, yaxis_title="tokens/s (median step)", yaxis_type="log", barmode="group",
                      template="plotly_white", legend=dict(orientation="h", y=-0.25))
    return fig
