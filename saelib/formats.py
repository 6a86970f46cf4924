"""Export saelib SAEs to the layouts of SAELens, sparsify and OpenAI's released autoencoders, and import them.

    export(sae, "saelens" | "sparsify" | "openai", out_dir) -> path the peer library loads
    import_sae(path) -> TopKSAE        # any of those layouts, or a native saelib folder

Conventions (the full mapping is in ``docs/interop.md``). A saelib SAE takes raw activations, as
the peers do, but its weights live on the normalised scale ``x_n = (x - mean) / s`` (the normaliser
is applied inside ``encode`` and inverted inside ``decode``); the peers subtract one decoder bias
from raw activations. Exports fold the normaliser into the weights so that the peer needs none::

    b_dec  = mean + s * b_pre          (SAELens b_dec, sparsify b_dec, OpenAI pre_bias)
    W_enc, W_dec unchanged             (decoder rows stay unit norm)
    b_enc' = s * b_enc                 (latents come out multiplied by s: z' = s z)
    threshold' = s * threshold         (JumpReLU-style threshold, SAELens only)

so ``peer_reconstruction(x) == sae(x).x_hat`` (and ``peer_latents(x) == s * sae.encode(x)``) to
float tolerance, on the same raw ``x``. The
folding is not bit-exact in float32, so every export also writes ``saelib.json`` and
``saelib.safetensors`` (the config and the small vectors ``b_enc, b_pre, normalizer_mean,
threshold``) next to the peer's files: importing an unmodified export gives back the SAE bit
for bit. A folder without ``saelib.json`` is the peer's own SAE and imports on the raw scale with
an identity normaliser.

The rule for a changed export: ``saelib.json`` records the SHA-256 of every file of the export
(the peer's weights and ``cfg.json``, ``saelib.safetensors``) and ``saelib.safetensors``'s header
repeats the record, so any change to any of them is an error naming the file. If the peer's files
changed on purpose (the SAE was trained further in SAELens, say), delete ``saelib.json``: the
folder then imports as that library's own SAE.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, NonNegativeInt, PositiveInt
from safetensors.torch import save_file
from torch import Tensor

from .files import check_schema, load_safetensors, read_json, sha256_file, writable_folder
from .normalize import Normalizer
from .sae import (CONFIG_FILE, HEADER_CONFIG, WEIGHTS_FILE, SAEConfig, Sha256, TopKSAE, check_recorded, check_tensors,
                  header_record, load_folder)

FORMATS = ("saelens", "sparsify", "openai")
PEERS = {"saelens": "SAELens", "sparsify": "sparsify", "openai": "OpenAI's sparse_autoencoder"}
SIDECAR_CONFIG = "saelib.json"
SIDECAR_TENSORS = "saelib.safetensors"
# the sidecar's vectors: what folding the normaliser into the peer's tensors would round
VECTORS = ("b_enc", "b_pre", "normalizer_mean", "threshold")
SAELENS_CONFIG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
SPARSIFY_CONFIG, SPARSIFY_WEIGHTS = "cfg.json", "sae.safetensors"
PEER_CONFIG = {"saelens": SAELENS_CONFIG, "sparsify": SPARSIFY_CONFIG, "openai": None}
PEER_WEIGHTS = {"saelens": SAELENS_WEIGHTS, "sparsify": SPARSIFY_WEIGHTS}  # OpenAI's is <layer>.pt
# Hook names of a site at layer L: TransformerLens's (SAELens) and the Hugging Face module path (sparsify).
SAELENS_HOOKS = {"resid_post": "blocks.{}.hook_resid_post", "mlp_out": "blocks.{}.hook_mlp_out", "attn_out": "blocks.{}.hook_attn_out"}
SPARSIFY_HOOKS = {"resid_post": "layers.{}", "mlp_out": "layers.{}.mlp", "attn_out": "layers.{}.self_attn"}


# ---- the folding ----------------------------------------------------------------------------


def raw_scale_tensors(sae: TopKSAE) -> dict[str, Tensor]:
    """The SAE as a raw-scale SAE with one decoder bias (float32, computed in float64).

    Returns ``W_enc (n, d)``, ``b_enc (n,)``, ``W_dec (n, d)``, ``b_dec (d,)`` and
    ``threshold ()`` (NaN when unset), with ``b_dec = mean + s b_pre``, ``b_enc' = s b_enc`` and
    ``threshold' = s threshold``; latents come out as ``s z``.
    """
    s = float(sae.normalizer_scale)
    with torch.no_grad():
        out = {
            "W_enc": sae.W_enc.detach().clone(),
            "b_enc": (sae.b_enc.double() * s).float(),
            "W_dec": sae.W_dec.detach().clone(),
            "b_dec": (sae.normalizer_mean.double() + s * sae.b_pre.double()).float(),
            "threshold": (sae.threshold.double() * s).float(),
        }
    return {name: t.contiguous().cpu() for name, t in out.items()}


def layer_norm(x: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:
    """OpenAI's (and SAELens's ``layer_norm``) per-token input normalisation: ``(x_ln, mu, std)``.

    ``x_ln = (x - mu) / (std + eps)`` over the last dimension (unbiased std); reconstructions map
    back with ``x_hat_ln * std + mu``. SAEs imported with ``metadata["input_norm"] == "layer_norm"``
    expect ``x_ln``: saelib's affine ``Normalizer`` cannot express a per-token map.
    """
    mu = x.mean(dim=-1, keepdim=True)
    std = (x - mu).std(dim=-1, keepdim=True)
    return (x - mu) / (std + eps), mu, std


# ---- export ---------------------------------------------------------------------------------


def export(sae: TopKSAE, fmt: str, out_dir: str | os.PathLike) -> Path:
    """Write ``sae`` in a peer library's layout under ``out_dir``; return what that library loads.

    - ``"saelens"``: ``out_dir/cfg.json`` + ``sae_weights.safetensors`` (``SAE.load_from_disk(out_dir)``);
      architecture ``topk`` (topk, multitopk), ``standard`` (relu) or ``jumprelu`` (any SAE with
      a threshold set).
    - ``"sparsify"``: ``out_dir/<hookpoint>/cfg.json`` + ``sae.safetensors`` (``SparseCoder.load_from_disk``
      on the returned folder, ``load_many(out_dir)`` for all); topk and multitopk.
    - ``"openai"``: ``out_dir/<layer>.pt``, the state dict of ``sparse_autoencoder.Autoencoder``
      (``Autoencoder.from_state_dict(torch.load(path, weights_only=True))``, then
      ``ae.normalize = False``: their loader switches on per-token layer norm for every TopK
      file, and this one is on the raw scale); topk, multitopk and relu.

    An SAE that expects layer-normed tokens (``metadata["input_norm"]``, an import) is exported to
    SAELens with ``normalize_activations: "layer_norm"`` and to OpenAI's format as it is (keep their
    ``normalize``); sparsify has no such option and refuses it. A folder that holds a saelib SAE
    (``config.json`` beside its weights) is never written into: its weights would be replaced.
    """
    if fmt not in FORMATS:
        raise ValueError(f"Unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    thresholded = not bool(torch.isnan(sae.threshold))
    supported = {"saelens": ("topk", "multitopk", "relu"), "sparsify": ("topk", "multitopk"), "openai": ("topk", "multitopk", "relu")}[fmt]
    if not (thresholded and fmt == "saelens") and (thresholded or sae.arch not in supported):
        rule = f"a {sae.arch} SAE" + (" with an inference threshold" if thresholded else "")
        raise ValueError(f"The {fmt} format cannot hold {rule}; it takes {', '.join(supported)} SAEs without a threshold"
                         + (" (SAELens also takes thresholded ones, as jumprelu)." if fmt != "saelens" else "."))
    layer_normed = sae.metadata.get("input_norm") == "layer_norm"
    if layer_normed and fmt == "sparsify":
        raise ValueError("The sparsify format cannot hold an SAE that expects layer-normed tokens "
                         "(metadata['input_norm'] is 'layer_norm'); export it as saelens or openai.")
    out_dir = writable_folder(out_dir, "out_dir")
    raw = raw_scale_tensors(sae)
    layer, site = sae.metadata.get("layer"), sae.metadata.get("site", "resid_post")
    folder = out_dir / (SPARSIFY_HOOKS.get(site, "{}").format(layer) if layer is not None else "sae") \
        if fmt == "sparsify" else out_dir
    if (folder / "config.json").is_file():
        raise ValueError(f"{folder} holds a saelib SAE or run (its config.json), whose files the {fmt} export "
                         "would write over; choose another out folder.")
    if fmt == "saelens":
        weights_file = SAELENS_WEIGHTS
        folder.mkdir(parents=True, exist_ok=True)
        arch = "jumprelu" if thresholded else "standard" if sae.arch == "relu" else "topk"
        tensors = {"W_enc": raw["W_enc"].T.contiguous(), "b_enc": raw["b_enc"], "W_dec": raw["W_dec"], "b_dec": raw["b_dec"]}
        if arch == "jumprelu":
            tensors["threshold"] = raw["threshold"].expand(sae.n_latents).contiguous()
        hook = SAELENS_HOOKS.get(site, "{}").format(layer) if layer is not None else None
        cfg = {"architecture": arch, "d_in": sae.d_in, "d_sae": sae.n_latents, "dtype": "float32", "device": "cpu",
               "apply_b_dec_to_input": True, "normalize_activations": "layer_norm" if layer_normed else "none",
               "reshape_activations": "none",
               "metadata": {"model_name": sae.metadata.get("model"), "hook_name": hook,
                            "context_size": sae.metadata.get("ctx_len"), "saelib_metadata": sae.metadata}}
        if arch == "topk":
            cfg["k"] = sae.k
        save_file(tensors, str(folder / weights_file))
        (folder / SAELENS_CONFIG).write_text(json.dumps(cfg, indent=2))
        target = folder
    elif fmt == "sparsify":
        weights_file = SPARSIFY_WEIGHTS
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"encoder.weight": raw["W_enc"], "encoder.bias": raw["b_enc"], "W_dec": raw["W_dec"], "b_dec": raw["b_dec"]}
        cfg = {"activation": "topk", "expansion_factor": max(1, sae.n_latents // sae.d_in), "normalize_decoder": True,
               "num_latents": sae.n_latents, "k": sae.k, "multi_topk": sae.arch == "multitopk",
               "skip_connection": False, "transcode": False, "d_in": sae.d_in}
        save_file(tensors, str(folder / weights_file))
        (folder / SPARSIFY_CONFIG).write_text(json.dumps(cfg, indent=2))
        target = folder
    else:
        folder.mkdir(parents=True, exist_ok=True)
        weights_file = f"{layer if layer is not None else 'ae'}.pt"
        try:
            held = json.loads((folder / SIDECAR_CONFIG).read_text()).get("weights_file")
        except (OSError, ValueError, AttributeError):  # no sidecar yet, or not one of ours
            held = None
        if held not in (None, weights_file):  # one sidecar per folder: it would stop describing held
            raise ValueError(f"{folder} holds saelib's export of {held} (its {SIDECAR_CONFIG}), which an export of "
                             f"{weights_file} would make unreadable; export each layer to a folder of its own.")
        activation = "ReLU" if sae.arch == "relu" else "TopK"
        state = {"pre_bias": raw["b_dec"], "encoder.weight": raw["W_enc"], "latent_bias": raw["b_enc"],
                 "decoder.weight": raw["W_dec"].T.contiguous(),
                 "stats_last_nonzero": torch.zeros(sae.n_latents, dtype=torch.long),
                 "latents_activation_frequency": torch.ones(sae.n_latents),
                 "latents_mean_square": torch.zeros(sae.n_latents),
                 "activation": activation,
                 "activation_state_dict": {"k": sae.k, "postact_fn": "ReLU"} if activation == "TopK" else {}}
        torch.save(state, folder / weights_file)  # their layout is a torch pickle of tensors, str and int only
        target = folder / weights_file
    _write_sidecar(sae, folder, weights_file, fmt)
    return target


def _write_sidecar(sae: TopKSAE, folder: Path, weights_file: str, fmt: str) -> None:
    """``saelib.safetensors`` (the vectors, with the export's record in its header) and ``saelib.json``
    (the record and the vectors' SHA-256): the SHA-256 covers the record, as in an SAE folder."""
    vectors = {name: getattr(sae, name).detach().contiguous().cpu().clone() for name in VECTORS}
    cfg = PEER_CONFIG[fmt]
    record = {"format": fmt, "weights_file": weights_file, "weights_sha256": sha256_file(folder / weights_file),
              "cfg_sha256": sha256_file(folder / cfg) if cfg else None, "config": sae.config()}
    save_file(vectors, str(folder / SIDECAR_TENSORS), metadata={HEADER_CONFIG: json.dumps(record)})
    record["vectors_sha256"] = sha256_file(folder / SIDECAR_TENSORS)
    (folder / SIDECAR_CONFIG).write_text(json.dumps(record, indent=2))


# ---- the schemas of what is read ------------------------------------------------------------


class ExportRecord(BaseModel):
    """What an export records in the header of ``saelib.safetensors``: the format, the SHA-256 of the
    peer's files as written (``cfg_sha256`` is None for OpenAI's layout, which has no config file)
    and the SAE's config."""

    model_config = ConfigDict(strict=True, extra="forbid")

    format: Literal[FORMATS]
    weights_file: str
    weights_sha256: Sha256
    cfg_sha256: Sha256 | None
    config: SAEConfig


class Sidecar(ExportRecord):
    """The schema of ``saelib.json``: the record, plus the SHA-256 of ``saelib.safetensors``."""

    vectors_sha256: Sha256


class SAELensConfig(BaseModel):
    """The keys of a SAELens ``cfg.json`` that saelib reads (it has more; the values saelib cannot
    express are refused by ``_read_saelens`` with their own reason)."""

    model_config = ConfigDict(strict=True, extra="allow")

    d_in: PositiveInt
    d_sae: PositiveInt
    architecture: str = "standard"
    k: PositiveInt | None = None
    normalize_activations: str | None = "none"
    apply_b_dec_to_input: bool = True
    rescale_acts_by_decoder_norm: bool | None = False


class SparsifyConfig(BaseModel):
    """The keys of a sparsify ``cfg.json`` that saelib reads, with sparsify's defaults."""

    model_config = ConfigDict(strict=True, extra="allow")

    d_in: PositiveInt
    num_latents: NonNegativeInt = 0  # 0: d_in * expansion_factor
    expansion_factor: PositiveInt = 32
    k: PositiveInt = 32
    multi_topk: bool = False
    activation: str = "topk"
    transcode: bool = False
    skip_connection: bool = False


class OpenAITopK(BaseModel):
    """The ``activation_state_dict`` of an OpenAI TopK autoencoder."""

    model_config = ConfigDict(strict=True, extra="allow")

    k: PositiveInt
    postact_fn: Literal["ReLU"] = "ReLU"  # what follows the top-k; saelib applies ReLU (an "Identity" keeps negatives)


# ---- import ---------------------------------------------------------------------------------


def detect(path: str | os.PathLike) -> tuple[str, Path]:
    """``(format, weights path or folder)`` of what ``path`` holds: ``"saelib"`` or one of ``FORMATS``."""
    path = Path(path)
    if path.is_file():
        if path.suffix in (".pt", ".pth"):
            return "openai", path
        raise ValueError(f"{path} is a file but not an OpenAI autoencoder (.pt); pass an SAE folder or a .pt file.")
    if not path.is_dir():
        raise FileNotFoundError(f"No SAE at {path}; pass an saelib, SAELens or sparsify folder or an OpenAI .pt file.")
    if (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file():
        return "saelib", path
    if (path / SAELENS_CONFIG).is_file() and (path / SAELENS_WEIGHTS).is_file():
        return "saelens", path
    if (path / SPARSIFY_CONFIG).is_file() and (path / SPARSIFY_WEIGHTS).is_file():
        return "sparsify", path
    hookpoints = sorted(p.name for p in path.iterdir() if (p / SPARSIFY_CONFIG).is_file() and (p / SPARSIFY_WEIGHTS).is_file())
    if len(hookpoints) == 1:
        return "sparsify", path / hookpoints[0]
    if hookpoints:
        raise ValueError(f"{path} holds sparsify SAEs for several hookpoints ({', '.join(hookpoints)}); pass one of those folders.")
    checkpoints = sorted(path.glob("*.pt"))
    if len(checkpoints) == 1:
        return "openai", checkpoints[0]
    raise ValueError(f"{path} is not an saelib, SAELens, sparsify or OpenAI SAE: it needs config.json + sae.safetensors, "
                     f"cfg.json + sae_weights.safetensors, cfg.json + sae.safetensors, or a single .pt file.")


def import_sae(path: str | os.PathLike) -> TopKSAE:
    """Load an SAE from any supported layout (see :func:`detect`), in eval mode.

    saelib exports come back bit for bit (via the sidecar; a peer file changed since the export is
    an error, see the module docstring); other SAELens, sparsify and OpenAI SAEs come in on the raw
    scale (identity normaliser, ``b_pre = b_dec``) with ``metadata["source_format"]`` set, and
    ``metadata["input_norm"] = "layer_norm"`` where the peer normalises each token (OpenAI TopK
    files, SAELens ``layer_norm``; see :func:`layer_norm`). Every problem is a ValueError (or
    FileNotFoundError) naming the file, the key and the value.
    """
    fmt, where = detect(path)
    if fmt == "saelib":
        return load_folder(where)
    folder = where.parent if where.is_file() else where
    if (folder / SIDECAR_CONFIG).is_file():
        return _import_export(folder, fmt, where.name if where.is_file() else PEER_WEIGHTS[fmt])
    raw, arch, k, extra = READERS[fmt](where)
    n_latents, d_in = raw["W_dec"].shape
    sae = TopKSAE(d_in, n_latents, k, arch=arch, metadata={"source_format": fmt, "source": str(where), **extra})
    threshold = raw.get("threshold")
    if threshold is not None and not bool((threshold == threshold.flatten()[0]).all()):
        raise ValueError(f"{where} has a per-latent threshold; saelib holds one global threshold, so it cannot import this SAE exactly.")
    sae.load_state_dict({"W_enc": raw["W_enc"], "b_enc": raw["b_enc"], "W_dec": raw["W_dec"], "b_pre": raw["b_dec"],
                         "normalizer_mean": torch.zeros(d_in),
                         "threshold": torch.tensor(float("nan")) if threshold is None else threshold.flatten()[0].clone()})
    return sae.eval()


def _import_export(folder: Path, fmt: str, weights_file: str) -> TopKSAE:
    """The SAE that saelib exported to ``folder``, bit for bit: the peer's matrices and the sidecar's
    config and vectors, every file checked against the SHA-256 the export recorded."""
    sidecar = folder / SIDECAR_CONFIG
    fix = f"export the SAE again, or delete {SIDECAR_CONFIG} to import the {PEERS[fmt]} files as that library's own SAE"
    record = read_json(sidecar, Sidecar, fix)
    vectors = load_safetensors(folder / SIDECAR_TENSORS, record.vectors_sha256, fix)
    saved = header_record(folder / SIDECAR_TENSORS, fix)
    if saved is None:
        raise ValueError(f"{folder / SIDECAR_TENSORS} has no {HEADER_CONFIG} record in its header (an export by an "
                         f"earlier saelib, or another file); {fix}.")
    saved = check_schema(saved, ExportRecord, f"{folder / SIDECAR_TENSORS} (its {HEADER_CONFIG} header)", fix)
    check_recorded(sidecar, record.model_dump(exclude={"vectors_sha256"}), folder / SIDECAR_TENSORS, saved.model_dump(), fix)
    if (record.format, record.weights_file) != (fmt, weights_file):
        raise ValueError(f"{sidecar} records a {record.format} export to {record.weights_file}, but {folder} holds "
                         f"{fmt}'s {weights_file}; {fix}.")
    for name, sha256 in ((weights_file, record.weights_sha256), (PEER_CONFIG[fmt], record.cfg_sha256)):
        if name and sha256_file(folder / name) != sha256:
            raise ValueError(f"{folder / name} changed since saelib exported it (its SHA-256 is not the one in {sidecar}); "
                             f"if it was trained or edited in {PEERS[fmt]} since, delete {SIDECAR_CONFIG} to import it as "
                             f"that library's own SAE, otherwise export it again.")
    raw, *_ = READERS[fmt](folder / weights_file if fmt == "openai" else folder)
    config = record.config
    check_tensors(folder / SIDECAR_TENSORS, vectors, {"b_enc": (config.n_latents,), "b_pre": (config.d_in,),
                                                      "normalizer_mean": (config.d_in,), "threshold": ()}, fix)
    normalizer = Normalizer(vectors["normalizer_mean"], config.normalizer_scale)
    sae = TopKSAE(config.d_in, config.n_latents, config.k, arch=config.arch, normalizer=normalizer, metadata=config.metadata)
    sae.load_state_dict({"W_enc": raw["W_enc"], "W_dec": raw["W_dec"], **vectors})
    return sae.eval()


def _read_saelens(folder: Path) -> tuple[dict[str, Tensor], str, int | None, dict]:
    path, fix = folder / SAELENS_CONFIG, "fix the file or download the SAE again"
    cfg = read_json(path, SAELensConfig, fix)
    arch, norm = cfg.architecture, cfg.normalize_activations or "none"
    if arch not in ("topk", "standard", "jumprelu"):
        raise ValueError(f"{path}: architecture {arch!r} has no saelib equivalent; saelib imports topk, standard and jumprelu.")
    if norm not in ("none", "expected_average_only_in", "layer_norm"):
        raise ValueError(f"{path}: normalize_activations={norm!r} has no saelib equivalent; fold it into the weights first.")
    if not cfg.apply_b_dec_to_input:
        raise ValueError(f"{path}: apply_b_dec_to_input=false has no saelib equivalent (saelib always subtracts b_pre).")
    if cfg.rescale_acts_by_decoder_norm:
        raise ValueError(f"{path}: rescale_acts_by_decoder_norm=true has no saelib equivalent; fold the decoder norms first.")
    if arch == "topk" and not (cfg.k and cfg.k <= cfg.d_sae):
        raise ValueError(f"{path}: a topk SAE needs k, a positive integer up to d_sae={cfg.d_sae}, got {cfg.k!r}; {fix}.")
    d_in, n = cfg.d_in, cfg.d_sae
    t = load_safetensors(folder / SAELENS_WEIGHTS, None, "download or export it again")
    shapes = {"W_enc": (d_in, n), "b_enc": (n,), "W_dec": (n, d_in), "b_dec": (d_in,)} | ({"threshold": (n,)} if arch == "jumprelu" else {})
    check_tensors(folder / SAELENS_WEIGHTS, t, shapes, f"it does not match {path.name}, download or export it again", others=True)
    raw = {"W_enc": t["W_enc"].T.contiguous().float(), "b_enc": t["b_enc"].float(), "W_dec": t["W_dec"].float(), "b_dec": t["b_dec"].float()}
    if arch == "jumprelu":
        raw["threshold"] = t["threshold"].float()
    extra = {"input_norm": "layer_norm"} if norm == "layer_norm" else {}
    return raw, {"topk": "topk", "standard": "relu", "jumprelu": "relu"}[arch], cfg.k if arch == "topk" else None, extra


def _read_sparsify(folder: Path) -> tuple[dict[str, Tensor], str, int | None, dict]:
    path, fix = folder / SPARSIFY_CONFIG, "fix the file or download the SAE again"
    cfg = read_json(path, SparsifyConfig, fix)
    if cfg.activation != "topk" or cfg.transcode or cfg.skip_connection:
        raise ValueError(f"{path}: only plain TopK sparse autoencoders import into saelib "
                         "(not groupmax activations, transcoders or skip connections).")
    d_in, k = cfg.d_in, cfg.k
    n = cfg.num_latents or d_in * cfg.expansion_factor
    t = load_safetensors(folder / SPARSIFY_WEIGHTS, None, "download or export it again")
    check_tensors(folder / SPARSIFY_WEIGHTS, t, {"encoder.weight": (n, d_in), "encoder.bias": (n,), "W_dec": (n, d_in), "b_dec": (d_in,)},
                  f"it does not match {path.name}, download or export it again", others=True)
    if k > n:
        raise ValueError(f"{path}: k is {k}, more than the {n} latents; {fix}.")
    raw = {"W_enc": t["encoder.weight"].float(), "b_enc": t["encoder.bias"].float(), "W_dec": t["W_dec"].float(), "b_dec": t["b_dec"].float()}
    return raw, "multitopk" if cfg.multi_topk and 4 * k <= n else "topk", k, {"hookpoint": folder.name}


def _read_openai(path: Path) -> tuple[dict[str, Tensor], str, int | None, dict]:
    fix = "download or export it again"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # the weights-only unpickler names a blocked callable ("Unsupported global: GLOBAL posix.system ...")
        # or, for bytes that are no pickle at all, an unknown opcode ("Unsupported operand 103")
        blocked = re.search(r"GLOBAL (\S+)", str(error))
        if blocked:
            raise ValueError(f"Refusing to load {path}: it holds more than tensors and plain values (it calls "
                             f"{blocked[1]}), and loading it would run code.") from None
        raise ValueError(f"{path} cannot be read as a torch file (not a pickle of tensors); the file is truncated or "
                         f"corrupt, {fix}.") from None
    except Exception as error:  # a damaged zip or pickle fails in many ways (RuntimeError, EOFError, UnicodeDecodeError...)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(f"{path} cannot be read as a torch file ({type(error).__name__}: {reason}); the file is truncated "
                         f"or corrupt, {fix}.") from None
    weight = state.get("encoder.weight") if isinstance(state, dict) else None
    if not isinstance(weight, Tensor) or weight.ndim != 2 or 0 in weight.shape:
        raise ValueError(f"{path} is not an OpenAI autoencoder state dict (it has no 'encoder.weight' matrix); {fix}.")
    n, d_in = weight.shape
    check_tensors(path, state, {"encoder.weight": (n, d_in), "pre_bias": (d_in,), "latent_bias": (n,), "decoder.weight": (d_in, n)},
                  fix, others=True)
    activation = state.get("activation", "ReLU")
    if not (isinstance(activation, str) and activation in ("TopK", "ReLU")):
        raise ValueError(f"{path}: activation {activation!r} has no saelib equivalent; saelib imports TopK and ReLU autoencoders.")
    raw = {"W_enc": state["encoder.weight"].float(), "b_enc": state["latent_bias"].float(),
           "W_dec": state["decoder.weight"].T.contiguous().float(), "b_dec": state["pre_bias"].float()}
    if activation == "ReLU":
        return raw, "relu", None, {}
    k = check_schema(state.get("activation_state_dict"), OpenAITopK, f"{path}: activation_state_dict", fix).k
    if k > n:
        raise ValueError(f"{path}: activation_state_dict.k is {k}, more than the {n} latents; {fix}.")
    # their loader normalises each token whenever the activation is TopK (model.py, from_state_dict)
    return raw, "topk", k, {"input_norm": "layer_norm"}


READERS = {"saelens": _read_saelens, "sparsify": _read_sparsify, "openai": _read_openai}
