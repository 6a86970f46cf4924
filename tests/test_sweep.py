"""The sweep runner: grids, one folder per run, resume, held-out metrics and seed summaries."""

import json

import numpy as np
import pytest
import torch

from saelib import sweep
from saelib.train import TensorSource


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(64, 16, generator=g), dim=1)

    def sample(n):
        codes = torch.rand(n, 64, generator=g) * (torch.rand(n, 64, generator=g) < 0.06)
        return codes @ features

    return sample(2048), sample(512)


def test_grid_and_names():
    configs = sweep.grid(n_latents=[16, 64], k=[4, 32], arch="topk", seed=[0, 1])
    assert len(configs) == 6  # k=32 > n=16 is left out
    assert sweep.run_name(configs[0]) == "topk-n16-k4-s0"
    assert len(sweep.grid(n_latents=[16, 64], k=8, arch="multitopk")) == 1  # 4k <= n
    assert sweep.run_name({"n_latents": 8, "k": 2, "lr": 1e-3}) != sweep.run_name({"n_latents": 8, "k": 2, "lr": 2e-3})
    # the learning rate shows in the name; an L1 coefficient only where it acts (ReLU), hashed in elsewhere
    assert sweep.run_name({"arch": "topk", "n_latents": 8, "k": 2, "lr_multiplier": 4.0, "seed": 0}) == "topk-n8-k2-lrx4-s0"
    assert sweep.run_name({"arch": "relu", "n_latents": 8, "l1_coef": 0.05, "lr": 1e-3}).startswith("relu-n8-l10.05-lr0.001")
    topk = [sweep.run_name({"arch": "topk", "n_latents": 8, "k": 2, "l1_coef": c}) for c in (0.05, 0.1)]
    assert all(name.startswith("topk-n8-k2-") and "l1" not in name for name in topk) and topk[0] != topk[1]
    # where a run trains is not which run it is: a sweep started on the CPU resumes on a GPU
    assert sweep.run_name({"n_latents": 8, "k": 2, "device": "cuda"}) == sweep.run_name({"n_latents": 8, "k": 2})


def test_sweep_trains_evaluates_and_resumes(tmp_path, data):
    train, val = data
    source = TensorSource(train)
    configs = sweep.grid(n_latents=[32, 64], k=4, seed=[0, 1])
    common = dict(tokens=1024, batch_size=128, geometric_median_samples=256)
    table = sweep.run_sweep(configs, source, tmp_path, validation=val, progress=False, **common)
    assert [(r["n_latents"], r["seed"]) for r in table] == [(32, 0), (32, 1), (64, 0), (64, 1)]
    for row in table:
        assert 0 < row["val_nmse"] < 1 and row["val_l0"] <= 4 and 0 <= row["dead_fraction"] <= 1
        assert row["curve"][-1]["tokens"] == 1024 and row["flops"] == 6 * 16 * row["n_latents"] * 1024
    # a finished sweep loads every run instead of retraining; an interrupted one trains what is missing
    (tmp_path / sweep.run_name({**common, **configs[-1]}) / "sae" / "config.json").unlink()
    again = sweep.run_sweep(configs, source, tmp_path, validation=val, progress=False, **common)
    assert [r["val_nmse"] for r in again] == pytest.approx([r["val_nmse"] for r in table], rel=1e-5)
    assert json.loads((tmp_path / sweep.run_name({**common, **configs[0]}) / sweep.RESULT_FILE).read_text())["train_seconds"] > 0
    summary = sweep.summarize(table, ["n_latents"], ["val_nmse"])
    assert [s["runs"] for s in summary] == [2, 2] and all(s["val_nmse_std"] >= 0 for s in summary)
    assert "curve" not in sweep.without_curves(table)[0]
    mean = sweep.mean_curve(table[:2], ["nmse"])
    assert len(mean) == len(table[0]["curve"]) and mean[-1]["tokens"] == 1024
    assert mean[-1]["nmse"] == pytest.approx((table[0]["curve"][-1]["nmse"] + table[1]["curve"][-1]["nmse"]) / 2)


def test_summarize_gives_the_means_student_t_interval():
    rows = [dict(cell="a", x=v) for v in (0.10, 0.12, 0.14)] + [dict(cell="b", x=0.5)]
    a, b = sweep.summarize(rows, ["cell"], ["x"])
    # t(0.975, 2) = 4.303; sd 0.02; half-width 4.303 * 0.02 / sqrt(3)
    assert a["x"] == pytest.approx(0.12) and a["x_ci"] == pytest.approx(4.303 * 0.02 / 3**0.5, rel=1e-3)
    assert b["runs"] == 1 and b["x_ci"] == 0.0
    # a seed that diverged: counted apart, left out of the mean, the sd and the interval alike
    (c,) = sweep.summarize([dict(cell="c", x=0.20), dict(cell="c", x=0.22), dict(cell="c", x=float("nan"), diverged="Loss is nan")],
                           ["cell"], ["x"])
    assert (c["runs"], c["diverged"], c["x_runs"]) == (3, 1, 2)
    assert c["x"] == pytest.approx(0.21) and c["x_std"] == pytest.approx(0.02**0.5 / 10) and c["x_ci"] > 0


def test_a_run_that_diverges_is_a_row_and_the_sweep_goes_on(tmp_path, data):
    train, val = data
    source, common = TensorSource(train), dict(tokens=512, batch_size=128, geometric_median_samples=256)
    configs = [dict(n_latents=32, k=4, lr=1e30), dict(n_latents=32, k=4, lr=1e-3)]
    table = sweep.run_sweep(configs, source, tmp_path, validation=val, progress=False, **common)
    bad, good = table
    assert "Loss is" in bad["diverged"] and bad["lr"] == 1e30 and np.isnan(bad["val_nmse"]) and np.isnan(bad["train_nmse"])
    assert "diverged" not in good and 0 < good["val_nmse"] < 1
    folder = tmp_path / sweep.run_name({**common, **configs[0]})
    assert "diverged" in json.loads((folder / sweep.RESULT_FILE).read_text())
    (folder / "config.json").touch()
    stamp = (folder / "config.json").stat().st_mtime_ns
    again = sweep.run_sweep(configs, source, tmp_path, validation=val, progress=False, **common)
    assert again[0]["diverged"] == bad["diverged"] and (folder / "config.json").stat().st_mtime_ns == stamp  # not retrained
    with pytest.raises(ValueError, match="logged at the same tokens"):
        sweep.mean_curve(table, ["nmse"])  # the diverged run's curve stops early


def test_shards_split_a_sweep_and_a_call_without_shard_collects_it(tmp_path, data):
    source, configs = TensorSource(data[0]), sweep.grid(n_latents=[16, 32, 64], k=2)
    common = dict(tokens=256, batch_size=128, geometric_median_samples=256, progress=False)
    first = sweep.run_sweep(configs, source, tmp_path, shard=(0, 2), **common)
    second = sweep.run_sweep(configs, source, tmp_path, shard=(1, 2), **common)
    assert [r["n_latents"] for r in first] == [16, 64] and [r["n_latents"] for r in second] == [32]
    everything = sweep.run_sweep(configs, source, tmp_path, **common)  # nothing left to train: loads
    assert [r["run"] for r in everything] == [first[0]["run"], second[0]["run"], first[1]["run"]]
    assert [r["train_seconds"] for r in everything] == [first[0]["train_seconds"], second[0]["train_seconds"],
                                                        first[1]["train_seconds"]]
    with pytest.raises(ValueError, match=r"shard must be \(i, N\) with 0 <= i < N, got \(2, 2\)"):
        sweep.run_sweep(configs, source, tmp_path, shard=(2, 2), **common)


def test_changed_shared_options_train_new_runs_beside_the_old(tmp_path, data):
    # a student who edits a preset's budget re-runs the sweep: new folders, no clash with the old runs
    source, config = TensorSource(data[0]), [dict(n_latents=32, k=4)]
    short = sweep.run_sweep(config, source, tmp_path, progress=False, tokens=512, batch_size=128)
    longer = sweep.run_sweep(config, source, tmp_path, progress=False, tokens=1024, batch_size=128)
    assert (short[0]["tokens"], longer[0]["tokens"]) == (512, 1024) and short[0]["run"] != longer[0]["run"]
    assert len(list(tmp_path.iterdir())) == 2


def test_unknown_option_is_named_before_any_run_trains(tmp_path, data):
    configs = [{"n_latents": 16, "k": 2}, {"n_latents": 16, "k": 2, "colour": "red"}]
    with pytest.raises(ValueError, match="colour"):
        sweep.run_sweep(configs, TensorSource(data[0]), tmp_path, tokens=256, batch_size=128)
    assert not any(tmp_path.iterdir())


def test_progress_estimates_the_time_left_from_the_compute_to_go(tmp_path, data, capsys):
    configs = sweep.grid(n_latents=[32, 64], k=4)
    common = dict(tokens=512, batch_size=128, geometric_median_samples=256)
    sweep.run_sweep(configs, TensorSource(data[0]), tmp_path, **common)
    first, last = capsys.readouterr().out.strip().splitlines()
    assert first.startswith("[1/2] n32-k4-") and " s; about " in first and first.endswith(" left)")
    assert last.startswith("[2/2] n64-k4-") and "left" not in last
    sweep.run_sweep(configs, TensorSource(data[0]), tmp_path, **common)  # all loaded: nothing trained, no estimate
    assert "left" not in capsys.readouterr().out


def test_mean_interval_is_student_t_and_ignores_what_is_not_finite():
    from saelib.stats import mean_interval

    mean, half = mean_interval([0.10, 0.12, float("nan"), 0.14])
    assert mean == pytest.approx(0.12) and half == pytest.approx(4.303 * 0.02 / 3**0.5, rel=1e-3)
    assert mean_interval([0.3]) == (0.3, 0.0) and all(v != v for v in mean_interval([]))


def test_runs_double_their_tokens_until_their_curve_converges(tmp_path, data, capsys):
    train, val = data
    common = dict(batch_size=128, decay="none", warmup_steps=2, lr_multiplier=4, log_every=1, geometric_median_samples=256)
    configs = [dict(n_latents=32, k=4), dict(n_latents=64, k=4)]
    table = sweep.run_until_converged(configs, TensorSource(train), tmp_path, tokens=1024, max_tokens=16_384,
                                      tol=0.05, n_boot=20, validation=val, **common)
    lines = capsys.readouterr().out.splitlines()
    for row, config in zip(table, configs):
        steps = [line for line in lines if sweep.run_name({**common, **config}) in line]
        budgets = [int(line.split(": ")[1].split(" tokens")[0].replace(",", "")) for line in steps]
        assert budgets == [1024 * 2**i for i in range(len(budgets))]  # doubled until it converged or hit the cap
        assert all("beyond the run" in line for line in steps[:-1])
        assert row["curve"][-1]["tokens"] == budgets[-1] and row["tokens"] == budgets[-1]
        assert row["converged"] == (row["T"] <= budgets[-1]) and (row["converged"] or budgets[-1] == 16_384)
    assert len(lines) > len(configs)  # at least one run was extended
    again = sweep.run_until_converged(configs, TensorSource(train), tmp_path, tokens=1024, max_tokens=16_384,
                                      tol=0.05, n_boot=20, validation=val, progress=False, **common)
    assert [r["val_nmse"] for r in again] == [r["val_nmse"] for r in table]  # the finished runs are loaded
    with pytest.raises(ValueError, match="decay='none'"):
        sweep.run_until_converged(configs, TensorSource(train), tmp_path, tokens=1024, max_tokens=4096)


def test_time_left_reuses_a_sizes_own_time_and_leaves_out_the_first_runs_one_time_costs():
    from saelib.sweep import _time_left, training_flops

    def row(n):
        return {"n_latents": n, "tokens": 1000, "d_in": 8, "flops": training_flops(8, n, 1000)}

    to_go = [{"n_latents": n, "tokens": 1000} for n in (512, 2048)]
    assert _time_left([(row(512), 26.0)], to_go, 8) == pytest.approx(26.0 + 4 * 26.0)  # the only run: all there is
    assert _time_left([(row(512), 26.0), (row(512), 8.0)], to_go, 8) == pytest.approx(8.0 + 4 * 8.0)
    assert _time_left([(row(512), 26.0), (row(512), 8.0), (row(2048), 12.0)], to_go, 8) == pytest.approx(8.0 + 12.0)
    assert _time_left([], to_go, 8) is None and _time_left([(row(512), 8.0)], [{"n_latents": 512}], 8) is None
