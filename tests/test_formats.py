"""Export and import against the real peer libraries (SAELens, sparsify, OpenAI's sparse_autoencoder).

The peers live in their own virtual environment, ``.venv-peers`` (see docs/interop.md for the
recipe). One subprocess there loads every export with the peer's own loader, builds SAEs with
the peers' own classes and save functions, and writes reconstructions; this file compares them
with saelib's. Without ``.venv-peers`` those tests are skipped, saying why.
"""

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from saelib import formats
from saelib.normalize import Normalizer
from saelib.sae import TopKSAE

REPO = Path(__file__).resolve().parents[1]
PEERS_PYTHON = REPO / ".venv-peers" / "bin" / "python"
D_IN, N_LATENTS, K = 16, 64, 4

PEER_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from safetensors.torch import load_file, save_file

    job = json.loads(sys.argv[1])
    x = load_file(job["x"])["x"]
    out = {}
    torch.manual_seed(0)

    def saelens(path):
        from sae_lens import SAE
        sae = SAE.load_from_disk(path, device="cpu")
        return sae.decode(sae.encode(x)), sae.encode(x)

    def sparsify(path):
        from sparsify import SparseCoder
        sae = SparseCoder.load_from_disk(path)
        enc = sae.encode(x)
        return sae.decode(enc.top_acts, enc.top_indices), torch.zeros(x.shape[0], sae.num_latents).scatter(-1, enc.top_indices, enc.top_acts)

    def openai(path, raw=True):
        from sparse_autoencoder.model import Autoencoder
        ae = Autoencoder.from_state_dict(torch.load(path, weights_only=True))
        if raw:
            ae.normalize = False  # saelib exports are on the raw scale (docs/interop.md)
        _, latents, recons = ae(x)
        return recons, latents

    with torch.no_grad():
        for name, (fmt, path) in job["load"].items():
            out[name + ".recons"], out[name + ".latents"] = {"saelens": saelens, "sparsify": sparsify, "openai": openai}[fmt](path)

        # SAEs made and saved by the peers themselves, with random (non-zero) biases
        from sae_lens import TopKSAE, TopKSAEConfig
        sae = TopKSAE(TopKSAEConfig(d_in=x.shape[1], d_sae=job["n"], k=job["k"]))
        sae.b_enc.normal_(0, 0.1); sae.b_dec.normal_(0, 0.5)
        sae.save_model(job["native"] + "/saelens")
        out["native_saelens.recons"] = sae.decode(sae.encode(x))

        from sparsify import SparseCoder, SparseCoderConfig
        sc = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=job["n"], k=job["k"], multi_topk=True))
        sc.encoder.bias.normal_(0, 0.1); sc.b_dec.normal_(0, 0.5)
        sc.save_to_disk(job["native"] + "/sparsify/layers.3")
        enc = sc.encode(x)
        out["native_sparsify.recons"] = sc.decode(enc.top_acts, enc.top_indices)

        if job["openai"]:
            from sparse_autoencoder.model import Autoencoder, TopK
            ae = Autoencoder(job["n"], x.shape[1], activation=TopK(job["k"]), normalize=True)
            torch.nn.init.normal_(ae.encoder.weight, 0, 0.3); torch.nn.init.normal_(ae.decoder.weight, 0, 0.3)
            ae.pre_bias.normal_(0, 0.5); ae.latent_bias.normal_(0, 0.1)
            torch.save(ae.state_dict(), job["native"] + "/8.pt")
            out["native_openai.recons"] = ae(x)[2]
    save_file({k: v.contiguous() for k, v in out.items()}, job["out"])
    """
)


def make_sae(arch="topk", k=K, seed=0, threshold=None, normalizer=None):
    """A trained-looking SAE: untied weights, non-zero biases, a non-trivial normaliser (by default
    fitted to activations like ``raw_input``'s)."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(512, D_IN, generator=g) * 3 + torch.linspace(-2, 2, D_IN)
    sae = TopKSAE(D_IN, N_LATENTS, k, arch=arch, normalizer=normalizer or Normalizer.fit(raw), generator=g,
                  metadata={"model": "toy", "layer": 3, "site": "resid_post", "ctx_len": 64})
    with torch.no_grad():
        sae.W_enc.add_(0.2 * torch.randn(N_LATENTS, D_IN, generator=g))
        sae.b_enc.copy_(0.1 * torch.randn(N_LATENTS, generator=g))
        sae.b_pre.copy_(0.3 * torch.randn(D_IN, generator=g))
    if threshold is not None:
        sae.set_threshold(threshold)
    return sae.eval()


def raw_input(n=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=g) * 3 + torch.linspace(-2, 2, D_IN)


def reconstruct(sae, x):
    """saelib's reconstruction of raw activations, on the raw scale."""
    with torch.no_grad():
        if sae.metadata.get("input_norm") == "layer_norm":
            x_ln, mu, std = formats.layer_norm(x)
            return sae.decode(sae.encode(x_ln)) * std + mu
        return sae.decode(sae.encode(x))


def assert_same_state(a, b):
    assert a.config() == b.config()
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, equal_nan=True, msg=name)


EXPORTS = [  # (name, format, arch, threshold)
    ("saelens_topk", "saelens", "topk", None),
    ("saelens_relu", "saelens", "relu", None),
    ("saelens_jumprelu", "saelens", "topk", 0.2),
    ("sparsify_topk", "sparsify", "topk", None),
    ("sparsify_multitopk", "sparsify", "multitopk", None),
    ("openai_topk", "openai", "topk", None),
    ("openai_relu", "openai", "relu", None),
]
RAW_CASE = "saelens_raw_activations"  # a topk SAE with a random-mean, scale-3.5 normaliser, as SAELens


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Every case exported: ``(saes, paths, x, root)``; no peer library needed."""
    root = tmp_path_factory.mktemp("interop")
    x = raw_input()
    save_file({"x": x}, str(root / "x.safetensors"))
    saes, paths = {}, {}
    for i, (name, fmt, arch, threshold) in enumerate(EXPORTS):
        saes[name] = make_sae(arch, k=None if arch == "relu" else K, seed=i, threshold=threshold)
        paths[name] = formats.export(saes[name], fmt, root / name)
    # a normaliser unrelated to the data, so that a missing apply or invert shows at full size
    g = torch.Generator().manual_seed(len(EXPORTS))
    saes[RAW_CASE] = make_sae(seed=len(EXPORTS), normalizer=Normalizer(2 * torch.randn(D_IN, generator=g), 3.5))
    paths[RAW_CASE] = formats.export(saes[RAW_CASE], "saelens", root / RAW_CASE)
    return saes, paths, x, root


@pytest.fixture(scope="module")
def peers(exports):
    """The peer script run once on the exports: ``(saes, paths, x, peer outputs, native folder)``."""
    if not PEERS_PYTHON.exists():
        pytest.skip(f"{PEERS_PYTHON} is absent: build .venv-peers with the recipe in docs/interop.md to run the interop tests.")
    # OpenAI's package is not on PyPI: CI's .venv-peers lacks it, and its cases are skipped there
    has_openai = subprocess.run([str(PEERS_PYTHON), "-c", "import sparse_autoencoder.model"], capture_output=True).returncode == 0
    saes, paths, x, root = exports
    (root / "native").mkdir()
    job = {"x": str(root / "x.safetensors"), "out": str(root / "peer.safetensors"), "native": str(root / "native"),
           "n": N_LATENTS, "k": K, "openai": has_openai,
           "load": {name: (fmt, str(paths[name])) for name, fmt, _, _ in [*EXPORTS, (RAW_CASE, "saelens", None, None)]
                    if has_openai or fmt != "openai"}}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([str(PEERS_PYTHON), "-c", PEER_SCRIPT, json.dumps(job)], capture_output=True, text=True,
                            timeout=300, env=env, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return saes, paths, x, load_file(str(root / "peer.safetensors")), root / "native"


def needs_peer_output(out, key):
    if key not in out:
        pytest.skip("OpenAI's sparse_autoencoder is not installed in .venv-peers (it is not on PyPI; see docs/interop.md).")


@pytest.mark.parametrize("name", [name for name, *_ in EXPORTS])
def test_peer_library_reconstructs_like_saelib(peers, name):
    saes, _, x, out, _ = peers
    needs_peer_output(out, f"{name}.recons")
    sae = saes[name]
    torch.testing.assert_close(out[f"{name}.recons"], reconstruct(sae, x), rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # latents: the same code, multiplied by the normaliser's scale
        ours = sae.encode(x).to_dense() * sae.normalizer_scale
    torch.testing.assert_close(out[f"{name}.latents"], ours, rtol=1e-4, atol=1e-4)


def test_sae_takes_the_same_raw_activations_as_its_saelens_export(peers):
    """sae(x) on the model's raw activations is what SAELens computes from the same x with the
    exported SAE: the normaliser is applied inside, not left to the caller."""
    saes, _, x, out, _ = peers
    sae = saes[RAW_CASE]
    assert sae.normalizer_scale == 3.5 and sae.normalizer_mean.abs().min() > 0
    with torch.no_grad():
        x_hat = sae(x).x_hat
    theirs = out[f"{RAW_CASE}.recons"]
    assert float((x_hat - theirs).norm() / theirs.norm()) < 1e-4


@pytest.mark.parametrize("name", [name for name, *_ in EXPORTS])
def test_export_round_trip_is_exact(exports, name):
    saes, paths, *_ = exports
    assert_same_state(formats.import_sae(paths[name]), saes[name])


@pytest.mark.parametrize("fmt, where", [("saelens", "saelens"), ("sparsify", "sparsify"), ("openai", "8.pt")])
def test_sae_saved_by_peer_imports_with_same_reconstructions(peers, fmt, where):
    _, _, x, out, native = peers
    needs_peer_output(out, f"native_{fmt}.recons")
    sae = formats.import_sae(native / where)
    assert sae.metadata["source_format"] == fmt
    torch.testing.assert_close(reconstruct(sae, x), out[f"native_{fmt}.recons"], rtol=1e-4, atol=1e-4)
    if fmt == "openai":  # their TopK files normalise each token: recorded, not guessed later
        assert sae.metadata["input_norm"] == "layer_norm" and sae.k == K
    if fmt == "sparsify":
        assert sae.arch == "multitopk" and sae.metadata["hookpoint"] == "layers.3"


def test_a_changed_export_is_an_error_until_its_sidecar_is_deleted(tmp_path):
    """The rule (formats' docstring, docs/interop.md): peer files that differ from the export are an
    error naming the file; deleting saelib.json imports them as the peer's own SAE."""
    sae = make_sae()
    folder = formats.export(sae, "saelens", tmp_path)
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    tensors["b_dec"] = tensors["b_dec"] + 1  # as if fine-tuned in SAELens after the export
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match=r"sae_weights.safetensors changed since saelib exported it .* delete saelib.json "
                                         r"to import it as that library's own SAE, otherwise export it again\.$"):
        formats.import_sae(folder)
    (folder / "saelib.json").unlink()
    imported = formats.import_sae(folder)
    assert imported.metadata["source_format"] == "saelens" and imported.normalizer_scale == 1.0
    assert torch.equal(imported.b_pre, tensors["b_dec"]) and torch.equal(imported.W_enc, tensors["W_enc"].T)


@pytest.mark.parametrize("fmt, file", [("saelens", "sae_weights.safetensors"), ("saelens", "cfg.json"),
                                       ("sparsify", "sae.safetensors"), ("openai", "3.pt")])
def test_a_flipped_byte_in_exported_peer_files_is_named(tmp_path, fmt, file):
    path = formats.export(make_sae(), fmt, tmp_path)
    target = (path if path.is_dir() else path.parent) / file
    content = bytearray(target.read_bytes())
    content[-20] ^= 0x01
    target.write_bytes(bytes(content))
    with pytest.raises(ValueError, match=rf"{file} changed since saelib exported it"):
        formats.import_sae(path)


@pytest.mark.parametrize("key, value, match", [
    ("config", None, r"saelib.json: config is wrong \(input should be an object"),
    ("config.normalizer_scale", 7.0, r"saelib.json: config.normalizer_scale is 7.0 but saelib.safetensors was saved with"),
    ("config.k", 0, r"saelib.json: config.k is wrong \(input should be greater than 0, got 0\)"),
    ("weights_sha256", "0" * 64, r"saelib.json: weights_sha256 is '0000"),
    ("vectors_sha256", "0" * 64, r"saelib.safetensors is corrupt"),
    ("format", "openai", r"saelib.json: format is 'openai' but saelib.safetensors was saved with 'saelens'"),
])
def test_an_edited_sidecar_is_one_sentence_naming_the_key(tmp_path, key, value, match):
    folder = formats.export(make_sae(), "saelens", tmp_path)
    record = json.loads((folder / "saelib.json").read_text())
    *parents, last = key.split(".")
    target = record
    for part in parents:
        target = target[part]
    target[last] = value
    (folder / "saelib.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=match) as info:
        formats.import_sae(folder)
    assert "\n" not in str(info.value)


def _peer_folder(tmp_path, fmt):
    """An export with its sidecar deleted: the peer library's own SAE."""
    path = formats.export(make_sae(), fmt, tmp_path / fmt)
    folder = path if path.is_dir() else path.parent
    (folder / "saelib.json").unlink()
    return path, folder


@pytest.mark.parametrize("fmt, edit, match", [
    ("saelens", {"d_in": ...}, r"cfg.json has no d_in; fix the file or download the SAE again\.$"),
    ("saelens", {"d_in": "16"}, r"cfg.json: d_in is wrong \(input should be a valid integer, got '16'\)"),
    ("saelens", {"d_sae": 32}, r"sae_weights.safetensors: W_enc has shape \(16, 64\) but the config implies \(16, 32\)"),
    ("saelens", {"k": None}, r"cfg.json: a topk SAE needs k, a positive integer up to d_sae=64, got None"),
    ("saelens", {"apply_b_dec_to_input": "yes"}, r"cfg.json: apply_b_dec_to_input is wrong \(input should be a valid boolean"),
    ("sparsify", {"d_in": ...}, r"cfg.json has no d_in"),
    ("sparsify", {"k": [4]}, r"cfg.json: k is wrong \(input should be a valid integer, got \[4\]\)"),
    ("sparsify", {"k": 65}, r"cfg.json: k is 65, more than the 64 latents"),
    ("sparsify", {"num_latents": 60}, r"sae.safetensors: encoder.weight has shape \(64, 16\) but the config implies \(60, 16\)"),
])
def test_peer_configs_are_checked_by_name(tmp_path, fmt, edit, match):
    path, folder = _peer_folder(tmp_path, fmt)
    cfg = json.loads((folder / "cfg.json").read_text())
    for key, value in edit.items():
        cfg.pop(key) if value is ... else cfg.__setitem__(key, value)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        formats.import_sae(path)


@pytest.mark.parametrize("edit, match", [
    (lambda s: s.pop("pre_bias"), r"3.pt has no tensor 'pre_bias'"),
    (lambda s: s.update(latent_bias="zeros"), r"3.pt: latent_bias is a str, not floating-point weights"),
    (lambda s: s.update(activation_state_dict={}), r"3.pt: activation_state_dict has no k"),
    (lambda s: s.update(activation_state_dict={"k": "4"}), r"activation_state_dict: k is wrong \(input should be a valid integer"),
    (lambda s: s.update(activation=3), r"3.pt: activation 3 has no saelib equivalent"),
    (lambda s: s["activation_state_dict"].update(postact_fn="Identity"), r"activation_state_dict: postact_fn is wrong"),
    (lambda s: s.update({"encoder.weight": torch.zeros(3)}), r"3.pt is not an OpenAI autoencoder state dict"),
])
def test_openai_state_dicts_are_checked_by_name(tmp_path, edit, match):
    path, _ = _peer_folder(tmp_path, "openai")
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)
    with pytest.raises(ValueError, match=match):
        formats.import_sae(path)


def test_unreadable_peer_configs_name_the_file(tmp_path):
    path, folder = _peer_folder(tmp_path, "saelens")
    (folder / "cfg.json").write_bytes(b'{"d_in": 16, \xff\xfe}')
    with pytest.raises(ValueError, match=r"cfg.json is not valid JSON"):
        formats.import_sae(path)
    (folder / "cfg.json").write_text("[16, 64]")
    with pytest.raises(ValueError, match=r"cfg.json: the content is wrong \(input should be an object"):
        formats.import_sae(path)


def test_native_folders_and_detection(tmp_path):
    sae = make_sae()
    assert_same_state(formats.import_sae(sae.save(tmp_path / "native")), sae)
    formats.export(sae, "sparsify", tmp_path / "many")
    other = make_sae(seed=1)
    other.metadata["layer"] = 5
    formats.export(other, "sparsify", tmp_path / "many")
    assert formats.detect(tmp_path / "many" / "layers.5")[0] == "sparsify"
    with pytest.raises(ValueError, match="several hookpoints .*layers.3, layers.5"):
        formats.import_sae(tmp_path / "many")
    with pytest.raises(ValueError, match="is not an saelib, SAELens, sparsify or OpenAI SAE"):
        formats.import_sae(tmp_path / "native" / "..")
    with pytest.raises(FileNotFoundError, match="No SAE at"):
        formats.import_sae(tmp_path / "nowhere")


@pytest.mark.parametrize("fmt, sae, match", [
    ("onnx", make_sae(), "Unknown export format 'onnx'"),
    ("sparsify", make_sae("relu", k=None), "sparsify format cannot hold a relu SAE"),
    ("openai", make_sae(threshold=0.1), "openai format cannot hold a topk SAE with an inference threshold"),
])
def test_unsupported_exports_are_refused(tmp_path, fmt, sae, match):
    with pytest.raises(ValueError, match=match):
        formats.export(sae, fmt, tmp_path)


def test_an_export_never_writes_over_a_saelib_sae(tmp_path):
    """An SAE without a layer goes to sparsify's ``sae/`` folder: in a run folder, that is the SAE itself."""
    sae = make_sae()
    sae.metadata.pop("layer")
    sae.save(tmp_path / "run" / "sae")
    before = (tmp_path / "run" / "sae" / "sae.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"run/sae holds a saelib SAE or run \(its config.json\), whose files the sparsify "
                                         r"export would write over; choose another out folder"):
        formats.export(sae, "sparsify", tmp_path / "run")
    with pytest.raises(ValueError, match="saelens export would write over"):
        formats.export(sae, "saelens", tmp_path / "run" / "sae")
    assert (tmp_path / "run" / "sae" / "sae.safetensors").read_bytes() == before


def test_an_openai_export_of_another_layer_is_refused_where_one_lies(tmp_path):
    """The OpenAI layout names its file by layer, but the sidecar is one per folder."""
    first, second = make_sae(seed=0), make_sae(seed=1)
    second.metadata["layer"] = 5
    formats.export(first, "openai", tmp_path)
    with pytest.raises(ValueError, match=r"holds saelib's export of 3.pt \(its saelib.json\), which an export of 5.pt "
                                         r"would make unreadable; export each layer to a folder of its own\.$"):
        formats.export(second, "openai", tmp_path)
    assert torch.equal(formats.import_sae(tmp_path / "3.pt").W_enc, first.W_enc) and not (tmp_path / "5.pt").exists()
    formats.export(first, "openai", tmp_path)  # the same layer again writes over its own export


def test_an_sae_that_expects_layer_normed_tokens_keeps_that_in_its_export(tmp_path):
    sae = make_sae()
    sae.metadata["input_norm"] = "layer_norm"
    folder = formats.export(sae, "saelens", tmp_path / "saelens")
    assert json.loads((folder / "cfg.json").read_text())["normalize_activations"] == "layer_norm"
    (folder / "saelib.json").unlink()  # read as SAELens's own files: the layer norm comes back from them
    assert formats.import_sae(folder).metadata["input_norm"] == "layer_norm"
    with pytest.raises(ValueError, match="sparsify format cannot hold an SAE that expects layer-normed tokens"):
        formats.export(sae, "sparsify", tmp_path / "sparsify")


class RunsCode:
    """A pickle that runs code when loaded: what ``weights_only=True`` must refuse."""

    def __reduce__(self):
        return (Path.touch, (Path(os.environ["SAELIB_TEST_MARKER"]),))


def test_openai_file_that_would_run_code_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "code-ran"
    monkeypatch.setenv("SAELIB_TEST_MARKER", str(marker))
    state = {"encoder.weight": torch.zeros(N_LATENTS, D_IN), "payload": RunsCode()}
    with open(tmp_path / "8.pt", "wb") as f:
        torch.save(state, f)
    with pytest.raises(ValueError, match=r"Refusing to load .*8.pt: it holds more than tensors and plain values \(it calls getattr\), and loading it would run code\.$"):
        formats.import_sae(tmp_path / "8.pt")
    assert not marker.exists()
    (tmp_path / "8.pt").write_bytes(b"not a pickle at all " * 8)  # garbage is called corrupt, not dangerous
    with pytest.raises(ValueError, match=r"8.pt cannot be read as a torch file \(not a pickle of tensors\); the file is truncated"):
        formats.import_sae(tmp_path / "8.pt")


def test_truncated_exports_name_the_file(tmp_path):
    path = formats.export(make_sae(), "openai", tmp_path / "oai")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"3.pt changed since saelib exported it"):
        formats.import_sae(path)
    (path.parent / "saelib.json").unlink()
    with pytest.raises(ValueError, match=r"3.pt cannot be read as a torch file"):
        formats.import_sae(path)
    path, folder = _peer_folder(tmp_path, "saelens")
    weights = folder / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"sae_weights.safetensors cannot be read as safetensors"):
        formats.import_sae(folder)


def test_a_model_folder_whose_weights_would_run_code_is_refused_in_one_sentence(tmp_path, monkeypatch):
    """``load_lm`` on a local folder: transformers reads ``pytorch_model.bin`` with weights_only=True,
    and its refusal is one sentence, not an UnpicklingError."""
    from transformers import LlamaConfig

    from saelib.models import _embedded_folder, load_lm

    marker = tmp_path / "code-ran"
    monkeypatch.setenv("SAELIB_TEST_MARKER", str(marker))
    folder = tmp_path / "model"
    LlamaConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2).save_pretrained(folder)
    embedded = _embedded_folder("smollm2-135m")  # converted here if no test has yet
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(embedded / name, folder / name)
    with open(folder / "pytorch_model.bin", "wb") as f:
        torch.save({"model.embed_tokens.weight": torch.zeros(64, 8), "payload": RunsCode()}, f)
    with pytest.raises(ValueError, match=r"^Refusing to load model .*: its weights are a pickle that would run code") as info:
        load_lm(str(folder))
    assert "\n" not in str(info.value) and not marker.exists()
