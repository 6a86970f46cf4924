"""The results tables of ``docs/results.md``, rendered from the JSON the notebooks write beside their figures.

    python -m saelib.results            # after `make figures`; rewrites docs/results.md's result blocks

Each block sits in the document between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``
and is replaced whole, so no number in it is typed by hand. A block whose notebook has not been
run at its ``demo`` preset (no JSON in ``figures/``) says which command makes it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from pathlib import Path

from .stats import paired_difference


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) if not isinstance(v, str) else v for v in row) + " |" for row in rows]
    return "\n".join(lines)


def frontier(data: dict) -> str:
    """01: TopK / BatchTopK / ReLU+L1 at each setting, mean ± sd over seeds."""
    rows = [[r["arch"], f"k={r['k']}" if r["arch"] != "relu" else f"λ={r['l1_coef']:g}", r["runs"],
             f"{r['val_l0']:.1f}", f"{r['val_nmse']:.4f} ± {r['val_nmse_std']:.4f}",
             f"{r['delta_ce']:.3f} ± {r['delta_ce_std']:.3f}"]
            for r in sorted(data["summary"], key=lambda r: (r["arch"], r["val_l0"]))]
    return _table(["architecture", "setting", "seeds", "L0", "validation NMSE (mean ± sd)", "Δ CE (nats, mean ± sd)"], rows)


def dead_latents(data: dict) -> str:
    """02: the fraction of dead latents at the end of training, by n, mitigation and lr multiplier: the
    mean over seeds and, with several, the half-width of its 95% interval."""
    from .sweep import summarize

    cells = summarize(data["runs"], ["lr_multiplier", "mitigation", "n_latents"], ["dead_fraction"])
    ns = sorted({c["n_latents"] for c in cells})
    seeds = max(c["runs"] for c in cells)
    groups = {}
    for c in cells:
        ci = f" ± {c['dead_fraction_ci']:.1%}" if c["runs"] > 1 else ""
        groups.setdefault((c["lr_multiplier"], c["mitigation"]), {})[c["n_latents"]] = f"{c['dead_fraction']:.1%}{ci}"
    rows = [[f"{m:g}x", mitigation] + [by_n.get(n, "–") for n in ns]
            for (m, mitigation), by_n in sorted(groups.items(), key=lambda item: item[0][0])]
    note = (f"\n\nMean of {seeds} seeds per cell, ± the half-width of its 95% interval (Student t)." if seeds > 1
            else "")
    return _table(["lr (x the rule)", "mitigation"] + [f"dead at n={n}" for n in ns], rows) + note


def scaling(data: dict) -> str:
    """03: every fitted coefficient with its 95% bootstrap interval, next to the paper's."""
    rows = []
    for r in data["coefficients"]:
        per_curve = r["fit"].startswith(("L(n) at", "L(k) at"))
        if per_curve and r["coefficient"] != "b":
            continue  # per-curve fits: only the exponent goes in docs/results.md (the CSV has all)
        finite = all(isinstance(v, float) and math.isfinite(v) for v in (r["ci_low"], r["ci_high"]))
        ci = f"[{r['ci_low']:+.3g}, {r['ci_high']:+.3g}]" if finite else "– (too few points)"
        rows.append([r["fit"], r["coefficient"], f"{r['ours']:+.3g}", ci,
                     "–" if r["paper"] is None else f"{r['paper']:+.3g}", f"{r['r2']:.3f}", r["n_points"]])
    d = data["data"]
    epochs = d["tokens_per_run"] / d["unique_tokens"]
    note = (f"\n\nEach run saw {d['tokens_per_run']:,} tokens of layer-{d['layer']} activations from the "
            f"`{d['corpus']}` corpus, of which {d['unique_tokens']:,} unique ({epochs:.2g} epoch{'s' * (epochs != 1)}), "
            f"in batches of {d['batch_size']:,} at {d['lr_multiplier']:g}x the paper's learning-rate rule; "
            f"the loss is NMSE on {d['validation_tokens']:,} held-out tokens.")
    return _table(["fit", "coefficient", "ours", "95% bootstrap CI", "paper", "R²", "points"], rows) + note


def metrics_vs_size(data: dict) -> str:
    """04 and 10: every evaluation metric of the paper's section 4 at each n (arrows: which way is better),
    ± the 95% interval of the metrics averaged over a sample where the run recorded it; the probe-loss and
    delta CE differences between the largest and the smallest n, task by task and context by context
    (:func:`saelib.stats.paired_difference`); where the runs record them (10), the tokens each SAE trained."""
    def cell(r: dict, metric: str, digits: int) -> str:
        ci = f" ± {r[metric + '_ci']:.{digits}f}" if metric + "_ci" in r else ""
        return f"{r[metric]:.{digits}f}{ci}"

    runs = sorted(data["runs"], key=lambda r: r["n_latents"])
    trained = "trained" in runs[0]  # 10: each SAE's training tokens, and whether it reached its T
    rows = [[f"{r['n_latents']:,}"] + ([f"{r['trained'] / 1e6:.1f}M" + (" (short of T)" if r["short"] else "")]
                                       if trained else [])
            + [f"{r['val_nmse']:.4f}", f"{r['delta_ce']:.3f}", cell(r, "probe_loss", 3), cell(r, "n2g_precision", 3),
               cell(r, "n2g_recall", 3), cell(r, "ablation_sparsity", 3), f"{r['dead_fraction']:.1%}"] for r in runs]
    first, last = runs[0], runs[-1]
    note = (f"\n\nBaselines on the residual channels: probe loss {first['probe_loss_baseline']:.4f}, "
            f"ablation sparsity {first['ablation_sparsity_baseline']:.3f}.")
    for key, name, items in (("probe_loss_by_task", "Probe loss", "task by task over {} tasks"),
                             ("delta_ce_by_context", "Δ CE", "context by context over {} contexts")):
        if first.get(key) and last.get(key):
            shift, half, m = paired_difference(first[key], last[key])
            note += (f" {name}, n {last['n_latents']:,} minus n {first['n_latents']:,} {items.format(m)}: "
                     f"{shift:+.3f} ± {half:.3f}.")
    return _table(["n"] + (["tokens trained"] if trained else []) + ["NMSE ↓", "Δ CE (nats) ↓", "probe loss ↓",
                  "N2G precision ↑", "N2G recall ↑", "ablation sparsity ↓", "dead"], rows) + note


def progressive(data: dict) -> str:
    """05: NMSE when decoding the top k' latents of a TopK and a Multi-TopK SAE, mean ± sd over seeds."""
    by = {(r["arch"], r["k_prime"]): r for r in data["summary"]}
    archs, ks = sorted({a for a, _ in by}, reverse=True), sorted({k for _, k in by})
    rows = [[f"k'={k}"] + [f"{by[a, k]['nmse']:.4f} ± {by[a, k]['nmse_std']:.4f}" if (a, k) in by else "–"
                           for a in archs] for k in ks]
    return _table(["decoded latents"] + [f"{a} NMSE (mean ± sd)" for a in archs], rows)


def ablation(data: dict) -> str:
    """07: held-out NMSE of each one-knob change from the reference recipe."""
    runs = data["runs"]
    ref = [r["val_nmse"] for r in runs if r["variant"] == "reference"]
    ref_mean = sum(ref) / len(ref)
    ref_dead = sum(r["dead_fraction"] for r in runs if r["variant"] == "reference") / len(ref)
    rows = [[f"reference (mean of {len(ref)} seeds: {', '.join(f'{v:.4f}' for v in ref)})",
             f"{data['reference']['lr']:.3g}", f"{ref_mean:.4f}", "–", f"{ref_dead:.1%}"]]
    for r in sorted((r for r in runs if r["variant"] != "reference"), key=lambda r: r["val_nmse"]):
        rows.append([r["variant"], f"{r['lr']:.3g}", f"{r['val_nmse']:.4f}", f"{r['val_nmse'] - ref_mean:+.4f}",
                     f"{r['dead_fraction']:.1%}"])
    return _table(["variant", "lr", "validation NMSE", "vs reference", "dead"], rows)


def toy_recovery(data: dict) -> str:
    """06: mean best cosine of the learned decoder rows to a planted dictionary, by n and k."""
    runs, setup = data["runs"], data["setup"]
    ns, ks = sorted({r["n_latents"] for r in runs}), sorted({r["k"] for r in runs})
    mbc = {(r["n_latents"], r["k"]): r["mbc"] for r in runs}
    rows = [[f"k={k}"] + [f"{mbc[n, k]:.3f}" if (n, k) in mbc else "–" for n in ns] for k in ks]
    note = (f"\n\n{setup['m']} planted features in {setup['d']} dimensions, {setup['s']} active per sample; "
            f"a random dictionary scores {data['random_mbc']:.3f}.")
    return _table(["mean best cosine"] + [f"n={n}" for n in ns], rows) + note


def _lr_grids(best: list[dict], by: str | None = None) -> str:
    """09: one row per grid of a learning-rate sweep (:func:`saelib.scaling.lr_grid_table`), with a
    column for ``by`` (``"batch_size"`` or ``"k"``) where the grids differ in it."""
    rows = [[f"{b['n_latents']:,}", f"{b['steps']:,}"] + ([f"{b[by]:,}"] if by else [])
            + [f"{b['multiple']:.1f}", f"{b['default_multiple']:.1f}", f"{b['best_run_nmse']:.4f}",
               f"{b['default_nmse']:.4f}", f"{b['regret']:+.1%}"] for b in best]
    column = {"batch_size": ["batch"], "k": ["k"]}.get(by, [])
    return _table(["n", "steps"] + column + ["best multiple", "default's multiple", "NMSE, best run",
                   "NMSE at the default", "default vs best run"], rows)


def lr_rule(data: dict) -> str:
    """09: each run size's best learning-rate multiple, the default's, and what the default costs."""
    fit, rule = data["fit"], data["rule"]
    law = ", ".join(f"{k} = {v:+.3f} [{fit['ci'][k][0]:+.3f}, {fit['ci'][k][1]:+.3f}]" for k, v in fit["params"].items())
    note = (f"\n\nFit `multiple = exp(a) · steps^b · (n / 2^14)^c` to the best multiples: {law} (95% intervals, "
            f"R² {fit['r2']:.2f}); the library's default uses "
            + ", ".join(f"{k} = {v:+.3f}" for k, v in rule.items()) + ", and never less than 1x.")
    return _lr_grids(data["best"]) + note


def _lr_term(data: dict, name: str, law: str) -> str:
    """09: the fitted exponent of one more term of the learning-rate rule, against the library's."""
    fit = data["fit"]
    low, high = fit["ci"][name]
    return (f"\n\nFit `{law}` to each best multiple over the same run size's best in the main sweep: "
            f"{name} = {fit['params'][name]:+.3f} (95% interval {low:+.3f} to {high:+.3f}); the library's "
            f"default uses {name} = {data['rule'][name]:+.3f}.")


def lr_batches(data: dict) -> str:
    """09: the best multiple of the same run sizes at other batch sizes, the fitted batch term, and
    what the default costs there."""
    best = sorted(data["best"], key=lambda b: (b["n_latents"], b["steps"], b["batch_size"]))
    return _lr_grids(best, by="batch_size") + _lr_term(data, "e", "(B / 1024)^e")


def lr_ks(data: dict) -> str:
    """09: the best multiple of the same run sizes at other k, the fitted k term, and what the default costs."""
    best = sorted(data["best"], key=lambda b: (b["n_latents"], b["steps"], b["k"]))
    return _lr_grids(best, by="k") + _lr_term(data, "d", "(k / 32)^d")


# a bench row whose slowest timed step took more than this many times its fastest ran on an unsteady machine
UNSTEADY_SPREAD = 2.0


def _unsteady(row: dict) -> bool:
    times = row.get("step_s_all") or []
    return len(times) > 1 and max(times) > UNSTEADY_SPREAD * min(times)


def throughput(data: dict) -> str:
    """08: tokens/s of one training step per implementation, with saelib's ratio to the fastest peer;
    ``*`` marks a figure whose timed steps spread more than ``UNSTEADY_SPREAD``-fold."""
    impls = ["saelib", "saelib-bf16", "sparsify", "sae-lens", "naive", "roofline"]
    groups = {}
    for r in data["rows"]:
        groups.setdefault((r["d_in"], r["n_latents"], r["batch_size"], r["dead_fraction"]), {})[r["impl"]] = r

    def cell(r: dict | None) -> str:
        if r is None or not r.get("tokens_per_s"):
            return "–"
        ratio = r["ratio_to_best_peer"]
        return (f"{r['tokens_per_s']:,.0f}" + (f" ({ratio:.2f}x)" if r["impl"].startswith("saelib") and ratio else "")
                + ("*" if _unsteady(r) else ""))

    rows = [[f"{d}", f"{n:,}", f"{b:,}", f"{dead:.0%}"] + [cell(by.get(i)) for i in impls]
            for (d, n, b, dead), by in sorted(groups.items(), key=lambda item: (item[0][:3], -item[0][3]))]
    m = data["machine"]
    note = (f"\n\nTokens/s of one full training step, k {data['rows'][0]['k']}; in brackets saelib's ratio to the "
            f"faster of sparsify and SAELens in the same row; dead > 0 turns AuxK on. {m['cpu']}, {m['threads']} "
            f"threads, torch {m['torch_version']}, load average {m['load_avg_1m']:.1f} at the start.")
    heaps = {r.get("heap") for r in data["rows"]}  # None: a JSON from before the bench recorded it, no sentence
    if heaps == {"reuse"}:
        note += (" glibc's heap reused for every block (`--heap reuse`): no implementation paid page faults for memory "
                 "it allocates afresh at each step.")
    elif heaps == {"default"}:
        note += (" glibc's default heap: an implementation that allocates large temporaries afresh at each step pays "
                 "their page faults (`--heap reuse` removes them).")
    if m.get("native_kernels"):
        native = m["native_kernels"]
        note += " saelib's AuxK ran on its compiled CPU kernels." if native == "in use" else \
            f" saelib's AuxK ran on torch ops: its compiled CPU kernels were not in use ({native})."
    if any(_unsteady(r) for r in data["rows"]):
        note += (f" * marks a figure whose slowest timed step took more than {UNSTEADY_SPREAD:g}x its fastest: the "
                 f"machine slowed down for part of the run (each step time is in the JSON), so it is uncertain.")
    supply = data.get("supply") or []
    if supply:
        rates = ", ".join(f"{s['tokens_per_s']:,.0f} (epoch {s['epoch']})" for s in supply)
        note += f" Reading and shuffling the activation cache: {rates} tokens/s at batch {supply[0]['batch_size']:,}."
    parity = {r["encoder_dtype"]: r for r in data.get("bf16_parity") or []}
    if len(parity) == 2:
        fp32, bf16 = parity["float32"], parity["bfloat16"]
        note += (f" The same SAE (n {fp32['n_latents']:,}, k {fp32['k']}) trained {fp32['steps']} steps of "
                 f"{fp32['batch_size']:,} SmolLM2 tokens with each encoder dtype: validation NMSE {bf16['nmse']:.5f} "
                 f"with the bf16 encoder against {fp32['nmse']:.5f} in fp32 ({bf16['rel_nmse_diff']:+.2%}).")
    return _table(["d_in", "n", "batch", "dead"] + impls, rows) + note


def best_cells(rows: list[dict]) -> dict[str, dict]:
    """``saelib bench --quality``: each library's best learning rate, by NMSE averaged over seeds."""
    cells: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        if r["status"] == "ok":
            cells.setdefault((r["library"], r["lr_multiplier"]), []).append(r)
    best = {}
    for (library, multiple), runs in cells.items():
        mean = {key: sum(r[key] for r in runs) / len(runs)
                for key in ("nmse", "delta_ce", "loss_recovered", "dead_fraction", "tokens_per_s")}
        if library not in best or mean["nmse"] < best[library]["nmse"]:
            best[library] = {"library": library, "lr_multiplier": multiple, "seeds": len(runs), **mean}
    return best


def convergence(data: dict) -> str:
    """10: each run's tokens to convergence with its interval, and the exponent of ``T(n)``."""
    unique = data["unique_tokens"]
    rows = [[f"{r['n_latents']:,}", f"{r['trained'] / 1e6:.1f}M ({r['trained'] / unique:.0f})", f"{r['T'] / 1e6:.1f}M",
             f"[{r['T_low'] / 1e6:.1f}M, {r['T_high'] / 1e6:.1f}M]", f"{r['T'] / r['trained']:.2f}x",
             f"{r['curve_fit']['c']:.4f}", f"{r['val_nmse']:.4f}"]
            for r in sorted(data["runs"], key=lambda r: r["n_latents"])]
    fit = data["fit"]
    low, high = fit["ci"]["b"]
    note = (f"\n\nT(n) = exp({fit['params']['a']:.2f}) n^{fit['params']['b']:.2f}, 95% interval of the exponent "
            f"[{low:.2f}, {high:.2f}] (the paper: n^0.6). Each run trained at a constant learning rate on the passes "
            f"over {unique:,} tokens shown; T is where its fitted curve comes within {data['tol']:.0%} of the "
            f"asymptote, beyond the run where the ratio exceeds 1x.")
    return _table(["n", "trained (passes)", "T (tokens)", "95% interval", "T / tokens trained", "asymptote (NMSE)",
                   "held-out NMSE"], rows) + note


def quality(data: dict) -> str:
    """``saelib bench --quality``: every cell (library x lr x seed), then each library's best."""
    rows = [[r["library"], f"{r['lr_multiplier']:.3g}", r["seed"]]
            + ([f"{r['nmse']:.4f}", f"{r['delta_ce']:.3f}", f"{r['loss_recovered']:.3f}", f"{r['dead_fraction']:.2%}",
                f"{r['tokens_per_s']:,.0f}"] if r["status"] == "ok" else [r["reason"], "", "", "", ""])
            for r in data["rows"]]
    best = [[b["library"], f"{b['lr_multiplier']:.3g}", b["seeds"], f"{b['nmse']:.4f}", f"{b['delta_ce']:.3f}",
             f"{b['loss_recovered']:.3f}", f"{b['dead_fraction']:.2%}"]
            for b in sorted(best_cells(data["rows"]).values(), key=lambda b: b["nmse"])]
    return (_table(["library", "lr (x its rule)", "seed", "NMSE", "Δ CE (nats)", "loss recovered", "dead", "tokens/s"], rows)
            + "\n\nEach library at its best learning rate (mean over seeds):\n\n"
            + _table(["library", "lr (x its rule)", "seeds", "NMSE", "Δ CE (nats)", "loss recovered", "dead"], best))


# block name -> (JSON file under figures/, renderer, figure embedded above the table, command that makes it)
BLOCKS = {
    "frontier": ("01_frontier.json", frontier, "01_frontier.png", "make figures NOTEBOOKS=01_topk_vs_relu"),
    "dead_latents": ("02_dead_vs_n.json", dead_latents, "02_dead_vs_n.png", "make figures NOTEBOOKS=02_dead_latents"),
    "scaling": ("03_coefficients.json", scaling, "03_loss_vs_n.png", "make figures NOTEBOOKS=03_scaling_laws"),
    "metrics": ("04_metrics_vs_size.json", metrics_vs_size, "04_metrics_vs_size.png",
                "make figures NOTEBOOKS=04_metrics_vs_size"),
    "progressive": ("05_progressive.json", progressive, "05_progressive.png",
                    "make figures NOTEBOOKS=05_progressive_codes"),
    "toy": ("06_recovery.json", toy_recovery, "06_recovery.png", "make figures NOTEBOOKS=06_toy_ground_truth"),
    "ablation": ("07_recipe_ablation.json", ablation, "07_recipe_ablation.png",
                 "make figures NOTEBOOKS=07_recipe_ablation"),
    "lr_rule": ("09_learning_rate.json", lr_rule, "09_learning_rate.png", "make figures NOTEBOOKS=09_learning_rate"),
    "lr_batches": ("09_lr_batches.json", lr_batches, "09_lr_batches.png", "make figures NOTEBOOKS=09_learning_rate"),
    "lr_ks": ("09_lr_ks.json", lr_ks, "09_lr_ks.png", "make figures NOTEBOOKS=09_learning_rate"),
    "convergence": ("10_convergence.json", convergence, "10_convergence.png", "make figures NOTEBOOKS=10_convergence"),
    "convergence_metrics": ("10_metrics.json", metrics_vs_size, "10_metrics.png", "make figures NOTEBOOKS=10_convergence"),
    "throughput": ("08_throughput.json", throughput, "08_throughput.png", "make figures NOTEBOOKS=08_performance"),
    "quality_lesson": ("quality_lesson.json", quality, "quality_lesson.png",
                       "saelib bench --quality --budget lesson --seeds 0 1 --out figures/quality_lesson.json"),
    "quality": ("quality_demo.json", quality, "quality_demo.png", "make figures NOTEBOOKS=11_peers_quality"),
    "quality_x4": ("quality_demo_x4.json", quality, "quality_demo_x4.png", "make figures NOTEBOOKS=11_peers_quality"),
}


def render(name: str, figures: Path, link_prefix: str = "figures/") -> str:
    """The markdown of block ``name`` from the JSON in ``figures``."""
    file, renderer, image, command = BLOCKS[name]
    path = figures / file
    if not path.exists():
        return f"*Not run yet: `{command}` writes `{link_prefix}{file}`.*"
    out = renderer(json.loads(path.read_text()))
    if (figures / image).exists():
        out = f"![{name}]({link_prefix}{image})\n\n{out}"
    return out + f"\n\n*From `{link_prefix}{file}`, written by `{command}`.*"


def update(doc: str | Path = "docs/results.md", figures: str | Path = "figures") -> list[str]:
    """Rewrite every result block found in the markdown file ``doc`` (links to ``figures`` relative
    to it); returns the names rewritten."""
    doc, figures = Path(doc), Path(figures)
    link_prefix = Path(os.path.relpath(figures, doc.parent)).as_posix() + "/"
    text = doc.read_text()
    done = []
    for name in BLOCKS:
        pattern = re.compile(rf"(<!-- results:{name} -->).*?(<!-- /results:{name} -->)", re.S)
        if pattern.search(text):
            body = render(name, figures, link_prefix)
            text = pattern.sub(lambda m: f"{m.group(1)}\n{body}\n{m.group(2)}", text)
            done.append(name)
    doc.write_text(text)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m saelib.results", description=__doc__.splitlines()[0])
    parser.add_argument("--doc", default="docs/results.md")
    parser.add_argument("--figures", default="figures")
    args = parser.parse_args(argv)
    for name in ("doc", "figures"):
        if not Path(getattr(args, name)).exists():
            parser.error(f"--{name} {getattr(args, name)} does not exist; run from the repository root.")
    print("rewrote:", ", ".join(update(args.doc, args.figures)) or "no result blocks found")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
