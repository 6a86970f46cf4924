"""Ablation sparsity: how sparse is one latent's effect on the next-token logits?

As in the paper: at a random held-out token, take one of the latents active there (every firing
equally likely, as when each latent active at a token is ablated in turn); run the LM with the SAE's
reconstruction spliced in (at kept tokens), once as is and once with that latent's contribution
``z_i W_dec[i]`` removed at that token alone. The effect is the change in logits at
that token and every later one of its context. A constant change of every logit leaves the
probabilities as they are, so each position's median change over the vocabulary is subtracted; the
result is a vector of ``V * T'`` numbers (vocabulary times positions), whose sparsity is
``(L1 / L2)^2 / (V * T')``: 1 for a uniform change, ``1 / (V T')`` for a single logit. Lower is
sparser. The paper reports about 10-14% for SAE latents.

Baseline (``ablation_sparsity_baseline``, about 60% in the paper): the same for a residual channel
of the clean model, set to its mean (zero on the normalised scale) at a random kept token of a
random context. It depends on the LM, the text and the normaliser's mean, not on the SAE: it is
computed once and kept under ``$SAELIB_HOME/ablation/``, so a later SAE with the same normaliser
(every SAE trained on one activation cache) runs the LM only for its own latents.
"""

from __future__ import annotations

import json
import random

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..files import atomic_write_text, kept_json
from ..models import model_id
from ..stats import mean_interval
from .downstream import sae_reconstruct, splice
from .heldout import HeldOut, encode


# names the protocol in the key of the kept channel baselines
METHOD = "one token ablated, median change over the vocabulary subtracted"


def effect_sparsity(base: Tensor, ablated: Tensor) -> float:
    """``(L1/L2)^2 / numel`` of the change ``ablated - base`` in logits ``(..., V)``, less each
    position's median change over the vocabulary (a shift of every logit moves no probability);
    NaN where nothing is left."""
    d = (ablated - base).double()
    d = (d - d.median(-1, keepdim=True).values).flatten()
    l2 = d.norm()
    return float((d.abs().sum() / l2) ** 2 / d.numel()) if l2 > 0 else float("nan")


def _minus(reconstruct, delta: Tensor):
    """``reconstruct`` (or the identity) minus ``delta (b, T, d)``."""
    def patched(x: Tensor) -> Tensor:
        return (reconstruct(x) if reconstruct is not None else x) - delta.to(x)
    return patched


@torch.inference_mode()
def _sparsities(lm, held: HeldOut, contexts: list[int], delta: Tensor, reconstruct, batch_size: int, desc: str,
                progress: bool) -> list[float]:
    """Sparsity of the effect of subtracting ``delta[j] (T, d)`` in context ``contexts[j]``."""
    out = []
    for start in tqdm(range(0, len(contexts), batch_size), desc=desc, disable=not progress, leave=False):
        ctx = torch.tensor(contexts[start:start + batch_size], dtype=torch.long)
        d = delta[start:start + batch_size]
        ids, keep = held.ids[ctx], held.keep[ctx]
        base, _, acts = splice(lm, ids, held.layer, held.site, reconstruct, keep)
        ablated = splice(lm, ids, held.layer, held.site, _minus(reconstruct, d), keep, acts).logits
        first = (d != 0).any(-1).int().argmax(-1).tolist()  # the ablated position of each row
        out += [effect_sparsity(base[r, p:], ablated[r, p:]) for r, p in enumerate(first)]
    return out


def ablation_sparsity(sae, lm, held: HeldOut, sample: int = 16, seed: int = 0, batch_size: int = 8,
                      progress: bool = True) -> dict:
    """Mean ablation sparsity of ``sample`` random firings (a latent at a token where it is active)
    and of ``sample`` random residual channels.

    Args:
        held: held-out contexts and activations at the SAE's site (:func:`~saelib.evals.heldout.held_out`).

    Returns ``ablation_sparsity, ablation_sparsity_baseline, ablation_latents``.
    """
    rng = random.Random(seed)
    n, T, d = held.acts.shape
    values, indices = encode(sae, held.acts)
    values = values * held.keep[..., None]
    firings = (values > 0).nonzero()  # (context, position, slot) of every firing
    picked = [firings[rng.randrange(len(firings))].tolist() for _ in range(min(sample, len(firings)))]
    contexts, delta = [], torch.zeros(len(picked), T, d)
    for j, (c, t, s) in enumerate(picked):
        contexts.append(c)
        # removing z_i W_dec[i] on the normalised scale is removing scale * z_i W_dec[i] on the raw one
        delta[j, t] = values[c, t, s] * sae.W_dec.detach()[indices[c, t, s]] * sae.normalizer.scale
    latent_sparsity = _sparsities(lm, held, contexts, delta, sae_reconstruct(sae), batch_size,
                                  "ablation sparsity (latents)", progress)

    rng = random.Random(seed)  # its own draws: the channel baseline is the same for every SAE on this text
    kept = held.keep.nonzero().tolist()  # (context, position) of every kept token
    tokens = [kept[rng.randrange(len(kept))] for _ in range(sample)]
    contexts = [c for c, _ in tokens]
    channels = [rng.randrange(d) for _ in range(sample)]
    delta = torch.zeros(sample, T, d)
    for j, ((c, t), ch) in enumerate(zip(tokens, channels)):
        delta[j, t, ch] = held.acts[c, t, ch] - sae.normalizer.mean[ch]
    ctx = torch.tensor(contexts, dtype=torch.long)
    kept_file, channel_sparsity = kept_json("ablation", [model_id(lm.name), held.layer, held.site, batch_size, METHOD],
                                            held.ids[ctx], held.keep[ctx], delta)
    if not (isinstance(channel_sparsity, list) and len(channel_sparsity) == sample):
        channel_sparsity = _sparsities(lm, held, contexts, delta, None, batch_size, "ablation sparsity (channels)",
                                       progress)
        atomic_write_text(kept_file, json.dumps(channel_sparsity))
    (latent_mean, latent_ci), (channel_mean, channel_ci) = mean_interval(latent_sparsity), mean_interval(channel_sparsity)
    return {"ablation_sparsity": latent_mean, "ablation_sparsity_ci": latent_ci,
            "ablation_sparsity_baseline": channel_mean, "ablation_sparsity_baseline_ci": channel_ci,
            "ablation_latents": len(picked)}
