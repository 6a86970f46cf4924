"""The static site: ``saelib view RUN --out DIR`` writes a self-contained, offline visualizer.

Layout of ``DIR``::

    index.html                 one page; routes: #overview, #latent/<id>, #search/<text>
    assets/viz.js, viz.css     shipped with saelib (no CDN, no network)
    data/overview.js           window.SAELIB_OVERVIEW = {...}: facts, density histogram, table columns
    data/search.js             window.SAELIB_SEARCH = [[token text, [[latent, score], ...]], ...]
    data/latents/<id>.js       saelibLatent(<id>, {...}): one latent, loaded on demand

Data files are scripts, not JSON, because Chromium refuses ``fetch()`` of local files: the site
opens from disk (``file://``) as well as from any static HTTP server. Corpus text is untrusted:
the page builds its DOM with ``textContent`` only, the data are JSON with ``<``, ``>`` and ``&``
escaped, and a Content-Security-Policy allows no inline script.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

from tqdm.auto import tqdm

from .summary import Summary, summarize

ASSETS = ("index.html", "viz.js", "viz.css")
# Flags for a headless Chromium on a machine without network or GPU (tests use them too).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--disable-dev-shm-usage"]


def _js_value(obj) -> str:
    """JSON that is also a safe JavaScript literal (no NaN; ``<``, ``>``, ``&`` and line separators escaped)."""
    text = json.dumps(obj, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def write_site(sae_or_run, out_dir: str | Path, lm=None, preset: str | None = None, *, summary: Summary | None = None,
               texts: list[str] | None = None, progress: bool = True, **overrides) -> Path:
    """Write the static visualizer of an SAE into ``out_dir``; return the path of ``index.html``.

    Args:
        sae_or_run: a run folder, an SAE folder, a released SAE's name or a loaded SAE (see
            :func:`saelib.viz.summarize`).
        out_dir: where to write; existing visualizer files in it are replaced.
        lm: the loaded LM; loaded from the SAE's metadata when a summary must be computed.
        preset: ``"ci"``, ``"lesson"``, ``"demo"`` or ``"full"``: how many held-out tokens and examples (``None``: the
            largest the run already has a summary of, else ``"ci"``).
        summary: a summary already computed (then ``sae_or_run``, ``lm``, ``preset`` are unused).
        texts, overrides: passed to :func:`saelib.viz.summarize`.
    """
    if summary is None:
        summary = summarize(sae_or_run, lm, preset, texts=texts, progress=progress, **overrides)
    out = Path(out_dir)
    latents_dir = out / "data" / "latents"
    if latents_dir.exists():
        shutil.rmtree(latents_dir)
    latents_dir.mkdir(parents=True)
    (out / "assets").mkdir(exist_ok=True)
    shipped = resources.files("saelib.viz") / "assets"
    for name in ASSETS:
        target = out / name if name == "index.html" else out / "assets" / name
        target.write_bytes((shipped / name).read_bytes())
    (out / "data" / "overview.js").write_text(f"window.SAELIB_OVERVIEW = {_js_value(summary.overview())};\n")
    index = [[key, [[j, s] for j, s in hits]] for key, hits in summary.search_index().items()]
    (out / "data" / "search.js").write_text(f"window.SAELIB_SEARCH = {_js_value(index)};\n")
    for i in tqdm(range(summary.n_latents), desc="writing latent pages", disable=not progress, leave=False):
        (latents_dir / f"{i}.js").write_text(f"saelibLatent({i}, {_js_value(summary.latent(i))});\n")
    return out / "index.html"


def chromium() -> str:
    """The local Chromium executable (``$SAELIB_CHROMIUM``, else ``chromium`` or ``google-chrome`` on PATH)."""
    for candidate in (os.environ.get("SAELIB_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    raise FileNotFoundError("No Chromium found: install Debian's `chromium` (apt-get install chromium) or set "
                            "SAELIB_CHROMIUM to a Chrome/Chromium executable.")


def screenshot(site_dir: str | Path, png: str | Path, latent: int | None = None, width: int = 1280,
               height: int = 1000, timeout: float = 60.0) -> Path:
    """A PNG of a written site, from the local headless Chromium: the overview, or ``latent``'s page.

    Args:
        site_dir: a folder written by :func:`write_site`.
        png: the image to write (its folder is created).
        latent: show this latent's page instead of the overview.
        width, height: the window size in pixels (the image's size).
    """
    index = Path(site_dir).resolve() / "index.html"
    if not index.exists():
        raise FileNotFoundError(f"No visualizer at {site_dir}; write one with saelib.viz.write_site(RUN, {site_dir!r}).")
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    url = index.as_uri() + ("#overview" if latent is None else f"#latent/{int(latent)}")
    with tempfile.TemporaryDirectory(prefix="saelib-chromium-") as profile:
        cmd = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
               "--virtual-time-budget=5000", f"--screenshot={png}", url]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 or not png.exists():
        raise RuntimeError(f"Chromium could not take the screenshot of {url} (exit {done.returncode}): "
                           f"{done.stderr.strip()[-500:]}")
    return png
