"""SAEs released with saelib, loadable by name: ``saelib.load("smollm2-135m/resid_12/n4608_k32")``.

Each lives in the package as ``saelib/saes/<model>/<site>_<layer>/n<n_latents>_k<k>/`` (an
ordinary SAE folder: ``config.json`` + ``sae.safetensors``).
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).parent / "saes"


def names() -> list[str]:
    """Every released SAE's name, e.g. ``["smollm2-135m/resid_12/n4608_k32", ...]``."""
    return sorted(str(p.parent.relative_to(ROOT)) for p in ROOT.glob("*/*/*/config.json"))


def find(name: str) -> Path | None:
    """The folder of the released SAE called ``name``, or ``None`` if there is none."""
    folder = ROOT / name
    return folder if name and ".." not in Path(name).parts and (folder / "config.json").is_file() else None
