"""The bench's rows as a markdown table (the figure: :func:`saelib.plots.throughput`)."""

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
