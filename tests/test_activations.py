"""The activation pipeline on the real SmolLM2: hooks, early stop, exclusion, cache, shuffling."""

import json
import re
import shutil
import threading
import time

import pytest
import torch
from safetensors.torch import save_file

from saelib import activations as A
from saelib import data, texts
from saelib.normalize import Normalizer


def test_hooked_activations_equal_hidden_states(lm, val_contexts):
    ids = val_contexts[:4]
    (_, acts), = list(A.extract(lm, ids, [3, 12], progress=False, dtype="float32"))  # as the model's own forward
    with torch.no_grad():
        hidden = lm.model(ids, output_hidden_states=True).hidden_states
    # hidden_states[i + 1] is the output of decoder layer i
    torch.testing.assert_close(acts[3], hidden[4], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(acts[12], hidden[13], rtol=1e-5, atol=1e-4)


def test_sub_module_sites_have_the_residual_width(lm, val_contexts):
    for site in ("attn_out", "mlp_out"):
        (_, acts), = list(A.extract(lm, val_contexts[:2], [5], site, progress=False))
        assert acts[5].shape == (2, 64, lm.d_model)
    # attention + MLP outputs add up to the change in the residual stream across the block
    (_, a), = list(A.extract(lm, val_contexts[:2], [5], "attn_out", progress=False))
    (_, m), = list(A.extract(lm, val_contexts[:2], [5], "mlp_out", progress=False))
    (_, r4), = list(A.extract(lm, val_contexts[:2], [4], progress=False))
    (_, r5), = list(A.extract(lm, val_contexts[:2], [5], progress=False))
    torch.testing.assert_close(r4[4] + a[5] + m[5], r5[5], rtol=1e-4, atol=1e-3)


def test_early_stop_skips_later_layers(lm, val_contexts):
    calls = {"later": 0, "hooked": 0}
    count = lambda name: lambda *_: calls.__setitem__(name, calls[name] + 1)  # noqa: E731
    hooks = [lm.layers[13].register_forward_pre_hook(count("later")),
             lm.model.lm_head.register_forward_pre_hook(count("later")),
             lm.layers[12].register_forward_pre_hook(count("hooked"))]
    try:
        list(A.extract(lm, val_contexts[:2], [12], progress=False))
        assert calls == {"later": 0, "hooked": 1}
        list(A.extract(lm, val_contexts[:2], [12], progress=False, stop_early=False))
        assert calls == {"later": 2, "hooked": 2}
    finally:
        for h in hooks:
            h.remove()


def test_exclusion_drops_first_position_separators_and_outliers(lm):
    docs = data.split_documents(data.load_documents(), "validation")[:40]
    ctx = data.pack(docs, lm.tokenizer, 64)
    (_, acts), = list(A.extract(lm, ctx[:16], [12], progress=False))
    ids = ctx[:16]
    keep, dropped = A.keep_mask(ids, acts[12], lm.special_ids)
    assert not keep[:, 0].any()
    assert not keep[ids == lm.eos_id].any()
    assert dropped["first_position"] == 16 and dropped["special_token"] == int((ids[:, 1:] == lm.eos_id).sum())
    norms = acts[12].norm(dim=-1)
    assert norms[keep].max() <= 10 * norms[keep].median()
    # the separators are what wrecks the normalisation scale (OFFLINE.md): kept tokens have a far smaller one
    assert Normalizer.fit(acts[12][keep]).scale < 0.5 * Normalizer.fit(acts[12].flatten(0, 1)).scale
    keep_all, none = A.keep_mask(ids, acts[12], lm.special_ids, A.Exclusion(False, False, None))
    assert keep_all.all() and sum(none.values()) == 0


def _key(tmp_tag, layer=12):
    return A.CacheKey("smollm2-135m", layer, "resid_post", f"test-{tmp_tag}", "validation", 64, None)


def test_cache_round_trip_and_interrupted_build_resumes(lm, val_contexts, tmp_path, monkeypatch):
    monkeypatch.setenv("SAELIB_HOME", str(tmp_path))
    ctx = val_contexts[:12]
    key_of = lambda L: _key("resume", L)  # noqa: E731
    partial = A.build_cache(lm, ctx, [6, 12], "resid_post", key_of, shard_contexts=4, batch_size=4,
                            stop_after_shards=1, progress=False)
    assert not partial[12].complete and len(partial[12].manifest["shards"]) == 1
    # resumed with shards of another size: it goes on from where the written shards end
    resumed = A.build_cache(lm, ctx, [6, 12], "resid_post", key_of, shard_contexts=3, batch_size=4, progress=False)
    assert [s["contexts"] for s in resumed[12].manifest["shards"]] == [[0, 4], [4, 7], [7, 10], [10, 12]]
    fresh = A.build_cache(lm, ctx, [6, 12], "resid_post", lambda L: _key("fresh", L), shard_contexts=4,
                          batch_size=4, progress=False)
    other = A.build_cache(lm, ctx[:8], [12], "resid_post", lambda L: _key("other", L), shard_contexts=4, batch_size=4,
                          stop_after_shards=1, progress=False)[12]
    with pytest.raises(ValueError, match=rf"The unfinished activation cache at {other.folder} was begun on other contexts"):
        A.build_cache(lm, ctx[4:12], [12], "resid_post", lambda L: _key("other", L), shard_contexts=4, batch_size=4,
                      progress=False)
    # the contexts the shards index are checked too: other token ids there are an error, not a silent read
    from safetensors.torch import save_file

    assert fresh[12].manifest["contexts_sha256"]
    save_file({"contexts": ctx.flip(0).contiguous()}, str(fresh[12].folder / "contexts.safetensors"))
    with pytest.raises(ValueError, match=r"contexts.safetensors was edited or damaged .* delete .* and extract again"):
        A.ActivationCache(fresh[12].folder).contexts()
    for layer in (6, 12):
        assert resumed[layer].complete
        rows = resumed[layer].all_rows()
        torch.testing.assert_close(rows, fresh[layer].all_rows(), rtol=0, atol=0)
        index = torch.cat([resumed[layer].shard(i)["index"] for i in range(len(resumed[layer].manifest["shards"]))])
        assert len(index) == len(set(index.tolist())) == resumed[layer].n_rows  # no duplicate or missing rows
        # the cached rows are exactly the extracted activations at the kept positions
        (_, acts), = list(A.extract(lm, ctx, [layer], batch_size=12, progress=False, dtype=key_of(layer).lm_dtype))
        keep, _ = A.keep_mask(ctx, acts[layer], lm.special_ids)
        torch.testing.assert_close(rows, acts[layer][keep], rtol=1e-5, atol=1e-4)
        assert torch.equal(index, keep.flatten().nonzero().squeeze(1))


def test_a_cache_asked_for_twice_at_once_is_extracted_once(lm, val_contexts, tmp_path, monkeypatch, capsys):
    """A second builder of a cache that is being built (another notebook, process or thread) waits for
    the first, then finds it complete: the LM runs over each shard once, and both get the same rows."""
    monkeypatch.setenv("SAELIB_HOME", str(tmp_path))
    extracting, forwards, real = threading.Event(), [], A.extract

    def extract(*args, **kwargs):
        forwards.append(1)
        if not extracting.is_set():
            extracting.set()
            time.sleep(0.2)  # the second builder arrives while the first holds the cache
        return real(*args, **kwargs)

    monkeypatch.setattr(A, "extract", extract)
    build = lambda: A.build_cache(lm, val_contexts[:8], [12], "resid_post", lambda L: _key("twice", L),  # noqa: E731
                                  shard_contexts=4, batch_size=4, progress=False)[12]
    built = {}
    first = threading.Thread(target=lambda: built.setdefault("first", build()))
    first.start()
    assert extracting.wait(60)
    second = build()
    first.join()
    assert len(forwards) == 2  # 8 contexts in shards of 4, extracted by the first builder alone
    assert "Waiting for another process to finish building the activation cache" in capsys.readouterr().err
    assert second.complete and torch.equal(second.all_rows(), built["first"].all_rows())


def test_cache_detects_key_mismatch_and_corruption(lm, val_contexts, tmp_path, monkeypatch):
    monkeypatch.setenv("SAELIB_HOME", str(tmp_path))
    cache = A.build_cache(lm, val_contexts[:4], [12], "resid_post", lambda L: _key("bad", L), shard_contexts=2,
                          progress=False)[12]
    with pytest.raises(ValueError, match="another configuration"):
        A.ActivationCache(cache.folder, _key("other"))
    save_file({"acts": torch.zeros(3, 576), "index": torch.zeros(3, dtype=torch.long)}, cache.folder / "shard_00001.safetensors")
    with pytest.raises(ValueError, match="corrupt"):
        A.ActivationCache(cache.folder).verify()
    (cache.folder / "shard_00000.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        A.ActivationCache(cache.folder).shard(0)


def test_cached_source_shuffles_across_contexts_and_resumes(lm, val_contexts, tmp_path, monkeypatch):
    monkeypatch.setenv("SAELIB_HOME", str(tmp_path))
    cache = A.build_cache(lm, val_contexts, [12], "resid_post", lambda L: _key("src", L), shard_contexts=4,
                          progress=False)[12]
    src = A.CachedSource(cache, memory_gb=cache.n_rows * 576 * 4 / 3 / 2**30)  # forces several groups
    epoch = list(src.batches(64, seed=0, epoch=0))
    assert torch.equal(torch.cat(epoch), torch.cat(list(src.batches(64, seed=0, epoch=0))))
    assert not torch.equal(torch.cat(epoch), torch.cat(list(src.batches(64, seed=0, epoch=1))))
    for a, b in zip(epoch[5:], src.batches(64, seed=0, epoch=0, start=5)):
        assert torch.equal(a, b)
    # with the whole cache in one group, every row appears once per epoch and a batch mixes many contexts
    src = A.CachedSource(cache)
    rows = cache.all_rows()
    normed = src.normalizer.apply(rows)
    first = next(src.batches(64, seed=0, epoch=0))
    matches = torch.cdist(first, normed).argmin(1)
    assert len(set(matches.tolist())) == 64
    index = torch.cat([cache.shard(i)["index"] for i in range(len(cache.manifest["shards"]))])
    assert len(set((index[matches] // 64).tolist())) >= 10
    # normalised scale: unit mean squared norm over the whole cache
    assert abs(normed.pow(2).sum(-1).mean().item() - 1) < 1e-3


def test_fit_trains_on_a_cache_directly_with_its_normaliser(lm, val_contexts, tmp_path, monkeypatch):
    from saelib.train import fit

    monkeypatch.setenv("SAELIB_HOME", str(tmp_path))
    cache = A.build_cache(lm, val_contexts[:16], [12], "resid_post", lambda L: _key("fit", L), progress=False)[12]
    sae = fit(cache, 64, 4, tokens=40 * 256, batch_size=256, seed=0, progress=False)
    assert torch.equal(sae.normalizer.mean, cache.normalizer.mean) and sae.normalizer.scale == cache.normalizer.scale
    rows = cache.all_rows()  # raw activations in, raw reconstructions out
    with torch.no_grad():
        error = (sae.decode(sae.encode(rows)) - rows).pow(2).sum() / (rows - rows.mean(0)).pow(2).sum()
    assert float(error) < 0.8  # an untrained SAE is above 1


def test_a_cache_larger_than_the_memory_budget_is_read_ahead_in_the_background(lm, val_contexts, tmp_path, monkeypatch):
    monkeypatch.setenv("SAELIB_HOME", str(tmp_path))
    cache = A.build_cache(lm, val_contexts, [12], "resid_post", lambda L: _key("ahead", L), shard_contexts=4,
                          progress=False)[12]
    budget = cache.n_rows * 576 * 4 / 2**30 / 2  # half the cache: groups of a quarter, two resident at most
    src = A.CachedSource(cache, memory_gb=budget)
    assert src.group_rows <= cache.n_rows // 4 + max(s["rows"] for s in cache.manifest["shards"])
    readers = []
    read = src._read
    monkeypatch.setattr(src, "_read", lambda key: readers.append(threading.current_thread().name) or read(key))
    epochs = [torch.cat(list(src.batches(64, seed=0, epoch=e))) for e in (0, 1)]
    # only the very first group is read while the trainer waits; every later one, the next
    # epoch's first included, was read ahead in the background
    assert readers[0] == threading.current_thread().name and len(readers) >= 6
    assert all(name.startswith("saelib-read-ahead") for name in readers[1:])
    # the same batches as a source that reads every group when it gets to it
    serial = A.CachedSource(cache, memory_gb=budget, read_ahead=False)
    for e, got in enumerate(epochs):
        assert torch.equal(got, torch.cat(list(serial.batches(64, seed=0, epoch=e))))
    # every row once per epoch, less each group's last partial batch
    assert cache.n_rows - len(epochs[0]) < 64 * len(src._plan(0, 0)[1])
    assert len(torch.unique(epochs[0], dim=0)) == len(epochs[0])
    with pytest.raises(ValueError, match="memory_gb must be a positive number of GB, got 0"):
        A.CachedSource(cache, memory_gb=0)
    # a shard found corrupt by the background read is reported to the consumer, naming the file
    fresh = A.CachedSource(cache, memory_gb=budget)
    victim = cache.folder / cache.manifest["shards"][fresh._plan(0, 0)[1][1][0]]["file"]  # in the second group
    victim.write_bytes(victim.read_bytes()[:-8] + bytes(8))
    batches = fresh.batches(64, seed=0, epoch=0)
    next(batches)
    assert fresh._next[0] == tuple(sorted(fresh._plan(0, 0)[1][1]))
    with pytest.raises(ValueError, match=f"{victim.name} is corrupt"):
        list(batches)


def test_shuffle_buffer_mixes_contexts():
    # a stream of 40 "contexts", each a block of rows tagged with its context id
    blocks = [torch.full((64, 1), float(c)) for c in range(40)]
    out = list(A.shuffle(iter(blocks), batch_size=64, capacity=640, seed=0))
    assert len(out) == 40
    assert sorted(torch.cat(out).squeeze(1).tolist()) == sorted(torch.cat(blocks).squeeze(1).tolist())
    distinct = [len(set(b.squeeze(1).tolist())) for b in out]
    assert min(distinct) >= 4  # an unshuffled stream gives exactly 1 context per batch


def test_bad_input_errors(lm, val_contexts):
    with pytest.raises(ValueError, match=r"Layer 30 does not exist .* 30 layers"):
        list(A.extract(lm, val_contexts[:1], [30], progress=False))
    with pytest.raises(ValueError, match="Unknown site 'mlp'"):
        list(A.extract(lm, val_contexts[:1], [1], "mlp", progress=False))
    with pytest.raises(ValueError, match="exceeds"):
        list(A.extract(lm, torch.zeros(1, lm.max_context + 1, dtype=torch.long), [1], progress=False))
    with pytest.raises(ValueError, match="empty"):
        data.pack([], lm.tokenizer, 64)
    # a tokenizer without an end-of-text token separates documents with its begin token; one with neither is refused
    import copy

    tok = copy.deepcopy(lm.tokenizer)
    tok.eos_token, tok.bos_token = None, "<|im_start|>"
    assert data.separator(tok) == tok.convert_tokens_to_ids("<|im_start|>") != lm.eos_id
    assert (data.pack(["one document.", "another one."], tok, 4)[0] == data.separator(tok)).any()
    tok.bos_token = None
    with pytest.raises(ValueError, match="has neither an end-of-text nor a begin token to place between documents; pass separator_id"):
        data.pack(["one document."], tok, 4)
    # NaN activations are named with their batch: break a real weight, then restore it
    w = lm.layers[2].mlp.down_proj.weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w[0, 0] = float("nan")
        with pytest.raises(ValueError, match=r"NaN/Inf .* layer 5 .* contexts 0-1"):
            list(A.extract(lm, val_contexts[:2], [5], progress=False))
    finally:
        with torch.no_grad():
            w.copy_(saved)


def test_a_local_model_loads_without_shard_bars_and_leaves_download_bars_on():
    from transformers.utils import logging as transformers_logging

    from saelib.models import load_lm

    transformers_logging.enable_progress_bar()
    assert load_lm("smollm2-135m").n_layers == 30
    assert transformers_logging.is_progress_bar_enabled()  # a hub model loaded next shows its download


def test_a_local_corpus_file_leaves_the_download_bars_of_hub_corpora_on(tmp_path):
    import datasets

    datasets.enable_progress_bars()
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "hello there"}) + "\n")
    assert data.load_documents(str(tmp_path / "c.jsonl")) == ["hello there"]
    assert datasets.is_progress_bar_enabled()


def test_a_datasets_corpus_is_streamed_until_its_contexts_are_filled(tmp_path):
    """A datasets name (here a local dataset folder, read as a hub dataset is) with max_tokens reads
    its documents only until the contexts are filled: the second file, which a whole download reads,
    is damaged, and the streamed contexts never reach it."""
    from saelib.models import load_tokenizer

    docs = [f"Note {i}: the river {i % 7} rises in hill {i % 5} and meets the sea." for i in range(300)]
    (tmp_path / "dataset" / "data").mkdir(parents=True)
    (tmp_path / "dataset" / "data" / "train-00000-of-00002.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "dataset" / "data" / "train-00001-of-00002.jsonl").write_text("{damaged\n")
    tok, name = load_tokenizer("smollm2-135m"), str(tmp_path / "dataset")
    for split in ("train", "validation"):
        streamed = data.contexts(name, tok, split, ctx_len=16, max_tokens=16 * 20)
        assert torch.equal(streamed, data.pack(data.split_documents(docs, split), tok, 16, max_contexts=20))
    with pytest.raises(ValueError, match=rf"Cannot load corpus '{re.escape(name)}'"):
        data.contexts(name, tok, "train", ctx_len=16)  # all of it: the whole split, damaged file included
    # offline (as here) a hub name cannot be streamed: the whole split is asked of datasets' cache
    with pytest.raises(ValueError, match=r"Cannot load corpus 'no-such/corpus-xyz': it is not an embedded corpus"):
        data.contexts("no-such/corpus-xyz", tok, "train", ctx_len=16, max_tokens=16 * 20)


def test_bad_model_and_corpus_errors(tmp_path):
    from saelib.models import load_lm

    with pytest.raises(ValueError, match="Cannot load model 'no-such-model-xyz'"):
        load_lm("no-such-model-xyz")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty"):
        data.load_documents(str(empty))
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(ValueError, match="no 'text' field"):
        data.load_documents(str(tmp_path / "c.jsonl"))


def test_converting_the_embedded_model_parses_its_gguf_once_and_leaves_gguf_as_it_was(tmp_path):
    import gguf
    import numpy as np

    from saelib.models import _gguf_read_once

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.arange(8, dtype=np.float32).reshape(2, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    before = gguf.GGUFReader, gguf.get_tensor_name_map
    with _gguf_read_once():
        reader = gguf.GGUFReader(path)
        assert gguf.GGUFReader(path) is reader and reader.tensors[0].data.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is names
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == before
    assert gguf.GGUFReader(path) is not gguf.GGUFReader(path), "outside the block, each call parses the file"


def test_the_offline_mix_holds_every_packaged_text_interleaved_in_a_fixed_order():
    from saelib.evals.probe_sources import TEXT_SOURCES

    docs = data.load_documents("mix")
    wiki = data.load_documents("wikipedia")
    in_wiki = set(wiki)
    assert [d for d in docs if d in in_wiki] == wiki  # every Wikipedia lead, in its own order
    assert sum(map(len, docs)) > 3 * sum(map(len, wiki))  # about 4M tokens against 1M
    # interleaved: the first tenth of the text holds every part at about its share of the whole
    total, head, chars = sum(map(len, docs)), set(), 0
    for doc in docs:
        if chars > total / 10:
            break
        head.add(doc)
        chars += len(doc)
    parts = {"wikipedia": wiki, **{name: [t for t, _ in TEXT_SOURCES[name]()]
                                   for name in ("austen", "shakespeare", "milton", "fortunes")}}
    for name, part in parts.items():
        share_of_head = sum(len(d) for d in part if d in head) / chars
        assert share_of_head == pytest.approx(sum(map(len, part)) / total, abs=0.01), name
    assert data.load_documents("mix") == docs


def test_a_complete_cache_is_left_alone_when_built_again_with_another_layer(lm, val_contexts, tmp_path, monkeypatch):
    monkeypatch.setenv("SAELIB_HOME", str(tmp_path))
    ctx = val_contexts[:8]
    key_of = lambda L: _key("mixed", L)  # noqa: E731
    only_12 = A.build_cache(lm, ctx, [12], "resid_post", key_of, shard_contexts=4, batch_size=4, progress=False)
    rows = only_12[12].n_rows
    both = A.build_cache(lm, ctx, [6, 12], "resid_post", key_of, shard_contexts=4, batch_size=4, progress=False)
    assert both[6].complete and both[12].complete
    assert len(both[12].manifest["shards"]) == 2 and A.ActivationCache(both[12].folder).n_rows == rows
    assert both[6].n_rows == rows  # the same kept positions at layer 6


def test_a_local_corpus_is_cached_by_its_content_not_its_path(lm, tmp_path, monkeypatch):
    monkeypatch.setenv("SAELIB_HOME", str(tmp_path / "home"))
    corpus = tmp_path / "notes.txt"
    corpus.write_text("The cat sat on the mat and looked at the door for a while.\n\n"
                      "A second paragraph about rivers, bridges and the boats under them.\n")
    extract = lambda: A.cached_activations("smollm2-135m", 0, corpus=str(corpus), split="all", ctx_len=8,  # noqa: E731
                                           lm=lm, progress=False)
    before = extract()
    assert extract().folder == before.folder  # unchanged text: the cache is reused
    corpus.write_text(corpus.read_text().replace("cat", "dog"))
    after = extract()
    assert after.folder != before.folder and after.manifest["key"]["corpus"] == str(corpus)
    assert after.manifest["key"]["corpus_sha256"] == data.corpus_sha256(str(corpus)) != before.manifest["key"]["corpus_sha256"]
    assert not torch.equal(after.all_rows(), before.all_rows())
    assert data.corpus_sha256("wikipedia") is None


def test_a_local_corpus_replaced_with_its_time_stamp_kept_is_read_as_its_new_text(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("SAELIB_HOME", str(tmp_path / "home"))
    corpus = tmp_path / "notes.jsonl"
    corpus.write_text('{"text": "The cat sat on the mat."}\n')
    stamp = corpus.stat().st_mtime_ns
    assert data.load_documents(str(corpus)) == ["The cat sat on the mat."]
    corpus.write_text('{"text": "A dog ran by the river."}\n{"text": "Boats passed under the bridge."}\n')
    os.utime(corpus, ns=(stamp, stamp))  # as cp -p, rsync -t or tar leave it
    assert data.load_documents(str(corpus)) == ["A dog ran by the river.", "Boats passed under the bridge."]


def test_the_mix_is_cached_by_the_files_of_its_debian_texts_not_its_name(lm, tmp_path, monkeypatch):
    # Austen's novels and the fortunes come from Debian's packages, which a release may change
    key = lambda: A.cache_keys("smollm2-135m", "resid_post", "mix", "train", 64, 4096,  # noqa: E731
                               tokenizer=lm.tokenizer)(12)
    before = key()
    assert len(before.corpus_sha256) == 64 and key() == before
    fortunes = tmp_path / "fortunes"
    shutil.copytree(texts.FORTUNES_DIR, fortunes, symlinks=True)
    monkeypatch.setattr(texts, "FORTUNES_DIR", fortunes)
    assert key() == before  # the same files elsewhere: the same key
    science = fortunes / "science"
    science.write_bytes(science.read_bytes() + b"%\nA cookie the next release adds.\n")
    after = key()
    assert after.corpus_sha256 != before.corpus_sha256 and after.folder_name() != before.folder_name()
    science.unlink()
    assert key().corpus_sha256 not in (before.corpus_sha256, after.corpus_sha256)


def test_bf16_extraction_is_close_to_float32(lm, val_contexts):
    # bf16 matmuls are slow on a CPU without AMX/AVX512_BF16: two short contexts
    ids = val_contexts[:2]
    (_, fp32), = list(A.extract(lm, ids, [12], progress=False, dtype="float32"))
    (_, bf16), = list(A.extract(lm, ids, [12], progress=False, dtype="bfloat16"))
    keep, _ = A.keep_mask(ids, fp32[12], lm.special_ids)
    exact, approx = fp32[12][keep], bf16[12][keep]
    assert approx.dtype == torch.float32 and approx.shape == exact.shape
    error = (approx - exact).norm(dim=-1) / exact.norm(dim=-1)
    # bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2% per op), compounded over 13 blocks:
    # measured 0.6% per token (median), 5% at most, 0.85% over all kept tokens. Bounds: 10% per token,
    # 2% overall; above 0.01% overall, so the forward did run in bf16
    assert error.max() < 0.1, error.max()
    overall = ((approx - exact).norm() / exact.norm()).item()
    assert 1e-4 < overall < 0.02, overall


def test_a_run_chooses_and_records_the_dtype_of_its_extraction(tmp_path):
    from saelib import config
    from saelib.runs import train_run

    with pytest.raises(config.ConfigError, match="lm_dtype must be one of float32, bfloat16"):
        config.resolve("ci", lm_dtype="float16")
    cfg = config.resolve("ci", lm_dtype="float32", max_tokens=2048, n_latents=256, k=8, batch_size=512)
    sae = train_run(cfg, tmp_path / "run", progress=False)
    assert sae.metadata["lm_dtype"] == "float32"


def test_the_extraction_dtype_is_bf16_only_where_it_is_fast(monkeypatch):
    from saelib import kernels

    assert A.extraction_dtype("cpu") == ("bfloat16" if kernels.fast_bf16("cpu") else "float32")
    monkeypatch.setattr(A, "fast_bf16", lambda device="cpu": False)
    assert A.extraction_dtype("cpu") == "float32"
    monkeypatch.setattr(A, "fast_bf16", lambda device="cpu": True)
    assert A.extraction_dtype("cpu") == "bfloat16"
    monkeypatch.setattr(kernels, "cpu_info", lambda: {"flags": "fpu avx avx2 fma"})
    assert not kernels.fast_bf16("cpu")
    monkeypatch.setattr(kernels, "cpu_info", lambda: {"flags": "avx2 avx512f avx512_bf16"})
    assert kernels.fast_bf16("cpu")
    # the dtype is part of a cache's key; float32 keys keep the folders they had before it was recorded
    fp32, bf16 = _key("dtype"), A.CacheKey(**{**vars(_key("dtype")), "lm_dtype": "bfloat16"})
    assert "lm_dtype" not in fp32.to_dict() and bf16.to_dict()["lm_dtype"] == "bfloat16"
    assert fp32.folder_name() != bf16.folder_name()


def test_an_unknown_extraction_dtype_is_refused(lm, val_contexts):
    with pytest.raises(ValueError, match="Unknown extraction dtype 'float16'"):
        list(A.extract(lm, val_contexts[:1], [1], progress=False, dtype="float16"))
