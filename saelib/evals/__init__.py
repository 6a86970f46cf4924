"""The evaluation suite of Gao et al. (2024), run on held-out text (the corpus's validation split).

``evaluate(sae)`` returns one flat dict (what ``saelib eval RUN --json`` prints): numbers,
``probe_loss_by_task`` (the probe loss of each task by name) and ``delta_ce_by_context`` (the
delta CE of each downstream context, in order):

=============================  ==============================================================
keys                           module
=============================  ==============================================================
nmse, explained_variance, l0,  :mod:`.reconstruction` (normalised scale; ``latent_density``
dead_fraction, dense_fraction  gives the per-latent densities for a histogram)
delta_ce, kl, loss_recovered,  :mod:`.downstream` (SAE spliced into the LM with nnsight)
loss_recovered_mean, ce_*,
delta_ce_by_context
probe_loss,                    :mod:`.probes` (1-D logistic probes on latents / on residual
probe_loss_baseline,           channels, tasks from offline sources: :mod:`.probe_sources`)
probe_loss_by_task
n2g_precision, n2g_recall      :mod:`.n2g` (n-gram explanations of sampled latents)
ablation_sparsity,             :mod:`.ablation` (sparsity of a latent's / a channel's effect
ablation_sparsity_baseline     on later logits)
eval_tokens                    kept held-out tokens of the reconstruction metrics
=============================  ==============================================================

The metrics averaged over a sample (probe tasks, N2G latents, ablated latents) come with the
half-width of their mean's 95% interval under ``<metric>_ci`` (:func:`saelib.stats.mean_interval`):
raise the preset's sample sizes where it is wider than the difference it should show. The probe
tasks differ from one another more than SAEs do: compare two SAEs task by task
(``probe_loss_by_task``), which narrows the interval of their difference; the same holds for the
downstream contexts (``delta_ce_by_context``).

Presets change scale, never code paths: ``"ci"`` runs in well under a minute on 2 CPU cores,
``"demo"`` in minutes, ``"full"`` reads 8 to 16 times ``"demo"``'s samples. The suite runs on the
CPU, the LM and the SAE included (``saelib.fit`` returns its SAE there); an LM or SAE on another
device is refused.
"""

from __future__ import annotations

import os
import time

from .. import config
from ..loading import load
from .ablation import ablation_sparsity
from .downstream import downstream_loss, splice
from .heldout import HeldOut, encode, held_out, probe_held_out, trained_prepend_bos, trained_site, trained_val_fraction
from .n2g import n2g
from .probes import TASKS, probe_loss, probe_results
from .reconstruction import density_histogram, latent_density, reconstruction_metrics

__all__ = ["PRESETS", "evaluate", "held_out", "HeldOut", "reconstruction_metrics", "latent_density",
           "density_histogram", "downstream_loss", "splice", "probe_loss", "probe_results", "TASKS", "n2g",
           "ablation_sparsity"]

# options of evaluate() at each preset of saelib.config (one registry: PRESETS["ci"] is config.PRESETS["ci"]["eval"])
PRESETS = config.section("eval")


def evaluate(sae, lm=None, preset: str = "ci", *, corpus: str | None = None, seed: int = 0, progress: bool = True,
             **overrides) -> dict:
    """Every metric of the suite for ``sae`` on held-out text, as one flat dict of floats and ints.

    Args:
        sae: a trained SAE (or the folder of one, or a run folder holding ``sae/``) whose ``metadata`` names ``model``, ``layer``, ``site`` (default
            ``resid_post``), ``ctx_len`` (default 64) and ``corpus`` (default ``wikipedia``).
        lm: the loaded LM (:func:`saelib.models.load_lm`); loaded from ``sae.metadata["model"]`` if None.
        preset: ``"ci"``, ``"lesson"``, ``"demo"`` or ``"full"`` (see :data:`PRESETS`).
        corpus: held-out corpus, default the SAE's training corpus (its validation split).
        overrides: any key of a preset, e.g. ``eval_tokens=8192``.
    """
    if preset not in PRESETS:
        raise ValueError(f"Unknown eval preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    unknown = set(overrides) - set(PRESETS[preset])
    if unknown:
        raise ValueError(f"Unknown eval option(s) {', '.join(sorted(unknown))}; valid ones: {', '.join(PRESETS[preset])}.")
    cfg = {**PRESETS[preset], **overrides}
    if isinstance(sae, (str, os.PathLike)):
        sae = load(sae)
    lm, layer, site, ctx_len = trained_site(sae, lm, "evaluate")
    _check_options(cfg, ctx_len)
    corpus = corpus or sae.metadata.get("corpus", "wikipedia")
    prepend_bos = trained_prepend_bos(sae)
    sae.eval()
    timings = {}

    def timed(name, fn, *args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        timings[f"seconds_{name}"] = round(time.perf_counter() - start, 2)
        return result

    held = timed("activations", held_out, lm, layer, site, corpus, ctx_len, cfg["eval_tokens"], progress=progress,
                 prepend_bos=prepend_bos, val_fraction=trained_val_fraction(sae, corpus))
    # the preset and the sample sizes travel with the numbers they produced
    report = {"eval_preset": preset, **{key: value for key, value in cfg.items() if key != "eval_tokens"},
              "eval_tokens": held.n_tokens}
    report |= timed("reconstruction", reconstruction_metrics, sae, held.acts[held.keep])
    report |= timed("downstream", downstream_loss, sae, lm, held.ids[:cfg["downstream_contexts"]], layer, site,
                    progress=progress)
    report |= timed("probes", probe_loss, sae, lm, layer, site, ctx_len=ctx_len, per_source=cfg["probe_per_source"],
                    seed=seed, progress=progress, prepend_bos=prepend_bos, held_out=probe_held_out(sae))
    values, indices = encode(sae, held.acts)
    report |= timed("n2g", n2g, values, indices, held.ids, held.keep, sample=cfg["n2g_latents"], seed=seed)
    report |= timed("ablation", ablation_sparsity, sae, lm, held, sample=cfg["ablation_latents"], seed=seed,
                    progress=progress)
    return {**report, **timings}


def _check_options(cfg: dict, ctx_len: int) -> None:
    """Refuse, in one sentence, an option of :func:`evaluate` that no metric can be computed from."""
    least = {"eval_tokens": 2 * ctx_len, "downstream_contexts": 1, "probe_per_source": 1, "n2g_latents": 0,
             "ablation_latents": 0}
    for key, value in cfg.items():
        if key == "eval_tokens" and value is None:  # the whole validation split
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least[key]:
            why = f" (two contexts of {ctx_len} tokens: N2G explains on one half and scores on the other)" \
                if key == "eval_tokens" else ""
            raise ValueError(f"{key} must be an integer of at least {least[key]}{why}, got {value!r}.")
