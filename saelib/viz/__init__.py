"""The latent visualizer: one data layer (:mod:`.summary`), two front ends.

- :func:`summarize` computes (once, cached next to the run) what is shown about every latent;
- :func:`write_site` writes a static, offline, self-contained site (``saelib view RUN --out DIR``);
- :func:`browser` is an ipywidgets browser for notebooks;
- :func:`screenshot` photographs a written site with the local headless Chromium.
"""

from .static import screenshot, write_site
from .summary import PRESETS, Summary, summarize
from .widget import LatentBrowser, browser

__all__ = ["PRESETS", "Summary", "summarize", "write_site", "screenshot", "browser", "LatentBrowser"]
