"""The command line refuses bad input with one sentence naming the value, and exit status 2."""

import json
import math
import os

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
    st.tuples(st.just("--lm-dtype"), st.sampled_from(["float16", "fp32", "bf16"])),
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


def test_layer_out_of_range_names_the_valid_ones(lm, capsys, tmp_path, monkeypatch):
    from saelib import paths

    # lm: the embedded model is converted before, so its progress bars are not part of the error output;
    # a fresh cache root that shares only the converted model: the refusal comes before any extraction
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(paths.cache_dir("models"))
    monkeypatch.setenv("SAELIB_HOME", str(home))
    for dry in ([], ["--dry-run"]):
        code, out, err = run(["train", "--preset", "ci", "--layer", "30", "--out", str(tmp_path / "r"), *dry], capsys)
        assert code == 2 and not out
        assert_one_sentence(err, "Layer 30", "30 layers", "0 to 29")
    assert not (home / "activations").exists() and not (tmp_path / "r").exists()
    # a hub model whose config is not on this machine: the dry run does not download it, and says so
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code, out, err = run(["train", "--preset", "ci", "--model", "no-such-org/no-such-model", "--layer", "99",
                          "--out", str(tmp_path / "r"), "--dry-run"], capsys)
    assert code == 0 and json.loads(out)["layer"] == 99
    assert_one_sentence(err, "no-such-org/no-such-model's config is not on this machine")


def test_an_out_folder_in_use_or_of_other_activations_is_refused_before_any_extraction(lm, capsys, tmp_path, monkeypatch):
    import fcntl

    from saelib import paths

    run_folder = str(tmp_path / "r")
    code, _, err = run(["train", "--preset", "ci", "--out", run_folder], capsys)
    assert code == 0, err
    # a fresh cache root sharing only the converted model: a refusal that extracted first would fill it
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(paths.cache_dir("models"))
    monkeypatch.setenv("SAELIB_HOME", str(home))
    for dry in ([], ["--dry-run"]):
        code, out, err = run(["train", "--preset", "ci", "--layer", "6", "--out", run_folder, *dry], capsys)
        assert code == 2 and not out
        assert_one_sentence(err, "was trained on other activations", "layer 12 resid_post", "given: activation cache "
                            "of smollm2-135m layer 6 resid_post on wikipedia train")
    with open(tmp_path / "r" / ".lock", "a+") as lock:  # another trainer holds the run
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.truncate(0)
        lock.write("pid 4242")
        lock.flush()
        code, out, err = run(["train", "--preset", "ci", "--out", run_folder], capsys)
        assert code == 2 and not out
        assert_one_sentence(err, "is in use by another trainer (pid 4242)")
    assert not (home / "activations").exists()
    # a corpus file that does not exist: the dry run says so; a datasets name it leaves to the extraction
    code, out, err = run(["train", "--preset", "ci", "--corpus", str(tmp_path / "missing.txt"), "--out", run_folder,
                          "--dry-run"], capsys)
    assert code == 2 and not out
    assert_one_sentence(err, "missing.txt' does not exist")
    code, out, err = run(["train", "--preset", "ci", "--corpus", "no-such-org/no-such-corpus", "--out", str(tmp_path / "s"),
                          "--dry-run"], capsys)
    assert code == 0 and json.loads(out)["corpus"] == "no-such-org/no-such-corpus"
    assert_one_sentence(err, "looked up as a datasets name")


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
    """The configuration `saelib train argv` would train, from its --dry-run."""
    from contextlib import redirect_stdout
    from io import StringIO

    from saelib.config import TrainConfig

    printed = StringIO()
    with redirect_stdout(printed):
        assert main(["train", *argv, "--out", "unused", "--dry-run"]) == 0
    return TrainConfig(**json.loads(printed.getvalue()))


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
    assert sorted(config.PRESETS) == ["ci", "demo", "full", "lesson"]
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
            "--nproc", "2", "--latent-parallel", "2", "--device", "cpu", "--out", str(out)]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert sorted(p.name for p in (out / "sae").iterdir()) == ["shard_000_of_002", "shard_001_of_002"]
    sae = load_run(out)
    assert (sae.n_latents, sae.k) == (256, 8)
    rows = read_metrics(out)
    assert rows[-1]["nmse"] < rows[0]["nmse"]


# ---- every way a config file or a flag can be wrong: one sentence, exit status 2 -------------


@pytest.mark.parametrize("name, content, needles", [
    ("syntax.yaml", b"n_latents: [512\nk: 8\n", ["not valid YAML", "line 2"]),
    ("syntax.json", b'{"n_latents": 512,}', ["not valid JSON", "line 1"]),
    ("list.yaml", b"- n_latents\n- 512\n", ["mapping", "got a list"]),
    ("empty.yaml", b"", ["is empty"]),
    ("blank.json", b"  \n", ["is empty"]),
    ("comment.yaml", b"# nothing\n", ["got nothing"]),
    ("latin1.yaml", "model: caf\u00e9\n".encode("latin-1"), ["not UTF-8", "0xe9"]),
    ("intkey.yaml", b"1: 512\n", ["key 1", "not a name"]),
    ("twice.yaml", b"seed: 1\nseed: 2\n", ["'seed' is written twice"]),
    ("twice.json", b'{"seed": 1, "seed": 2}', ["'seed' is written twice"]),
    ("settings.toml", b"seed = 1\n", ["must end in .json, .yaml or .yml"]),
])
def test_a_damaged_config_file_is_one_sentence(capsys, tmp_path, name, content, needles):
    (tmp_path / name).write_bytes(content)
    code, _, err = run(["train", "--config", str(tmp_path / name), "--out", str(tmp_path / "r")], capsys)
    assert code == 2
    assert_one_sentence(err, name, *needles)
    assert not (tmp_path / "r").exists()


def test_a_missing_or_unreadable_config_file_is_one_sentence(capsys, tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe.yaml")  # would block a read
    (tmp_path / "folder.yaml").mkdir()
    for name, needle in [("missing.yaml", "cannot be read (No such file"), ("folder.yaml", "is not a regular file"),
                         ("pipe.yaml", "is not a regular file")]:
        code, _, err = run(["train", "--config", str(tmp_path / name), "--out", str(tmp_path / "r")], capsys)
        assert code == 2
        assert_one_sentence(err, name, needle)


@pytest.mark.parametrize("key, value, shown", [
    ("seed", "abc", "'abc'"),
    ("adam_betas", 0, "got 0"),
    ("site", [], "got []"),
    ("auxk", "abc", "'abc'"), ("auxk", [], "got []"), ("auxk", math.nan, "got nan"),
    ("tied_init", "abc", "'abc'"), ("tied_init", [], "got []"), ("tied_init", math.nan, "got nan"),
    ("epochs", True, "got True"),
    ("max_tokens", 1e20, "must be a positive integer, got 1e+20"),
    ("n_latents", 2**31, "at most 2147483647"),
    ("tokens", 2**70, "at most 9223372036854775807"),
    ("lr", 10**400, "an integer of 1329 bits"),
    ("model", " ", "must not be blank"),
])
def test_a_bad_value_in_a_config_file_names_the_file_the_key_and_the_value(capsys, tmp_path, key, value, shown):
    (tmp_path / "cfg.json").write_text(json.dumps({key: value}))
    code, _, err = run(["train", "--preset", "ci", "--config", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "r")],
                       capsys)
    assert code == 2
    assert_one_sentence(err, "cfg.json", key, shown)


def test_a_yaml_number_in_exponent_notation_is_a_number(tmp_path):
    from saelib import config

    (tmp_path / "cfg.yaml").write_text("lr: 1e-3\nmax_tokens: 1e20\n")
    with pytest.raises(ValueError, match=r"cfg.yaml: max_tokens must be a positive integer, got 1e\+20"):
        config.resolve(config_file=tmp_path / "cfg.yaml")
    (tmp_path / "cfg.yaml").write_text("lr: 1e-3\n")
    assert train_config(["--config", str(tmp_path / "cfg.yaml")]).lr == 1e-3


def test_an_int_too_large_for_a_tensor_dimension_is_refused_before_any_work(capsys, tmp_path):
    code, _, err = run(["train", "--preset", "ci", "--n-latents=2147483648", "--out", str(tmp_path / "r")], capsys)
    assert code == 2
    assert_one_sentence(err, "n_latents", "at most 2147483647", "2147483648")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("command", ["train", "view", "export"])
def test_a_blank_out_or_an_existing_file_is_refused(capsys, tmp_path, command, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("")
    head = {"train": ["train", "--preset", "ci"], "view": ["view", "run"], "export": ["export", "run", "--format", "openai"]}
    for out, needle in [("", "got ''"), ("  ", "got '  '"), ("a-file", "is a file")]:
        code, _, err = run([*head[command], "--out", out], capsys)
        assert code == 2
        assert_one_sentence(err, f"saelib {command}: error: argument --out:", needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.mark.parametrize("argv, needle", [
    (["eval", "run", "--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    (["export", "run", "--format", "onnx", "--out", "x"], "argument --format: invalid choice: 'onnx'"),
    (["train", "--nproc", "0", "--out", "x"], "argument --nproc: must be a positive integer, got '0'"),
    (["bench", "--steps", "many"], "argument --steps: invalid int value: 'many'"),
    (["bench", "--preset", "quick", "--k", "0"], "--k must be positive integers, got [0]"),
    (["bench", "--preset", "quick", "--threads", "-1"], "--threads must be a positive integer, got -1"),
    (["bench", "--preset", "quick", "--memory-gb", "nan"], "--memory-gb positive, got 0 and nan"),
    (["bench", "--preset", "quick", "--device", "bogus"], "device must be a torch device such as 'cpu'"),
    (["bench", "--preset", "quick", "--out", ""], "--out must name a file to write the rows to, got ''"),
    (["bench", "--preset", "quick", "--out", "no-such-folder/rows.json"], "--out 'no-such-folder/rows.json' cannot be written: its folder"),
    (["bench", "--quality", "--out", "no-such-folder/rows.json"], "--out 'no-such-folder/rows.json' cannot be written"),
    (["bench", "--pipeline", "--quality"], "argument --quality: not allowed with argument --pipeline"),
    (["train", "--bogus-flag", "3", "--out", "x"], "saelib train: error: unrecognized arguments: --bogus-flag 3; see `saelib train --help`."),
])
def test_bad_flags_of_every_command_are_one_sentence(capsys, tmp_path, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(argv, capsys)
    assert code == 2
    assert_one_sentence(err, needle)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, where no folder can be made")
def test_an_out_folder_that_cannot_be_made_is_refused_before_the_extraction(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SAELIB_HOME", str(tmp_path / "home"))  # an empty cache: nothing extracted yet
    code, _, err = run(["train", "--preset", "ci", "--out", "/proc/saelib-run"], capsys)
    assert code == 2
    assert_one_sentence(err, "saelib train: error: out '/proc/saelib-run' cannot be written (No such file or "
                             "directory); name a folder you can write to.")
    assert not (tmp_path / "home" / "activations").exists()


def test_a_cache_folder_that_cannot_be_one_is_one_sentence(capsys, tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("SAELIB_HOME", str(tmp_path / "a-file"))
    code, _, err = run(["train", "--out", str(tmp_path / "run"), "--dry-run"], capsys)
    assert code == 2
    assert_one_sentence(err, f"Cannot use {tmp_path / 'a-file'} as saelib's cache folder (File exists); set SAELIB_HOME "
                             "to a writable folder.")


def test_version_is_printed(capsys):
    from saelib import __version__

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out == f"saelib {__version__}\n"


def test_max_tokens_null_in_a_file_means_all_of_the_split_and_train_says_so(capsys, tmp_path):
    from unittest import mock

    (tmp_path / "cfg.yaml").write_text("max_tokens: null\n")
    argv = ["--preset", "ci", "--config", str(tmp_path / "cfg.yaml")]
    assert train_config(argv).max_tokens is None  # over the preset's 16,384
    cache = mock.Mock(n_rows=123_456, folder=tmp_path / "cache")
    with mock.patch("saelib.runs.train_activations", return_value=cache), \
            mock.patch("saelib.runs.train_run") as train_run:
        code, _, err = run(["train", *argv, "--out", str(tmp_path / "r")], capsys)
    assert code == 0 and train_run.call_args[0][0].max_tokens is None
    assert "123,456 tokens of activations (all of wikipedia's train split, max_tokens=None)" in err
    with mock.patch("saelib.runs.train_activations", return_value=cache), mock.patch("saelib.runs.train_run"):
        code, _, err = run(["train", "--preset", "ci", "--out", str(tmp_path / "r")], capsys)
    assert code == 0 and "(at most 16,384 tokens of wikipedia's train split, max_tokens=16384)" in err


# ---- the error boundary: expected failures exit 2, anything else 1 with the traceback on disk -----------


@pytest.mark.parametrize("error, code, needle", [
    (ValueError("a bad value\nover two lines"), 2, "saelib eval: error: a bad value over two lines"),
    (PermissionError(13, "Permission denied", "/run/locked"), 2, "Permission denied: '/run/locked'"),
    (FileNotFoundError(2, "No such file or directory", "x.safetensors"), 2, "x.safetensors"),
    (FloatingPointError("NaN loss at step 3"), 2, "NaN loss at step 3"),
    (KeyError("d_in"), 1, "saelib eval: unexpected error (KeyError: 'd_in'); the full traceback is in"),
])
def test_one_error_boundary(capsys, tmp_path, monkeypatch, error, code, needle):
    from saelib import cli

    monkeypatch.setenv("SAELIB_HOME", str(tmp_path))

    def fail(args):
        raise error

    monkeypatch.setattr(cli, "cmd_eval", fail)
    got, _, err = run(["eval", "run"], capsys)
    assert got == code
    assert_one_sentence(err, needle)
    saved = list((tmp_path / "errors").glob("*.txt")) if (tmp_path / "errors").exists() else []
    assert len(saved) == (code == 1)
    if saved:
        assert str(saved[0]) in err and "Traceback" in saved[0].read_text() and "KeyError" in saved[0].read_text()


def test_ctrl_c_exits_130(capsys, monkeypatch):
    from saelib import cli

    def interrupt(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_eval", interrupt)
    code, _, err = run(["eval", "run"], capsys)
    assert code == 130
    assert_one_sentence(err, "interrupted")


@pytest.mark.parametrize("argv, content", [
    (["train", "--config", "cfg.yaml", "--out", "r"], "n_latents: [512\n"),
    (["train", "--preset", "ci", "--out", " "], None),
])
def test_no_traceback_reaches_the_terminal(tmp_path, argv, content):
    import os
    import subprocess
    import sys
    from pathlib import Path

    if content is not None:
        (tmp_path / "cfg.yaml").write_text(content)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "SAELIB_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-m", "saelib", *argv], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert_one_sentence(done.stderr, "saelib train: error:")


def test_epochs_beyond_what_a_run_can_count_are_refused_naming_epochs(capsys, tmp_path):
    code, _, err = run(["train", "--preset", "ci", "--epochs", "1e300", "--out", str(tmp_path / "r")], capsys)
    assert code == 2
    error = err.strip().splitlines()[-1]  # after the line saying how many tokens were extracted
    assert error.startswith("saelib train: error: epochs=1e+300 over the") and "choose fewer epochs or give tokens" in error
    assert "Traceback" not in err and not (tmp_path / "r" / "checkpoints").exists()


@pytest.mark.parametrize("argv, needle", [
    (["--nproc", "3", "--latent-parallel", "2"], "latent_parallel=2 must be a positive divisor of the world size 3"),
    (["--nproc", "3"], "batch_size=1024 does not split over 3 data-parallel ranks"),
    (["--nproc", "2", "--latent-parallel", "2", "--n-latents", "1151"], "n_latents=1151 does not split into latent_parallel=2"),
    (["--nproc", "2", "--arch", "relu"], "Training on 2 processes supports arch='topk' only"),
    (["--tokens", "5"], "tokens=5 is less than one batch of batch_size=1024"),
    (["--batch-size", "100000"], "max_tokens=16384 times epochs=2.0 is less than one batch of batch_size=100000"),
])
@pytest.mark.parametrize("dry_run", [False, True])
def test_a_run_that_cannot_take_one_step_or_split_over_its_ranks_is_refused_before_any_extraction(
        capsys, tmp_path, monkeypatch, argv, needle, dry_run):
    monkeypatch.setenv("SAELIB_HOME", str(tmp_path / "home"))  # where an extraction would write
    code, _, err = run(["train", "--preset", "ci", *argv, *(["--dry-run"] if dry_run else []), "--out",
                        str(tmp_path / "r")], capsys)
    assert code == 2
    assert_one_sentence(err, needle)
    assert not (tmp_path / "home" / "activations").exists() and not (tmp_path / "r").exists()


def test_eval_json_is_strict_with_nan_inside_lists_and_dicts(capsys, monkeypatch):
    from saelib import evals, runs

    report = {"nmse": math.nan, "l0": 16, "delta_ce_by_context": [0.1, math.nan, None],
              "probe_loss_by_task": {"austen": math.nan, "fortunes": 0.5}}
    monkeypatch.setattr(runs, "load_run", lambda path: None)
    monkeypatch.setattr(evals, "evaluate", lambda sae, **options: report)
    code, out, _ = run(["eval", "some-run", "--json"], capsys)
    assert code == 0
    assert json.loads(out, parse_constant=lambda name: pytest.fail(f"{name} in strict JSON")) == {
        "nmse": None, "l0": 16, "delta_ce_by_context": [0.1, None, None], "probe_loss_by_task": {"austen": None, "fortunes": 0.5}}


def test_eval_prints_each_sampled_metric_with_its_interval(capsys, monkeypatch):
    from saelib import evals, runs

    report = {"nmse": 0.2, "probe_loss": 0.41, "probe_loss_ci": 0.034, "n2g_latents": 64}
    monkeypatch.setattr(runs, "load_run", lambda path: None)
    monkeypatch.setattr(evals, "evaluate", lambda sae, **options: report)
    code, out, _ = run(["eval", "some-run"], capsys)
    assert code == 0
    lines = out.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["nmse", "probe_loss", "n2g_latents"]
    assert lines[1].split()[1:] == ["0.41", "±", "0.034"]


def test_extract_then_train_then_eval_json_and_view_of_the_run(lm, capsys, tmp_path):
    from saelib.activations import ActivationCache

    code, out, err = run(["extract", "--preset", "ci"], capsys)
    assert code == 0, err
    extracted = json.loads(out)
    cache = ActivationCache(extracted["cache"])
    assert extracted["rows"] == cache.n_rows > 0 and extracted["dropped"] == cache.manifest["dropped"]
    run_folder = str(tmp_path / "r")
    assert run(["train", "--preset", "ci", "--out", run_folder], capsys)[0] == 0
    code, out, err = run(["eval", run_folder, "--preset", "ci", "--json"], capsys)
    assert code == 0, err
    report = json.loads(out, parse_constant=lambda name: pytest.fail(f"{name} in strict JSON"))
    assert 0 < report["nmse"] < 1 and report["l0"] <= 16 and report["ce_clean"] < report["ce_sae"]
    code, out, err = run(["view", run_folder, "--preset", "ci", "--out", str(tmp_path / "viz")], capsys)
    assert code == 0, err
    assert (tmp_path / "viz" / "index.html").is_file() and str(tmp_path / "viz" / "index.html") in out
