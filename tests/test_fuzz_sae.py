"""Damaged SAE folders and exports: ``saelib.load`` gives back the SAE exactly or one clear sentence.

Each case writes nothing new: it copies a pristine folder (an saelib SAE, d_in 8, n_latents 16, and
its SAELens, sparsify and OpenAI exports), damages one file -- a JSON edit (a value of any type,
a deleted or an added key, at any depth; or the same values reformatted), a byte flip, a truncation, a deleted file, a tensor
added, removed, reshaped or retyped -- and loads it. Allowed outcomes: an SAE whose config, state
and reconstruction equal the undamaged SAE's (the damage did not matter), or a ValueError /
FileNotFoundError of one line naming the damaged folder. A traceback or a different SAE fails.

Deleting ``saelib.json`` is not damage but the documented way to import an export's files as the
peer library's own SAE (``saelib.formats``): the second test fuzzes such peer-made folders, where
no checksum can tell a changed value from an intended one, for tracebacks only.
"""

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import saelib
from saelib import formats
from saelib.normalize import Normalizer
from saelib.sae import TopKSAE

D_IN, N_LATENTS, K = 8, 16, 4
CASES, PEER_CASES = 600, 300
LAYOUTS = ("saelib", "saelens", "sparsify", "openai")
OUTCOMES = Counter()

# keys without control characters: files.describe prints a key as it is (see the report)
json_keys = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=6)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(json_keys, inner, max_size=3),
    max_leaves=4,
)


@pytest.fixture(scope="module", autouse=True)
def report():
    """Prints how the cases ended (``pytest -s`` shows it); a traceback or a silent wrong SAE fails its case."""
    yield
    print(f"\nfuzz outcomes: {dict(OUTCOMES)}")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """``{layout: path saelib.load takes}`` under a read-only root, the SAE and an input ``x``."""
    root = tmp_path_factory.mktemp("pristine")
    g = torch.Generator().manual_seed(0)
    sae = TopKSAE(D_IN, N_LATENTS, K, normalizer=Normalizer(torch.randn(D_IN, generator=g), 2.5), generator=g,
                  metadata={"model": "toy", "layer": 3, "site": "resid_post", "ctx_len": 64}).eval()
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(N_LATENTS, generator=g))
        sae.b_pre.copy_(0.3 * torch.randn(D_IN, generator=g))
    paths = {"saelib": sae.save(root / "saelib")}
    for fmt in formats.FORMATS:
        paths[fmt] = formats.export(sae, fmt, root / fmt)
    return paths, sae, torch.randn(32, D_IN, generator=g) * 3


def folder_of(path: Path) -> Path:
    return path.parent if path.is_file() else path


def copy_case(pristine_path: Path, tmp: Path) -> tuple[Path, Path]:
    """A fresh copy of a pristine case: ``(what to load, its folder)``."""
    source = folder_of(pristine_path)
    target = tmp / "case"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    return target / pristine_path.relative_to(source), target


def json_paths(value, prefix=()):
    """Every key path of a parsed JSON object, nested ones included."""
    for key, item in value.items():
        yield (*prefix, key)
        if isinstance(item, dict):
            yield from json_paths(item, (*prefix, key))


def damage_json(path: Path, data) -> str:
    record = json.loads(path.read_text())
    op = data.draw(st.sampled_from(["set", "delete", "add", "reformat"]))
    where = data.draw(st.sampled_from(list(json_paths(record))))
    parent = record
    for key in where[:-1]:
        parent = parent[key]
    if op == "reformat":  # the same values, keys in another order
        record = dict(reversed(record.items()))
    elif op == "set":
        parent[where[-1]] = data.draw(json_values)
    elif op == "delete":
        del parent[where[-1]]
    else:
        target = parent[where[-1]] if isinstance(parent[where[-1]], dict) else parent
        target[data.draw(json_keys)] = data.draw(json_values)
    path.write_text(json.dumps(record, indent=data.draw(st.sampled_from([None, 2]))))
    return f"json {op} {'.'.join(where)}"


def damage_tensors(path: Path, data) -> str:
    """Add, remove, reshape or retype one tensor, rewriting the file in its own format (header kept)."""
    if path.suffix == ".safetensors":
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            header = f.metadata()
    else:
        tensors = torch.load(path, weights_only=True)
    names = sorted(name for name, t in tensors.items() if isinstance(t, torch.Tensor))
    op, name = data.draw(st.sampled_from(["add", "remove", "reshape", "retype"])), data.draw(st.sampled_from(names))
    if op == "add":
        tensors[data.draw(st.sampled_from(["extra", name + "_", "W_enc", "threshold"]))] = torch.zeros(data.draw(st.integers(0, 3)))
    elif op == "remove":
        del tensors[name]
    elif op == "reshape":
        tensors[name] = tensors[name].reshape(-1)[: max(tensors[name].numel() - 1, 0)].contiguous()
    else:
        tensors[name] = tensors[name].to(data.draw(st.sampled_from([torch.float64, torch.int32, torch.float16])))
    if path.suffix == ".safetensors":
        save_file(tensors, str(path), metadata=header)
    else:
        torch.save(tensors, path)
    return f"tensor {op} {name}"


def damage(folder: Path, data, sidecar_deletable: bool) -> str:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    path = data.draw(st.sampled_from(files))
    kinds = ["flip", "truncate"] + (["delete"] if sidecar_deletable or path.name != "saelib.json" else [])
    kinds += ["json"] * 3 if path.suffix == ".json" else ["tensors"] * 2 if path.suffix in (".safetensors", ".pt") else []
    kind = data.draw(st.sampled_from(kinds))
    if kind == "json":
        return f"{path.name}: {damage_json(path, data)}"
    if kind == "tensors":
        return f"{path.name}: {damage_tensors(path, data)}"
    content = bytearray(path.read_bytes())
    if kind == "delete":
        path.unlink()
        return f"{path.name}: deleted"
    if kind == "truncate":
        path.write_bytes(bytes(content[: data.draw(st.integers(0, len(content) - 1))]))
        return f"{path.name}: truncated"
    offset = data.draw(st.integers(0, len(content) - 1))
    content[offset] ^= data.draw(st.integers(1, 255))
    path.write_bytes(bytes(content))
    return f"{path.name}: flip at {offset}"


def load_or_error(target: Path, folder: Path, what: str):
    """The loaded SAE, or None after checking that the error is one line naming ``folder``."""
    try:
        return saelib.load(target)
    except (ValueError, FileNotFoundError) as error:
        message = str(error)
        assert "\n" not in message and str(folder) in message, (what, message)
        return None


def same(a: TopKSAE, b: TopKSAE, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return (a.config() == b.config() and a.state_dict().keys() == b.state_dict().keys()
                and all(torch.equal(p.nan_to_num(), q.nan_to_num()) and p.dtype == q.dtype
                        for p, q in zip(a.state_dict().values(), b.state_dict().values()))
                and torch.equal(a(x).x_hat, b(x).x_hat))


@settings(max_examples=CASES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_damage_gives_the_same_sae_or_one_sentence_naming_the_file(pristine, tmp_path_factory, data):
    paths, sae, x = pristine
    layout = data.draw(st.sampled_from(LAYOUTS))
    target, folder = copy_case(paths[layout], tmp_path_factory.getbasetemp())
    what = f"{layout}: {damage(folder, data, sidecar_deletable=False)}"
    loaded = load_or_error(target, folder, what)
    if loaded is None:
        OUTCOMES["clear error"] += 1
    else:
        assert same(loaded, sae, x), f"silently loaded a different SAE after {what}"
        OUTCOMES["equal result"] += 1


@settings(max_examples=PEER_CASES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_damaged_peer_made_folders_load_or_give_one_sentence(pristine, tmp_path_factory, data):
    paths, _, _ = pristine
    layout = data.draw(st.sampled_from(formats.FORMATS))
    target, folder = copy_case(paths[layout], tmp_path_factory.getbasetemp())
    for name in ("saelib.json", "saelib.safetensors"):
        (folder / name).unlink()
    what = f"peer {layout}: {damage(folder, data, sidecar_deletable=True)}"
    OUTCOMES["peer: clear error" if load_or_error(target, folder, what) is None else "peer: loaded"] += 1

