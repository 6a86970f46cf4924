"""The result blocks of docs/results.md are rendered from the notebooks' JSON, replaced whole and idempotently."""

import json

import pytest

from saelib import results


def _ablation_json(folder):
    runs = [dict(variant="reference", seed=0, lr=1e-3, val_nmse=0.20, dead_fraction=0.0),
            dict(variant="reference", seed=1, lr=1e-3, val_nmse=0.22, dead_fraction=0.0),
            dict(variant="no AuxK", seed=0, lr=1e-3, val_nmse=0.25, dead_fraction=0.5)]
    (folder / "07_recipe_ablation.json").write_text(json.dumps({"reference": {"lr": 1e-3}, "runs": runs}))


def test_blocks_are_rewritten_from_json_and_the_rest_kept(tmp_path):
    figures = tmp_path / "figures"
    figures.mkdir()
    _ablation_json(figures)
    readme = tmp_path / "results.md"
    readme.write_text("intro\n<!-- results:ablation -->\nold text\n<!-- /results:ablation -->\n"
                      "<!-- results:scaling -->\n<!-- /results:scaling -->\noutro\n")
    assert results.update(readme, figures) == ["scaling", "ablation"]
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old text" not in text
    assert "| reference (mean of 2 seeds: 0.2000, 0.2200) | 0.001 | 0.2100 | – | 0.0% |" in text
    assert "| no AuxK | 0.001 | 0.2500 | +0.0400 | 50.0% |" in text
    # no JSON for the scaling block: it names the command that makes it
    assert "make figures NOTEBOOKS=03_scaling_laws" in text
    results.update(readme, figures)
    assert readme.read_text() == text


def test_the_scaling_block_states_tokens_seen_and_unique():
    coefficient = dict(fit="joint L(n, k)", coefficient="g", ours=-0.05, ci_low=-0.07, ci_high=-0.03, paper=-0.042,
                       r2=0.99, n_points=20)
    data = dict(corpus="mix", layer=12, unique_tokens=1_000_000, tokens_per_run=1_000_000, batch_size=1024,
                lr_multiplier=16, validation_tokens=8000)
    text = results.scaling({"data": data, "coefficients": [coefficient]})
    assert "| joint L(n, k) | g | -0.05 | [-0.07, -0.03] | -0.042 | 0.990 | 20 |" in text
    assert "1,000,000 tokens" in text and "`mix` corpus" in text and "1,000,000 unique (1 epoch)" in text


def test_the_metrics_and_progressive_blocks_put_each_value_in_its_cell():
    run = dict(n_latents=1024, val_nmse=0.25, delta_ce=0.5, probe_loss=0.3, n2g_precision=0.8, n2g_recall=0.4,
               ablation_sparsity=0.6, dead_fraction=0.01, probe_loss_baseline=0.35, ablation_sparsity_baseline=0.7)
    text = results.metrics_vs_size({"runs": [run]})
    assert "| 1,024 | 0.2500 | 0.500 | 0.300 | 0.800 | 0.400 | 0.600 | 1.0% |" in text
    with_intervals = results.metrics_vs_size({"runs": [dict(run, probe_loss_ci=0.05, n2g_precision_ci=0.02)]})
    assert "| 1,024 | 0.2500 | 0.500 | 0.300 ± 0.050 | 0.800 ± 0.020 | 0.400 | 0.600 | 1.0% |" in with_intervals
    assert "probe loss 0.3500, ablation sparsity 0.700" in text
    # tasks paired across the two sizes: each moves by 0.02 to 0.04, far less than the tasks differ
    small = {f"task{i}": 0.1 * i for i in range(4)}
    large = {task: loss + 0.03 + (0.01 if i % 2 else -0.01) for i, (task, loss) in enumerate(small.items())}
    converged = [dict(run, trained=4_098_048, short=False, probe_loss_by_task=small, delta_ce_by_context=[0.5, None, 0.3]),
                 dict(run, n_latents=4096, trained=15_456_256, short=True, probe_loss_by_task={**large, "only_here": 0.5},
                      delta_ce_by_context=[0.3, 0.2, 0.1])]
    text = results.metrics_vs_size({"runs": converged})
    assert "Δ CE, n 4,096 minus n 1,024 context by context over 2 contexts: -0.200 ± 0.000." in text
    assert "| 1,024 | 4.1M | 0.2500 |" in text and "| 4,096 | 15.5M (short of T) | 0.2500 |" in text
    # mean 0.03, sd 0.01155 over 4 tasks: half-width t(0.975, 3) 3.182 * 0.01155 / 2 = 0.018
    assert "n 4,096 minus n 1,024 task by task over 4 tasks: +0.030 ± 0.018" in text
    summary = [dict(arch="topk", k_prime=8, nmse=0.3, nmse_std=0.01), dict(arch="multitopk", k_prime=8, nmse=0.28, nmse_std=0.02),
               dict(arch="multitopk", k_prime=64, nmse=0.2, nmse_std=0.0)]
    text = results.progressive({"summary": summary})
    assert "| decoded latents | topk NMSE (mean ± sd) | multitopk NMSE (mean ± sd) |" in text
    assert "| k'=8 | 0.3000 ± 0.0100 | 0.2800 ± 0.0200 |" in text and "| k'=64 | – | 0.2000 ± 0.0000 |" in text


def test_the_dead_latents_block_gives_each_cells_mean_over_seeds_and_its_interval():
    cell = dict(lr_multiplier=4, mitigation="neither", n_latents=1024)
    runs = [dict(cell, seed=0, dead_fraction=0.30), dict(cell, seed=1, dead_fraction=0.32), dict(cell, seed=2, dead_fraction=0.34),
            dict(cell, n_latents=4096, seed=0, dead_fraction=0.5), dict(cell, n_latents=4096, seed=1, dead_fraction=0.5),
            dict(cell, n_latents=4096, seed=2, dead_fraction=0.5)]
    text = results.dead_latents({"runs": runs})
    assert "| 4x | neither | 32.0% ± 5.0% | 50.0% ± 0.0% |" in text and "Mean of 3 seeds per cell" in text
    one = results.dead_latents({"runs": runs[:1]})
    assert "| 4x | neither | 30.0% |" in one and "seeds" not in one


def test_the_convergence_block_states_each_T_against_its_run_and_the_exponent():
    run = dict(n_latents=1024, T=2.5e7, T_low=2e7, T_high=3.1e7, trained=4_000_000, curve_fit=dict(a=7, b=-0.7, c=0.19),
               val_nmse=0.2)
    fit = dict(params=dict(a=13.5, b=0.6), ci=dict(a=[11, 16], b=[0.28, 0.99]))
    text = results.convergence(dict(runs=[run], fit=fit, tol=0.01, unique_tokens=1_000_000))
    assert "| 1,024 | 4.0M (4) | 25.0M | [20.0M, 31.0M] | 6.25x | 0.1900 | 0.2000 |" in text
    assert "n^0.60, 95% interval of the exponent [0.28, 0.99]" in text and "within 1% of the asymptote" in text


def test_the_throughput_block_has_one_row_per_configuration_and_saelibs_ratio():
    base = dict(d_in=576, n_latents=4608, k=32, batch_size=4096, dead_fraction=0.25)
    rows = [dict(base, impl="saelib", tokens_per_s=3000.0, ratio_to_best_peer=2.0),
            dict(base, impl="sparsify", tokens_per_s=1500.0, ratio_to_best_peer=1.0),
            dict(base, impl="sae-lens", tokens_per_s=None, ratio_to_best_peer=None),
            dict(base, dead_fraction=0.0, impl="saelib", tokens_per_s=6000.0, ratio_to_best_peer=None)]
    machine = dict(cpu="Some CPU", threads=2, torch_version="2.x", load_avg_1m=1.0)
    supply = [dict(epoch=0, batch_size=4096, tokens_per_s=100000.0)]
    text = results.throughput({"rows": rows, "machine": machine, "supply": supply})
    assert "| 576 | 4,608 | 4,096 | 25% | 3,000 (2.00x) | – | 1,500 | – | – | – |" in text
    assert "| 576 | 4,608 | 4,096 | 0% | 6,000 | – | – | – | – | – |" in text
    assert "Some CPU, 2 threads" in text and "100,000 (epoch 0) tokens/s at batch 4,096" in text
    assert "bf16" not in text.split("|")[-1]  # no parity runs, no sentence about them
    assert "*" not in text  # no step times, nothing flagged
    rows[0]["step_s_all"], rows[1]["step_s_all"] = [1.0, 2.5, 1.1], [1.0, 1.9, 1.2]  # spread 2.5x and 1.9x
    text = results.throughput({"rows": rows, "machine": machine, "supply": supply})
    assert "| 25% | 3,000 (2.00x)* | – | 1,500 | – |" in text and "slowest timed step took more than 2x its fastest" in text
    parity = [dict(encoder_dtype=dtype, n_latents=4608, k=32, steps=248, batch_size=1024, nmse=nmse, rel_nmse_diff=rel)
              for dtype, nmse, rel in (("float32", 0.4, 0.0), ("bfloat16", 0.401, 0.0025))]
    text = results.throughput({"rows": rows, "machine": machine, "supply": supply, "bf16_parity": parity})
    assert "248 steps of 1,024 SmolLM2 tokens" in text and "NMSE 0.40100 with the bf16 encoder against 0.40000 in fp32 (+0.25%)" in text
    assert "compiled CPU kernels" not in text and "heap" not in text  # an older JSON without the fields: no sentence
    for heap, says in (("reuse", "glibc's heap reused for every block"), ("default", "glibc's default heap")):
        assert says in results.throughput({"rows": [dict(r, heap=heap) for r in rows], "machine": machine})
    machine["native_kernels"] = "in use"
    assert "saelib's AuxK ran on its compiled CPU kernels." in results.throughput({"rows": rows, "machine": machine})
    machine["native_kernels"] = "no C compiler `cc` on PATH (install gcc, or set CC)"
    assert ("AuxK ran on torch ops: its compiled CPU kernels were not in use (no C compiler `cc` on PATH"
            in results.throughput({"rows": rows, "machine": machine}))


def test_the_repository_results_document_has_every_block():
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "results.md").read_text()
    for name in results.BLOCKS:
        assert f"<!-- results:{name} -->" in text and f"<!-- /results:{name} -->" in text, name


def test_the_quality_block_picks_each_librarys_best_lr_by_its_mean_over_seeds():
    cell = dict(status="ok", delta_ce=0.3, loss_recovered=0.97, dead_fraction=0.0, tokens_per_s=1000.0)
    rows = [dict(cell, library="saelib", lr_multiplier=4, seed=0, nmse=0.20),
            dict(cell, library="saelib", lr_multiplier=4, seed=1, nmse=0.22),
            dict(cell, library="saelib", lr_multiplier=16, seed=0, nmse=0.18),
            dict(cell, library="saelib", lr_multiplier=16, seed=1, nmse=0.26),
            dict(library="sae-lens", lr_multiplier=4, seed=0, status="failed", reason="sae-lens failed")]
    best = results.best_cells(rows)
    assert set(best) == {"saelib"} and best["saelib"]["lr_multiplier"] == 4
    assert best["saelib"]["nmse"] == pytest.approx(0.21) and best["saelib"]["seeds"] == 2
    text = results.quality({"rows": rows})
    assert "| saelib | 16 | 1 | 0.2600 | 0.300 | 0.970 | 0.00% | 1,000 |" in text
    assert "| sae-lens | 4 | 0 | sae-lens failed |" in text and "| saelib | 4 | 2 | 0.2100 |" in text
