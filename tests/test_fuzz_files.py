"""Generated damage to every file saelib reads back from a run folder and from an activation cache.

A tiny interrupted run (the checkpoint of step 8 of 9, ``config.json``, ``metrics.jsonl``) and a
tiny activation cache (three shards, written by the cache's own writer) are damaged one way per
case: a value of ``state.json``, the run's ``config.json`` or ``manifest.json`` changed (to any
type, or nudged within its own), deleted or added; a byte of any file flipped; any file truncated.
Resuming the run (reading the cache) must then give the undamaged result exactly, or raise
ValueError / FileNotFoundError / OSError in one line naming a file or folder of the damaged copy:
never another exception, a different result or a hang.
"""

import copy
import itertools
import json
import math
import shutil
import signal
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saelib.activations import ActivationCache, CachedSource, CacheKey
from saelib.train import fit

CASES = 500  # per test, each a fresh copy of the pristine folder
SECONDS = 20  # per case, far above a resume's ~0.1 s: a case past it hangs
CLEAR = (ValueError, FileNotFoundError, OSError)
RUN_OPTIONS = dict(checkpoint_every_tokens=4 * 32, geometric_median_samples=64, log_every=1, progress=False)
KEY = CacheKey("test", 0, "resid_post", "test", "train", 64, None)

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=5,
)


def nudged(data, value):
    """``value`` changed a little within its own type (the edit a schema alone lets through)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + data.draw(st.sampled_from([-1, 1, 2**31]))
    if isinstance(value, float):
        return value * data.draw(st.sampled_from([1 + 1e-6, -1.0, 2.0])) if value else 1e-6
    if isinstance(value, str):
        return data.draw(st.sampled_from([value + "x", value[:-1], value.upper()]))
    if isinstance(value, list):
        return value[:-1] if value else [0]
    if isinstance(value, dict):
        return {**value, "x": 0}
    return 0  # null


def edited(data, doc):
    """``doc`` (parsed JSON) with one value somewhere in it replaced, nudged or deleted, or a key added."""
    doc = copy.deepcopy(doc)
    parent, key, value = None, None, doc
    while isinstance(value, (dict, list)) and value and data.draw(st.integers(0, 3)):  # descends 3 times in 4
        key = data.draw(st.sampled_from(sorted(value) if isinstance(value, dict) else range(len(value))))
        parent, value = value, value[key]
    action = data.draw(st.sampled_from(["replace", "nudge", "delete", "add"]))
    if action == "add" and isinstance(value, (dict, list)):
        if isinstance(value, dict):
            value[data.draw(st.text(max_size=6))] = data.draw(JSON)
        else:
            value.append(data.draw(JSON))
        return doc
    if action == "delete" and parent is not None:
        del parent[key]
        return doc
    new = nudged(data, value) if action == "nudge" else data.draw(JSON)
    if parent is None:
        return new
    parent[key] = new
    return doc


def damage(data, folder, json_files):
    """One generated damage to the files under ``folder``; the JSON edits go to ``json_files`` (relative paths)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    kind = data.draw(st.sampled_from(["json", "flip", "truncate"]))
    if kind == "json":
        path = folder / data.draw(st.sampled_from(json_files))
        path.write_text(json.dumps(edited(data, json.loads(path.read_text()))))
        return
    path = data.draw(st.sampled_from(files))
    content = bytearray(path.read_bytes())
    if kind == "flip" and content:
        content[data.draw(st.integers(0, len(content) - 1))] ^= data.draw(st.integers(1, 255))
    else:
        del content[data.draw(st.integers(0, max(0, len(content) - 1))):]
    path.write_bytes(bytes(content))


class Hang(Exception):
    pass


def outcome(call, folder, same):
    """``identical``, ``clear error``, or what went wrong: ``call()`` within ``SECONDS``, compared by ``same``."""
    def expire(signum, frame):
        raise Hang

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, SECONDS)
    try:
        result = call()
    except Hang:
        return "hang"
    except CLEAR as error:
        message = str(error)
        return "clear error" if "\n" not in message and str(folder) in message else f"unclear error: {message!r}"
    except Exception as error:  # noqa: BLE001 -- any other type is what this test looks for
        return f"traceback: {type(error).__name__}: {error}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return "identical" if same(result) else "silent wrong"


def fuzz(pristine, scratch, json_files, call, same):
    """Run ``CASES`` generated damages of copies of ``pristine``; the outcomes, counted."""
    outcomes, numbers = Counter(), itertools.count()

    @settings(max_examples=CASES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.data())
    def case(data):
        folder = scratch / f"case_{next(numbers)}" / pristine.name
        shutil.copytree(pristine, folder)
        damage(data, folder, json_files)
        result = outcome(lambda: call(folder), folder, same)
        outcomes[result.split(":")[0]] += 1
        assert result in ("identical", "clear error"), result
        shutil.rmtree(folder.parent)

    case()
    print(dict(outcomes))
    return outcomes


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run stopped by a NaN batch at step 9 of 9, its batches (clean again) and the SAE a resume gives."""
    folder = tmp_path_factory.mktemp("pristine") / "run"
    batches = list(torch.randn(9 * 32, 8, generator=torch.Generator().manual_seed(0)).split(32))
    batches[8] = batches[8].clone()
    batches[8][0, 0] = math.nan
    with pytest.raises(ValueError, match="Batch 8 of epoch 0 contains NaN or Inf"):
        fit(batches, 32, 4, out=folder, **RUN_OPTIONS)
    batches[8][0, 0] = 0.0
    reference = tmp_path_factory.mktemp("reference") / "run"
    shutil.copytree(folder, reference)
    return folder, batches, fit(batches, 32, 4, out=reference, **RUN_OPTIONS).state_dict()


def test_damaged_run_files_resume_identically_or_fail_naming_the_file(run, tmp_path):
    folder, batches, expected = run
    state = next(folder.glob("checkpoints/step_*")).relative_to(folder) / "state.json"

    def same(sae):  # bit for bit, NaN where NaN (the unset JumpReLU threshold)
        return sae.state_dict().keys() == expected.keys() and all(
            p.shape == expected[name].shape and bool(((p == expected[name]) | p.isnan() & expected[name].isnan()).all())
            for name, p in sae.state_dict().items())

    outcomes = fuzz(folder, tmp_path, ["config.json", str(state)], lambda f: fit(batches, 32, 4, out=f, **RUN_OPTIONS), same)
    assert sum(outcomes.values()) == CASES and outcomes["clear error"] and outcomes["identical"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A complete three-shard cache of random rows, and what reading it gives."""
    folder = tmp_path_factory.mktemp("pristine") / "cache"
    folder.mkdir()
    writer, g = ActivationCache(folder, KEY), torch.Generator().manual_seed(0)
    for s in range(3):
        writer.add_shard(torch.randn(40, 8, generator=g), torch.arange(40 * s, 40 * (s + 1)), (s, s + 1), 40)
    writer.finish()
    return folder, read(folder)


def read(folder):
    """An epoch of normalised batches and the manifest, as training reads them."""
    cache = ActivationCache(folder, KEY)
    return torch.cat(list(CachedSource(cache).batches(16, seed=0, epoch=0))), cache.manifest


def test_damaged_activation_cache_reads_identically_or_fails_naming_it(cache, tmp_path):
    folder, (batches, manifest) = cache

    def same(result):
        return torch.equal(result[0], batches) and result[1] == manifest

    outcomes = fuzz(folder, tmp_path, ["manifest.json"], read, same)  # the fixture read the undamaged cache
    assert sum(outcomes.values()) == CASES and outcomes["clear error"]
