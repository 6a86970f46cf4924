"""``saelib.load``: one function that opens any SAE a user holds.

    load("runs/demo")                           # a run folder: its sae/, merged if latent-sharded
    load("runs/demo/sae")                       # an SAE folder written by sae.save (or its shards)
    load("smollm2-135m/resid_12/n4608_k32")     # a released SAE, by name
    load("exports/saelens")                     # a SAELens, sparsify or OpenAI layout

Released SAEs ship inside the package, in ``saelib/saes/<model>/<site>_<layer>/n<n>_k<k>/``
(``<site>``: the site's first word, as in ``resid_12``; ordinary SAE folders, weights in float16;
:mod:`saelib.released` re-creates them).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .checkpoint import is_sharded, merge_shards
from .formats import import_sae
from .sae import CONFIG_FILE, TopKSAE, load_folder

RELEASED = Path(__file__).parent / "saes"


def load(path_or_name: str | os.PathLike) -> TopKSAE:
    """The SAE at ``path_or_name`` (see the module docstring), in eval mode on the CPU; errors name
    the file and the value at fault."""
    path = Path(path_or_name)
    if not path.exists():
        path = resolve(str(path_or_name))
    if (path / "sae").is_dir():  # a run folder
        path = path / "sae"
    if is_sharded(path):
        return merge_shards(path)
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        return load_folder(path)
    return import_sae(path)


def released_names() -> list[str]:
    """Every released SAE's name, in layer order: ``["smollm2-135m/resid_4/n3072_k32", ...]``."""
    found = (str(p.parent.relative_to(RELEASED)) for p in RELEASED.glob("*/*/*/config.json"))
    return sorted(found, key=lambda name: [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)])


def find(name: str) -> Path | None:
    """The folder of the released SAE called ``name``, or ``None`` if there is none."""
    folder = RELEASED / name
    return folder if name and ".." not in Path(name).parts and (folder / CONFIG_FILE).is_file() else None


def resolve(name: str) -> Path:
    """The folder of the released SAE called ``name``; a one-sentence error listing the names if there is none."""
    folder = find(name)
    if folder is None:
        raise FileNotFoundError(f"No SAE folder at {name} and no released SAE of that name; pass a folder written by "
                                f"sae.save, a run folder or a released name: {', '.join(released_names()) or 'none installed'}.")
    return folder
