"""The pipeline's rate stage by stage (``saelib bench --pipeline``): text to a trained SAE.

Stages, each timed on the same tokens in one process:

- ``tokenise``: ``data.pack`` of the corpus's documents into contexts;
- ``forward``: the LM stopped after the hooked layer, read by a bare torch forward hook, on a copy
  of the LM that nnsight never wrapped (nnsight wraps the modules it sees for good);
- ``hook``: what nnsight's trace (``activations.extract``, the library's path) costs over that
  bare hook: its seconds are the difference of the two (``None`` when within the noise);
- ``cache write``: exclusion, shards, checksums and the normaliser (``activations.store_shard``,
  ``ActivationCache.finish``) into a temporary folder;
- ``cache read + shuffle``: ``CachedSource``'s first epoch (reads and checks the shards);
- ``train step``: ``train.train_step``, timed as the bench's ``saelib`` row (AuxK off) on those
  activations.

``tokens_per_s`` is tokens over wall seconds (``cpu_seconds`` beside them: on a shared machine the
wall time includes the others' load). The forward and nnsight take turns for ``rounds`` rounds and
give their medians, so a load that changes falls on both alike. The pipeline runs at its slowest
stage's rate (``slowest``); ``serial_tokens_per_s`` is the rate when the stages run one after the
other, as ``saelib train`` runs them (extract and cache, then train one epoch).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from ..activations import ActivationCache, CacheKey, CachedSource, extract, extraction_dtype, forward_dtype, store_shard
from ..data import load_documents, pack, split_documents
from ..models import DEFAULT_MODEL, LM, load_lm
from .cases import BenchConfig, initial_weights
from .experiments import supply_rate
from .memory import machine
from .peers import make_step, measure

# quick: seconds, for tests; default: a few minutes on 2 cores
PIPELINE_SIZES = {
    "quick": dict(n_contexts=8, batch_size=4, n_latents=256, k=8, train_batch=256, steps=3, rounds=1),
    "default": dict(n_contexts=128, batch_size=64, n_latents=4608, k=32, train_batch=4096, steps=5, rounds=2),
}
STAGES = ("tokenise", "forward", "hook", "cache write", "cache read + shuffle", "train step")


class _Stop(Exception):
    """Raised by the bare hook to end the forward after the hooked layer."""


def bare_forward(lm: LM, ids: torch.Tensor, layer: int, site: str = "resid_post", dtype: str = "float32") -> torch.Tensor:
    """``(b, T, d_model)`` float32 activations at ``site`` of ``layer`` from a plain torch forward hook,
    the forward stopped there (in ``dtype``): what ``extract`` computes, without nnsight."""
    saved = {}

    def hook(module, inputs, output):
        saved["acts"] = output[0] if isinstance(output, tuple) else output
        raise _Stop

    handle = lm.model.get_submodule(lm.site_module_path(layer, site)).register_forward_hook(hook)
    try:
        with torch.inference_mode(), forward_dtype(lm.model.device, dtype):
            lm.model(ids.to(lm.model.device))
    except _Stop:
        pass
    finally:
        handle.remove()
    return saved["acts"].float().cpu()


def _timed(fn: Callable[[], object]) -> tuple[object, float, float]:
    """``fn()``'s result, wall seconds and CPU seconds (of this process, every thread)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def _row(stage: str, tokens: int, seconds: float | None, cpu_seconds: float | None) -> dict:
    measured = seconds is not None and seconds > 0
    return {"stage": stage, "tokens": tokens, "seconds": seconds if measured else None,
            "cpu_seconds": cpu_seconds if measured else None, "tokens_per_s": tokens / seconds if measured else None}


def pipeline_rates(size: str = "default", *, model: str = DEFAULT_MODEL, corpus: str = "wikipedia",
                   layer: int = 12, site: str = "resid_post", ctx_len: int = 64, device: str | torch.device = "cpu",
                   seed: int = 0) -> dict:
    """Time every stage of the pipeline once (see the module's docstring).

    Args:
        size: ``"quick"`` (8 contexts, a tiny SAE: seconds) or ``"default"`` (128 contexts of 64
            tokens, n 4608, k 32, batches of 4096: the demo's SAE).
        model: loaded twice on ``device``, for the bare hook and for nnsight.

    Returns:
        ``{"stages": [{stage, tokens, seconds, cpu_seconds, tokens_per_s}, ...], "slowest",
        "serial_tokens_per_s", "hook_overhead"`` (nnsight's seconds over the bare hook's, as a
        fraction of the bare hook's), ``"extract_tokens_per_s"`` (nnsight's whole rate),
        ``"float32_forward_tokens_per_s"`` and ``"forward_speedup"`` (the ``lm_dtype`` forward's rate
        over float32's, timed in the same rounds; 1 when ``lm_dtype`` is float32), the sizes and the
        machine.
    """
    if size not in PIPELINE_SIZES:
        raise ValueError(f"Unknown pipeline size {size!r}; choose one of {', '.join(PIPELINE_SIZES)}.")
    sizes = PIPELINE_SIZES[size]
    lm, unwrapped = load_lm(model, device), load_lm(model, device)
    rows = []

    docs = split_documents(load_documents(corpus), "train")
    contexts, wall, cpu = _timed(lambda: pack(docs, lm.tokenizer, ctx_len, max_contexts=sizes["n_contexts"]))
    tokens = contexts.numel()
    rows.append(_row("tokenise", tokens, wall, cpu))

    bs, dtype = sizes["batch_size"], extraction_dtype(lm.model.device)
    def bare(dtype: str) -> Callable[[], list]:
        return lambda: [bare_forward(unwrapped, contexts[s:s + bs], layer, site, dtype) for s in range(0, len(contexts), bs)]

    runs = {"bare": bare(dtype), "nnsight": lambda: list(extract(lm, contexts, [layer], site, bs, progress=False, dtype=dtype))}
    if dtype != "float32":  # the float32 forward in the same rounds: what the faster dtype gains
        runs["bare float32"] = bare("float32")
    batches = {name: run() for name, run in runs.items()}["nnsight"]  # warm-up (allocations, nnsight's setup)
    times = {name: [] for name in runs}
    for _ in range(sizes["rounds"]):
        for name, run in runs.items():
            times[name].append(_timed(run)[1:])
    median = {name: [statistics.median(t[i] for t in times[name]) for i in (0, 1)] for name in runs}
    forward, nnsight = median["bare"], median["nnsight"]
    float32_forward = median.get("bare float32", forward)
    rows.append(_row("forward", tokens, *forward))
    rows.append(_row("hook", tokens, nnsight[0] - forward[0], nnsight[1] - forward[1]))

    with tempfile.TemporaryDirectory() as tmp:
        key = CacheKey(lm.name, layer, site, corpus, "train", ctx_len, tokens, lm_dtype=dtype)
        cache = ActivationCache(Path(tmp), key)

        def write() -> None:
            store_shard({layer: cache}, contexts, 0, len(contexts), batches, lm.special_ids)
            cache.finish()

        _, wall, cpu = _timed(write)
        rows.append(_row("cache write", tokens, wall, cpu))

        train_batch = min(sizes["train_batch"], cache.n_rows)
        source = CachedSource(cache)
        supplied, wall, cpu = _timed(lambda: supply_rate(source, train_batch, epochs=1, seed=seed))
        rows.append(_row("cache read + shuffle", supplied[0]["tokens"], wall, cpu))  # the batches the trainer gets
        train = list(source.batches(train_batch, seed=seed, epoch=1))

    cfg = BenchConfig(lm.d_model, sizes["n_latents"], sizes["k"], train_batch, dead_fraction=0.0)
    step = make_step("saelib", cfg, {name: t.to(device) for name, t in initial_weights(cfg, seed).items()}, None)
    train = [x.to(device) for x in train]
    measure(step, train, 1, 0)  # the first step allocates the optimiser's state
    (step_seconds, _), _, cpu = _timed(lambda: measure(step, train, 0, sizes["steps"]))
    rows.append(_row("train step", train_batch, statistics.median(step_seconds), cpu / sizes["steps"]))

    timed = [r for r in rows if r["tokens_per_s"]]
    return {"stages": rows, "slowest": min(timed, key=lambda r: r["tokens_per_s"])["stage"],
            "serial_tokens_per_s": 1 / sum(1 / r["tokens_per_s"] for r in timed),
            "hook_overhead": nnsight[0] / forward[0] - 1, "extract_tokens_per_s": tokens / nnsight[0],
            "float32_forward_tokens_per_s": tokens / float32_forward[0], "forward_speedup": float32_forward[0] / forward[0],
            "model": lm.name, "layer": layer, "site": site, "ctx_len": ctx_len, "lm_dtype": dtype, "size": size,
            **sizes, **machine(torch.device(device))}


def pipeline_table(report: dict) -> str:
    """The stages as a Markdown table, the slowest marked."""
    lines = ["| stage | tokens | seconds (wall) | CPU seconds | tokens/s |", "|---|---:|---:|---:|---:|"]
    for r in report["stages"]:
        cells = [f"{r[key]:.3f}" if r[key] is not None else "-" for key in ("seconds", "cpu_seconds")]
        rate = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] is not None else "- (within noise)"
        name = f"**{r['stage']}** (slowest)" if r["stage"] == report["slowest"] else r["stage"]
        lines.append(f"| {name} | {r['tokens']:,} | {cells[0]} | {cells[1]} | {rate} |")
    return "\n".join(lines)
