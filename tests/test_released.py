"""The released SAEs (saelib/saes/): each loads by name, and reconstructs real held-out SmolLM2
activations at its layer as well as its model card says."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open

import saelib
from saelib import released
from saelib.evals import held_out, reconstruction_metrics

NAMES = released.names()
# NMSE on the test's first 2,048 held-out tokens against the card's (16,384 tokens): they differ by
# 2-6% (measured); read at a neighbouring layer, the same SAE is 11-160% worse.
NMSE_REL_TOL = 0.08


def test_every_entry_of_the_table_is_released():
    assert NAMES == [r.name for r in sorted(released.RELEASES, key=lambda r: r.layer)]  # in layer order
    layers = {r.layer for r in released.RELEASES}
    assert len(layers) >= 3
    total_mb = sum((released.ROOT / n / "sae.safetensors").stat().st_size for n in NAMES) / 1e6
    assert total_mb < 30, total_mb


@pytest.mark.parametrize("name", NAMES)
def test_loads_by_name_in_float32_with_provenance(name):
    sae = saelib.load(name)
    release = {r.name: r for r in released.RELEASES}[name]
    assert all(p.dtype == torch.float32 for p in sae.parameters())
    assert (sae.n_latents, sae.k, sae.d_in) == (release.n_latents, release.k, 576)
    meta = sae.metadata
    assert (meta["model"], meta["layer"], meta["site"]) == (release.model, release.layer, release.site)
    assert meta["recipe"]["lr"] == pytest.approx(release.lr)
    assert meta["tokens"] == pytest.approx(2 * meta["train_rows"], rel=0.01)  # 2 epochs
    with safe_open(str(released.ROOT / name / "sae.safetensors"), "pt") as f:
        assert f.get_tensor("W_dec").dtype == torch.float16
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(sae.n_latents), atol=1e-2)


def test_the_card_is_generated_from_the_configs():
    text = released.CARD.read_text()
    assert text == released.card()
    for name in NAMES:
        line = next(line for line in text.splitlines() if line.startswith(f"| `{name}` |"))
        cells = dict(zip(released.COLUMNS, (cell.strip() for cell in line.strip("| ").split("|"))))
        scores = json.loads((released.ROOT / name / "config.json").read_text())["metadata"]["eval"]
        assert float(cells["NMSE"]) == pytest.approx(scores["nmse"], abs=5e-4)
        assert float(cells["delta CE (nats)"]) == pytest.approx(scores["delta_ce"], abs=5e-4)
        assert cells["layer"] == str({r.name: r.layer for r in released.RELEASES}[name])


def test_an_unknown_name_is_one_sentence_listing_the_releases():
    with pytest.raises(FileNotFoundError) as info:
        saelib.load("smollm2-135m/resid_12/n9999_k32")
    message = str(info.value)
    assert message.startswith("No SAE folder at smollm2-135m/resid_12/n9999_k32") and message.endswith(".")
    assert message.count(". ") == 0 and all(name in message for name in NAMES)


def test_a_damaged_copy_is_refused(tmp_path):
    folder = shutil.copytree(released.ROOT / NAMES[0], tmp_path / "sae")
    weights = bytearray((folder / "sae.safetensors").read_bytes())
    weights[-3] ^= 0xFF
    (folder / "sae.safetensors").write_bytes(bytes(weights))
    with pytest.raises(ValueError, match="corrupt"):
        saelib.load(folder)


@pytest.fixture(scope="module")
def held(lm):
    """The first 2,048 held-out tokens with their activations at every released layer."""
    return {layer: held_out(lm, layer, max_tokens=2048, progress=False) for layer in {r.layer for r in released.RELEASES}}


@pytest.mark.parametrize("name", NAMES)
def test_reconstructs_its_layer_as_the_card_says(name, held):
    sae = saelib.load(name)
    card = json.loads((released.ROOT / name / "config.json").read_text())["metadata"]["eval"]
    h = held[sae.metadata["layer"]]
    m = reconstruction_metrics(sae, h.acts[h.keep])
    assert m["nmse"] == pytest.approx(card["nmse"], rel=NMSE_REL_TOL), (m, card)
    assert m["l0"] == pytest.approx(card["l0"], abs=0.5)
    for layer, other in held.items():  # it fits its own layer best
        if layer != sae.metadata["layer"]:
            assert reconstruction_metrics(sae, other.acts[other.keep])["nmse"] > 1.08 * m["nmse"], layer


def test_run_loaders_take_a_released_name():
    from saelib import runs

    sae = runs.load_run("smollm2-135m/resid_12/n4608_k32")
    assert sae.n_latents == 4608 and sae.metadata["layer"] == 12
    with pytest.raises(FileNotFoundError, match="no released SAE of that name"):
        runs.load_run("smollm2-135m/resid_6/n1_k1")


def test_an_edited_config_of_a_copy_is_refused(tmp_path):
    """The weights' header holds the config they were saved with (covered by their SHA-256)."""
    folder = shutil.copytree(released.ROOT / NAMES[0], tmp_path / "sae")
    config = json.loads((folder / "config.json").read_text())
    config["metadata"]["layer"] += 1
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    with pytest.raises(ValueError, match=r"config.json: metadata.layer is \d+ but sae.safetensors was saved with \d+"):
        saelib.load(folder)
