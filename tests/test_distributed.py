"""Distributed training: 2- and 4-rank gloo runs on CPU match the one-process trainer.

Every rank is a process started with torch.multiprocessing (spawn), one thread each, joining a
store this process hosts as torchrun's agent does. Two launches (world 2, then world 4) run all
the distributed jobs; the tests compare their run folders with ``saelib.fit``'s.
"""

import json
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from saelib.distributed import fit_distributed, merge_shards
from saelib.grid import RankSlice, init_shard, rank_device
from saelib import load
from saelib.sae import TopKSAE
from saelib.train import TensorSource, fit, latest_checkpoint
from rendezvous import agent_store, rank_env

D_IN, N_LATENTS, K, BATCH, STEPS = 8, 32, 4, 64, 8
# dead after one batch without firing, so AuxK is on from the second step; checkpoints every 2 steps
OPTIONS = dict(batch_size=BATCH, tokens=STEPS * BATCH, lr=1e-2, warmup_steps=2, dead_tokens=BATCH,
               checkpoint_every_tokens=2 * BATCH, log_every=1, seed=3, geometric_median_samples=4 * BATCH,
               device="cpu")  # gloo on the CPU, on a machine with GPUs too
INTERRUPT_AT = 5  # batch index at which the interrupted run stops (its last checkpoint: step 4)
LAUNCH_SECONDS = 300  # a launch takes 10-30 s on 2 loaded cores


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls gain nothing from threads


def activations():
    """Already-normalised activations, so every run uses them as they are."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(12 * BATCH, D_IN, generator=g) * torch.linspace(0.2, 2.0, D_IN) + 0.3


class Interrupted(Exception):
    pass


class StopsAt(TensorSource):
    """Raises on every rank when it reaches batch ``stop`` (a killed run)."""

    def __init__(self, x, stop):
        super().__init__(x)
        self.stop = stop

    def batches(self, batch_size, *, seed, epoch, start=0):
        for index, x in enumerate(super().batches(batch_size, seed=seed, epoch=epoch, start=start), start):
            if index == self.stop:
                raise Interrupted
            yield x


def _worker(rank, world, env, jobs, errors_file):
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    x, errors = activations(), {}
    for name, latent_parallel, out, n_latents in jobs:
        data = StopsAt(x, INTERRUPT_AT) if name.startswith("interrupted") else x
        options = dict(OPTIONS, encoder_dtype="bfloat16") if name.endswith("bf16") else OPTIONS
        try:
            fit_distributed(data, n_latents, K, latent_parallel=latent_parallel, out=out, normalize=False,
                            progress=False, **options)
        except Interrupted:
            pass
        except ValueError as error:
            if not name.startswith("bad"):
                raise
            errors[name] = str(error)
    if rank == 0:
        Path(errors_file).write_text(json.dumps(errors))
    dist.destroy_process_group()


def _spawn(world, jobs, folder):
    store = agent_store()  # held until every rank has ended
    errors_file = folder / f"errors_{world}.json"
    threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        launch = mp.spawn(_worker, args=(world, rank_env(store, 0, world), jobs, str(errors_file)), nprocs=world,
                          join=False)
        deadline = time.monotonic() + LAUNCH_SECONDS
        while not launch.join(timeout=1):  # raises where a rank failed
            if time.monotonic() > deadline:  # a rank waits for another that will never come
                codes = [process.exitcode for process in launch.processes]
                for process in launch.processes:
                    process.kill()
                pytest.fail(f"the {world}-rank launch did not end within {LAUNCH_SECONDS} s; the ranks' exit codes: "
                            f"{codes} (None: still waiting)")
    finally:
        os.environ.pop("OMP_NUM_THREADS") if threads is None else os.environ.update(OMP_NUM_THREADS=threads)
    return json.loads(errors_file.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run folders: the one-process reference and every distributed job; errors by job."""
    root = tmp_path_factory.mktemp("distributed")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a module fixture starts before the per-test one_thread
    try:
        fit(activations(), N_LATENTS, K, out=root / "one", normalize=False, progress=False, **OPTIONS)
        fit(activations(), N_LATENTS, K, out=root / "one_bf16", normalize=False, progress=False, encoder_dtype="bfloat16",
            **OPTIONS)
    finally:
        torch.set_num_threads(threads)
    errors = _spawn(2, [("data", 1, root / "data", N_LATENTS), ("latent", 2, root / "latent", N_LATENTS),
                        ("latent_bf16", 2, root / "latent_bf16", N_LATENTS),
                        ("interrupted", 2, root / "resumed", N_LATENTS),
                        ("interrupted_data", 1, root / "handoff", N_LATENTS)], root)
    assert not (root / "resumed" / "sae").exists() and not (root / "handoff" / "sae").exists()
    errors |= _spawn(4, [("grid", 2, root / "grid", N_LATENTS), ("resumed", 4, root / "resumed", N_LATENTS),
                         ("bad_world", 3, root / "bad", N_LATENTS), ("bad_n", 4, root / "bad", 30)], root)
    return root, errors


def test_one_process_fit_resumes_a_data_parallel_run(runs):
    root, _ = runs  # a 2-rank data-parallel run stopped at step 5, finished by saelib.fit
    fit(activations(), N_LATENTS, K, out=root / "handoff", normalize=False, progress=False, **OPTIONS)
    _assert_same_run(root / "handoff", root / "one")


def _assert_same_run(run, reference):
    one, other = load(reference / "sae"), merge_shards(run / "sae")
    for name, t in one.state_dict().items():
        torch.testing.assert_close(other.state_dict()[name], t, atol=1e-5, rtol=1e-4, equal_nan=True, msg=name)
    assert other.n_latents == one.n_latents and other.k == one.k
    # dead counters agree exactly: both runs end on the same final checkpoint step
    merged = merge_checkpoint_counters(run)
    assert torch.equal(merged, load_file(str(latest_checkpoint(reference) / "state.safetensors"))["since_fired"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    reference_rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [r["step"] for r in reference_rows]
    for row, ref in zip(rows, reference_rows):
        for key in ("nmse", "l0", "dead_fraction", "auxk_loss", "lr"):
            assert row[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (row["step"], key)
        assert row.keys() == ref.keys() and 0 <= row["input_wait"] <= 1  # the same columns, the wait share included


def merge_checkpoint_counters(run):
    folder = latest_checkpoint(run)
    files = [folder / "state.safetensors"] if (folder / "state.safetensors").exists() else sorted(folder.glob("shard_*/state.safetensors"))
    return torch.cat([load_file(str(f))["since_fired"] for f in files])


def test_reference_run_uses_auxk(runs):
    root, _ = runs
    rows = [json.loads(line) for line in (root / "one" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == STEPS and max(r["auxk_loss"] for r in rows) > 0 and max(r["dead_fraction"] for r in rows) > 0


def test_data_parallel_matches_one_process(runs):
    root, _ = runs
    _assert_same_run(root / "data", root / "one")
    assert (root / "data" / "sae" / "config.json").is_file()  # one checkpoint, one SAE folder


def test_latent_parallel_matches_one_process(runs):
    root, _ = runs
    _assert_same_run(root / "latent", root / "one")
    assert sorted(p.name for p in (root / "latent" / "sae").iterdir()) == ["shard_000_of_002", "shard_001_of_002"]


def test_latent_parallel_trains_with_the_bf16_encoder(runs):
    root, _ = runs
    nmse = {run: [json.loads(line)["nmse"] for line in (root / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("latent_bf16", "one_bf16", "latent")}
    assert nmse["latent_bf16"] != nmse["latent"]  # the shards' GEMM ran in bf16, not silently in fp32
    # bf16 rounding can break ties differently in one GEMM and in two shards: close, not equal
    assert nmse["latent_bf16"] == pytest.approx(nmse["one_bf16"], rel=2e-2)
    assert nmse["latent_bf16"] == pytest.approx(nmse["latent"], rel=5e-2)


def test_two_dimensional_grid_matches_one_process(runs):
    root, _ = runs
    _assert_same_run(root / "grid", root / "one")


def test_resume_on_a_different_grid_matches_one_process(runs):
    root, _ = runs  # interrupted at step 5 with 2 latent shards, resumed from step 4 with 4
    _assert_same_run(root / "resumed", root / "one")
    assert (root / "resumed" / "sae" / "shard_003_of_004").is_dir()


def test_grid_errors_name_the_value(runs):
    _, errors = runs
    assert "latent_parallel=3" in errors["bad_world"] and "world size 4" in errors["bad_world"]
    assert "n_latents=30" in errors["bad_n"] and "latent_parallel=4" in errors["bad_n"]


def test_sharded_init_is_the_one_process_init():
    sae = TopKSAE(D_IN, N_LATENTS, K, generator=torch.Generator().manual_seed(7))
    untied = TopKSAE(D_IN, N_LATENTS, K, tied_init=False, generator=torch.Generator().manual_seed(7))
    for reference, tied in ((sae, True), (untied, False)):
        shard = TopKSAE(D_IN, 8, K)
        init_shard(shard, N_LATENTS, 16, seed=7, tied_init=tied)
        assert torch.equal(shard.W_dec, reference.W_dec[16:24]) and torch.equal(shard.W_enc, reference.W_enc[16:24])


def test_rank_slices_make_the_global_batch():
    class Grid:
        data_size, device = 4, torch.device("cpu")

    source = TensorSource(activations())
    slices = []
    for d in range(4):
        grid = Grid()
        grid.data_rank = d
        slices.append(list(RankSlice(source, grid).batches(BATCH, seed=1, epoch=0, start=2)))
    for step, batch in enumerate(source.batches(BATCH, seed=1, epoch=0, start=2)):
        assert torch.equal(torch.cat([s[step] for s in slices]), batch)


def test_every_rank_of_a_cpu_run_trains_on_the_cpu():
    assert [rank_device(device, r) for device, r in [("cpu", 0), ("cpu", 7), (torch.device("cpu"), 3)]] == [torch.device("cpu")] * 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_each_cuda_rank_takes_its_own_gpu_and_a_machine_short_of_gpus_is_refused():
    count = torch.cuda.device_count()
    assert [rank_device("cuda", r) for r in range(count)] == [torch.device("cuda", r) for r in range(count)]
    with pytest.raises(ValueError, match=f"{count + 1} processes on this machine need {count + 1} GPUs, one each, but it "
                                         f"has {count}; launch at most {count}"):
        rank_device("cuda:0", count)
