"""``saelib bench --quality``: saelib, sparsify and SAELens trained on one activation cache and scored
by one evaluation. The peers run in their own interpreter (``make peers``), as the bench runs them."""

import json
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

from saelib import config, results
from saelib.activations import cached_activations
from saelib.bench import quality
from saelib.formats import import_sae

PEERS = Path(__file__).resolve().parents[1] / ".venv-peers" / "bin" / "python"
needs_peers = pytest.mark.skipif(not PEERS.exists(), reason="the peers' environment is missing: make peers")

# In the peers' interpreter: each peer with its own init and decoder rows of uneven norm (as
# training leaves SAELens' by default), its own reconstruction of x, then saved as the bench saves it.
SAVE_AND_RECONSTRUCT = """
import sys, torch
from safetensors.torch import save_file
from saelib import results
from saelib.bench import quality
library, out = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
step = quality._peer_step(library, 32, 128, 8, 64, 1e-3)
with torch.no_grad():
    step.model.W_dec.mul_(torch.rand(128, 1) + 0.5)
    step.model.b_dec.normal_()
x = torch.randn(64, 32)
with torch.no_grad():
    x_hat = step.model(x).sae_out if library.startswith("sparsify") else step.model(x)
quality.save_peer(library, step, out)
save_file({"x": x, "x_hat": x_hat.contiguous()}, out + "/check.safetensors")
"""


@needs_peers
@pytest.mark.parametrize("library", ["sparsify", "sae-lens"])
def test_a_trained_peer_saved_by_the_bench_imports_to_the_same_reconstruction(library, tmp_path):
    subprocess.run([str(PEERS), "-c", SAVE_AND_RECONSTRUCT, library, str(tmp_path)], check=True)
    check = load_file(tmp_path / "check.safetensors")
    sae = import_sae(tmp_path)
    x_hat = sae(check["x"]).x_hat
    assert (x_hat - check["x_hat"]).norm() / check["x_hat"].norm() < 1e-5


@needs_peers
def test_every_library_trains_on_the_same_cache_and_gets_one_evaluation():
    rows = quality.run_quality("ci", (4,), libraries=("saelib", "sparsify", "sae-lens"), peers_python=str(PEERS),
                               eval_preset="ci", progress=False)
    assert [r["library"] for r in rows] == ["saelib", "sparsify", "sae-lens"]
    assert all(r["status"] == "ok" for r in rows), [r.get("reason") for r in rows]
    steps = rows[0]["steps"]
    for r in rows:
        assert r["steps"] == steps > 0 and r["tokens"] == steps * r["batch_size"]
        assert r["lr"] == pytest.approx(4 * 2e-4 / (r["n_latents"] / 2**14) ** 0.5)
        # a few dozen steps at the ci budget: trained well past the zero code, nowhere near converged
        assert 0 < r["nmse"] < 0.8 and 0.5 < r["loss_recovered"] < 1 and r["l0"] == pytest.approx(r["k"])
        assert r["eval_tokens"] == rows[0]["eval_tokens"] and r["ce_zero"] == rows[0]["ce_zero"]
    best = results.best_cells(rows)
    assert set(best) == {"saelib", "sparsify", "sae-lens"} and all(b["seeds"] == 1 for b in best.values())
    table = results.quality({"rows": rows})
    assert table.count("\n| saelib |") == 2 and "at its best learning rate" in table


@needs_peers
def test_one_peer_interpreter_serves_every_cell_and_outlives_a_failed_one(tmp_path):
    data_opts, _ = config.split(config.resolve("ci"))
    cache = cached_activations(**data_opts, split="train", progress=False)
    options = dict(cache=str(cache.folder), n_latents=64, k=4, batch_size=64, steps=2, warmup_steps=1, lr=1e-3, seed=0)
    with quality.PeerWorker(str(PEERS)) as peers:
        with pytest.raises(RuntimeError, match="saelib failed \\(ValueError: Unknown peer 'saelib'"):
            peers.train(library="saelib", out=str(tmp_path / "saelib"), **options)
        pid = peers.process.pid
        for library in ("sparsify", "sae-lens"):
            speed = peers.train(library=library, out=str(tmp_path / library), **options)
            assert speed["tokens_per_s"] > 0 and import_sae(tmp_path / library).n_latents == 64
        assert peers.process.pid == pid, "one interpreter for every cell"
    assert peers.process is None
    with pytest.raises(RuntimeError, match="sparsify failed \\(exit code 1; .*`make peers`"):
        quality.PeerWorker("/bin/false").train(library="sparsify", out=str(tmp_path / "x"), **options)
    with pytest.raises(RuntimeError, match="Cannot start /no/python .*`make peers`"):
        quality.PeerWorker("/no/python").train(library="sparsify", out=str(tmp_path / "x"), **options)


def test_a_grid_run_again_into_its_file_trains_only_the_missing_cells(tmp_path):
    out = tmp_path / "grid.json"
    first = quality.run_quality("ci", (4,), libraries=("saelib",), eval_preset="ci", out=out, progress=False)
    rows = quality.run_quality("ci", (4, "default"), libraries=("saelib",), eval_preset="ci", out=out, progress=False)
    # the multiple saelib's fit would choose
    default = config.lr_multiple(rows[0]["steps"], rows[0]["n_latents"], rows[0]["k"], rows[0]["batch_size"])
    assert [(r["lr_multiplier"], r["status"]) for r in rows] == [(4, "ok"), (default, "ok")] and default != 4
    assert rows[0] == first[0]  # kept as it was, not trained again
    assert json.loads(out.read_text())["rows"] == rows
    with pytest.raises(ValueError, match="holds the grid of another budget .*'scale': 1.0.*'scale': 2.0"):
        quality.run_quality("ci", (4,), libraries=("saelib",), scale=2.0, eval_preset="ci", out=out, progress=False)


def test_an_unknown_library_is_refused_before_anything_runs():
    with pytest.raises(ValueError, match="Unknown libraries \\['sparsify2'\\]"):
        quality.run_quality("ci", libraries=("saelib", "sparsify2"))


def test_each_library_has_a_rule_and_a_grid_of_at_least_four_multiples():
    assert set(quality.RULES) == set(quality.GRIDS) == set(quality.LIBRARIES)
    assert all(len(grid) >= 4 for grid in quality.GRIDS.values())
    assert quality.GRIDS["saelib"] == (1, 4, 16, 32)
    assert quality.RULES["sparsify-signum"](2**14) == pytest.approx(5e-3) and quality.RULES["saelib"](2**14) == 2e-4
