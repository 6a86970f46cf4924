"""The notebook front end: an ipywidgets latent browser fed by a precomputed :class:`~.summary.Summary`.

``saelib.viz.browser(RUN)`` (computing the summary first if it is not cached) gives a widget with
a slider and a box for the latent id, a token search, plotly figures (the overview's density
histogram, the latent's activation histogram) and the latent's facts, output effect, N2G
explanation, nearest latents and example contexts. Corpus text goes through ``html.escape``
before it reaches an ``HTML`` widget.
"""

from __future__ import annotations

import html

import ipywidgets as widgets
import plotly.graph_objects as go
from IPython.display import display

from .summary import HELP, Summary, summarize


def _tok(text: str) -> str:
    return html.escape(text.replace("\n", "\u21b5").replace("\t", "\u21e5"), quote=True)


def _token(text: str) -> str:
    """A token on its own (in a list): one made only of whitespace shows its spaces as "␣"."""
    return _tok(text.replace(" ", "\u2423") if text.isspace() else text)


def _num(x, digits: int = 3) -> str:
    """``x`` with ``digits`` significant digits, trailing zeros kept ("1.00", "0.140"); below 1e-3
    in exponent form ("3.20e-4"), as the static site shows numbers."""
    if x is None:
        return "\u2013"
    if x == 0:
        return "0"
    mantissa, exponent = f"{x:.{digits - 1}e}".split("e")
    exponent = int(exponent)
    if abs(x) < 1e-3 or exponent >= digits:
        return f"{mantissa}e{exponent:+d}"
    return f"{x:.{max(0, digits - 1 - exponent)}f}"


def _signed(x) -> str:
    return ("+" if x > 0 else "") + _num(x)


def density_figure(summary: Summary) -> go.Figure:
    """Histogram of log10 activation density over the latents that fire."""
    o = summary.overview()
    edges, counts = o["density_hist"]["edges"], o["density_hist"]["counts"]
    fig = go.Figure(go.Bar(x=[(a + b) / 2 for a, b in zip(edges, edges[1:])], y=counts, width=edges[1] - edges[0]))
    fig.update_layout(title=f"Activation density: {o['dead']} dead, {o['dense']} dense of {o['n_latents']} latents",
                      xaxis_title="log10(activation density)", yaxis_title="latents", template="plotly_white",
                      height=280, margin=dict(t=40, b=40, l=50, r=10))
    return fig


def activation_figure(data: dict) -> go.Figure:
    """Histogram of one latent's non-zero activations (``data`` from :meth:`Summary.latent`)."""
    edges, counts = data["hist"]["edges"], data["hist"]["counts"]
    width = (edges[1] - edges[0]) or 1.0
    fig = go.Figure(go.Bar(x=[(a + b) / 2 for a, b in zip(edges, edges[1:])], y=counts, width=width))
    fig.update_layout(title=f"Latent {data['id']}: activations when firing", xaxis_title="activation",
                      yaxis_title="tokens", template="plotly_white", height=280, margin=dict(t=40, b=40, l=50, r=10))
    return fig


def _titled(text: str, about: str, tag: str = "span") -> str:
    """``text`` (HTML) with ``about`` as its tooltip."""
    return f'<{tag} title="{html.escape(about)}">{text}</{tag}>'


def latent_html(data: dict) -> str:
    """Facts, N2G explanation, nearest latents and output effect of one latent, as escaped HTML; each
    number's meaning (:data:`~.summary.HELP`) is its tooltip."""
    n2g = data["n2g"]
    patterns = " ".join(f"<code>{_token(p)}</code>" for p in n2g["patterns"]) or "<i>none</i>"
    neighbours = ", ".join(f"#{j} ({_num(c, 2)})" for j, c in data["neighbours"])

    def logits(rows, kind):
        return ", ".join(f"<code>{_token(t)}</code> {_titled(_signed(v), HELP[kind])}" for t, v in rows)

    parts = [
        f"<h3>Latent {data['id']}</h3>",
        f"<p>{_titled('density', HELP['density'], 'b')} {_num(100 * data['density'])}% · "
        f"{_titled('mean activation', HELP['mean_act'], 'b')} {_num(data['mean_act'])} · "
        f"{_titled('max', HELP['max_act'], 'b')} {_num(data['max_act'])}</p>",
        f"<p><b>N2G</b> ({_titled('precision', HELP['n2g_precision'])} {_num(n2g['precision'])}, "
        f"{_titled('recall', HELP['n2g_recall'])} {_num(n2g['recall'])}): {patterns}</p>",
        f"<p><b>Nearest latents</b> (decoder cosine): {neighbours}</p>",
        f"<p><b>Output effect</b> in Δ logit ({html.escape(HELP['logit'])}; hover a number for its definition)<br>"
        f"{_titled('Promoted', HELP['direct'], 'b')} (direct logit attribution, per unit activation): "
        f"{logits(data['promoted'], 'direct')}<br>"
        f"{_titled('Suppressed', HELP['direct'], 'b')}: {logits(data['suppressed'], 'direct')}</p>",
    ]
    if data["ablation"]:
        parts.append(f"<p>{_titled('Ablation', HELP['ablation'], 'b')} raises "
                     f"{logits(data['ablation']['promoted'], 'ablation')}<br>"
                     f"lowers {logits(data['ablation']['suppressed'], 'ablation')}</p>")
    return "\n".join(parts)


def examples_html(data: dict) -> str:
    """Example contexts grouped by activation quantile, tokens highlighted by activation (escaped)."""
    if not data["examples"]:
        return "<p><i>This latent never fires on the held-out tokens (dead).</i></p>"
    out, group = [], None
    for ex in data["examples"]:
        if ex["group"] != group:
            group = ex["group"]
            out.append(f"<h4>{html.escape(group)}</h4>")
        spans = []
        for j, (tok, a) in enumerate(zip(ex["tokens"], ex["acts"])):
            alpha = min(1.0, 0.1 + 0.9 * a / (data["max_act"] or 1.0)) if a > 0 else 0.0
            border = "outline:1.5px solid #b03000;" if j == ex["center"] else ""
            spans.append(f'<span title="activation {_num(a)}" style="white-space:pre-wrap;'
                         f'background:rgba(255,110,0,{alpha:.2f});{border}">{_tok(tok)}</span>')
        out.append(f'<div style="font-family:monospace;margin:2px 0">{"".join(spans)}</div>')
    return "\n".join(out)


class LatentBrowser(widgets.VBox):
    """Browse the latents of a :class:`Summary`: ``.latent`` (slider) and ``.latent_box`` pick one,
    ``.query`` searches a token (hits in ``.results``), ``.info`` and ``.contexts`` show it,
    ``.histogram`` is its plotly figure (drawn in ``.plot``), ``.overview_figure`` the density one."""

    def __init__(self, summary: Summary, latent: int = 0):
        self.summary = summary
        n = summary.n_latents
        self.latent = widgets.IntSlider(value=latent, min=0, max=n - 1, description="latent",
                                        continuous_update=False, layout=widgets.Layout(width="60%"))
        self.latent_box = widgets.BoundedIntText(value=latent, min=0, max=n - 1, layout=widgets.Layout(width="8em"))
        widgets.link((self.latent, "value"), (self.latent_box, "value"))
        self.query = widgets.Text(placeholder="token or text, e.g. the", description="search",
                                  continuous_update=False)
        self.results = widgets.Select(options=[], rows=5, description="fires most", layout=widgets.Layout(width="60%"))
        self.info = widgets.HTML()
        self.contexts = widgets.HTML()
        self.plot = widgets.Output()
        self.overview_figure = density_figure(summary)
        overview = widgets.Output()
        with overview:
            display(self.overview_figure)
        accordion = widgets.Accordion(children=[overview], titles=("Overview: activation density over latents",))
        self.latent.observe(lambda change: self.show(change["new"]), names="value")
        self.query.observe(lambda change: self.search(change["new"]), names="value")
        self.results.observe(self._pick, names="value")
        super().__init__([accordion, widgets.HBox([self.latent, self.latent_box]),
                          widgets.HBox([self.query, self.results]),
                          widgets.HBox([self.plot, self.info]), self.contexts])
        self.show(latent)

    def show(self, latent: int) -> None:
        """Show one latent (also what moving the slider does)."""
        data = self.summary.latent(int(latent))
        self.histogram = activation_figure(data)
        self.info.value = latent_html(data)
        self.contexts.value = examples_html(data)
        with self.plot:
            self.plot.clear_output(wait=True)
            display(self.histogram)

    def search(self, query: str) -> list[tuple[int, float]]:
        """Fill ``.results`` with the latents that fire most on ``query``'s token."""
        hits = self.summary.search(query)
        self.results.options = [(f"#{j}  mean activation {_num(s)}", j) for j, s in hits]
        return hits

    def _pick(self, change) -> None:
        if change["new"] is not None:
            self.latent.value = change["new"]


def browser(run_or_summary, lm=None, preset: str | None = None, latent: int = 0, **options) -> LatentBrowser:
    """An ipywidgets latent browser for a :class:`Summary`, or for a run/SAE (summarised first, cached).

    ``options`` go to :func:`saelib.viz.summarize` (``texts``, ``progress``, preset keys).
    """
    summary = run_or_summary if isinstance(run_or_summary, Summary) else summarize(run_or_summary, lm, preset, **options)
    return LatentBrowser(summary, latent)
