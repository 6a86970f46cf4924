"""The benchmark's step implementations compute the right thing (no timing assertions here).

saelib and the naive dense step implement the same recipe, so they agree on the loss before and
after a step; every step lowers the loss; the peers (in ``.venv-peers``, through a subprocess)
compute saelib's reconstruction loss on the same weights and learn too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saelib import bench
from saelib.bench import BenchConfig

REPO = Path(__file__).resolve().parents[1]
PEERS_PYTHON = REPO / ".venv-peers" / "bin" / "python"
TINY = BenchConfig(d_in=32, n_latents=256, k=8, batch_size=128, dead_fraction=0.25)


def _losses(impl: str, cfg: BenchConfig, steps: int, same_batch: bool = True) -> list[float]:
    x = bench.synthetic_activations(cfg.batch_size * (1 if same_batch else 4), cfg.d_in)
    batches = list(x.split(cfg.batch_size))
    step = bench.make_step(impl, cfg, bench.initial_weights(cfg), bench.dead_mask(cfg))
    return [float(step(batches[i % len(batches)])) for i in range(steps)]


def test_synthetic_activations_are_normalised_and_structured():
    x = bench.synthetic_activations(2048, 32)
    assert x.shape == (2048, 32) and x.dtype == torch.float32
    assert torch.allclose(x.mean(0), torch.zeros(32), atol=1e-5)
    assert x.pow(2).sum(1).mean().item() == pytest.approx(1.0, rel=1e-4)
    # sparse structure: a few directions explain much more variance than isotropic noise would
    eig = torch.linalg.eigvalsh(x.T @ x / len(x))
    assert eig[-1] / eig.mean() > 2


# AuxK on 64 dead of 256 keeps 16 = 25% of them (saelib's dense AuxK path), on 512 of 2048 3% (sparse path)
@pytest.mark.parametrize("n_latents, dead_fraction", [(256, 0.25), (2048, 0.25), (256, 0.0)])
def test_naive_dense_step_matches_saelib_step(n_latents, dead_fraction):
    cfg = BenchConfig(d_in=32, n_latents=n_latents, k=8, batch_size=128, dead_fraction=dead_fraction)
    saelib, naive = _losses("saelib", cfg, 3), _losses("naive", cfg, 3)
    assert saelib[0] == pytest.approx(naive[0], rel=1e-5)  # same weights, same loss (with AuxK)
    assert saelib == pytest.approx(naive, rel=1e-3)  # and the same updates


@pytest.mark.parametrize("impl", ["saelib", "naive"])
def test_step_lowers_the_loss(impl):
    losses = _losses(impl, TINY, 30)
    assert losses[-1] < 0.9 * losses[0], losses


def test_dead_mask_and_k_aux():
    assert bench.dead_mask(BenchConfig(32, 256, dead_fraction=0.0)) is None
    assert int(bench.dead_mask(TINY).sum()) == 64
    assert BenchConfig(576, 4608).k_aux == 288 and BenchConfig(2048, 4608).k_aux == 512 and TINY.k_aux == 16


def test_run_bench_rows_ratios_and_unavailable_peers():
    rows = bench.run_bench([TINY], ["saelib", "naive", "sparsify"], warmup=1, steps=2)
    by_impl = {r["impl"]: r for r in rows}
    assert list(by_impl) == ["saelib", "naive", "sparsify", "roofline"]  # roofline is always measured
    for key in ("impl", "d_in", "n_latents", "k", "batch_size", "tokens_per_s", "ratio_to_best_peer",
                "ratio_to_roofline", "peak_rss_mb", "threads", "cpu", "torch_version", "impl_version"):
        assert all(key in r for r in rows), key
    assert by_impl["roofline"]["ratio_to_roofline"] == 1.0
    assert by_impl["saelib"]["tokens_per_s"] > 0 and 0 < by_impl["saelib"]["ratio_to_roofline"]
    peer = by_impl["sparsify"]
    if peer["status"] == "ok":
        assert by_impl["saelib"]["ratio_to_best_peer"] == pytest.approx(by_impl["saelib"]["tokens_per_s"] / peer["tokens_per_s"])
    else:  # not installed here: the row stays and says why
        assert peer["status"] == "unavailable" and "pip install" in peer["reason"] and peer["tokens_per_s"] is None
        assert by_impl["saelib"]["ratio_to_best_peer"] is None


def test_main_prints_json_rows(capsys):
    assert bench.main(["--preset", "quick", "--impl", "saelib", "--warmup", "0", "--steps", "1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["impl"] for r in rows] == ["saelib", "roofline"]
    assert rows[0]["n_latents"] == bench.PRESETS["quick"]["n_latents"][0]


def test_run_elsewhere_returns_the_rows_of_another_interpreter(tmp_path):
    import sys

    rows = bench.run_elsewhere(sys.executable, "quick", warmup=0, steps=1)
    by_impl = {r["impl"]: r for r in rows}
    assert by_impl["saelib"]["status"] == "ok" and by_impl["saelib"]["tokens_per_s"] > 0
    assert {r["impl"] for r in rows} == set(bench.IMPLS)  # every impl has its row, run or not
    with pytest.raises(ValueError, match="make peers"):
        bench.run_elsewhere(str(tmp_path / "python"), "quick")


@pytest.mark.parametrize("argv, named", [(["--n-latents", "0"], "--n-latents"), (["--dead-fraction", "1"], "--dead-fraction"),
                                         (["--k", "600", "--n-latents", "512"], "k=600"),
                                         (["--supply", "x", "--memory-gb", "0"], "--memory-gb positive, got 0 and 0.0"),
                                         (["--supply-steps", "5"], "name the cache folder"),
                                         (["--pipeline", "--heap", "reuse"], "--heap does not apply to --pipeline"),
                                         (["--quality", "--d-in", "768", "--steps", "3"],
                                          "--d-in, --steps do not apply to --quality"),
                                         (["--budget", "ci"], "--budget does not apply to the speed grid")])
def test_bad_flags_exit_2_naming_the_value(argv, named, capsys):
    assert bench.main(argv) == 2
    assert named in capsys.readouterr().err


PEER_SCRIPT = r"""
import json, torch
from saelib import bench
from saelib.bench import BenchConfig
from saelib.sae import TopKSAE

out = {}
for dead_fraction in (0.0, 0.25):
    cfg = BenchConfig(d_in=32, n_latents=256, k=8, batch_size=128, dead_fraction=dead_fraction)
    x = bench.synthetic_activations(cfg.batch_size, cfg.d_in)
    w, dead = bench.initial_weights(cfg), bench.dead_mask(cfg)
    sae = TopKSAE(cfg.d_in, cfg.n_latents, cfg.k)
    sae.load_state_dict({**sae.state_dict(), **w})
    out[f"saelib_nmse_{dead_fraction}"] = float(sae(x).nmse)
    for impl in ("sparsify", "sae-lens"):
        step = bench.make_step(impl, cfg, w, dead)
        out[f"{impl}_{dead_fraction}"] = [float(step(x)) for _ in range(30)]
    out["total_var"] = float((x - x.mean(0)).pow(2).sum())
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def peer_losses():
    if not PEERS_PYTHON.exists():
        pytest.skip(f"{PEERS_PYTHON} is absent: build .venv-peers (docs/interop.md) to test the peers' bench steps.")
    result = subprocess.run([str(PEERS_PYTHON), "-c", PEER_SCRIPT], capture_output=True, text=True, cwd=REPO, timeout=600)
    if "No module named 'saelib'" in result.stderr:
        pytest.skip("saelib is not installed in .venv-peers: run `.venv-peers/bin/pip install --no-deps -e .`.")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_peer_steps_compute_saelibs_reconstruction_loss_on_the_same_weights(peer_losses):
    nmse = peer_losses["saelib_nmse_0.0"]
    assert peer_losses["sparsify_0.0"][0] == pytest.approx(nmse, rel=1e-5)  # sparsify's FVU is saelib's NMSE
    # SAELens' loss is the per-token summed squared error: NMSE times total variance / B
    assert peer_losses["sae-lens_0.0"][0] == pytest.approx(nmse * peer_losses["total_var"] / 128, rel=1e-5)


@pytest.mark.parametrize("impl", ["sparsify", "sae-lens"])
@pytest.mark.parametrize("dead_fraction", [0.0, 0.25])
def test_peer_steps_lower_the_loss(peer_losses, impl, dead_fraction):
    losses = peer_losses[f"{impl}_{dead_fraction}"]
    assert losses[-1] < 0.9 * losses[0], losses


def test_saelib_bf16_row_runs_where_bf16_is_fast_and_says_why_elsewhere(monkeypatch):
    from saelib import kernels
    from saelib.bench import peers

    rows = {r["impl"]: r for r in bench.run_bench([TINY], ["saelib-bf16", "roofline-bf16"], warmup=0, steps=1)}
    bf16 = {impl: r for impl, r in rows.items() if impl != "roofline"}  # the fp32 roofline is run beside, as the bound
    assert {r["status"] for r in bf16.values()} == {"ok" if kernels.fast_bf16() else "unavailable"}
    if kernels.fast_bf16():  # the bf16 step's bound is the bf16 GEMM
        ratio = rows["saelib-bf16"]["tokens_per_s"] / rows["roofline-bf16"]["tokens_per_s"]
        assert rows["saelib-bf16"]["ratio_to_roofline"] == pytest.approx(ratio)
    monkeypatch.setattr(peers, "fast_bf16", lambda device="cpu": False)
    rows = bench.run_bench([TINY], ["saelib-bf16", "roofline-bf16"], warmup=0, steps=1)
    assert all(r["status"] == "unavailable" and r["tokens_per_s"] is None for r in rows if r["impl"] != "roofline")
    assert "AMX" in rows[0]["reason"] and "AMX" in rows[1]["reason"]


def test_memory_estimates_at_batch_16384():
    cfg = BenchConfig(576, 18432, batch_size=16384, dead_fraction=0.25)
    need = {impl: bench._needed_gb(impl, cfg) for impl in bench.IMPLS}
    # a (B, n) fp32 matrix is 1.2 GB: saelib holds about three, the dense steps about eight
    assert need["roofline"] < need["saelib"] < need["sparsify"] < need["sae-lens"] < need["naive"] < 12


def test_supply_rate_reads_every_batch_of_each_epoch():
    from saelib.train import TensorSource

    rows = bench.supply_rate(TensorSource(torch.randn(1000, 8)), 128, epochs=2)
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(r["tokens"] == 7 * 128 and r["tokens_per_s"] > 0 for r in rows)


def test_interleaved_timing_gives_the_same_rows():
    rows = bench.run_bench([TINY], ["saelib", "naive", "sparsify"], warmup=1, steps=2, interleave=True)
    by_impl = {r["impl"]: r for r in rows}
    assert list(by_impl) == ["saelib", "naive", "sparsify", "roofline"]
    assert all(len(by_impl[i]["step_s_all"]) == 2 and by_impl[i]["tokens_per_s"] > 0 for i in ("saelib", "naive", "roofline"))
    assert by_impl["sparsify"]["status"] in ("ok", "unavailable")
    # the same steps on the same data as the sequential timing: the same losses
    sequential = {r["impl"]: r for r in bench.run_bench([TINY], ["saelib", "naive"], warmup=1, steps=2)}
    for impl in ("saelib", "naive"):
        assert by_impl[impl]["loss_last"] == pytest.approx(sequential[impl]["loss_last"], rel=1e-6)


def test_rows_say_where_they_ran_and_a_missing_gpu_is_named(capsys):
    rows = bench.run_bench([TINY], ["saelib"], warmup=0, steps=1)
    assert {r["device"] for r in rows} == {"cpu"} and all(r["peak_device_mb"] is None for r in rows)
    if shutil.which("cc"):  # the machine builds saelib's CPU kernels, and the rows say they ran
        assert {r["native_kernels"] for r in rows} == {"in use"}
    assert "peak_device_mb" not in bench.markdown_table(rows)
    gpu_rows = [dict(rows[0], device="cuda", peak_device_mb=1234.0)]
    assert "| peak_device_mb | note |" in bench.markdown_table(gpu_rows) and "| 1,234 |" in bench.markdown_table(gpu_rows)
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU, or the first on a machine without
    assert bench.main(["--preset", "quick", "--impl", "saelib", "--steps", "1", "--device", missing]) == 2
    assert f"device '{missing}' was asked for" in capsys.readouterr().err


FAULTS = """
import json, resource, sys, torch
from saelib import bench
if sys.argv[1] == "reuse":
    bench.reuse_heap()
counts = []
for _ in range(8):  # a 64 MB block, every page touched, then freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20)
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"faults": counts, "heap": bench.machine()["heap"]}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux (glibc's malloc)")
def test_a_reused_heap_serves_a_freed_block_again_without_page_faults():
    pages = 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    runs = {heap: json.loads(subprocess.run([sys.executable, "-c", FAULTS, heap], capture_output=True, text=True,
                                            check=True).stdout) for heap in bench.HEAPS}
    assert runs["reuse"]["heap"] == "reuse" and runs["default"]["heap"] == "default"
    # once the heap holds the blocks (an aligned block may not fit the freed one: a second is faulted
    # in), every later one reuses mapped pages
    assert sum(runs["reuse"]["faults"][-3:]) < pages / 100, runs
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[always]" not in thp.read_text():  # small pages: each page of a fresh mapping faults
        assert min(runs["default"]["faults"][-3:]) > pages / 2, runs
    # the command's default, auto, reuses glibc's heap
    rows = json.loads(subprocess.run([sys.executable, "-m", "saelib.bench", "--preset", "quick", "--impl", "saelib",
                                      "--warmup", "0", "--steps", "1", "--json"],
                                     capture_output=True, text=True, check=True).stdout)
    assert {r["heap"] for r in rows} == {"reuse"} and bench.resolve_heap("auto") == "reuse"
    with pytest.raises(ValueError, match="heap must be one of auto, default, reuse, got 'fast'"):
        bench.run_elsewhere(sys.executable, heap="fast")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_bench_runs_on_a_gpu_with_the_cpu_losses():
    cpu = {r["impl"]: r for r in bench.run_bench([TINY], ["saelib", "naive"], warmup=0, steps=2)}
    gpu = {r["impl"]: r for r in bench.run_bench([TINY], ["saelib", "naive"], warmup=0, steps=2, device="cuda")}
    for impl in ("saelib", "naive"):
        assert gpu[impl]["status"] == "ok" and gpu[impl]["device"] == "cuda" and gpu[impl]["peak_device_mb"] > 0
        assert gpu[impl]["loss_first"] == pytest.approx(cpu[impl]["loss_first"], rel=1e-4)
        assert gpu[impl]["loss_last"] == pytest.approx(cpu[impl]["loss_last"], rel=1e-3)


def test_input_wait_trains_on_a_cache_with_and_without_read_ahead(lm, val_contexts, tmp_path, monkeypatch, capsys):
    from saelib import activations as A

    monkeypatch.setenv("SAELIB_HOME", str(tmp_path))
    key = lambda L: A.CacheKey("smollm2-135m", L, "resid_post", "test-wait", "validation", 64, None)  # noqa: E731
    cache = A.build_cache(lm, val_contexts, [12], "resid_post", key, shard_contexts=2, progress=False)[12]
    memory_gb = cache.n_rows * 576 * 4 / 2**30 / 2  # half the cache: four groups or so
    for read_ahead in (False, True):
        r = bench.input_wait(cache, 64, 4, 64, steps=20, memory_gb=memory_gb, read_ahead=read_ahead)
        assert r["read_ahead"] is read_ahead and r["groups"] >= 3 and r["steps"] == 20
        assert 0 < r["waited_seconds"] < r["seconds"] and r["input_wait"] == r["waited_seconds"] / r["seconds"]
    argv = ["--preset", "quick", "--impl", "roofline", "--steps", "1", "--batch-size", "64", "--supply", str(cache.folder),
            "--memory-gb", str(memory_gb), "--supply-steps", "5"]
    assert bench.main(argv) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("input wait")]
    assert [line.split(":")[0] for line in lines] == ["input wait, read ahead off", "input wait, read ahead on "] * 2


def test_pipeline_report_times_every_stage_and_names_the_slowest(capsys):
    # the quick sizes on the real SmolLM2 and corpus; the structure of the report, never its speed
    assert bench.main(["--pipeline", "--preset", "quick", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    from saelib.bench.pipeline import PIPELINE_SIZES, STAGES

    assert [r["stage"] for r in report["stages"]] == list(STAGES)
    assert report["slowest"] in STAGES  # which one is a matter of speed (a loaded machine can make it the hook)
    quick = PIPELINE_SIZES["quick"]
    for row in report["stages"]:
        assert set(row) == {"stage", "tokens", "seconds", "cpu_seconds", "tokens_per_s"}
        if row["stage"] != "hook":  # nnsight's cost over the bare hook may be within the noise
            assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["seconds"]) and row["tokens_per_s"] > 0
    by_stage = {r["stage"]: r for r in report["stages"]}
    assert by_stage["forward"]["tokens"] == quick["n_contexts"] * report["ctx_len"]
    assert by_stage["train step"]["tokens"] == quick["train_batch"]
    slowest = by_stage[report["slowest"]]["tokens_per_s"]
    assert all(r["tokens_per_s"] is None or r["tokens_per_s"] >= slowest for r in report["stages"])
    assert report["serial_tokens_per_s"] < slowest
    assert report["lm_dtype"] in ("float32", "bfloat16") and report["cpu"] and report["threads"] >= 1
    table = bench.pipeline_table(report)
    assert table.count("\n") == len(STAGES) + 1 and "(slowest)" in table


def test_the_bare_forward_reads_what_extract_reads(lm, val_contexts):
    from saelib.activations import extract
    from saelib.bench.pipeline import bare_forward

    (_, acts), = list(extract(lm, val_contexts[:2], [12], progress=False, dtype="float32"))
    torch.testing.assert_close(bare_forward(lm, val_contexts[:2], 12, dtype="float32"), acts[12], rtol=0, atol=0)
