"""Contexts follow the model's begin-of-sequence convention: a tiny, random Llama whose tokenizer
puts BOS in front of every text (as Gemma's and Llama's do) against the embedded SmolLM2, whose
tokenizer adds nothing."""

from dataclasses import asdict, replace

import pytest
import torch
import torch.nn.functional as F

from saelib import config, data
from saelib.activations import ActivationCache, CacheKey, cached_activations
from saelib.evals.downstream import downstream_loss, scored_positions, splice
from saelib.evals.heldout import trained_prepend_bos
from saelib.models import load_lm, load_tokenizer
from saelib.runs import train_run
from saelib.sae import TopKSAE

TEXT = ("The river rises in the hills above the town, runs north through a wide valley of farms "
        "and meets the sea at a small harbour.")
DOCS = [TEXT, "A second, shorter document follows it.", "And a third one closes the little corpus for good."]


@pytest.fixture(scope="module")
def bos_lm(tmp_path_factory):
    """A 2-layer Llama (hidden 64, random weights, seed 0) with SmolLM2's vocabulary, its tokenizer
    set to add BOS; saved and loaded as a local folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama-bos")
    load_tokenizer("smollm2-135m").save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, add_bos_token=True)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return load_lm(str(folder))


def test_contexts_start_with_bos_only_where_the_tokenizer_adds_it(bos_lm):
    tok, smol = bos_lm.tokenizer, load_tokenizer("smollm2-135m")
    assert data.tokenizer_adds_bos(tok) and not data.tokenizer_adds_bos(smol)

    packed = data.pack(DOCS, tok, ctx_len=16)
    assert (packed[:, 0] == tok.bos_token_id).all()
    # after the BOS, ctx_len - 1 tokens of the same stream the BOS-less packing cuts
    stream = data.pack(DOCS, tok, ctx_len=15, prepend_bos=False)
    assert torch.equal(packed[:, 1:], stream)

    plain = data.pack(DOCS, smol, ctx_len=16)
    assert torch.equal(plain, data.pack(DOCS, smol, ctx_len=16, prepend_bos=False))
    assert not (plain == smol.bos_token_id).any()


def test_clean_loss_is_that_of_a_plain_forward_of_the_text(bos_lm):
    """saelib's clean cross-entropy on a packed context equals the model's own on the tokenised text,
    over the same predictions: it holds only when the context starts with the BOS the model expects."""
    tok = bos_lm.tokenizer
    encoded = tok(TEXT, return_tensors="pt")
    n = encoded["input_ids"].shape[1]
    ids = data.pack([TEXT], tok, ctx_len=n)
    assert torch.equal(ids, encoded["input_ids"])

    sae = TopKSAE(64, 128, 4)
    saelib_ce = downstream_loss(sae, bos_lm, ids, 1, progress=False)
    keep = splice(bos_lm, ids, 1, "resid_post").keep
    scored = scored_positions(ids, keep, bos_lm.special_ids)
    assert not scored[0, 0] and int(scored.sum()) == saelib_ce["downstream_tokens"] >= n - 4  # the BOS's prediction is not scored
    with torch.no_grad():
        logits = bos_lm.model(**encoded).logits
    plain_ce = F.cross_entropy(logits[0, :-1], encoded["input_ids"][0, 1:], reduction="none")[scored[0]].mean()
    assert saelib_ce["ce_clean"] == pytest.approx(float(plain_ce), rel=1e-5)

    without_bos = data.pack([TEXT], tok, ctx_len=n, prepend_bos=False)
    assert downstream_loss(sae, bos_lm, without_bos, 1, progress=False)["ce_clean"] != pytest.approx(float(plain_ce), rel=1e-3)


def test_cache_keys_with_and_without_bos_never_mix(bos_lm, tmp_path, monkeypatch):
    key = CacheKey("smollm2-135m", 12, "resid_post", "wikipedia", "train", 64, None)
    with_bos = replace(key, prepend_bos=True)
    # without BOS (with the float32 forward, of a model named by its name), the key is recorded and hashed
    # as when it had no such fields
    assert key.to_dict() == {k: v for k, v in asdict(key).items() if k not in ("prepend_bos", "lm_dtype", "model_digest")}
    assert with_bos.to_dict() == {**key.to_dict(), "prepend_bos": True} and with_bos.folder_name() != key.folder_name()

    monkeypatch.setenv("SAELIB_HOME", str(tmp_path))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(DOCS * 8))
    cache = cached_activations(bos_lm.name, 1, corpus=str(corpus), split="all", ctx_len=16, lm=bos_lm, progress=False)
    assert cache.manifest["key"]["prepend_bos"] is True
    assert (cache.contexts()[:, 0] == bos_lm.tokenizer.bos_token_id).all()
    with pytest.raises(ValueError, match="prepend_bos"):
        ActivationCache(cache.folder, replace(CacheKey(**cache.manifest["key"]), prepend_bos=False))


def test_a_model_saved_again_into_its_folder_gets_caches_of_its_own(bos_lm, tmp_path, monkeypatch):
    """A local model folder is keyed by its files too: a further fine-tune saved over it is not
    served the activations (nor the evaluation's kept losses) of the model it replaced."""
    import shutil

    from saelib.models import model_digest, model_id

    monkeypatch.setenv("SAELIB_HOME", str(tmp_path / "home"))
    folder = str(shutil.copytree(bos_lm.name, tmp_path / "model"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(DOCS * 8))
    options = dict(corpus=str(corpus), split="all", ctx_len=16, progress=False)
    lm = load_lm(folder)
    before = cached_activations(folder, 1, lm=lm, **options)
    assert before.manifest["key"]["model_digest"] == model_digest(folder) and model_id(folder) == f"{folder}@{model_digest(folder)}"
    assert cached_activations(folder, 1, lm=lm, **options).folder == before.folder  # unchanged: the same cache
    with torch.no_grad():
        lm.model.model.layers[0].mlp.up_proj.weight.mul_(2)
    lm.model.save_pretrained(folder)  # a further fine-tune, saved over the first
    after = cached_activations(folder, 1, lm=load_lm(folder), **options)
    assert after.folder != before.folder and not torch.equal(after.all_rows(), before.all_rows())
    copy = str(shutil.copytree(folder, tmp_path / "copy", copy_function=shutil.copyfile))  # new modification times
    assert model_digest(copy) == model_digest(folder)  # the same files: the same caches
    assert model_digest("smollm2-135m") is None and model_id("smollm2-135m") == "smollm2-135m"


def test_a_hub_model_is_keyed_by_the_commit_it_resolves_to(bos_lm, tmp_path, monkeypatch):
    """A hub name's caches are keyed by the commit ``from_pretrained`` resolves it to: here read from
    a hub cache (offline, as in every test) whose main branch moves on to a commit with other weights,
    which gets activations of its own."""
    import shutil

    from huggingface_hub import constants
    from transformers import AutoModelForCausalLM

    from saelib.models import model_digest, model_id

    name, repo = "saelib-test/tiny-llama", tmp_path / "hub" / "models--saelib-test--tiny-llama"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("SAELIB_HOME", str(tmp_path / "home"))

    def publish(commit: str, scale: float) -> None:
        snapshot = shutil.copytree(bos_lm.name, repo / "snapshots" / commit)
        model = AutoModelForCausalLM.from_pretrained(snapshot)
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight.mul_(scale)
        model.save_pretrained(snapshot)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)

    first, second = "0123456789abcdef" * 2 + "01234567", "fedcba9876543210" * 2 + "76543210"
    publish(first, 1.0)
    assert model_digest(name) == first[:16] and model_id(name) == f"{name}@{first[:16]}"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(DOCS * 8))
    options = dict(corpus=str(corpus), split="all", ctx_len=16, progress=False)
    before = cached_activations(name, 1, **options)
    assert before.manifest["key"]["model_digest"] == first[:16]
    publish(second, 2.0)  # a new revision on the hub's main branch
    after = cached_activations(name, 1, **options)
    assert after.manifest["key"]["model_digest"] == second[:16] and after.folder != before.folder
    assert not torch.equal(after.all_rows(), before.all_rows())
    assert model_digest("saelib-test/no-such-model") is None  # neither on the hub (offline) nor here


def test_a_run_records_bos_for_its_evaluation(bos_lm, tmp_path, monkeypatch):
    monkeypatch.setenv("SAELIB_HOME", str(tmp_path))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Note {i}: {doc}" for i in range(40) for doc in DOCS))
    cfg = config.resolve(model=bos_lm.name, layer=1, corpus=str(corpus), ctx_len=16,
                         n_latents=128, k=4, batch_size=64, epochs=1.0, warmup_steps=1)
    sae = train_run(cfg, tmp_path / "run", progress=False)
    assert sae.metadata["prepend_bos"] is True and trained_prepend_bos(sae)
    assert trained_prepend_bos(TopKSAE(64, 128, 4, metadata={"layer": 1})) is False  # a saelib SAE that does not record it
    # a peer's SAE records nothing: its model's convention (the model's BOS where its tokenizer adds one)
    imported = TopKSAE(64, 128, 4, metadata={"layer": 1, "source_format": "saelens"})
    assert trained_prepend_bos(imported) is None
    assert data.bos_prefix(load_tokenizer(bos_lm.name), trained_prepend_bos(imported)) != []
