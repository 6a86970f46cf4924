"""The evaluation suite on real SmolLM2 activations at tiny scale (a quickly trained TopK SAE)."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("SAELIB_HOME", str(Path(__file__).resolve().parents[1] / ".cache"))

from saelib.evals import evaluate  # noqa: E402
from saelib.evals import probe_sources, probes  # noqa: E402
from saelib.evals.ablation import ablation_sparsity  # noqa: E402
from saelib.evals.downstream import downstream_loss, resumes, scored_positions, splice  # noqa: E402
from saelib.evals.heldout import cached_contexts, encode, held_out, site_activations  # noqa: E402
from saelib.evals.n2g import explain_and_score, firing, n2g  # noqa: E402
from saelib.evals.reconstruction import density_histogram, latent_density, reconstruction_metrics  # noqa: E402
from saelib.normalize import Normalizer  # noqa: E402
from saelib.sae import TopKSAE  # noqa: E402

LAYER = 3  # an early layer keeps the stopped-early forwards cheap
META = {"model": "smollm2-135m", "layer": LAYER, "site": "resid_post", "ctx_len": 64, "corpus": "wikipedia"}


@pytest.fixture(scope="module")
def lm():
    from saelib.models import load_lm

    return load_lm("smollm2-135m")


@pytest.fixture(scope="module")
def held(lm):
    return held_out(lm, LAYER, max_tokens=16 * 64, progress=False)


@pytest.fixture(scope="module")
def sae(lm):
    """A TopK SAE trained briefly on real training-split activations."""
    from saelib.data import contexts
    from saelib.train import fit

    train = site_activations(lm, contexts("wikipedia", lm.tokenizer, "train", max_tokens=48 * 64), LAYER,
                             "resid_post", progress=False)
    x = train.acts[train.keep]
    return fit(x, 256, 8, tokens=4 * len(x), batch_size=256, seed=0, metadata=META, progress=False)


def test_held_out_activations_are_extracted_once_in_float32_and_read_from_the_cache(lm, held):
    from saelib.activations import cached_activations

    cache = cached_activations("smollm2-135m", LAYER, "resid_post", "wikipedia", "validation", 64, 16 * 64, lm=lm,
                               lm_dtype="float32", progress=False)
    assert cache.complete and torch.equal(cache.contexts(), held.ids)
    direct = site_activations(lm, held.ids, LAYER, "resid_post", progress=False)  # a fresh forward
    assert torch.equal(held.keep, direct.keep) and 0 < held.n_tokens < held.keep.numel()
    assert torch.equal(held.acts[held.keep], direct.acts[direct.keep])
    assert not held.acts[~held.keep].any()  # the excluded tokens are not cached


def test_an_sae_that_expects_layer_normed_tokens_is_refused_not_scored_on_raw_ones(lm, tmp_path):
    """An imported SAE whose peer layer-normalised each token (OpenAI's TopK files, SAELens'
    layer_norm) would get silently wrong metrics on raw activations: evaluation and the visualizer
    refuse it in one sentence."""
    from saelib import evals
    from saelib.viz import summarize

    sae = TopKSAE(576, 64, 4, metadata={**META, "input_norm": "layer_norm"})
    for call in (lambda: evals.evaluate(sae, lm), lambda: summarize(sae, lm, "ci", progress=False)):
        with pytest.raises(ValueError, match=r"normalised token by token \(metadata\['input_norm'\] is 'layer_norm'\)"):
            call()


def test_an_sae_is_evaluated_on_the_share_of_its_corpus_it_trained_without(lm, monkeypatch):
    from saelib import evals
    from saelib.data import contexts
    from saelib.evals.heldout import trained_val_fraction

    sae = TopKSAE(576, 64, 4, metadata={**META, "corpus": "wikipedia", "val_fraction": 0.3})
    assert trained_val_fraction(sae, "wikipedia") == 0.3 and trained_val_fraction(sae, "mix") == 0.1
    assert trained_val_fraction(TopKSAE(576, 64, 4, metadata=META), "wikipedia") == 0.1  # not recorded: the default
    # mix holds Wikipedia's documents, split alike: an SAE trained on one with less held out is
    # evaluated on the other's smaller validation split, which it never trained on
    on_mix = TopKSAE(576, 64, 4, metadata={**META, "corpus": "mix", "val_fraction": 0.05})
    assert trained_val_fraction(on_mix, "wikipedia") == 0.05 and trained_val_fraction(on_mix, "notes.txt") == 0.1
    assert trained_val_fraction(TopKSAE(576, 64, 4, metadata={**META, "corpus": "austen", "val_fraction": 0.02}), "mix") == 0.02
    held = held_out(lm, LAYER, max_tokens=4 * 64, progress=False, val_fraction=0.3)
    assert torch.equal(held.ids, contexts("wikipedia", lm.tokenizer, "validation", max_tokens=4 * 64, val_fraction=0.3))
    assert not torch.equal(held.ids, contexts("wikipedia", lm.tokenizer, "validation", max_tokens=4 * 64))

    asked = {}

    def stop(*args, **kwargs):  # evaluate's first step: what it asks for is all this test reads
        asked.update(kwargs)
        raise InterruptedError

    monkeypatch.setattr(evals, "held_out", stop)
    with pytest.raises(InterruptedError):
        evaluate(sae, lm, progress=False)
    assert asked["val_fraction"] == 0.3


def test_probe_contexts_are_extracted_once_into_the_activation_cache_and_read_from_it(lm, monkeypatch, tmp_path):
    """Every SAE scored on the probe tasks shares one forward pass over their contexts."""
    import saelib.activations

    ids, _ = probes.probe_contexts(lm.tokenizer, 64, per_source=2)
    monkeypatch.setenv("SAELIB_HOME", str(tmp_path))
    first = cached_contexts(lm, ids, LAYER, "resid_post", "probe-tasks", progress=False)
    direct = site_activations(lm, ids, LAYER, "resid_post", progress=False)
    assert torch.equal(first.ids, ids) and torch.equal(first.keep, direct.keep)
    assert torch.equal(first.acts[first.keep], direct.acts[direct.keep])

    def no_forward(*args, **kwargs):
        raise AssertionError("the LM ran again")

    monkeypatch.setattr(saelib.activations, "extract", no_forward)
    again = cached_contexts(lm, ids, LAYER, "resid_post", "probe-tasks", progress=False)
    assert torch.equal(again.acts, first.acts) and torch.equal(again.keep, first.keep)
    with pytest.raises(AssertionError, match="the LM ran again"):  # other contexts: a cache of their own
        cached_contexts(lm, ids.flip(0), LAYER, "resid_post", "probe-tasks", progress=False)


def test_reconstruction_metrics(sae, held):
    x = held.acts[held.keep]
    m = reconstruction_metrics(sae, x)
    assert 0 < m["nmse"] < 0.9, m
    # against the definition, also for a ReLU code whose width varies by batch (padded with zeros)
    relu = TopKSAE(x.shape[1], 256, None, arch="relu", normalizer=sae.normalizer, generator=torch.Generator().manual_seed(0))
    for model in (sae, relu):
        with torch.no_grad():
            x_n, x_hat = model.normalizer.apply(x), model.normalizer.apply(model(x).x_hat)
        nmse = (x_n - x_hat).pow(2).sum() / (x_n - x_n.mean(0)).pow(2).sum()
        assert reconstruction_metrics(model, x, batch_size=37)["nmse"] == pytest.approx(float(nmse), rel=1e-5)
    assert m["explained_variance"] == pytest.approx(1 - m["nmse"], abs=0.05)
    assert 0 < m["l0"] <= sae.k
    density = latent_density(sae, x)
    assert density.shape == (sae.n_latents,)
    assert m["dead_fraction"] == pytest.approx(float((density == 0).float().mean()))
    assert m["dense_fraction"] == pytest.approx(float((density > 0.1).float().mean()))
    assert float(density.sum()) == pytest.approx(m["l0"], rel=1e-4)
    counts, edges = density_histogram(density, bins=10)
    assert int(counts.sum()) == int((density > 0).sum()) and len(edges) == 11


def test_identity_splice_changes_nothing_and_exclusions_stay_clean(lm, held):
    ids = held.ids[:2]
    clean, keep, _ = splice(lm, ids, LAYER, "resid_post")
    same, _, _ = splice(lm, ids, LAYER, "resid_post", lambda x: x, keep)
    assert torch.allclose(clean, same, atol=1e-4)
    zeroed, _, _ = splice(lm, ids, LAYER, "resid_post", torch.zeros_like, keep)
    assert not keep[:, 0].any()
    # position 0 is excluded, so its logits (which see only position 0) stay clean
    assert torch.allclose(clean[:, 0], zeroed[:, 0], atol=1e-4)
    assert not torch.allclose(clean[:, 1:], zeroed[:, 1:], atol=1e-2)


def test_a_splice_from_the_clean_activations_skips_the_blocks_before_and_gives_the_same_logits(lm, held):
    """Given a splice's clean activations, a later splice of the same contexts at resid_post starts
    from them: block 0 does not run (its MLP is never called) and the logits are the full forward's,
    bit for bit. Inside a block (mlp_out) there is no such start, and the forward runs whole."""
    ids = held.ids[:2]

    def reconstruct(x):
        return 0.9 * x

    calls = []
    handle = lm.layers[0].mlp.register_forward_hook(lambda *_: calls.append(1))
    try:
        for site, block_0_runs in (("resid_post", False), ("mlp_out", True)):
            full = splice(lm, ids, LAYER, site, reconstruct)
            assert resumes(lm, ids, LAYER)  # checked once per model and layer, on one context
            calls.clear()
            again = splice(lm, ids, LAYER, site, reconstruct, full.keep, full.acts)
            assert bool(calls) == block_0_runs, site
            assert torch.equal(again.logits, full.logits) and torch.equal(again.acts, full.acts), site
    finally:
        handle.remove()


def test_zero_reconstruction_equals_zero_ablation(lm, held):
    """A real SAE whose reconstruction is exactly 0 on the raw scale scores as zero-ablation."""
    norm = Normalizer.fit(held.acts[held.keep])
    zero = TopKSAE(lm.d_model, 16, 2, normalizer=norm)
    with torch.no_grad():
        zero.W_dec.zero_()
        zero.b_pre.copy_(-norm.mean / norm.scale)  # b_pre on the normalised scale is 0 raw: decode() = 0
    m = downstream_loss(zero, lm, held.ids[:2], LAYER, progress=False)
    # equal up to float rounding of (b_pre * scale + mean), about 1e-6 per coordinate
    assert m["ce_sae"] == pytest.approx(m["ce_zero"], rel=1e-3)
    assert m["loss_recovered"] == pytest.approx(0.0, abs=1e-3)
    assert m["ce_zero"] > m["ce_clean"] + 1
    assert m["kl"] > 0.5
    # each context's delta CE per scored token; weighted by its scored tokens they give delta_ce
    by_context = m["delta_ce_by_context"]
    assert len(by_context) == 2 and all(d > 1 for d in by_context)
    ids = held.ids[:2]
    keep = splice(lm, ids, LAYER, "resid_post").keep
    counts = scored_positions(ids, keep, lm.special_ids).sum(-1).tolist()
    assert sum(d * c for d, c in zip(by_context, counts)) / sum(counts) == pytest.approx(m["delta_ce"], rel=1e-5)


def counted_splices(monkeypatch, module) -> list:
    """Count the LM forward passes ``module`` runs: its ``splice`` is wrapped, and the returned list
    grows by one per call."""
    forwards = []

    def counted(*args, **kwargs):
        forwards.append(1)
        return splice(*args, **kwargs)

    monkeypatch.setattr(module, "splice", counted)
    return forwards


def test_the_ablations_losses_are_computed_once_per_normaliser_and_contexts(sae, lm, held, monkeypatch, tmp_path):
    """A second SAE with the same normaliser, scored on the same contexts, runs the LM twice per batch
    (clean and spliced), not four times, and gets the zero- and mean-ablation losses of the first."""
    import saelib.evals.downstream as downstream

    monkeypatch.setenv("SAELIB_HOME", str(tmp_path))
    forwards = counted_splices(monkeypatch, downstream)
    ids = held.ids[:3]
    first = downstream_loss(sae, lm, ids, LAYER, batch_size=2, progress=False)
    assert len(forwards) == 2 * 4 and len(list((tmp_path / "downstream").iterdir())) == 1
    forwards.clear()
    again = downstream_loss(sae, lm, ids, LAYER, batch_size=2, progress=False)
    assert len(forwards) == 2 * 2 and again == first
    other = TopKSAE(lm.d_model, 16, 2, normalizer=Normalizer.fit(held.acts[held.keep][::2]))  # another mean
    forwards.clear()
    third = downstream_loss(other, lm, ids, LAYER, batch_size=2, progress=False)
    assert len(forwards) == 2 * 4 and third["ce_mean"] != first["ce_mean"] and third["ce_zero"] == first["ce_zero"]


def test_the_channel_baseline_of_ablation_sparsity_is_computed_once_per_normaliser(sae, lm, held, monkeypatch, tmp_path):
    """A second SAE with the same normaliser runs the LM for its own latents only, and gets the first's
    baseline; another normaliser's mean sets other channels' values, so its baseline runs again."""
    import saelib.evals.ablation as ablation

    monkeypatch.setenv("SAELIB_HOME", str(tmp_path))
    forwards = counted_splices(monkeypatch, ablation)
    first = ablation_sparsity(sae, lm, held, sample=2, progress=False)
    assert len(forwards) == 2 * 2 and len(list((tmp_path / "ablation").iterdir())) == 1
    forwards.clear()
    assert ablation_sparsity(sae, lm, held, sample=2, progress=False) == first and len(forwards) == 2
    other = TopKSAE(lm.d_model, 16, 2, normalizer=Normalizer.fit(held.acts[held.keep][::2]))  # another mean
    forwards.clear()
    third = ablation_sparsity(other, lm, held, sample=2, progress=False)
    assert len(forwards) == 2 * 2 and third["ablation_sparsity_baseline"] != first["ablation_sparsity_baseline"]


def test_probe_builders_give_20_tasks_with_both_labels(lm):
    tasks, skipped = probes.available_tasks()
    assert len(tasks) >= 20, f"only {len(tasks)} probe tasks available; missing sources: {skipped}"
    ids, tags = probes.probe_contexts(lm.tokenizer, 64, per_source=64)
    tokens = probes.token_strings(lm.tokenizer, ids)
    keep = torch.ones(ids.shape, dtype=torch.bool)
    both = [t.name for t in tasks if all(m.any() for m in probes.task_labels(t, tags, tokens, keep))]
    assert len(both) >= 20, both


def test_the_probes_of_an_sae_read_no_document_it_trained_on(lm):
    """An SAE trained on ``mix`` (every probe text) is probed on the validation split of each source;
    one trained on Wikipedia on Wikipedia's validation split and every document of the others."""
    from saelib.data import split_documents
    from saelib.evals.heldout import probe_held_out

    on_mix = TopKSAE(576, 64, 4, metadata={**META, "corpus": "mix", "val_fraction": 0.05})
    assert probe_held_out(on_mix) == dict.fromkeys(probe_sources.TEXT_SOURCES, 0.05)
    assert probe_held_out(TopKSAE(576, 64, 4, metadata={**META, "corpus": "wikipedia"})) == {"wikipedia": 0.1}
    assert probe_held_out(TopKSAE(576, 64, 4, metadata={**META, "corpus": "notes.txt"})) == {}
    loaded, _ = probes.available_sources()
    ids, tags = probes.probe_contexts(lm.tokenizer, 64, per_source=64, held_out=probe_held_out(on_mix))
    for name in ("wikipedia", "austen", "fortunes"):
        if name not in loaded:
            continue
        texts = [text for text, _ in loaded[name]]
        starts = lambda docs: {tuple(lm.tokenizer(d, add_special_tokens=False)["input_ids"][:64]) for d in docs}  # noqa: E731
        validation = starts(split_documents(texts, "validation", 0.05))
        used = [tuple(row) for row, tag in zip(ids.tolist(), tags) if tag["source"] == name]
        assert used and all(u in validation for u in used), name
        assert not set(used) <= starts(split_documents(texts, "train", 0.05)), name


def test_missing_source_skips_its_tasks(monkeypatch):
    def gone():
        raise probe_sources.SourceUnavailable("install it")

    monkeypatch.setitem(probe_sources.TEXT_SOURCES, "austen", gone)
    tasks, skipped = probes.available_tasks()
    assert "wikipedia_vs_austen" in skipped and skipped["wikipedia_vs_austen"] == "install it"
    assert "digit" in {t.name for t in tasks}


def test_austens_novels_are_parsed_once_then_read_from_the_kept_json(tmp_path, monkeypatch):
    import sys

    from saelib import texts

    monkeypatch.setenv("SAELIB_HOME", str(tmp_path))
    texts.austen.cache_clear()
    parsed = texts.austen()
    kept, = (tmp_path / "texts").glob("*.json")
    assert {tags["book"] for _, tags in parsed} == {"emma", "mansfieldpark", "northangerabbey", "persuasion",
                                                    "prideprejudice", "sensesensibility"}
    texts.austen.cache_clear()
    monkeypatch.setitem(sys.modules, "rdata", None)  # the R data can no longer be parsed: only the JSON serves
    assert texts.austen() == parsed
    kept.write_text('[["a chunk", "emma"], 3]')  # not the documents' shape: parsed again, when rdata is there
    texts.austen.cache_clear()
    with pytest.raises(probe_sources.SourceUnavailable, match="pip install rdata"):
        texts.austen()
    monkeypatch.delitem(sys.modules, "rdata")
    texts.austen.cache_clear()
    assert texts.austen() == parsed and json.loads(kept.read_text())[0] == [parsed[0][0], parsed[0][1]["book"]]
    chunk = texts._paragraphs

    def longer_chunks(text, min_chars=1600):  # another chunking: the texts kept for the old one are not served
        return chunk(text, min_chars)

    monkeypatch.setattr(texts, "_paragraphs", longer_chunks)
    texts.austen.cache_clear()
    assert len(texts.austen()) < len(parsed) and len(list((tmp_path / "texts").glob("*.json"))) == 2
    texts.austen.cache_clear()


def test_best_single_feature_finds_the_informative_column():
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(400, generator=g) > 0.5).float()
    x = torch.randn(400, 50, generator=g)
    x[:, 17] += 4 * y
    ce, col = probes.best_single_feature(x[:200], y[:200], x[200:], y[200:])
    assert col == 17 and ce < 0.2


def test_n2g_is_exact_for_a_latent_that_detects_one_token(held):
    """A 2-latent TopK SAE (k=1) whose latent 0 fires exactly on one token id, found from real activations."""
    norm = Normalizer.fit(held.acts[held.keep])
    x = norm.apply(held.acts)[held.keep]
    ids = held.ids[held.keep]
    token = int(ids.bincount().argmax())
    target = (ids == token).float() * 2 - 1
    design = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    w = torch.linalg.lstsq(design, target.double()[:, None]).solution[:-1, 0].float()
    proj = x @ w
    low, high = float(proj[ids != token].max()), float(proj[ids == token].min())
    assert low < high, "the token is not linearly separable at this layer"
    sae = TopKSAE(x.shape[1], 2, 1, normalizer=norm)
    with torch.no_grad():
        sae.b_pre.zero_()
        sae.W_enc.zero_()
        sae.W_enc[0] = w
        sae.b_enc.copy_(torch.tensor([-(low + high) / 2, 0.0]))  # latent 1 stays at 0: never fires
    values, indices = encode(sae, held.acts)
    fires = ((values > 0) & (indices == 0)).any(-1) & held.keep
    assert torch.equal(fires, (held.ids == token) & held.keep)
    m = n2g(values, indices, held.ids, held.keep, sample=4)
    assert m == {"n2g_precision": 1.0, "n2g_recall": 1.0, "n2g_latents": 1, "n2g_precision_ci": 0.0, "n2g_recall_ci": 0.0}


def _n2g_by_scanning(ids, acts, keep, top=16, max_n=4, min_precision=0.5):
    """N2G of one latent as its definition reads: each n-gram found by scanning the text for it."""
    half = len(ids) // 2

    def ends(part, pattern):
        match = part == pattern[-1]
        for back, token in enumerate(reversed(pattern[:-1]), start=1):
            match &= torch.cat([torch.zeros_like(match[:, :back]), part[:, :-back] == token], 1)
        return match

    fires = (acts > 0) & keep
    explained = []
    score = acts[:half].masked_fill(~fires[:half], 0).flatten()
    for flat in score.topk(min(top, int(fires[:half].sum()))).indices.tolist():
        c, t = divmod(flat, ids.shape[1])
        for n in range(1, min(max_n, t + 1) + 1):
            pattern = tuple(ids[c, t - n + 1:t + 1].tolist())
            if pattern in explained:
                break
            if fires[:half][ends(ids[:half], pattern) & keep[:half]].float().mean() >= min_precision:
                explained.append(pattern)
                break
    predicted = torch.zeros_like(keep[half:])
    for pattern in explained:
        predicted |= ends(ids[half:], pattern)
    predicted &= keep[half:]
    hits = int((predicted & fires[half:]).sum())
    return (explained, hits / int(predicted.sum()) if predicted.any() else math.nan,
            hits / int(fires[half:].sum()) if fires[half:].any() else math.nan)


def test_n2g_of_every_latent_at_once_is_what_scanning_the_text_per_latent_gives(sae, held):
    """The n-gram ids (all latents in one pass) against the definition, latent by latent: on the
    real code of held-out text, and on a small text with excluded tokens, repeated n-grams and a
    latent that fires only in the second half."""
    values, indices = encode(sae, held.acts)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 3, (6, 5), generator=g)
    acts = torch.rand(6, 5, 3, generator=g) * (torch.rand(6, 5, 3, generator=g) > 0.5)
    acts[:3, :, 2] = 0  # latent 2 never fires in the first half
    small = (ids, torch.rand(6, 5, generator=g) > 0.2, acts.topk(2).values, acts.topk(2).indices)
    for ids, keep, values, indices in ((held.ids, held.keep, values, indices), small):
        code = firing(values, indices)
        latents = sorted(set(code[1].tolist()))
        for options in ({}, {"top": 3, "max_n": 2, "min_precision": 0.8}):
            found, precision, recall = explain_and_score(ids, keep, *code, latents, **options)
            for i, latent in enumerate(latents):
                acts = (values * (indices == latent)).sum(-1)
                expected = _n2g_by_scanning(ids, acts, keep, **options)
                assert found[i] == expected[0], latent
                assert [precision[i].item(), recall[i].item()] == pytest.approx(expected[1:], rel=0, abs=0, nan_ok=True)


def test_ablation_sparsity_in_unit_interval(sae, lm, held):
    m = ablation_sparsity(sae, lm, held, sample=2, progress=False)
    assert 0 < m["ablation_sparsity"] <= 1 and 0 < m["ablation_sparsity_baseline"] <= 1
    assert m["ablation_latents"] == 2


def test_effect_sparsity_subtracts_each_positions_median_change():
    """A shift of every logit at a position moves no probability: it is no effect, and it does not
    make a sparse effect look dense (without the median it would score 0.79 here)."""
    from saelib.evals.ablation import effect_sparsity

    T, V = 8, 1000
    base = torch.randint(-8, 8, (T, V), generator=torch.Generator().manual_seed(0)).float()  # exact sums below
    spike = torch.zeros(T, V)
    spike[2, :5] = 3.0
    shift = 0.25 * torch.arange(1, T + 1)[:, None]  # another constant at each position
    assert math.isnan(effect_sparsity(base, base + shift))
    assert effect_sparsity(base, base + spike + shift) == pytest.approx(effect_sparsity(base, base + spike), rel=1e-9)
    assert effect_sparsity(base, base + spike) == pytest.approx(5 / (T * V), rel=1e-9)


def test_ablation_removes_one_active_latent_at_one_token(sae, lm, held, monkeypatch, tmp_path):
    """As in the paper, each ablation removes one latent at one token where it is active (its
    activation times its decoder row, on the raw scale), and each baseline sets one channel to its
    mean at one kept token; the effect is scored from that token on."""
    import saelib.evals.ablation as ablation

    monkeypatch.setenv("SAELIB_HOME", str(tmp_path))
    calls, sparsities = [], ablation._sparsities
    monkeypatch.setattr(ablation, "_sparsities", lambda *args: calls.append(args[2:4]) or sparsities(*args))
    m = ablation_sparsity(sae, lm, held, sample=3, progress=False)
    (contexts, latents), (channel_contexts, channels) = calls
    assert m["ablation_latents"] == len(contexts) == 3
    values, indices = encode(sae, held.acts)
    for c, delta in zip(contexts, latents):
        (t,) = delta.any(-1).nonzero().flatten().tolist()  # one position
        assert held.keep[c, t]
        direction = torch.nn.functional.normalize(delta[t], dim=0)
        latent = int((sae.W_dec.detach() @ direction).argmax())
        (slot,) = (indices[c, t] == latent).nonzero().flatten().tolist()  # active there
        assert float(delta[t].norm()) == pytest.approx(float(values[c, t, slot]) * sae.normalizer.scale, rel=1e-5)
    for c, delta in zip(channel_contexts, channels):
        (t, ch) = (delta != 0).nonzero().flatten().tolist()  # one channel at one token
        assert held.keep[c, t] and float(delta[t, ch]) == pytest.approx(float(held.acts[c, t, ch] - sae.normalizer.mean[ch]))



def test_token_probes_choose_and_score_on_disjoint_contexts():
    """A token task's halves come from disjoint contexts, each balanced; a context task's from one
    pool of contexts; too few examples (or none of a class in one half) skip the task."""
    from saelib.evals.probes import _balanced_split

    g = torch.Generator().manual_seed(0)
    pos = torch.rand(40, 16, generator=g) < 0.2
    neg = ~pos
    train, y_tr, val, y_va = _balanced_split(pos, neg, 1000, 32, g)
    assert not set((train // 16).tolist()) & set((val // 16).tolist())
    for idx, y in ((train, y_tr), (val, y_va)):
        assert torch.equal(pos.flatten()[idx], y.bool()) and y.sum() == len(y) / 2
    capped = _balanced_split(pos, neg, 20, 8, g)
    assert len(capped[1]) == len(capped[3]) == 20  # 10 of each class per half
    one_context = (torch.arange(40) == 0)[:, None].expand(40, 16)  # 16 positives, all in context 0
    assert _balanced_split(one_context, ~one_context, 1000, 2, g) is None  # none in the scoring half
    contexts = torch.arange(100) % 3 == 0
    train, y_tr, val, y_va = _balanced_split(contexts, ~contexts, 1000, 32, g)
    assert len(y_tr) == len(y_va) == 2 * 17 and not set(train.tolist()) & set(val.tolist())  # 34 positives
    assert _balanced_split(contexts, ~contexts, 1000, 40, g) is None


def test_probe_tasks_with_fewer_than_32_examples_of_a_class_are_skipped(sae, lm):
    """A latent chosen on a handful of examples does not hold up on the other half: such tasks are left
    out, with the reason. With 12 contexts per source every context task has 12 positives."""
    rows, skipped = probes.probe_results(sae, lm, 12, per_source=12, progress=False)
    assert rows and all(r["examples"] >= 2 * 32 for r in rows)
    context_tasks = {t.name for t in probes.TASKS if t.kind == "context"}
    assert context_tasks and context_tasks <= set(skipped)
    assert all("fewer than 32 examples" in skipped[name] for name in context_tasks)


def test_evaluate_reports_every_metric(sae, lm):
    report = evaluate(sae, lm, "ci", progress=False, eval_tokens=1024, downstream_contexts=2, probe_per_source=12,
                      n2g_latents=8, ablation_latents=2)
    required = ("nmse explained_variance l0 dead_fraction dense_fraction delta_ce kl loss_recovered probe_loss "
                "probe_loss_baseline n2g_precision n2g_recall ablation_sparsity ablation_sparsity_baseline eval_tokens")
    for key in required.split():
        assert isinstance(report[key], (int, float)) and math.isfinite(report[key]), (key, report[key])
    assert report["delta_ce"] > 0 and 0 < report["loss_recovered"] <= 1
    assert report["probe_tasks"] >= 10
    by_task = report["probe_loss_by_task"]  # what a task-by-task comparison of two SAEs reads
    assert len(by_task) == report["probe_tasks"] and sum(by_task.values()) / len(by_task) == pytest.approx(report["probe_loss"])
    assert report["eval_preset"] == "ci" and report["downstream_contexts"] == 2 and report["probe_per_source"] == 12
    with pytest.raises(ValueError, match="Unknown eval option"):
        evaluate(sae, lm, "ci", eval_token=5)


def test_an_sae_off_the_cpu_is_refused_before_any_metric(sae, lm):
    import copy

    elsewhere = copy.deepcopy(sae).to("meta")  # a device other than the CPU, as a GPU would be
    with pytest.raises(ValueError, match=r"on the CPU to evaluate an SAE, but the SAE is on meta; pass an LM loaded on "
                                         r"the CPU \(load_lm\(name\), its default\) and sae.cpu\(\)\.$"):
        evaluate(elsewhere, lm, "ci", progress=False)


def test_an_lm_other_than_the_one_the_sae_was_trained_on_is_refused_naming_both(sae, lm):
    import copy

    from saelib.sae import TopKSAE

    other = copy.deepcopy(sae)
    other.metadata = {**sae.metadata, "model": "HuggingFaceTB/SmolLM2-360M"}
    with pytest.raises(ValueError, match=r"trained on HuggingFaceTB/SmolLM2-360M's activations but the LM given is "
                                         r"smollm2-135m; pass load_lm\('HuggingFaceTB/SmolLM2-360M'\)"):
        evaluate(other, lm, "ci", progress=False)
    narrow = TopKSAE(64, 256, 8)
    narrow.metadata = {"layer": LAYER}
    with pytest.raises(ValueError, match=r"The SAE takes d_in=64 but smollm2-135m's activations have 576"):
        evaluate(narrow, lm, "ci", progress=False)


@pytest.mark.parametrize("option, value, needle", [
    ("eval_tokens", 64, "eval_tokens must be an integer of at least 128 (two contexts of 64 tokens"),
    ("eval_tokens", 0, "eval_tokens must be an integer of at least 128"),
    ("downstream_contexts", 0, "downstream_contexts must be an integer of at least 1, got 0."),
    ("n2g_latents", 1.5, "n2g_latents must be an integer of at least 0, got 1.5."),
    ("ablation_latents", -1, "ablation_latents must be an integer of at least 0, got -1."),
])
def test_an_eval_option_that_gives_no_metric_is_refused_before_any_work(sae, lm, monkeypatch, option, value, needle):
    import saelib.evals as evals

    monkeypatch.setattr(evals, "held_out", lambda *args, **kwargs: pytest.fail("the held-out text was read"))
    with pytest.raises(ValueError) as error:
        evaluate(sae, lm, "ci", progress=False, **{option: value})
    assert needle in str(error.value) and str(error.value).count(". ") == 0


def test_ablation_sparsity_of_no_latents_is_nan(sae, lm, held):
    report = ablation_sparsity(sae, lm, held, sample=0, progress=False)
    assert report["ablation_latents"] == 0
    assert math.isnan(report["ablation_sparsity"]) and math.isnan(report["ablation_sparsity_baseline"])


def test_latent_density_counts_tokens_whatever_the_leading_shape(sae, held):
    x = held.acts[:4]  # (contexts, positions, d)
    density = latent_density(sae, x)
    assert torch.allclose(density, latent_density(sae, x.reshape(-1, x.shape[-1])))
    assert 0 < float(density.max()) <= 1 and float(density.sum()) <= sae.k + 1e-4  # at most k latents a token
