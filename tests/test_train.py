"""The trainer: the paper's findings at toy scale, resume, run folders and bad input."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from saelib import load
from saelib.config import TrainConfig, paper_lr
from saelib.sae import TopKSAE
from saelib.grid import Grid
from saelib.normalize import Normalizer
from saelib.train import TensorSource, _train, fit, geometric_median, latest_checkpoint, learning_rate

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls gain nothing from threads


# The planted data's own seeds: an SAE of seed s starts its decoder as torch.randn from seed s, so features
# drawn from the same seed (and shape) would start it at the answer
PLANTED_SEEDS = 1_000_003


def toy_data(n_features=512, d=64, n=60_000, active=4, seed=0):
    """Sparse combinations of known unit features plus a little noise: ``(x, features)``."""
    g = torch.Generator().manual_seed(PLANTED_SEEDS + seed)
    features = torch.nn.functional.normalize(torch.randn(n_features, d, generator=g), dim=1)
    on = torch.rand(n, n_features, generator=g) < active / n_features
    coefficients = on * (0.5 + torch.rand(n, n_features, generator=g))
    return coefficients @ features + 0.01 * torch.randn(n, d, generator=g), features


def mean_best_cosine(W_dec, features):
    return (torch.nn.functional.normalize(W_dec, dim=1) @ features.T).max(0).values.mean().item()


def evaluate(sae, x):
    with torch.no_grad():
        out = sae(x)
    return out.nmse.item(), out.l0.item()


def test_topk_recovers_ground_truth_features():
    x, features = toy_data()
    start = TopKSAE(64, 1024, 4, generator=torch.Generator().manual_seed(0))  # where fit's seed 0 starts
    assert mean_best_cosine(start.W_dec, features) < 0.6
    sae = fit(x, 1024, 4, tokens=400_000, batch_size=512, progress=False)  # 2 latents a feature, the default lr
    assert mean_best_cosine(sae.W_dec, features) >= 0.95


def test_auxk_and_tied_init_prevent_dead_latents(tmp_path):
    x, _ = toy_data(n_features=2048, active=8)
    dead = {}
    for name, options in {"paper": dict(auxk=True, tied_init=True), "ablation": dict(auxk=False, tied_init=False)}.items():
        fit(x, 512, 4, tokens=50_000, batch_size=512, lr=1e-2, dead_tokens=5000, progress=False, out=tmp_path / name, **options)
        dead[name] = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1])["dead_fraction"]
    assert dead["paper"] < 0.05
    assert dead["ablation"] > dead["paper"] + 0.25


def test_auxk_revives_latents_forced_dead_at_init():
    """A case with a known answer: a quarter of the latents get encoder rows 20x shorter at init, so
    they (almost) never reach the top k. Without AuxK nothing trains them and they stay dead; AuxK, which
    trains the dead latents' top pre-activations on the residual, must bring them back."""
    x, _ = toy_data(n_features=256, active=4, n=30_000)
    x = Normalizer.fit(x).apply(x)
    forced = torch.arange(0, 256, 4)
    revived = {}
    for auxk in (True, False):
        cfg = TrainConfig(n_latents=256, k=4, tokens=60_000, batch_size=512, lr=3e-3, dead_tokens=2048,
                          auxk=auxk).resolved(x.shape[1], len(x))
        sae = TopKSAE(x.shape[1], 256, 4, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            sae.W_enc[forced] *= 0.05
        _train(TensorSource(x), sae, cfg, None, Grid.single(torch.device("cpu")), False, [])
        with torch.no_grad():
            latents = sae.train_forward(x[:8192]).latents
        fired = torch.zeros(256, dtype=torch.bool)
        fired[latents.indices[latents.values > 0]] = True
        revived[auxk] = fired[forced].float().mean().item()
    # measured: all of them with AuxK, 4 of the 64 without (those that won the top k by chance)
    assert revived[True] > 0.9 and revived[False] < 0.2, revived


def test_topk_beats_relu_l1_at_equal_or_higher_relu_l0():
    x, _ = toy_data(active=6, n=30_000)
    options = dict(tokens=400_000, batch_size=512, progress=False)  # each at its default learning rate
    topk_nmse, topk_l0 = evaluate(fit(x, 1024, 6, **options), x[:8192])
    relu_nmse, relu_l0 = evaluate(fit(x, 1024, None, arch="relu", l1_coef=0.3, **options), x[:8192])
    assert relu_l0 >= topk_l0, "the ReLU baseline is given at least as many active latents"
    assert topk_nmse < 0.8 * relu_nmse


def test_geometric_median_minimises_sum_of_distances():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(200, 5, generator=g), 100 + torch.randn(20, 5, generator=g)])
    median = geometric_median(x)
    cost = lambda y: (x - y).norm(dim=1).sum()  # noqa: E731
    for _ in range(20):
        assert cost(median) <= cost(median + 0.01 * torch.randn(5, generator=g)) + 1e-4
    assert median.norm() < 2 < x.mean(0).norm(), "robust to the outlying cluster, unlike the mean"
    point_on_data = geometric_median(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
    torch.testing.assert_close(point_on_data, torch.zeros(2))


def test_tensor_source_is_deterministic_and_skips():
    source = TensorSource(torch.arange(100.0).unsqueeze(1))
    epoch0 = list(source.batches(8, seed=1, epoch=0))
    assert len(epoch0) == 12 and all(b.shape == (8, 1) and b.dtype == torch.float32 for b in epoch0)
    assert all(torch.equal(a, b) for a, b in zip(epoch0, source.batches(8, seed=1, epoch=0)))
    assert all(torch.equal(a, b) for a, b in zip(epoch0[5:], source.batches(8, seed=1, epoch=0, start=5)))
    assert not torch.equal(epoch0[0], next(source.batches(8, seed=1, epoch=1)))
    assert torch.cat(epoch0).unique().numel() == 96


def test_learning_rate_schedule():
    cfg = TrainConfig(n_latents=2**16, k=32, tokens=100 * 4096, lr_multiplier=1).resolved(d_in=768, n_tokens=None)
    assert cfg.lr == pytest.approx(1e-4) and cfg.warmup_steps == 5 and cfg.k_aux == 384
    rates = [learning_rate(cfg, step, 100) for step in range(100)]
    assert rates[0] < rates[4] == pytest.approx(cfg.lr) and rates[5] == pytest.approx(cfg.lr)
    assert all(a >= b for a, b in zip(rates[5:], rates[6:])) and rates[-1] < 0.02 * cfg.lr


def test_lr_multiplier_scales_the_papers_rule_and_an_explicit_lr_wins():
    assert paper_lr(2**14) == pytest.approx(2e-4) and paper_lr(2**16) == pytest.approx(1e-4)
    scaled = TrainConfig(n_latents=4096, lr_multiplier=16).resolved(d_in=8, n_tokens=None)
    assert scaled.lr == pytest.approx(16 * paper_lr(4096)) and scaled.lr_multiplier == 1  # folded into lr
    assert TrainConfig(n_latents=4096, lr=1e-3, lr_multiplier=16).resolved(d_in=8, n_tokens=None).lr == 1e-3
    with pytest.raises(ValueError, match="lr_multiplier must be a positive finite number, got -1"):
        TrainConfig(lr_multiplier=-1).resolved(d_in=8, n_tokens=None)


def test_fit_on_iterable_of_batches_and_ema():
    x, _ = toy_data(n=4096, d=16, n_features=64)
    sae = fit(list(x.split(256)), 64, 4, ema=0.9, progress=False)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    assert sae.normalizer.scale == 1.0  # non-tensor data is used as given
    # the batches set the step size: a budget under the default batch_size is still two steps of 256
    short = fit(list(x.split(256)), 64, 4, tokens=512, out=None, progress=False)
    assert not torch.equal(short.W_dec, sae.W_dec)
    with pytest.raises(ValueError, match=r"^tokens=128 is less than one batch of batch_size=256; raise tokens"):
        fit(list(x.split(256)), 64, 4, tokens=128, progress=False)


def test_ema_returns_the_bias_corrected_average_of_the_steps_weights():
    """At a constant learning rate a run of t steps is the first t steps of a longer one, so the
    weights after each step are the t-step runs'; fit(ema=d) returns their bias-corrected average,
    with the decoder rows folded back to unit norm."""
    x, _ = toy_data(n=4096, d=16, n_features=64)
    opts = dict(batch_size=256, decay="none", warmup_steps=0, dead_tokens=2048, lr=3e-3, progress=False)
    steps, decay = 6, 0.7
    weights = [fit(x, 64, 4, tokens=t * 256, **opts).state_dict() for t in range(1, steps + 1)]
    by_hand = fit(x, 64, 4, tokens=steps * 256, **opts)
    with torch.no_grad():
        for name, p in by_hand.named_parameters():
            average = sum(decay ** (steps - t) * (1 - decay) * w[name] for t, w in enumerate(weights, 1))
            p.copy_(average / (1 - decay**steps))
        by_hand.fold_decoder_norms()
    ema = fit(x, 64, 4, tokens=steps * 256, ema=decay, **opts)
    for name, p in ema.named_parameters():
        torch.testing.assert_close(p, getattr(by_hand, name), rtol=1e-4, atol=1e-5, msg=name)
    assert (ema.W_enc - weights[-1]["W_enc"]).abs().max() > 1e-3  # the average, not the last step's weights


def test_a_trained_sae_is_returned_without_the_memory_its_steps_kept():
    from saelib import kernels

    x, _ = toy_data(n=2048, d=16, n_features=64)
    sae = fit(x, 64, 4, tokens=8 * 256, batch_size=256, progress=False)
    assert "_workspaces" not in sae.__dict__  # pre (B, n), the encoder with its bias column, the top-k's maxima
    assert all(p.grad is None and id(p) not in kernels._ROW_GRAD_MEMORY for p in sae.parameters())
    with torch.no_grad():
        assert sae(x[:8]).x_hat.shape == (8, 16)  # the next encode allocates what it needs


def test_the_share_of_time_spent_waiting_for_batches_is_logged(tmp_path):
    class Slow(TensorSource):  # a supply far slower than the trainer: it waits most of the time
        def batches(self, *args, **kwargs):
            for x in super().batches(*args, **kwargs):
                time.sleep(0.05)
                yield x

    x, _ = toy_data(n=2048, d=16, n_features=64)
    for name, source in (("slow", Slow(x)), ("tensor", TensorSource(x))):
        fit(source, 64, 4, out=tmp_path / name, tokens=16 * 128, batch_size=128, log_every=4, progress=False)
    waits = {name: [json.loads(line)["input_wait"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
             for name in ("slow", "tensor")}
    assert len(waits["slow"]) == 4 and all(0 <= w <= 1 for w in waits["slow"] + waits["tensor"])
    assert min(waits["slow"]) > 0.5 and sum(waits["tensor"]) < sum(waits["slow"])


RUN_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    from saelib.train import TensorSource, fit

    class Slow(TensorSource):  # same data, slow enough to be killed mid-run
        def batches(self, *args, **kwargs):
            for x in super().batches(*args, **kwargs):
                time.sleep(float(sys.argv[2]))
                yield x

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 32, generator=g) @ torch.randn(32, 32, generator=g)
    fit(Slow(x), 128, 8, out=sys.argv[1], tokens=60 * 128, batch_size=128, ema=0.99,
        checkpoint_every_tokens=5 * 128, log_every=2, seed=7, device="cpu")  # bit-identical: CPU arithmetic
    """
)


def run_script(out, delay):
    return subprocess.Popen([sys.executable, "-c", RUN_SCRIPT, str(out), str(delay)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_kill_and_resume_is_bit_identical(tmp_path):
    reference = run_script(tmp_path / "reference", 0)
    killed = run_script(tmp_path / "resumed", 0.05)
    deadline = time.monotonic() + 120
    while latest_checkpoint(tmp_path / "resumed") is None and time.monotonic() < deadline:
        assert killed.poll() is None, killed.stderr.read()
        time.sleep(0.05)
    assert killed.poll() is None, "the run must still be going when it is killed"
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "resumed" / "sae").exists()

    resumed = run_script(tmp_path / "resumed", 0)
    _, log = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, log
    assert "Resuming" in log and "from step 0 " not in log
    _, log = reference.communicate(timeout=120)
    assert reference.returncode == 0, log

    a, b = load(tmp_path / "reference" / "sae"), load(tmp_path / "resumed" / "sae")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, equal_nan=True, msg=name)
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(2, 61, 2))


def test_finished_run_is_loaded_and_a_changed_config_is_refused(tmp_path, capsys):
    x, _ = toy_data(n=2048, d=16, n_features=64)
    options = dict(tokens=1024, batch_size=256, out=tmp_path / "run")
    first = fit(x, 64, 4, progress=False, **options)
    assert (tmp_path / "run" / "sae" / "sae.safetensors").is_file()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["d_in"] == 16
    again = fit(x, 64, 4, progress=True, **options)
    assert "without retraining" in capsys.readouterr().err
    assert torch.equal(first.W_dec, again.W_dec)
    with pytest.raises(ValueError, match="k: 4 -> 8"):
        fit(x, 64, 8, progress=False, **options)
    with pytest.raises(ValueError, match="d_in=16 but the data has d_in=8"):
        fit(x[:, :8], 64, 4, progress=False, **options)


def test_a_run_is_refused_other_activations_of_the_same_shape(tmp_path):
    x, _ = toy_data(n=2048, d=16, n_features=64)
    other, _ = toy_data(n=2048, d=16, n_features=64, seed=1)
    options = dict(n_latents=64, k=4, tokens=1024, batch_size=256, progress=False)
    first = fit(x, out=tmp_path / "run", **options)
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["data"]
    assert re.fullmatch(r"tensor 2048 x 16, torch.float32 xxh3 \w{16}", recorded), recorded
    data = r"tensor 2048 x 16, torch.float32 xxh3 \w{16}"
    with pytest.raises(ValueError, match=rf"run was trained on other activations \({data}; given: {data}\); use a new out folder"):
        fit(other, out=tmp_path / "run", **options)
    with pytest.raises(ValueError, match="run was trained on other activations"):  # normalised alike, raw twice as large
        fit(2 * x, out=tmp_path / "run", **options)
    one_row = x.clone()
    one_row[1000] += 1e-3  # every row counts, not a sample of them
    with pytest.raises(ValueError, match="run was trained on other activations"):
        fit(one_row, out=tmp_path / "run", **options)
    assert torch.equal(fit(x.clone(), out=tmp_path / "run", **options).W_dec, first.W_dec)  # the same values: loaded
    # extended on batches, which it cannot check, a constant-rate run keeps the fingerprint it recorded
    fit(x, out=tmp_path / "longer", **{**options, "decay": "none"})
    kept = json.loads((tmp_path / "longer" / "config.json").read_text())["data"]
    fit(list(x.split(256)), out=tmp_path / "longer", **{**options, "decay": "none", "tokens": 2048})
    assert json.loads((tmp_path / "longer" / "config.json").read_text())["data"] == kept

    # a finished run written before runs recorded their data: its SAE's normaliser must be the data's
    config = tmp_path / "run" / "config.json"
    config.write_text(json.dumps({key: value for key, value in json.loads(config.read_text()).items() if key != "data"}))
    assert torch.equal(fit(x, out=tmp_path / "run", **options).W_dec, first.W_dec)
    with pytest.raises(ValueError, match=r"run was trained on other activations \(its SAE's normaliser is not this data's\)"):
        fit(other, out=tmp_path / "run", **options)


def test_a_constant_rate_run_extended_to_more_tokens_is_the_longer_run(tmp_path):
    x, _ = toy_data(n=4096, d=16, n_features=64)
    options = dict(batch_size=256, decay="none", warmup_steps=2, lr_multiplier=2, log_every=1)
    fit(x, 64, 4, tokens=1024, out=tmp_path / "run", progress=False, **options)
    longer = fit(x, 64, 4, tokens=3072, out=tmp_path / "run", progress=False, **options)  # on from the last checkpoint
    scratch = fit(x, 64, 4, tokens=3072, out=tmp_path / "scratch", progress=False, dead_tokens=256, **options)
    for (name, p), q in zip(longer.state_dict().items(), scratch.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, equal_nan=True, msg=name)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["tokens"] == 3072 and config["dead_tokens"] == 256  # kept from the first budget's default
    # options passed as None are defaults, as `saelib train` passes every trainer field: extended alike
    unset = dict.fromkeys(("lr", "dead_tokens", "checkpoint_every_tokens"), None)
    fit(x, 64, 4, tokens=4096, out=tmp_path / "run", progress=False, **options, **unset)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["dead_tokens"] == 256
    with pytest.raises(ValueError, match="tokens: 4096 -> 2048.*not cut to fewer"):  # a shorter budget is another run
        fit(x, 64, 4, tokens=2048, out=tmp_path / "run", progress=False, **options)
    fit(x, 64, 4, tokens=1024, out=tmp_path / "decaying", progress=False, batch_size=256)
    with pytest.raises(ValueError, match="only a run at a constant learning rate"):
        fit(x, 64, 4, tokens=2048, out=tmp_path / "decaying", progress=False, batch_size=256)


@pytest.mark.parametrize("k, match", [(65, "k=65"), (0, "k must be a positive integer, got 0")])
def test_bad_k_is_refused(k, match):
    with pytest.raises(ValueError, match=match):
        fit(torch.randn(512, 16), 64, k, tokens=256, batch_size=128, progress=False)


def test_unknown_option_is_refused():
    with pytest.raises(ValueError, match="learning_rate"):
        fit(torch.randn(512, 16), 64, 4, learning_rate=1e-3, progress=False)


@pytest.mark.parametrize("option", ["model", "layer", "epochs"])
def test_fit_refuses_the_data_and_run_fields_of_the_config(option):
    """They belong to `saelib train` (which extracts the activations), not to a trainer handed its data
    (latent_parallel is fit's own argument: it joins a torch.distributed grid)."""
    with pytest.raises(ValueError, match=rf"fit\(\) got unknown option\(s\) \['{option}'\]; options are TrainConfig's trainer fields"):
        fit(torch.randn(512, 16), 64, 4, progress=False, **{option: 1})


def test_the_old_import_paths_still_work():
    import saelib
    import saelib.train
    from saelib import config

    assert saelib.TrainConfig is saelib.train.TrainConfig is config.TrainConfig
    assert saelib.train.paper_lr is config.paper_lr and saelib.train.resolve_device is config.resolve_device


@pytest.mark.parametrize("options, match", [
    (dict(seed=-1), "seed must be a non-negative integer, got -1"),
    (dict(batch_size=2.5), "batch_size must be a positive integer, got 2.5"),
    (dict(auxk="yes"), "auxk must be true or false, got 'yes'"),
    (dict(adam_betas=(0.9, 1.5)), r"adam_betas must be two numbers in \[0, 1\)"),
    (dict(decay="cosine"), "decay must be one of linear, none, got 'cosine'"),
    (dict(ema=1.0), "ema must be None or a decay in"),
    (dict(arch="multitopk", n_latents=64, k=32), "multitopk trains with 4k=128 latents"),
    (dict(k=None), "k must be a positive integer for arch='topk', got None"),
    (dict(ctx_len=1), "ctx_len must be an integer >= 2, got 1"),
    (dict(max_tokens=10, ctx_len=64), r"max_tokens must be at least one context \(64 tokens\), got 10"),
    (dict(val_fraction=1.0), r"val_fraction must be a share in \(0, 1\)"),
    (dict(n_latents=2**31), r"n_latents must be at most 2147483647 \(the largest tensor dimension"),
    (dict(tokens=2**63), "tokens must be at most 9223372036854775807"),
    (dict(lr=10**400), "lr must be a positive finite number, got an integer of 1329 bits"),
    (dict(model=" "), "model must not be blank"),
    (dict(device=1), "device must be a string, got 1"),
])
def test_every_value_is_checked_when_the_config_is_built(options, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**options)


def test_replace_checks_again_and_lists_become_tuples():
    from dataclasses import replace

    cfg = TrainConfig(adam_betas=[0.8, 0.99])
    assert cfg.adam_betas == (0.8, 0.99)
    with pytest.raises(ValueError, match="n_latents must be a positive integer, got 0"):
        replace(cfg, n_latents=0)


def test_nan_batch_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path):
    batches = list(torch.randn(12 * 64, 16).split(64))
    batches[9][3, 5] = float("nan")
    with pytest.raises(ValueError, match="Batch 9 of epoch 0 .*NaN"):
        fit(batches, 64, 4, out=tmp_path, checkpoint_every_tokens=4 * 64, geometric_median_samples=128, progress=False)
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint.name == "step_000000008"
    assert json.loads((checkpoint / "state.json").read_text())["batch"] == 8
    assert not (tmp_path / "sae").exists()
    with pytest.raises(ValueError, match="non-finite"):
        fit(torch.stack(batches[8:]).flatten(0, 1), 64, 4, progress=False)


def test_batch_source_with_normalizer_and_metadata_is_saved(tmp_path):
    from saelib.normalize import Normalizer

    raw = torch.randn(2048, 16) * 3 + 1
    normalizer = Normalizer.fit(raw)
    sae = fit(TensorSource(normalizer.apply(raw)), 64, 4, tokens=1024, batch_size=256, out=tmp_path,
              normalizer=normalizer, metadata={"model": "toy", "layer": 2}, progress=False)
    loaded = load(tmp_path / "sae")
    assert torch.equal(loaded.W_dec, sae.W_dec) and torch.equal(loaded.normalizer_mean, normalizer.mean)
    assert loaded.metadata == {"model": "toy", "layer": 2} and loaded.normalizer.scale == normalizer.scale
    assert loaded.decode(loaded.encode(raw[:4])).shape == (4, 16)


def test_bf16_encoder_run_trains_and_resumes_with_either_dtype(tmp_path):
    x, _ = toy_data(n=2048, d=16, n_features=64)
    options = dict(tokens=8192, batch_size=256, out=tmp_path / "run", progress=False)
    sae = fit(x, 64, 4, encoder_dtype="bfloat16", **options)
    reference = fit(x, 64, 4, tokens=8192, batch_size=256, progress=False)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["encoder_dtype"] == "bfloat16"
    with torch.no_grad():
        # the encoder dtype is how the steps ran, not the SAE: fit's SAE encodes in fp32, as a loaded one
        assert sae.encoder_dtype == reference.encoder_dtype == "float32" and float(reference(x).nmse) < 0.5
        assert float(sae(x).nmse) == pytest.approx(float(reference(x).nmse), rel=0.05)
        assert not torch.equal(sae.W_enc, reference.W_enc)
    # nor the recipe: the finished run loads under another dtype
    again = fit(x, 64, 4, **options)
    assert again.encoder_dtype == "float32" and torch.equal(again.W_enc, sae.W_enc)
    with pytest.raises(ValueError, match="encoder_dtype must be one of float32, bfloat16, got 'fp8'"):
        fit(x, 64, 4, encoder_dtype="fp8", progress=False)


def test_the_device_is_recorded_checked_and_not_part_of_the_runs_identity(tmp_path):
    x, _ = toy_data(n=2048, d=16, n_features=64)
    options = dict(tokens=4096, batch_size=256, out=tmp_path / "run", progress=False)
    sae = fit(x, 64, 4, device="cpu", **options)
    assert sae.W_enc.device.type == "cpu"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["device"] == "cpu"
    assert torch.equal(fit(x, 64, 4, device=None, **options).W_enc, sae.W_enc)  # finished: loads, any device
    with pytest.raises(ValueError, match="device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got 'gpu0'"):
        fit(x, 64, 4, device="gpu0", progress=False)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=f"device 'cuda:{count}' was asked for but this machine has .*use device='cpu'"):
        fit(x, 64, 4, device=f"cuda:{count}", progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_run_on_the_gpu_matches_the_cpu_run(tmp_path):
    x, _ = toy_data(n=4096, d=16, n_features=64)
    options = dict(tokens=8192, batch_size=256, progress=False)
    cpu = fit(x, 64, 4, device="cpu", **options)
    gpu = fit(x, 64, 4, device="cuda", out=tmp_path / "run", **options)
    assert gpu.W_enc.device.type == "cpu"  # returned like a loaded SAE
    with torch.no_grad():
        assert float(gpu(x).nmse) == pytest.approx(float(cpu(x).nmse), rel=0.02)


def test_a_run_written_before_a_config_field_existed_still_loads(tmp_path):
    """Fields added to TrainConfig later count as their defaults in an older run's config.json."""
    x = torch.randn(2048, 16)
    fit(x, 32, 4, tokens=1024, batch_size=512, out=tmp_path, progress=False)
    record = json.loads((tmp_path / "config.json").read_text())
    del record["b_pre_init"], record["encoder_init_scale"]
    (tmp_path / "config.json").write_text(json.dumps(record))
    fit(x, 32, 4, tokens=1024, batch_size=512, out=tmp_path, progress=False)  # finished: loads
    with pytest.raises(ValueError, match="b_pre_init: 'geometric_median' -> 'mean'"):
        fit(x, 32, 4, tokens=1024, batch_size=512, out=tmp_path, progress=False, b_pre_init="mean")


def test_the_ema_is_bias_corrected():
    """After t updates with constant parameters the EMA is exactly those parameters, not a blend
    with the zeros it starts from (or with the init, which would dominate a short run)."""
    from torch import nn

    from saelib.train import ema_apply, ema_start, ema_update

    module = nn.Linear(3, 2)
    ema = ema_start(module)
    target = {name: p.detach().clone() for name, p in module.named_parameters()}
    for _ in range(5):
        ema_update(ema, module, 0.999)
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    ema_apply(ema, module, 0.999, steps=5)
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.detach(), target[name])


@pytest.mark.parametrize("data, match", [
    (torch.randint(0, 5, (512, 16)), r"The activations have dtype torch.int64; train on floating-point activations"),
    (torch.ones(512, 16, dtype=torch.bool), r"The activations have dtype torch.bool"),
    ([torch.randint(0, 5, (128, 16))] * 4, r"The first batch has dtype torch.int64"),
    (torch.empty(0, 16), r"Activations must be a non-empty \(N, d_in\) tensor, got shape \(0, 16\)"),
    (torch.randn(512, 16).numpy(), r"an iterable of \(B, d_in\) tensors, got ndarray; pass torch.from_numpy\(x\)\.$"),
    (None, r"The activations must be a \(N, d_in\) tensor, an activation cache or an iterable .*, got NoneType\.$"),
])
def test_activations_that_are_not_floating_point_or_empty_are_refused(data, match):
    with pytest.raises(ValueError, match=match):
        fit(data, 64, 4, tokens=256, batch_size=128, normalize=False, progress=False)


def test_normalize_is_a_flag():
    with pytest.raises(ValueError, match=r"normalize must be True, False or None, got 'no'\.$"):
        fit(torch.randn(512, 16), 64, 4, tokens=256, batch_size=128, normalize="no", progress=False)


def test_activations_hooked_with_autograd_on_train_on_their_values():
    x = torch.randn(512, 16)
    hooked = x * torch.ones(16, requires_grad=True)  # what a forward outside no_grad hands over
    trained = fit(hooked, 64, 4, tokens=1024, batch_size=128, progress=False)
    torch.testing.assert_close(trained.state_dict(), fit(x, 64, 4, tokens=1024, batch_size=128, progress=False).state_dict(),
                               equal_nan=True)


def test_a_file_where_the_run_folder_goes_is_refused_naming_it(tmp_path):
    taken = tmp_path / "notes.txt"
    taken.write_text("not a folder")
    for out in (taken, taken / "run"):
        with pytest.raises(ValueError, match=rf"out '{out}' cannot be a folder: {taken} is a file; name a folder\.$"):
            fit(torch.randn(512, 16), 64, 4, out=out, tokens=256, batch_size=128, progress=False)
    assert taken.read_text() == "not a folder"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, where no folder can be made")
def test_a_run_folder_that_cannot_be_made_is_refused_in_one_sentence():
    with pytest.raises(ValueError, match=r"^out '/proc/saelib-run' cannot be written \(No such file or directory\); "
                                         r"name a folder you can write to\.$"):
        fit(torch.randn(512, 16), 64, 4, out="/proc/saelib-run", tokens=256, batch_size=128, progress=False)


@pytest.mark.parametrize("out", ["", "  "])
def test_an_empty_run_folder_name_is_refused(out, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an empty name would otherwise train into the current folder
    with pytest.raises(ValueError, match=f"out must name a run folder, got {out!r}"):
        fit(torch.randn(512, 16), 64, 4, out=out, tokens=256, batch_size=128, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_b_pre_starts_at_the_samples_geometric_median_mean_or_zero():
    x, _ = toy_data(n=2048, d=16, n_features=64)
    x = x + 3.0 * torch.randn(16, generator=torch.Generator().manual_seed(1))  # far from the origin
    starts = {"geometric_median": geometric_median(x), "mean": x.mean(0), "zero": torch.zeros(16)}
    assert (starts["geometric_median"] - starts["mean"]).norm() > 1e-2
    for how, start in starts.items():  # one step at a learning rate that cannot move b_pre measurably
        sae = fit(x, 64, 4, tokens=256, batch_size=256, lr=1e-12, warmup_steps=0, normalize=False, b_pre_init=how,
                  progress=False)
        torch.testing.assert_close(sae.b_pre, start, rtol=0, atol=1e-4, msg=how)


def test_grad_clip_bounds_the_gradient_norm_of_a_step_and_zero_turns_it_off():
    from saelib.train import make_optimizer, train_step

    x, _ = toy_data(n=512, d=16, n_features=64)
    norms = {}
    for clip in (1e-3, 0.0):
        cfg = TrainConfig(n_latents=64, k=4, grad_clip=clip, lr=1e-3)
        sae = TopKSAE(16, 64, 4, generator=torch.Generator().manual_seed(0))
        train_step(sae, make_optimizer(sae, cfg), x[:256], None, cfg)
        norms[clip] = float(torch.nn.utils.get_total_norm([p.grad for p in sae.parameters()]))
    assert norms[0.0] > 0.1 and norms[1e-3] == pytest.approx(1e-3, rel=1e-3)
