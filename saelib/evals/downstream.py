"""Downstream loss: splice a reconstruction into the LM and measure next-token cross-entropy and KL.

``splice`` runs the LM with the activation at one site replaced by ``reconstruct(x)`` at the kept
tokens (position 0, special tokens and outliers keep their clean value, as in training). From
it, :func:`downstream_loss` reports, over positions whose own token is kept and whose target is
not a special token:

- ``delta_ce = CE(SAE spliced) - CE(clean)`` and ``kl = E KL(p_clean || p_SAE)`` (nats/token);
- ``loss_recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean)`` against zero-ablation of the
  site, and ``loss_recovered_mean`` against mean-ablation (the SAE's normaliser mean).

The two ablations' losses depend on the LM, the contexts and the normaliser's mean, not on the
SAE: they are computed once and kept under ``$SAELIB_HOME/downstream/``, so every later SAE with
the same normaliser (every SAE trained on one activation cache) scored on the same contexts runs
two forward passes per batch instead of four. Every spliced forward starts from the clean one's
activations at the site (``splice(..., acts=)``): the blocks before it are not run again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import NamedTuple
from weakref import WeakKeyDictionary

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..activations import keep_mask
from ..files import atomic_write_text, kept_json
from ..models import LM, model_id

Reconstruct = Callable[[Tensor], Tensor]  # raw (b, T, d) -> raw (b, T, d)


def _site_envoy(model, lm: LM, layer: int, site: str):
    for part in lm.site_module_path(layer, site).split("."):
        model = model[int(part)] if part.isdigit() else getattr(model, part)
    return model


class Spliced(NamedTuple):
    """What :func:`splice` returns."""

    logits: Tensor  # (b, T, vocab), float32
    keep: Tensor  # (b, T) bool: where the reconstruction went in
    acts: Tensor  # (b, T, d): the clean activations at the site, for a later splice of the same ids


# nn.Module -> {layer: whether a splice at that layer's resid_post can resume from the clean activations}
_RESUMES: WeakKeyDictionary = WeakKeyDictionary()


def splice(lm: LM, ids: Tensor, layer: int, site: str, reconstruct: Reconstruct | None = None,
           keep: Tensor | None = None, acts: Tensor | None = None) -> Spliced:
    """Logits of the LM on ``ids (b, T)`` with ``site`` at ``layer`` replaced by ``reconstruct``.

    Args:
        reconstruct: raw activations ``(b, T, d)`` -> replacement ``(b, T, d)``; ``None`` runs
            the clean model.
        keep: ``(b, T)`` bool, where to splice; default :func:`~saelib.activations.keep_mask` of
            the clean activations (excluded tokens keep their clean value).
        acts: ``(b, T, d)``, the clean activations at the site: a previous splice's ``acts`` for
            the same ``ids``. At ``resid_post`` the splice then starts from them and skips the
            blocks up to ``layer`` (about a third of SmolLM2's forward at layer 12), where
            :func:`resumes` finds that this gives the full forward's logits.

    Returns:
        ``Spliced(logits, keep, acts)``.
    """
    resume = acts is not None and site == "resid_post" and resumes(lm, ids, layer)
    return _trace(lm, ids, layer, site, reconstruct, keep, acts if resume else None)


@torch.inference_mode()
def _trace(lm: LM, ids: Tensor, layer: int, site: str, reconstruct: Reconstruct | None, keep: Tensor | None,
           start: Tensor | None) -> Spliced:
    """:func:`splice`, from the embeddings or (``start`` given, at ``resid_post``) from ``start``."""
    import nnsight
    from nnsight import NNsight

    model = NNsight(lm.model)
    envoy = _site_envoy(model, lm, layer, site)
    ids = ids.to(lm.model.device)
    if start is not None:
        x = start.to(lm.model.device)
    with model.trace(ids):
        if start is None:
            out = envoy.output
            x = nnsight.save(out[0] if isinstance(out, tuple) else out)
        else:
            for i in range(layer):  # the blocks before: not run (their outputs go nowhere)
                _site_envoy(model, lm, i, site).skip(x)
        if keep is None:
            keep = nnsight.save(keep_mask(ids, x, lm.special_ids)[0])
        new = x if reconstruct is None else torch.where(keep[..., None].to(x.device), reconstruct(x).to(x.dtype), x)
        if start is not None:
            envoy.skip(new)
        elif reconstruct is not None:
            envoy.output = (new, *out[1:]) if isinstance(out, tuple) else new
        logits = model.output.logits.save()
    return Spliced(logits.float(), keep.cpu(), x)


def resumes(lm: LM, ids: Tensor, layer: int) -> bool:
    """Whether a splice at ``resid_post`` of ``layer`` can start from the clean activations: checked
    once per model and layer, on the first context of ``ids``, against the full forward's logits (a
    model whose blocks return tuples, or pass state from block to block, runs the full forward)."""
    known = _RESUMES.setdefault(lm.model, {})
    if layer not in known:
        full = _trace(lm, ids[:1], layer, "resid_post", None, None, None)
        try:
            resumed = _trace(lm, ids[:1], layer, "resid_post", None, full.keep, full.acts)
            known[layer] = torch.allclose(full.logits, resumed.logits, rtol=1e-4, atol=1e-4)
        except Exception:  # noqa: BLE001 - the full forward is always right, only slower
            known[layer] = False
    return known[layer]


def sae_reconstruct(sae) -> Reconstruct:
    """Raw activations -> the SAE's reconstruction, in raw activations."""
    def reconstruct(x: Tensor) -> Tensor:
        return sae.decode(sae.encode(x))
    return reconstruct


def scored_positions(ids: Tensor, keep: Tensor, special_ids: list[int]) -> Tensor:
    """``(b, T-1)`` bool: predictions that count (own token kept, target not a special token)."""
    return keep[:, :-1] & ~torch.isin(ids[:, 1:], torch.tensor(special_ids, dtype=ids.dtype))


def _log_probs(logits: Tensor) -> Tensor:
    """``(b, T-1, vocab)`` next-token log-probabilities from ``logits (b, T, vocab)``."""
    return F.log_softmax(logits[:, :-1], -1)


def _ce(logp: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    """``(b,)`` each context's summed next-token cross-entropy over ``mask (b, T-1)``."""
    return -(logp.gather(-1, ids[:, 1:, None])[..., 0] * mask).sum(-1)


def _kept_ablations(lm: LM, ids: Tensor, layer: int, site: str, mean: Tensor, batch_size: int):
    """Where the zero- and mean-ablation losses of these contexts are kept, and those losses (summed
    CE and scored predictions) if they are there."""
    path, kept = kept_json("downstream", [model_id(lm.name), layer, site, batch_size], ids.to(torch.int64), mean.float())
    ok = isinstance(kept, dict) and all(isinstance(kept.get(key), (int, float)) for key in ("zero", "mean", "n"))
    return path, kept if ok else None


@torch.inference_mode()
def downstream_loss(sae, lm: LM, ids: Tensor, layer: int, site: str = "resid_post", batch_size: int = 8,
                    progress: bool = True) -> dict:
    """Delta CE, KL and loss recovered for ``sae`` spliced at ``layer``/``site`` on ``ids (n_ctx, T)``.

    Returns ``ce_clean, ce_sae, ce_zero, ce_mean, delta_ce, kl, loss_recovered,
    loss_recovered_mean`` (nats per scored token), ``downstream_tokens`` and
    ``delta_ce_by_context`` (each context's delta CE per scored token; None for a context with none):
    two SAEs scored on the same ``ids`` compare best context by context, since contexts differ far
    more from one another than SAEs do.
    """
    mean = sae.normalizer.mean
    kept_file, kept = _kept_ablations(lm, ids, layer, site, mean, batch_size)
    ablations = {"sae": sae_reconstruct(sae)}
    if kept is None:
        ablations |= {"zero": torch.zeros_like, "mean": lambda x: mean.to(x).expand_as(x)}
    totals = dict.fromkeys(["clean", *ablations, "kl"], 0.0)
    n, by_context = 0, []
    for start in tqdm(range(0, len(ids), batch_size), desc="downstream loss", disable=not progress, leave=False):
        batch = ids[start:start + batch_size]
        clean, keep, acts = splice(lm, batch, layer, site)
        mask = scored_positions(batch, keep, lm.special_ids)
        counts = mask.sum(-1).tolist()  # scored predictions per context
        n += sum(counts)
        p = _log_probs(clean)
        clean_ce = _ce(p, batch, mask)
        totals["clean"] += float(clean_ce.sum())
        for name, fn in ablations.items():
            q = _log_probs(splice(lm, batch, layer, site, fn, keep, acts).logits)
            ce = _ce(q, batch, mask)
            totals[name] += float(ce.sum())
            if name == "sae":
                by_context += [float(d) / c if c else None for d, c in zip(ce - clean_ce, counts)]
                totals["kl"] += float((p.exp() * (p - q)).sum(-1)[mask].sum())
    if n == 0:
        raise ValueError("No scored positions in the downstream-loss contexts; pass more (or longer) contexts.")
    if kept is None:
        atomic_write_text(kept_file, json.dumps({"zero": totals["zero"], "mean": totals["mean"], "n": n}))
    elif kept["n"] != n:
        raise ValueError(f"The ablation losses kept in {kept_file} count {kept['n']} predictions where these contexts "
                         f"score {n}; delete that file and evaluate again.")
    else:
        totals["zero"], totals["mean"] = kept["zero"], kept["mean"]
    ce = {name: total / n for name, total in totals.items()}
    return {
        "ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_zero": ce["zero"], "ce_mean": ce["mean"],
        "delta_ce": ce["sae"] - ce["clean"],
        "kl": ce["kl"],
        "loss_recovered": (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]),
        "loss_recovered_mean": (ce["mean"] - ce["sae"]) / (ce["mean"] - ce["clean"]),
        "downstream_tokens": n,
        "delta_ce_by_context": by_context,
    }
