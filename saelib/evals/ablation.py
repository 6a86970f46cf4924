"""Ablation sparsity: how sparse is one latent's effect on the next-token logits?

For a sampled latent, take the held-out token where it is most active; run the LM with the SAE's
reconstruction spliced in (at kept tokens), once as is and once with that latent's contribution
``z_i W_dec[i]`` removed at that token. The effect is the change in logits at that position and
every following one, a vector of ``V * T'`` numbers (vocabulary times positions); its sparsity is
``(L1 / L2)^2 / (V * T')``: 1 for a uniform change, ``1 / (V T')`` for a single logit. Lower is
sparser. The paper reports about 10-14% for SAE latents.

Baseline (``ablation_sparsity_baseline``, about 60% in the paper): the same with a residual
channel of the clean model set to its mean (zero on the normalised scale) at a random kept token.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .downstream import sae_reconstruct, splice
from .heldout import HeldOut, encode


def effect_sparsity(base: Tensor, ablated: Tensor) -> float:
    """``(L1/L2)^2 / numel`` of ``ablated - base`` (any shape); NaN if they are equal."""
    d = (ablated - base).double().flatten()
    l2 = d.norm()
    return float((d.abs().sum() / l2) ** 2 / d.numel()) if l2 > 0 else float("nan")


def _patched(reconstruct, rows: Tensor, positions: Tensor, delta: Tensor):
    """``reconstruct`` with ``delta[r]`` subtracted at ``(rows[r], positions[r])``, for each ``r``."""
    def patched(x: Tensor) -> Tensor:
        out = (reconstruct(x) if reconstruct is not None else x).clone()
        out[rows, positions] -= delta.to(out)
        return out
    return patched


@torch.inference_mode()
def _sparsities(lm, held: HeldOut, contexts: list[int], positions: list[int], delta: Tensor, reconstruct,
                batch_size: int, desc: str, progress: bool) -> list[float]:
    """Sparsity of the effect of subtracting ``delta[j] (d,)`` at ``(contexts[j], positions[j])``."""
    out = []
    for start in tqdm(range(0, len(contexts), batch_size), desc=desc, disable=not progress, leave=False):
        ctx = torch.tensor(contexts[start:start + batch_size])
        pos = torch.tensor(positions[start:start + batch_size])
        ids, keep = held.ids[ctx], held.keep[ctx]
        base, _ = splice(lm, ids, held.layer, held.site, reconstruct, keep)
        rows = torch.arange(len(ctx))
        ablated, _ = splice(lm, ids, held.layer, held.site,
                            _patched(reconstruct, rows, pos, delta[start:start + batch_size]), keep)
        out += [effect_sparsity(base[r, p:], ablated[r, p:]) for r, p in zip(rows.tolist(), pos.tolist())]
    return out


def ablation_sparsity(sae, lm, held: HeldOut, sample: int = 16, seed: int = 0, batch_size: int = 8,
                      progress: bool = True) -> dict:
    """Mean ablation sparsity of ``sample`` random latents and of ``sample`` random residual channels.

    Args:
        held: held-out contexts and activations at the SAE's site (:func:`~saelib.evals.heldout.held_out`).

    Returns ``ablation_sparsity, ablation_sparsity_baseline, ablation_latents``.
    """
    rng = random.Random(seed)
    n, T = held.ids.shape
    values, indices = encode(sae, held.acts)
    usable = held.keep.clone()
    usable[:, -1] = False  # the last position has no following logits worth measuring
    values = values * usable[..., None]
    fired = indices[values > 0].unique().tolist()
    latents = rng.sample(fired, min(sample, len(fired)))
    ctx, pos, amount = [], [], []
    for latent in latents:
        act = (values * (indices == latent)).sum(-1)
        c, t = divmod(int(act.argmax()), T)
        ctx.append(c)
        pos.append(t)
        amount.append(float(act[c, t]))
    # removing z_i W_dec[i] on the normalised scale is removing scale * z_i W_dec[i] on the raw one
    delta = torch.tensor(amount)[:, None] * sae.W_dec.detach()[latents] * sae.normalizer.scale
    latent_sparsity = _sparsities(lm, held, ctx, pos, delta, sae_reconstruct(sae), batch_size,
                                  "ablation sparsity (latents)", progress)

    kept = usable.nonzero().tolist()
    picks = [kept[rng.randrange(len(kept))] for _ in range(sample)]
    channels = [rng.randrange(held.acts.shape[-1]) for _ in range(sample)]
    mean = sae.normalizer.mean
    delta = torch.zeros(sample, held.acts.shape[-1])
    for j, ((c, t), ch) in enumerate(zip(picks, channels)):
        delta[j, ch] = held.acts[c, t, ch] - mean[ch]
    channel_sparsity = _sparsities(lm, held, [c for c, _ in picks], [t for _, t in picks], delta, None,
                                   batch_size, "ablation sparsity (channels)", progress)
    return {"ablation_sparsity": float(torch.tensor(latent_sparsity, dtype=torch.float64).nanmean()),
            "ablation_sparsity_baseline": float(torch.tensor(channel_sparsity, dtype=torch.float64).nanmean()),
            "ablation_latents": len(latents)}
