"""The command line refuses bad input with one sentence naming the value, and exit status 2."""

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saelib.cli import main


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_sentence(err, *needles):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


BAD_TRAIN = st.one_of(
    st.tuples(st.just("--n-latents"), st.integers(-10**6, 0)),
    st.tuples(st.just("--k"), st.integers(-10**6, 0)),
    st.tuples(st.just("--k"), st.integers(1153, 10**6)),  # the ci preset has n_latents 1152
    st.tuples(st.just("--batch-size"), st.integers(-10**6, 0)),
    st.tuples(st.just("--lr"), st.sampled_from([math.nan, math.inf, -math.inf, -1e-3, 0.0])),
    st.tuples(st.just("--epochs"), st.sampled_from([math.nan, math.inf, -1.0, 0.0])),
    st.tuples(st.just("--site"), st.text("abcxyz_", min_size=1, max_size=8).filter(
        lambda s: s not in ("resid_post", "mlp_out", "attn_out"))),
    st.tuples(st.just("--arch"), st.text("abcxyz", min_size=1, max_size=6)),
    st.tuples(st.just("--layer"), st.integers(-10**6, -1)),
    st.tuples(st.just("--ctx-len"), st.integers(-10**6, 1)),
)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(BAD_TRAIN)
def test_invalid_train_options_get_one_sentence(capsys, tmp_path_factory, bad):
    flag, value = bad
    out = tmp_path_factory.mktemp("run")
    code, _, err = run(["train", "--preset", "ci", f"{flag}={value}", "--out", str(out)], capsys)  # "=": argparse reads "-inf" as a flag
    assert code == 2
    shown = "nan" if isinstance(value, float) and math.isnan(value) else str(value)
    assert_one_sentence(err, shown)
    assert not any(out.iterdir())  # refused before any work


@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text("-abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=10), min_size=1, max_size=4))
def test_unparseable_command_lines_get_one_sentence(capsys, argv):
    if argv[0] in ("extract", "train", "eval", "view", "export") or argv[0] in ("-h", "--help"):
        argv = ["bogus-" + argv[0], *argv[1:]]
    code, _, err = run(argv, capsys)
    assert code == 2
    assert_one_sentence(err, "saelib: error:")


def test_layer_out_of_range_names_the_valid_ones(capsys, tmp_path):
    code, _, err = run(["train", "--preset", "ci", "--layer", "30", "--out", str(tmp_path / "r")], capsys)
    assert code == 2
    assert_one_sentence(err, "Layer 30", "30 layers", "0 to 29")


def test_unknown_model_and_corpus_and_config_key(capsys, tmp_path):
    code, _, err = run(["extract", "--model", "no/such-model", "--layer", "1"], capsys)
    assert code == 2
    assert_one_sentence(err, "'no/such-model'")
    code, _, err = run(["extract", "--corpus", str(tmp_path / "missing.jsonl")], capsys)
    assert code == 2
    assert_one_sentence(err, "missing.jsonl")
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"learning_rate": 1e-3}))
    code, _, err = run(["train", "--config", str(cfg), "--out", str(tmp_path / "r")], capsys)
    assert code == 2
    assert_one_sentence(err, "learning_rate")


def test_a_bad_value_in_a_config_file_is_refused_naming_it(capsys, tmp_path):
    for name, text in [("cfg.json", json.dumps({"k": "eight"})), ("cfg.yaml", "n_latents: 512\nauxk: maybe\n")]:
        (tmp_path / name).write_text(text)
        code, _, err = run(["train", "--config", str(tmp_path / name), "--out", str(tmp_path / "r")], capsys)
        assert code == 2
        assert_one_sentence(err, "k" if name.endswith("json") else "auxk", "'eight'" if name.endswith("json") else "'maybe'")
    (tmp_path / "unknown.yaml").write_text("n_latents: 512\nbatchsize: 64\n")
    code, _, err = run(["extract", "--config", str(tmp_path / "unknown.yaml")], capsys)
    assert code == 2
    assert_one_sentence(err, "unknown.yaml", "batchsize")
    assert not (tmp_path / "r").exists()


def train_config(argv):
    """The configuration `saelib train argv` would train, without training it."""
    from unittest import mock

    got = []
    with mock.patch("saelib.runs.train_run", lambda cfg, out, progress=True: got.append(cfg)):
        assert main(["train", *argv, "--out", "unused"]) == 0
    return got[0]


def test_every_config_field_is_a_flag_with_help_text():
    from dataclasses import fields

    from saelib.cli import build_parser
    from saelib.config import TrainConfig

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    actions = {a.dest: a for a in train._actions}
    for f in fields(TrainConfig):
        assert f.name in actions, f"TrainConfig.{f.name} has no flag"
        assert f.metadata["help"] and f.metadata["help"] in actions[f.name].help.replace("%%", "%")
        assert actions[f.name].option_strings[0] == "--" + f.name.replace("_", "-")


def test_flags_take_their_types_from_the_fields_and_override_file_and_preset(tmp_path):
    (tmp_path / "cfg.yaml").write_text("k: 8\nlr_multiplier: 2\nseed: 3\n")
    cfg = train_config(["--preset", "ci", "--config", str(tmp_path / "cfg.yaml"), "--seed", "4", "--no-auxk",
                        "--adam-betas", "0.8", "0.95", "--k-aux", "7", "--ema", "0.99", "--max-tokens", "4096"])
    assert (cfg.n_latents, cfg.batch_size) == (1152, 1024)  # the preset
    assert (cfg.k, cfg.lr_multiplier) == (8, 2)  # the file over the preset
    assert (cfg.seed, cfg.auxk, cfg.adam_betas, cfg.k_aux, cfg.ema, cfg.max_tokens) == (4, False, (0.8, 0.95), 7, 0.99, 4096)
    assert train_config(["--preset", "ci", "--no-auxk", "--auxk"]).auxk is True


def test_presets_come_from_one_registry():
    from saelib import bench, config, evals, viz
    from saelib.cli import build_parser

    for name, preset in config.PRESETS.items():
        assert evals.PRESETS[name] is preset["eval"] and viz.PRESETS[name] is preset["view"]
        assert preset["bench"] in config.BENCH_GRIDS
        assert config.resolve(name) == config.TrainConfig(**preset["train"])
    assert bench.PRESETS is config.BENCH_GRIDS
    assert sorted(config.PRESETS) == ["ci", "demo", "full"]
    subcommands = build_parser()._subparsers._group_actions[0].choices
    for command in ("extract", "train", "eval", "view"):
        preset = next(a for a in subcommands[command]._actions if a.dest == "preset")
        assert sorted(preset.choices) == sorted(config.PRESETS)


def test_eval_of_a_missing_run(capsys, tmp_path):
    code, _, err = run(["eval", str(tmp_path / "nothing")], capsys)
    assert code == 2
    assert_one_sentence(err, "nothing")


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_export_then_load_round_trip(capsys, tmp_path, fmt):
    import torch

    from saelib import TopKSAE, load

    sae = TopKSAE(16, 64, 4, metadata={"model": "toy", "layer": 3, "site": "resid_post"})
    sae.save(tmp_path / "sae")
    code, out, _ = run(["export", str(tmp_path / "sae"), "--format", fmt, "--out", str(tmp_path / fmt)], capsys)
    assert code == 0 and fmt in out
    back = load(tmp_path / fmt)
    x = torch.randn(8, 16)
    torch.testing.assert_close(back.decode(back.encode(x)), sae.decode(sae.encode(x)))


def test_train_nproc_launches_torchrun_and_merges_latent_shards(capsys, tmp_path):
    """`saelib train --nproc 2 --latent-parallel 2`: two gloo ranks, one shard of latents each."""
    from saelib.runs import load_run, read_metrics

    out = tmp_path / "run"
    argv = ["train", "--preset", "ci", "--max-tokens", "4096", "--n-latents", "256", "--k", "8", "--batch-size", "512",
            "--nproc", "2", "--latent-parallel", "2", "--out", str(out)]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert sorted(p.name for p in (out / "sae").iterdir()) == ["shard_000_of_002", "shard_001_of_002"]
    sae = load_run(out)
    assert (sae.n_latents, sae.k) == (256, 8)
    rows = read_metrics(out)
    assert rows[-1]["nmse"] < rows[0]["nmse"]
