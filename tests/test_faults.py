"""Faults and bad input: signals, kill -9, full disks, damaged files, two trainers, non-finite values.

Trainers run as real subprocesses and are stopped with real signals at random moments; the
disk fills up through a real file-size limit (RLIMIT_FSIZE); damaged files are real files with
flipped or missing bytes.
"""

import json
import math
import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from saelib.activations import SHARD_CHECKSUM, ActivationCache, CachedSource, CacheKey, shard_checksum
from saelib import load
from saelib.runs import read_metrics
from rendezvous import agent_store, rank_env
from saelib.files import sha256_file
from saelib.sae import TopKSAE
from saelib.train import fit, latest_checkpoint

REPO = Path(__file__).resolve().parents[1]
STEPS, BATCH = 40, 64

TRAINER = textwrap.dedent(
    """
    import resource, signal, sys, time, torch
    from saelib.train import TensorSource, fit

    out, delay, full_disk_at = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])

    class Source(TensorSource):  # the same data, slow enough to be stopped mid-run
        def batches(self, *args, **kwargs):
            for i, x in enumerate(super().batches(*args, **kwargs)):
                if i == full_disk_at:  # from now on no file may grow past 4 KiB: the disk is full
                    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
                time.sleep(delay)
                yield x

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 16, generator=g) @ torch.randn(16, 16, generator=g)
    fit(Source(x), 64, 4, out=out, tokens=%d * %d, batch_size=%d, ema=0.9, checkpoint_every_tokens=4 * %d,
        log_every=1, seed=3, geometric_median_samples=%d, progress=False, device="cpu")
    """ % (STEPS, BATCH, BATCH, BATCH, BATCH)
)


def start(out, delay=0.0, full_disk_at=-1):
    return subprocess.Popen([sys.executable, "-c", TRAINER, str(out), str(delay), str(full_disk_at)], cwd=REPO,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for_training(proc, run, timeout=60):
    """Block until ``proc`` holds the run's lock: its signal handlers are set right after."""
    deadline = time.monotonic() + timeout
    while not ((run / ".lock").exists() and (run / ".lock").read_text() == f"pid {proc.pid}"):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the trainer did not start"
        time.sleep(0.02)
    time.sleep(0.1)


def assert_checkpoint_intact(run):
    checkpoint = latest_checkpoint(run)
    if checkpoint is not None:
        meta = json.loads((checkpoint / "state.json").read_text())
        assert sha256_file(checkpoint / "state.safetensors") == meta["sha256"], checkpoint


def test_signals_kill_9_and_a_second_trainer(tmp_path):
    """kill -9 at random moments, SIGTERM and SIGINT mid-run, a second trainer: the result equals an uninterrupted run."""
    reference = start(tmp_path / "reference")
    run, rng, outcomes = tmp_path / "run", random.Random(1234), []
    for _ in range(3):  # kill -9 anywhere: during start-up, a step, a checkpoint write or a log line
        proc = start(run, delay=0.2)
        time.sleep(rng.uniform(0.3, 3.0))
        proc.kill()
        proc.communicate()
        assert_checkpoint_intact(run)
        outcomes.append(latest_checkpoint(run))
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = start(run, delay=0.2)
        wait_for_training(proc, run)
        if sig == signal.SIGTERM:  # a second trainer on the same folder is refused while this one runs
            with pytest.raises(BlockingIOError, match=rf"{re.escape(str(run))} is in use by another trainer \(pid {proc.pid}\)"):
                fit(torch.randn(1024, 16), 64, 4, out=run, tokens=STEPS * BATCH, batch_size=BATCH, progress=False)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert f"Stopped by {sig.name} after step" in err and "Run the same command again" in err, err
        step = int(err.split("after step ")[1].split()[0])
        assert latest_checkpoint(run).name == f"step_{step:09d}"
        assert_checkpoint_intact(run)
    final = start(run)
    _, err = final.communicate(timeout=120)
    assert final.returncode == 0, err
    assert reference.wait(timeout=120) == 0, reference.communicate()[1]

    a, b = load(tmp_path / "reference" / "sae"), load(run / "sae")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, equal_nan=True, msg=name)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))


DISTRIBUTED_TRAINER = TRAINER.replace("from saelib.train import TensorSource, fit", """from saelib.train import TensorSource
from saelib.distributed import fit_distributed as fit
import functools
fit = functools.partial(fit, latent_parallel=2)""")


def start_ranks(out, delay=0.0, world=2):
    """The ranks of a 2-process, 2-latent-shard run, started as torchrun starts them (one process each)."""
    store = agent_store()
    ranks = [subprocess.Popen([sys.executable, "-c", DISTRIBUTED_TRAINER, str(out), str(delay), "-1"], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, "OMP_NUM_THREADS": "1", **rank_env(store, rank, world)})
             for rank in range(world)]
    for proc in ranks:
        proc.store = store  # the store lives as long as its ranks are waited for
    return ranks


def test_distributed_run_survives_kill_9_and_sigterm(tmp_path):
    """The distributed path has the one-process guarantees: kill -9 of every rank at random moments,
    then SIGTERM to one rank only (every rank stops after the same step, with a checkpoint); the
    resumed run ends where an uninterrupted one-process run ends."""
    reference = start(tmp_path / "reference")
    run, rng = tmp_path / "run", random.Random(4321)
    for _ in range(2):
        ranks = start_ranks(run, delay=0.2)
        time.sleep(rng.uniform(1.0, 4.0))
        for proc in ranks:
            proc.kill()
        for proc in ranks:
            proc.communicate()
        checkpoint = latest_checkpoint(run)
        for shard in ([] if checkpoint is None else sorted(checkpoint.glob("shard_*"))):
            meta = json.loads((shard / "state.json").read_text())
            assert sha256_file(shard / "state.safetensors") == meta["sha256"], shard
    ranks = start_ranks(run, delay=0.2)
    wait_for_training(ranks[0], run)
    ranks[1].send_signal(signal.SIGTERM)  # a scheduler preempting one rank's process
    errs = [proc.communicate(timeout=120)[1] for proc in ranks]
    assert [proc.returncode for proc in ranks] == [0, 0], errs
    assert "Stopped by a signal to another rank after step" in errs[0] and "Run the same command again" in errs[0], errs[0]
    step = int(errs[0].split("after step ")[1].split()[0])
    assert latest_checkpoint(run).name == f"step_{step:09d}" and step < STEPS
    assert sorted(p.name for p in latest_checkpoint(run).iterdir()) == ["shard_000_of_002", "shard_001_of_002"]
    ranks = start_ranks(run)
    errs = [proc.communicate(timeout=120)[1] for proc in ranks]
    assert [proc.returncode for proc in ranks] == [0, 0], errs
    assert reference.wait(timeout=120) == 0, reference.communicate()[1]

    a, b = load(tmp_path / "reference"), load(run)  # one SAE, and one merged from two latent shards
    for name, p in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[name], p, atol=1e-5, rtol=1e-4, equal_nan=True, msg=name)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))


@pytest.mark.parametrize("nproc, sent, to_group", [(2, signal.SIGINT, True), (2, signal.SIGTERM, False),
                                                    (1, signal.SIGINT, True)])
def test_train_stops_with_a_checkpoint_before_it_exits(tmp_path, nproc, sent, to_group):
    """`saelib train` stopped by a terminal's Ctrl-C (SIGINT to its process group) or by a scheduler's
    SIGTERM to the command alone: each rank gets the signal once, finishes the step, writes a
    checkpoint and has stopped (the run's lock free) when the command exits, with 130 or 143."""
    import fcntl

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "saelib", "train", "--preset", "ci", "--nproc", str(nproc), "--tokens",
                             str(10**8), "--device", "cpu", "--out", str(run)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 240
    while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    os.killpg(proc.pid, sent) if to_group else proc.send_signal(sent)
    _, err = proc.communicate(timeout=120)
    with open(run / ".lock") as f:  # held by rank 0 until it has stopped
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert proc.returncode == 128 + sent, err
    assert err.count(f"Stopped by {sent.name} after step") == 1 and "Traceback" not in err, err
    step = int(err.split("after step ")[1].split()[0])
    assert latest_checkpoint(run).name == f"step_{step:09d}"


def test_a_failure_on_rank_0_alone_stops_every_rank_in_one_sentence(tmp_path):
    """Rank 0 alone writes the run folder: a damaged metrics.jsonl fails it there, and the other rank,
    waiting at the next collective, stops too, naming what failed, instead of waiting for a timeout."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("not json}\n")
    errs = [proc.communicate(timeout=120)[1] for proc in start_ranks(run)]
    assert re.search(r"metrics.jsonl line 1 is not valid JSON .*; delete that line or the file", errs[0]), errs[0]
    assert f"RuntimeError: Another rank failed to start the run folder {run}; its log has the error." in errs[1], errs[1]


def test_full_disk_keeps_the_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    proc = start(run, full_disk_at=6)  # checkpoint of step 4 written, that of step 8 hits the full disk
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "Could not write the checkpoint of step 8" in err and "File too large" in err, err
    assert "the previous checkpoint" in err and "step_000000004 is intact" in err, err
    assert latest_checkpoint(run).name == "step_000000004" and not list((run / "checkpoints").glob(".*tmp*"))
    assert_checkpoint_intact(run)  # resuming from it is what test_signals_kill_9_and_a_second_trainer checks


def interrupted_run(run):
    """A run stopped by a NaN batch at step 8, leaving the checkpoint of step 8."""
    batches = list(torch.randn(12 * 32, 8, generator=torch.Generator().manual_seed(0)).split(32))
    batches[8] = batches[8].clone()
    batches[8][0, 0] = math.inf
    with pytest.raises(ValueError, match="Batch 8 of epoch 0 contains NaN or Inf"):
        fit(batches, 32, 4, out=run, checkpoint_every_tokens=4 * 32, geometric_median_samples=64, log_every=1,
            progress=False)
    batches[8][0, 0] = 0.0
    return batches


def test_resuming_leaves_the_callers_global_rngs_alone(tmp_path):
    """Training draws from its own seeded generators: a resumed fit neither reads nor resets the
    caller's torch and Python RNGs (a checkpoint holds no global RNG state)."""
    import random

    batches = interrupted_run(tmp_path)
    torch.manual_seed(123)
    random.seed(7)
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    resume(tmp_path, batches)
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state


def flip_byte(path, offset_from_end=16):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, match", [
    ("flip", r"state.safetensors is corrupt \(its SHA-256 does not match"),
    ("truncate", r"state.safetensors is corrupt \(its SHA-256 does not match"),
    ("json", r"state.json is not valid JSON"),
])
def test_damaged_checkpoint_is_an_error_naming_the_file(tmp_path, damage, match):
    batches = interrupted_run(tmp_path)
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint.name == "step_000000008"
    tensors = checkpoint / "state.safetensors"
    if damage == "flip":
        flip_byte(tensors)
    elif damage == "truncate":
        tensors.write_bytes(tensors.read_bytes()[:-100])
    else:
        (checkpoint / "state.json").write_text('{"step": 8, "epo')
    with pytest.raises(ValueError, match=match + rf".*delete {re.escape(str(checkpoint))} to restart"):
        fit(batches, 32, 4, out=tmp_path, checkpoint_every_tokens=4 * 32, geometric_median_samples=64, progress=False)


@pytest.mark.parametrize("damage, match", [
    ("flip", r"sae.safetensors is corrupt"),
    ("truncate", r"sae.safetensors cannot be read as safetensors"),
    ("config", r"config.json is not valid JSON"),
])
def test_damaged_sae_file_is_an_error_naming_the_file(tmp_path, damage, match):
    folder = TopKSAE(8, 32, 4).save(tmp_path / "sae")
    if damage == "flip":
        flip_byte(folder / "sae.safetensors")
    elif damage == "truncate":
        (folder / "sae.safetensors").write_bytes((folder / "sae.safetensors").read_bytes()[:-64])
    else:
        (folder / "config.json").write_text((folder / "config.json").read_text()[:40])
    with pytest.raises(ValueError, match=match):
        load(folder)


def test_truncated_metrics_line_from_a_kill_is_dropped_on_resume(tmp_path):
    batches = interrupted_run(tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "tok')  # what kill -9 in the middle of a log write leaves
    assert [row["step"] for row in read_metrics(tmp_path)] == list(range(1, 9))  # read as the rows before it
    fit(batches, 32, 4, out=tmp_path, checkpoint_every_tokens=4 * 32, geometric_median_samples=64, progress=False)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [*range(1, 9), 10, 12]  # the partial row is gone; log_every is 10 after the resume, the run is 12 steps


def test_an_unfinished_run_is_named_as_one_where_an_sae_is_asked_for(tmp_path):
    interrupted_run(tmp_path)
    with pytest.raises(FileNotFoundError, match="is a training run that has not finished .* run the same training command again"):
        load(tmp_path)


def resume(run, batches):
    return fit(batches, 32, 4, out=run, checkpoint_every_tokens=4 * 32, geometric_median_samples=64, progress=False)


def edit_json(path, **values):
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))


@pytest.mark.parametrize("values, match", [
    ({"step": -5}, r"state.json: step is wrong \(input should be greater than or equal to 0, got -5\)"),
    ({"batch": 10**12}, r"state.json: batch is 1000000000000 but the copy written with the tensors says 8"),
    ({"step": 4, "tokens": 128}, r"state.json: step is 4 but the copy written with the tensors says 8"),
    ({"normalizer_scale": 0.5}, r"state.json: normalizer_scale is 0.5 but the copy written with the tensors says 1.0"),
    ({"python_rng": [3, [0] * 625, None]}, r"state.json: python_rng is \[3, \[0, 0, .* but the copy"),
    ({"sha256": "0" * 64}, r"state.safetensors is corrupt"),
    ({"shard": {"index": 0, "count": 1}}, r"state.json has no shard.n_latents"),
    ({"extra": 1}, r"state.json has an unknown key extra \(= 1\)"),
])
def test_an_edited_state_json_is_an_error_naming_the_key(tmp_path, values, match):
    batches = interrupted_run(tmp_path)
    checkpoint = latest_checkpoint(tmp_path)
    edit_json(checkpoint / "state.json", **values)
    with pytest.raises(ValueError, match=match + rf".*delete {re.escape(str(checkpoint))} to restart"):
        resume(tmp_path, batches)


def test_a_checkpoint_without_the_copy_of_state_json_resumes_checked_by_its_schema_and_the_run(tmp_path):
    """Checkpoints written before state.safetensors carried the copy still resume, identically."""
    batches = interrupted_run(tmp_path / "new")
    reference = resume(tmp_path / "new", batches)
    interrupted_run(tmp_path / "old")
    checkpoint = latest_checkpoint(tmp_path / "old")
    save_file(load_file(checkpoint / "state.safetensors"), checkpoint / "state.safetensors")  # no metadata
    edit_json(checkpoint / "state.json", sha256=sha256_file(checkpoint / "state.safetensors"))
    for name, p in resume(tmp_path / "old", batches).state_dict().items():
        torch.testing.assert_close(p, reference.state_dict()[name], rtol=0, atol=0, equal_nan=True, msg=name)
    interrupted_run(tmp_path / "edited")
    checkpoint = latest_checkpoint(tmp_path / "edited")
    save_file(load_file(checkpoint / "state.safetensors"), checkpoint / "state.safetensors")
    edit_json(checkpoint / "state.json", sha256=sha256_file(checkpoint / "state.safetensors"), tokens=7 * 32)
    with pytest.raises(ValueError, match=r"state.json: tokens is 224 but this run has 256; the checkpoint belongs to another run"):
        resume(tmp_path / "edited", batches)


@pytest.mark.parametrize("content, match", [
    (b"\xff\xfe{}", r"config.json is not valid JSON"),
    (b"[]", r"config.json: the content is wrong \(input should be an object, got \[\]\)"),
    (b'{"d_in": "8"}', r"config.json: d_in is wrong \(input should be a valid integer, got '8'\)"),
    (b'{"d_in": 8, "n_latents": 32.0}', r"config.json: n_latents is wrong \(input should be a valid integer, got 32.0\)"),
    (b'{"d_in": 8, "lr": NaN}', r"config.json: lr is wrong \(input should be a finite number, got nan\)"),
    (b'{"d_in": 8, "epochs": 2}', r"config.json has an unknown key epochs"),
])
def test_a_damaged_run_config_is_an_error_naming_it(tmp_path, content, match):
    batches = interrupted_run(tmp_path)
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(ValueError, match=match + rf".*; use a new out folder, or delete {re.escape(str(tmp_path))}"):
        resume(tmp_path, batches)


def test_a_broken_metrics_line_before_the_last_is_an_error_naming_it(tmp_path):
    batches = interrupted_run(tmp_path)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "metrics.jsonl").write_text("".join([*lines[:2], "not json}\n", *lines[2:]]))
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path / 'metrics.jsonl'))} line 3 is not valid JSON .*; "
                                         "delete that line or the file"):
        resume(tmp_path, batches)
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path / 'metrics.jsonl'))} line 3 is not valid JSON .*; "
                                         "delete that line or the file"):
        read_metrics(tmp_path)


def small_cache(folder, n_shards=3, rows=40, d=8):
    """An activation cache written as ``build_cache`` writes one, from random rows instead of an LM."""
    folder.mkdir()
    cache = ActivationCache(folder, CacheKey("test", 0, "resid_post", "test", "train", 64, None))
    g = torch.Generator().manual_seed(0)
    for s in range(n_shards):
        cache.add_shard(torch.randn(rows, d, generator=g), torch.arange(rows), (s, s + 1), rows)
    cache.finish()
    return ActivationCache(folder)


def test_a_run_on_one_activation_cache_is_refused_another(tmp_path):
    one, other = small_cache(tmp_path / "one"), small_cache(tmp_path / "other", n_shards=4)
    options = dict(n_latents=16, k=2, tokens=64, batch_size=16, progress=False, out=tmp_path / "run")
    first = fit(one, **options)
    cache = r"activation cache of test layer 0 resid_post on test train, manifest sha256 \w{16}, normaliser sha256 \w{16}"
    with pytest.raises(ValueError, match=rf"run was trained on other activations \({cache}; given: {cache}\)"):
        fit(other, **options)
    assert torch.equal(fit(ActivationCache(tmp_path / "one"), **options).W_dec, first.W_dec)


@pytest.mark.parametrize("checksum", ["xxh3_128", "sha256"])  # sha256: caches written before xxh3
def test_activation_cache_corruption_and_missing_shards_are_named(tmp_path, checksum):
    cache = small_cache(tmp_path / "cache")
    for entry in cache.manifest["shards"]:
        del entry[SHARD_CHECKSUM]
        entry.update(shard_checksum(tmp_path / "cache" / entry["file"], checksum))
    cache.save()
    cache = ActivationCache(tmp_path / "cache")
    cache.verify()
    flip_byte(tmp_path / "cache" / "shard_00001.safetensors")
    with pytest.raises(ValueError, match=r"shard_00001.safetensors is corrupt \(checksum mismatch\); delete .* and extract again"):
        cache.verify()
    (tmp_path / "cache" / "shard_00001.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"shard_00001.safetensors is missing"):
        list(CachedSource(cache).batches(16, seed=0, epoch=0))


@pytest.mark.parametrize("edit, match", [
    (lambda m: [], r"manifest.json: the content is wrong \(input should be an object, got \[\]\)"),
    (lambda m: {**m, "normalizer": {**m["normalizer"], "scale": 2.0}}, r"manifest.json was edited or damaged"),
    (lambda m: {**m, "normalizer": {**m["normalizer"], "mean": [0.0] * 8}}, r"manifest.json was edited or damaged"),
    (lambda m: {**m, "d_in": 4}, r"manifest.json was edited or damaged"),
    (lambda m: {**m, "shards": [{**m["shards"][0], "rows": 20}, *m["shards"][1:]]}, r"manifest.json was edited or damaged"),
    (lambda m: {**m, "normalizer": {**m["normalizer"], "scale": -1.0}}, r"manifest.json: normalizer.scale is wrong"),
    (lambda m: {k: v for k, v in m.items() if k != "sha256"}, r"manifest.json has no sha256"),
])
def test_an_edited_manifest_is_an_error_saying_to_extract_again(tmp_path, edit, match):
    small_cache(tmp_path / "cache")
    path = tmp_path / "cache" / "manifest.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(ValueError, match=match + rf".*delete {re.escape(str(tmp_path / 'cache'))} and extract again"):
        ActivationCache(tmp_path / "cache")


def test_a_shard_whose_rows_disagree_with_the_manifest_is_named(tmp_path):
    cache = small_cache(tmp_path / "cache")
    shard = tmp_path / "cache" / "shard_00001.safetensors"
    save_file({"acts": torch.randn(30, 8), "index": torch.arange(30)}, shard)
    cache.manifest["shards"][1].update(shard_checksum(shard))  # a consistent manifest, for a writer gone wrong
    cache.save()
    with pytest.raises(ValueError, match=r"shard_00001.safetensors holds acts \(30, 8\) torch.float32 and index \(30,\) "
                                         r"but the manifest says 40 rows of d_in 8 float32; delete .* and extract again"):
        list(CachedSource(ActivationCache(tmp_path / "cache")).batches(16, seed=0, epoch=0))


def test_a_shard_without_a_recorded_checksum_is_named(tmp_path):
    cache = small_cache(tmp_path / "cache", n_shards=1)
    del cache.manifest["shards"][0][SHARD_CHECKSUM]
    with pytest.raises(ValueError, match=r"manifest records no checksum for .*shard_00000.safetensors"):
        cache.verify()


def test_cached_source_detects_a_corrupt_shard(tmp_path):
    cache = small_cache(tmp_path / "cache", n_shards=1)
    flip_byte(tmp_path / "cache" / "shard_00000.safetensors", offset_from_end=8)  # inside acts' data
    with pytest.raises(ValueError, match="shard_00000.safetensors is corrupt"):
        list(CachedSource(cache).batches(16, seed=0, epoch=0))


# ---- bad input ------------------------------------------------------------------------------

X = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
BAD_SIZES = st.one_of(st.integers(-10**6, 0), st.sampled_from([1.5, "8", True, None]))
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
BAD_OPTIONS = st.one_of(
    st.tuples(st.just("n_latents"), st.integers(-10**6, 0)),
    st.tuples(st.just("k"), st.one_of(st.integers(-10**6, 0), st.integers(33, 10**6))),  # n_latents is 32
    st.tuples(st.just("batch_size"), st.one_of(BAD_SIZES.filter(lambda v: v is not None), st.integers(257, 10**6))),
    st.tuples(st.just("tokens"), st.one_of(st.integers(-10**6, 0), st.integers(1, 63))),  # fewer than one batch of 64
    st.tuples(st.just("lr"), st.one_of(NON_FINITE, st.floats(-1e9, 0))),
    st.tuples(st.sampled_from(["adam_eps", "auxk_coef", "l1_coef", "grad_clip"]), st.one_of(NON_FINITE, st.floats(-1e9, -1e-9))),
    st.tuples(st.just("ema"), st.one_of(NON_FINITE, st.floats(1, 1e9), st.floats(-1e9, 0))),
    st.tuples(st.sampled_from(["warmup_steps", "dead_tokens", "k_aux", "checkpoint_every_tokens", "log_every"]), st.integers(-10**6, -1)),
    st.tuples(st.just("arch"), st.text("abkopt_ -", max_size=8).filter(lambda s: s not in ("topk", "batchtopk"))),
    st.tuples(st.just("decay"), st.text("aeilnor_ -", max_size=8).filter(lambda s: s not in ("linear", "none"))),
)


def one_sentence(message: str) -> bool:
    return message.count(". ") == 0 and message.endswith(".") and "\n" not in message


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(BAD_OPTIONS)
def test_every_invalid_training_option_is_one_sentence_naming_the_value(option):
    name, value = option
    options = {"n_latents": 32, "k": 4, "batch_size": 64, "progress": False, name: value}
    with pytest.raises(ValueError) as error:
        fit(X, options.pop("n_latents"), options.pop("k"), **options)
    message = str(error.value)
    assert (repr(value) in message or str(value) in message), message
    assert one_sentence(message), message


@pytest.mark.parametrize("out, needle", [
    ("runs/a\0b", "holds a NUL character"),
    (b"runs/bytes", "out must be a folder's path (a str or a Path), got bytes"),
    (123, "out must be a folder's path (a str or a Path), got int 123."),
    ("x" * 300, "cannot be written (File name too long)"),
])
def test_an_out_that_no_folder_can_have_is_one_sentence(tmp_path, monkeypatch, out, needle):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as error:
        fit(X, 32, 4, batch_size=64, out=out, progress=False)
    assert needle in str(error.value) and one_sentence(str(error.value)), error.value


@pytest.mark.parametrize("data, options, needle", [
    (X[:100], dict(batch_size=128, tokens=1024), "The data has 100 tokens, fewer than one batch of batch_size=128"),
    ([X[:0], X], {}, "The first batch has shape (0, 8); give (B, d_in) batches"),
    (list(X.split(100)), dict(batch_size=50), "Batch 0 of epoch 0 has 100 rows where batch_size is 50"),
    ([X[:64], X[:32], X[:64]], {}, "Batch 1 of epoch 0 has 32 rows where batch_size is 64"),
    (X, dict(batch_size=64, metadata={"when": object()}), "metadata cannot be saved in config.json (Object of type object"),
    (X, dict(batch_size=64, metadata={"score": math.nan}), "metadata cannot be saved in config.json (Out of range float"),
])
def test_data_a_run_cannot_take_is_one_sentence_before_any_step(tmp_path, data, options, needle):
    with pytest.raises(ValueError) as error:
        fit(data, 32, 4, out=tmp_path / "run", progress=False, **options)
    assert needle in str(error.value) and one_sentence(str(error.value)), error.value
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_more_bad_input_of_the_library_is_one_sentence():
    import numpy as np

    from saelib.activations import shuffle
    from saelib.data import contexts

    sae = TopKSAE(8, 32, 4)
    cases = [
        (lambda: sae.decode(torch.tensor(1.0)), "A dense code must have shape (..., 32) for this SAE's n_latents, got ()."),
        (lambda: sae.decode([1, 2]), "decode takes the Latents of encode or a dense (..., n_latents) tensor, got list."),
        (lambda: sae.set_threshold_for_l0(X[:0], 2), "set_threshold_for_l0 needs a sample of at least one token, got shape (0, 8)."),
        (lambda: fit([b.numpy() for b in X.split(64)], 32, 4, progress=False), "The first batch is a ndarray; give torch tensors"),
        (lambda: fit([X[:64], X[64:128].numpy()], 32, 4, progress=False), "Batch 1 of epoch 0 is a ndarray; give torch tensors."),
        (lambda: contexts("wikipedia", None, ctx_len=0), "ctx_len must be an integer >= 2, got 0."),
        (lambda: contexts("wikipedia", None, max_tokens=0), "max_tokens must be at least one context (64 tokens), got 0."),
        (lambda: list(shuffle([X], 0)), "batch_size must be a positive integer, got 0."),
    ]
    for call, needle in cases:
        with pytest.raises(ValueError) as error:
            call()
        assert needle in str(error.value) and one_sentence(str(error.value)), error.value


def test_an_iterable_trains_on_its_full_batches_and_drops_a_shorter_last_one(tmp_path):
    batches = [*X[:192].split(64), X[192:224]]  # 3 of 64 rows, then 32
    fit(batches, 32, 4, tokens=6 * 64, out=tmp_path / "run", progress=False, log_every=1)
    rows = read_metrics(tmp_path / "run")
    assert [row["tokens"] for row in rows] == [64 * step for step in range(1, 7)]  # 2 epochs of 3 full batches


def test_a_transposed_tensor_trains_as_its_contiguous_copy():
    x = X.T.contiguous().T  # (256, 8) with strides (1, 256)
    assert not x.is_contiguous()
    opts = dict(batch_size=64, tokens=256, seed=0, progress=False)
    for a, b in zip(fit(x, 32, 4, **opts).state_dict().values(), fit(X.clone(), 32, 4, **opts).state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, equal_nan=True)  # up to the order of float sums


def test_a_run_that_trained_until_its_data_ended_is_not_given_a_budget(tmp_path):
    opts = dict(decay="none", batch_size=64, out=tmp_path / "run", progress=False)
    fit((b for b in X.split(64)), 32, 4, **opts)  # a generator: no budget, 4 steps
    with pytest.raises(ValueError, match=r"tokens: None -> 128\); use a new out folder or the same options \(a run that "
                                         r"trained until its data ended cannot be given a budget\)\.$"):
        fit((b for b in X.split(64)), 32, 4, tokens=128, **opts)


def test_the_newest_checkpoint_is_the_one_of_the_most_steps_past_a_billion(tmp_path):
    for step in (999_999_999, 1_000_000_000):
        (tmp_path / "checkpoints" / f"step_{step:09d}").mkdir(parents=True)
    assert latest_checkpoint(tmp_path).name == "step_1000000000"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads which file each descriptor is from /proc")
def test_a_checkpoint_reaches_the_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    synced, fsync = [], os.fsync

    def observed(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", observed)
    fit(X, 32, 4, batch_size=64, tokens=256, checkpoint_every_tokens=128, out=tmp_path / "run", progress=False)
    folder = str(tmp_path / "run" / "checkpoints" / ".step_000000004.tmp-shared")
    written = synced.index(f"{folder}/state.safetensors")
    assert f"{folder}/state.json" in synced and synced.index(folder) > written  # the files, then their folder
    assert str(tmp_path / "run" / "checkpoints") in synced[synced.index(folder):]  # then the rename


def _check_out(path, start, refusals):
    from saelib.files import writable_folder

    start.wait()
    try:
        writable_folder(path, "out")
    except ValueError as err:
        refusals.put(str(err))


def test_ranks_checking_one_new_run_folder_at_once_all_find_it_writable(tmp_path):
    """Every rank of a launch checks ``out`` before the ranks meet, and each removes the folders it
    made to find out: that must not fail another rank's check (that rank would refuse the run while
    the others waited for it at their first collective)."""
    context = multiprocessing.get_context("fork")  # plain Python in the children: no threads to lose
    refusals = context.Queue()
    for attempt in range(40):
        start = context.Barrier(4)
        ranks = [context.Process(target=_check_out, args=(tmp_path / str(attempt) / "runs" / "sae", start, refusals))
                 for _ in range(4)]
        for rank in ranks:
            rank.start()
        for rank in ranks:
            rank.join(timeout=60)
        assert [rank.exitcode for rank in ranks] == [0] * 4
    assert refusals.empty(), refusals.get()
