"""Fuzzed config files and command lines: every outcome is a configuration inside the documented
ranges or one sentence naming the file, key or flag at fault; never another exception, never a
value out of range accepted. 700 config files + 400 command lines per run (derandomized)."""

import json
import math
import re
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO

import pytest
import yaml
from hypothesis import event, given, settings
from hypothesis import strategies as st

from saelib import config
from saelib.cli import main
from saelib.config import FIELDS, ConfigError, TrainConfig, field_type

HUGE = st.sampled_from([2**31 - 1, 2**31, 2**63 - 1, 2**63, 10**30, -(2**63), 10**400])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**5), HUGE,
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
ANY_VALUE = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                               max_size=3), max_leaves=6)


def plausible(name: str):
    """Values of a field's own type, in and just out of its range, so that valid configs are common."""
    f, (kind, optional) = FIELDS[name], field_type(name)
    if "choices" in f.metadata:
        base = st.sampled_from(f.metadata["choices"]) | st.sampled_from(["", "TopK", "resid"])
    elif kind is bool:
        base = st.booleans()
    elif kind is int:
        base = st.integers(-2, 5000) | HUGE
    elif kind is float:
        base = st.floats(-0.5, 2.0) | st.integers(-1, 3) | st.sampled_from([math.nan, math.inf, 1e300])
    elif kind is tuple:
        base = st.lists(st.floats(-0.5, 1.5) | st.integers(0, 1), min_size=1, max_size=3)
    else:
        base = st.sampled_from(["cpu", "cuda:7", "meta", "smollm2-135m", "wikipedia", "", "  "])
    return base | st.none() if optional else base


SETTING = st.sampled_from(sorted(FIELDS)).flatmap(lambda name: st.tuples(st.just(name), plausible(name) | ANY_VALUE))
PLAUSIBLE_SETTING = st.sampled_from(sorted(FIELDS)).flatmap(lambda name: st.tuples(st.just(name), plausible(name)))
MAPPING = st.one_of(
    st.lists(SETTING, max_size=5).map(dict),
    st.lists(PLAUSIBLE_SETTING, max_size=3).map(dict),
    st.lists(SETTING, max_size=3).map(dict).flatmap(  # unknown and non-string keys beside known ones
        lambda known: st.dictionaries(st.text(max_size=6) | st.integers() | st.none() | st.booleans(), ANY_VALUE,
                                      min_size=1, max_size=2).map(lambda extra: {**known, **extra})),
)
FILE = st.one_of(
    MAPPING.map(lambda m: ("cfg.yaml", yaml.safe_dump(m, sort_keys=False).encode())),
    MAPPING.map(lambda m: ("cfg.json", json.dumps(m).encode())),
    ANY_VALUE.map(lambda v: ("cfg.yaml", yaml.safe_dump(v, sort_keys=False).encode())),
    ANY_VALUE.map(lambda v: ("cfg.json", json.dumps(v).encode())),
    st.tuples(st.sampled_from(["cfg.json", "cfg.yaml", "cfg.yml"]), st.binary(max_size=40)),
    st.tuples(st.sampled_from(["cfg.json", "cfg.yaml"]), MAPPING.map(lambda m: yaml.safe_dump(m, sort_keys=False).encode()),
              st.binary(min_size=1, max_size=3)).map(lambda t: (t[0], t[1][:len(t[1]) // 2] + t[2] + t[1][len(t[1]) // 2:])),
)


def assert_in_documented_range(cfg: TrainConfig) -> None:
    """Every field as its help text and annotation say (checked here apart from config._validate)."""
    for name, f in FIELDS.items():
        value, (kind, optional) = getattr(cfg, name), field_type(name)
        if value is None:
            assert optional, name
        elif kind is bool:
            assert type(value) is bool, name
        elif kind is str:
            assert isinstance(value, str) and value.strip(), name
            assert value in f.metadata.get("choices", (value,)), name
        elif kind in (int, float):
            assert type(value) is int or (kind is float and type(value) is float and math.isfinite(value)), name
            assert {"positive": value > 0, "non-negative": value >= 0}.get(f.metadata.get("bound"), True), name
            assert kind is float or value <= f.metadata.get("most", 2**63 - 1), name
    assert len(cfg.adam_betas) == 2 and all(0 <= b < 1 for b in cfg.adam_betas)
    assert cfg.ema is None or 0 < cfg.ema < 1
    assert 0 < cfg.val_fraction < 1 and cfg.ctx_len >= 2
    assert cfg.max_tokens is None or cfg.max_tokens >= cfg.ctx_len
    assert cfg.n_latents <= 2**31 - 1 and cfg.batch_size <= 2**31 - 1
    assert cfg.k is not None or cfg.arch == "relu"
    assert cfg.k is None or cfg.k * (4 if cfg.arch == "multitopk" else 1) <= cfg.n_latents


def assert_one_line(message: str, *any_of: str) -> None:
    assert message.strip() and "\n" not in message.strip() and "Traceback" not in message, message
    assert any(needle in message for needle in any_of), (any_of, message)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=700, deadline=None, derandomize=True)
@given(preset=st.sampled_from([None, *config.PRESETS]), file=FILE)
def test_any_config_file_is_a_valid_config_or_one_sentence(folder, preset, file):
    name, content = file
    path = folder / name
    path.write_bytes(content)
    try:
        cfg = config.resolve(preset, config_file=path)
    except ConfigError as error:
        assert_one_line(str(error), *error.keys)
        assert name in str(error)  # a preset's values are valid: the file is at fault
        event("clear error naming the key")
    except ValueError as error:
        assert_one_line(str(error), name)
        event("clear error naming the file")
    else:
        assert_in_documented_range(cfg)
        event("valid config")


# "-h", "--he": argparse's help, which prints usage and exits 0
TOKEN = st.text(max_size=8).filter(lambda token: not re.match(r"--?h", token))
FLAG_VALUE = st.sampled_from(["0", "1", "-1", "2", "16", "4096", "0.5", "0.999", "1e-3", "1e20", "nan", "inf", "-inf",
                              "", "  ", "2147483647", "2147483648", "9223372036854775808", "1" * 60, "true", "abc",
                              "resid_post", "cpu", "cuda:7", "topk", "relu", "multitopk"]) | TOKEN


def flag(name: str):
    kind, _ = field_type(name)
    dashed = "--" + name.replace("_", "-")
    if kind is bool:
        return st.sampled_from([[dashed], ["--no-" + dashed[2:]], [dashed + "=yes"]])
    value = plausible(name).filter(lambda v: v is not None and not isinstance(v, list)).map(str) | FLAG_VALUE
    if kind is tuple:
        return st.lists(value, min_size=0, max_size=3).map(lambda values: [dashed, *values])
    return value.map(lambda value: [f"{dashed}={value}"])


FLAGS = st.lists(st.sampled_from(sorted(FIELDS)).flatmap(flag) | st.lists(TOKEN, max_size=1), max_size=4)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(preset=st.sampled_from([[], *(["--preset", p] for p in config.PRESETS), ["--preset", "huge"]]), flags=FLAGS,
       out=st.sampled_from(["run", "", " ", "a-file"]))
def test_any_train_command_line_is_a_valid_config_or_one_sentence(folder, preset, flags, out):
    (folder / "a-file").write_text("")
    target = {"run": str(folder / "run"), "a-file": str(folder / "a-file")}.get(out, out)
    argv = ["train", *preset, *(token for group in flags for token in group), "--out", target, "--dry-run"]
    stdout, stderr = StringIO(), StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        code = main(argv)
    if code == 0:
        assert_in_documented_range(TrainConfig(**json.loads(stdout.getvalue())))
        assert out == "run"
        event("valid config")
    else:
        assert code == 2, (argv, stderr.getvalue())
        message = stderr.getvalue()
        assert_one_line(message, "saelib")
        assert re.search(r"--[a-z]|unrecognized arguments|\b(" + "|".join(FIELDS) + r")\b", message, re.I), message
        event("clear error")
    assert not (folder / "run").exists()
