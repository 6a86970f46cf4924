"""The latent visualizer: one data layer (:mod:`.summary`), two front ends.

- :func:`summarize` computes (once, cached next to the run) what is shown about every latent;
- :func:`write_site` writes a static, offline, self-contained site (``saelib view RUN --out DIR``);
- :func:`browser` is an ipywidgets browser for notebooks;
- :func:`screenshot` photographs a written site with the local headless Chromium.
"""

from .static import screenshot, write_site
from .summary import PRESETS, Summary, summarize

__all__ = ["PRESETS", "Summary", "summarize", "write_site", "screenshot", "browser", "LatentBrowser"]


def __getattr__(name: str):
    # the notebook browser needs ipywidgets, an optional dependency (the "notebooks" extra): imported on first use
    if name in ("browser", "LatentBrowser"):
        from . import widget

        return getattr(widget, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
