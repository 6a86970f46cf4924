"""The visualizer on a real (briefly trained) SAE and the real SmolLM2: the data layer, the static site
in headless Chromium (from file:// and over HTTP), untrusted corpus text, and the notebook widget."""

import functools
import html
import http.server
import json
import shutil
import threading

import pytest
import torch

from saelib.viz import Summary, browser, screenshot, summarize, write_site
from saelib.runs import load_run
from saelib.viz.static import CHROMIUM_FLAGS, chromium

LAYER = 3  # an early layer keeps the stopped-early forwards cheap
META = {"model": "smollm2-135m", "layer": LAYER, "site": "resid_post", "ctx_len": 64, "corpus": "wikipedia"}
OPTIONS = dict(eval_tokens=16 * 64, ablation_latents=2)
PAYLOAD = ('Win a prize <script>window.__xss_script = 1</script> now, or see '
           '<img src=x onerror="window.__xss_img = 1"> for details.')


@pytest.fixture(scope="module")
def texts():
    """Real held-out documents, with the injection payload planted in the first few."""
    from saelib.data import load_documents, split_documents

    docs = split_documents(load_documents("wikipedia"), "validation")[:40]
    return [f"{doc[:200]} {PAYLOAD} {doc[200:]}" if i < 4 else doc for i, doc in enumerate(docs)]


@pytest.fixture(scope="module")
def run(lm, tmp_path_factory):
    """A run folder holding a TopK SAE trained briefly on real training-split activations."""
    from saelib.data import contexts
    from saelib.evals.heldout import site_activations
    from saelib.train import fit

    train = site_activations(lm, contexts("wikipedia", lm.tokenizer, "train", max_tokens=32 * 64), LAYER,
                             "resid_post", progress=False)
    x = train.acts[train.keep]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls lose to thread overhead on a shared CPU
    try:
        sae = fit(x, 256, 8, tokens=4 * len(x), batch_size=256, seed=0, metadata=META, progress=False)
    finally:
        torch.set_num_threads(threads)
    folder = tmp_path_factory.mktemp("viz") / "run"
    sae.save(folder / "sae")
    return folder


@pytest.fixture(scope="module")
def summary(run, lm, texts):
    return summarize(run, lm, "ci", texts=texts, progress=False, **OPTIONS)


@pytest.fixture(scope="module")
def site(run, lm, texts, summary, tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    write_site(run, out, lm, "ci", texts=texts, progress=False, **OPTIONS)  # reads the cached summary
    return out


def shown(tokens):
    """What the page prints for a list of tokens (newlines and tabs made visible)."""
    return "".join(tokens).replace("\n", "\u21b5").replace("\t", "\u21e5")


def test_summary_numbers_match_the_sparse_code(summary, run, lm):
    from saelib.evals.heldout import encode, site_activations

    t, n = summary.tensors, summary.n_latents
    assert t["density"].shape == (n,) and t["hist"].shape[0] == n
    # density and histogram agree: every firing token lands in one bin
    assert torch.equal(t["hist"].sum(1).float(), (t["density"] * summary.info["n_tokens"]).round())
    # the top example of the densest latent is its largest activation, re-derived from the SAE
    i = int(t["density"].argmax())
    c, p = int(t["ex_ctx"][i, 0]), int(t["ex_pos"][i, 0])
    sae = load_run(run)
    held = site_activations(lm, t["ids"][c:c + 1].long(), LAYER, "resid_post", progress=False)
    values, indices = encode(sae, held.acts)
    act = float((values[0, p] * (indices[0, p] == i)).sum())
    assert act == pytest.approx(float(t["max_act"][i]), rel=1e-3)
    assert float(t["ex_acts"][i, 0, p]) == pytest.approx(act, rel=1e-2)
    # every example's activations over its whole context, re-derived from the code of all the text
    every = site_activations(lm, t["ids"].long(), LAYER, "resid_post", progress=False)
    values, indices = encode(sae, every.acts)
    ctx = t["ex_ctx"].long().clamp_min(0)
    acts = ((values * every.keep[..., None])[ctx] * (indices[ctx] == torch.arange(n)[:, None, None, None])).sum(-1)
    assert torch.equal(t["ex_acts"], (acts * (t["ex_ctx"] >= 0)[..., None]).half())
    # quantile examples are ordered: each slice's activations are below the top ones
    data = summary.latent(i)
    top = [ex["acts"][ex["center"]] for ex in data["examples"] if ex["group"] == "top activations"]
    rest = [ex["acts"][ex["center"]] for ex in data["examples"] if ex["group"] != "top activations"]
    assert top == sorted(top, reverse=True) and len(rest) > 0 and max(rest) <= top[0]
    # nearest latents really are the most similar decoder rows
    W = torch.nn.functional.normalize(sae.W_dec.detach(), dim=-1)
    sim = W @ W[i]
    sim[i] = -2
    assert int(t["neighbours"][i, 0]) == int(sim.argmax())
    # N2G says whether a latent was explained, so that a latent without patterns says why
    explained = {int(j) for j in summary.info["n2g"]}
    assert data["n2g"]["explained"] == (i in explained) and data["n2g"]["sampled"] is False  # ci: every live latent
    assert summary.latent(next(j for j in range(n) if j not in explained))["n2g"]["explained"] is False
    # output effect: promoted logits are positive, suppressed negative, and ablation was measured
    assert data["promoted"][0][1] > 0 > data["suppressed"][0][1]
    assert len(t["ablation_latents"]) == OPTIONS["ablation_latents"]
    assert summary.latent(int(t["ablation_latents"][0]))["ablation"] is not None
    with pytest.raises(ValueError, match="256 latents"):
        summary.latent(256)


def test_summary_is_cached_next_to_the_run_without_pickle(summary, run, lm, texts):
    folders = list((run / "viz_summary").iterdir())
    assert len(folders) == 1
    assert sorted(p.name for p in folders[0].iterdir()) == ["summary.json", "summary.safetensors"]
    again = summarize(run, None, "ci", texts=texts, progress=False, **OPTIONS)  # no LM needed: cached
    assert again.info == json.loads(json.dumps(summary.info))
    for k, v in summary.tensors.items():
        torch.testing.assert_close(again.tensors[k], v, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ValueError, match="Unknown visualizer option"):
        summarize(run, lm, "ci", eval_token=3)


def test_a_damaged_summary_is_built_again(run, lm, tmp_path, texts):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (folder,) = (copy / "viz_summary").iterdir()
    good = json.loads((folder / "summary.json").read_text())
    (folder / "summary.safetensors").write_bytes(b"torn")
    again = summarize(copy, lm, "ci", texts=texts, progress=False, **OPTIONS)
    assert again.info == good and Summary.load(folder).info == good  # rebuilt, and written over the damaged one


def test_a_summary_is_built_again_when_its_held_out_text_changes(run, lm, tmp_path):
    """The cached summary is kept under what fixes its contexts (the held-out cache's key): an SAE
    trained on a local corpus file whose text has changed since gets a summary of the new text."""
    from saelib.data import load_documents

    corpus = tmp_path / "corpus.jsonl"
    docs = load_documents("wikipedia")[:300]
    corpus.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
    sae = load_run(run)
    sae.metadata = {**sae.metadata, "corpus": str(corpus)}
    sae.save(tmp_path / "run" / "sae")
    first = summarize(tmp_path / "run", lm, "ci", progress=False, **OPTIONS)
    assert summarize(tmp_path / "run", None, "ci", progress=False, **OPTIONS).info == json.loads(json.dumps(first.info))
    corpus.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs[150:] + load_documents("wikipedia")[300:450]))
    again = summarize(tmp_path / "run", lm, "ci", progress=False, **OPTIONS)
    assert not torch.equal(again.tensors["ids"], first.tensors["ids"]) and again.info["held_out"] != first.info["held_out"]


def test_a_released_sae_is_summarised_by_its_name(lm, texts):
    from saelib.loading import RELEASED

    name = "smollm2-135m/resid_4/n3072_k32"
    package = RELEASED / name
    before = sorted(package.rglob("*"))
    summary = summarize(name, lm, "ci", texts=texts[:8], progress=False, eval_tokens=8 * 64, ablation_latents=1)
    assert summary.n_latents == 3072 and summary.info["metadata"]["layer"] == 4
    assert sorted(package.rglob("*")) == before  # nothing kept inside the package


def test_the_final_norms_gain_is_read_from_its_output_whatever_its_form():
    """RMSNorm multiplies by ``weight``, Gemma's by ``1 + weight``, LayerNorm by ``weight`` after
    centring, and some norms have no weight: the promoted tokens need the gain each applies."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from saelib.viz.summary import _norm_gain

    g = torch.Generator().manual_seed(0)
    llama, gemma, layer = LlamaRMSNorm(8, eps=1e-6), GemmaRMSNorm(8, eps=1e-6), torch.nn.LayerNorm(8)
    for norm in (llama, gemma, layer):
        norm.weight.data = torch.randn(8, generator=g)
    torch.testing.assert_close(_norm_gain(llama, 8), llama.weight.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_norm_gain(gemma, 8), 1 + gemma.weight.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_norm_gain(layer, 8), layer.weight.detach())
    torch.testing.assert_close(_norm_gain(torch.nn.LayerNorm(8, elementwise_affine=False), 8), torch.ones(8))


def test_without_a_preset_the_largest_current_summary_is_used(run, lm, tmp_path, monkeypatch):
    """A run that has a demo summary is shown with it when no preset is named (no LM is given: none
    could be built). Once the demo preset's values change, that summary is no longer current: it is
    rebuilt with the new values, and is not offered in place of a preset."""
    from saelib.viz import summary as S

    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("viz_summary"))
    monkeypatch.setitem(S.PRESETS, "demo", {**S.PRESETS["ci"], **OPTIONS})  # a demo preset as cheap as the tests'
    demo = summarize(copy, lm, "demo", progress=False)
    again = summarize(copy, None, progress=False)
    assert again.info == json.loads(json.dumps(demo.info)) and again.info["options"]["preset"] == "demo"
    assert sorted(p.name for p in (copy / "viz_summary").iterdir()) == ["demo"]
    monkeypatch.setitem(S.PRESETS, "demo", {**S.PRESETS["demo"], "ablation_latents": 1})
    assert S._cached_preset(copy, load_run(copy), None) is None
    rebuilt = summarize(copy, lm, "demo", progress=False)
    assert rebuilt.info["options"]["ablation_latents"] == 1 and len(rebuilt.tensors["ablation_latents"]) == 1
    assert summarize(copy, None, "demo", progress=False).info == json.loads(json.dumps(rebuilt.info))


def test_search_finds_latents_that_fire_on_a_token(summary):
    hits = summary.search(" the")
    assert hits and hits == sorted(hits, key=lambda h: -h[1])
    j = hits[0][0]
    assert any(tok.strip().lower() == "the" and ex["acts"][k] > 0
               for ex in summary.latent(j)["examples"] for k, tok in enumerate(ex["tokens"]))
    assert summary.search("zzzz-not-a-token") == []


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    driver_path = shutil.which("chromedriver")
    if driver_path is None:
        pytest.skip("chromedriver is not installed (apt-get install chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium()
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium')}", "--window-size=1280,1000"]:
        options.add_argument(flag)
    d = webdriver.Chrome(service=Service(driver_path), options=options)
    yield d
    d.quit()


def wait_for(driver, css, text=None):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    condition = (EC.text_to_be_present_in_element((By.CSS_SELECTOR, css), text) if text is not None
                 else EC.presence_of_element_located((By.CSS_SELECTOR, css)))
    WebDriverWait(driver, 10).until(condition)
    return driver.find_element(By.CSS_SELECTOR, css)


def submit(driver, field, value):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.ID, field)
    box.clear()
    box.send_keys(value + Keys.ENTER)


def test_site_overview_from_disk_sorts_its_table(site, summary, driver):
    from selenium.webdriver.common.by import By

    driver.get((site / "index.html").as_uri())
    table = wait_for(driver, "#latents tbody tr")
    rows = driver.find_elements(By.CSS_SELECTOR, "#latents tbody tr")
    assert len(rows) == 100
    densest = int(summary.tensors["density"].argmax())
    assert table.get_attribute("data-latent") == str(densest)
    driver.find_element(By.CSS_SELECTOR, "th[data-key=max_act]").click()
    first = wait_for(driver, "#latents tbody tr")
    assert first.get_attribute("data-latent") == str(int(summary.tensors["max_act"].argmax()))
    assert str(summary.overview()["dead"]) in driver.find_element(By.CSS_SELECTOR, ".facts").text
    assert driver.find_elements(By.CSS_SELECTOR, "svg.chart rect.bar")


def test_site_navigates_to_a_latent_and_shows_its_contexts(site, summary, driver):
    from selenium.webdriver.common.by import By

    driver.get((site / "index.html").as_uri())
    wait_for(driver, "#latents")
    latent = int(summary.tensors["density"].argmax())
    submit(driver, "latent-input", str(latent))
    wait_for(driver, "#latent-title", f"Latent {latent}")
    examples = [e.get_attribute("textContent") for e in driver.find_elements(By.CSS_SELECTOR, "#examples .example")]
    assert examples == [shown(ex["tokens"]) for ex in summary.latent(latent)["examples"]]
    highlighted = driver.find_elements(By.CSS_SELECTOR, "#examples .example span.center")
    assert len(highlighted) == len(examples)


def test_site_search_lists_the_latents_of_a_token(site, summary, driver):
    from selenium.webdriver.common.by import By

    driver.get((site / "index.html").as_uri())
    wait_for(driver, "#latents")
    submit(driver, "search-input", "the")
    wait_for(driver, "#search-results li")
    found = [int(li.get_attribute("data-latent")) for li in driver.find_elements(By.CSS_SELECTOR, "#search-results li")]
    assert found == [j for j, _ in summary.search("the", limit=50)]
    driver.find_element(By.CSS_SELECTOR, "#search-results li a").click()
    wait_for(driver, "#latent-title", f"Latent {found[0]}")


def test_digits_are_searched_as_tokens_and_latent_addresses_are_read_as_ids(site, summary, driver):
    from selenium.webdriver.common.by import By

    digit = next(str(d) for d in range(10) if summary.search(str(d)))
    driver.get((site / "index.html").as_uri())
    wait_for(driver, "#latents")
    submit(driver, "search-input", digit)  # a digit is a token: searched, not a jump to latent `digit`
    wait_for(driver, "#search-results li")
    found = [int(li.get_attribute("data-latent")) for li in driver.find_elements(By.CSS_SELECTOR, "#search-results li")]
    assert found == [j for j, _ in summary.search(digit, limit=50)]
    submit(driver, "search-input", "#3")  # with "#": the latent
    wait_for(driver, "#latent-title", "Latent 3")
    driver.get((site / "index.html").as_uri() + "#latent/007")  # a padded id is latent 7, at its own address
    wait_for(driver, "#latent-title", "Latent 7")
    assert driver.current_url.endswith("#latent/7")
    driver.get((site / "index.html").as_uri() + "#latent/1e3")
    wait_for(driver, "h1", "No such latent")


def test_a_malformed_escape_in_the_address_is_searched_as_typed(site, driver):
    driver.get((site / "index.html").as_uri() + "#search/%E0%A4%A")  # not valid UTF-8 once decoded
    assert wait_for(driver, "#search-query").text == "%E0%A4%A"
    wait_for(driver, "#search-results", "No token of the held-out text matches.")


def test_injected_markup_in_the_corpus_shows_as_text_and_never_runs(site, summary, driver):
    from selenium.webdriver.common.by import By

    hits = [i for i in range(summary.n_latents)
            if any("<script>" in shown(ex["tokens"]) or "onerror" in shown(ex["tokens"])
                   for ex in summary.latent(i)["examples"])]
    assert hits, "the payload should appear in some latent's examples"
    for latent in hits[:3]:
        driver.get((site / "index.html").as_uri() + f"#latent/{latent}")
        wait_for(driver, "#examples")
        text = driver.find_element(By.ID, "examples").get_attribute("textContent")
        assert "<script>" in text or "onerror" in text
        assert not driver.find_elements(By.CSS_SELECTOR, "#main img, #main script")
        assert driver.execute_script("return [window.__xss_script, window.__xss_img]") == [None, None]
    submit(driver, "search-input", "script")
    wait_for(driver, "#search-results")
    assert driver.execute_script("return [window.__xss_script, window.__xss_img]") == [None, None]


def test_site_works_over_http(site, summary, driver):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        latent = int(summary.tensors["max_act"].argmax())
        driver.get(f"http://127.0.0.1:{server.server_address[1]}/index.html#latent/{latent}")
        wait_for(driver, "#latent-title", f"Latent {latent}")
        wait_for(driver, "#examples .example")
    finally:
        server.shutdown()
        server.server_close()


def test_screenshot_writes_a_png(site, tmp_path):
    try:
        chromium()
    except FileNotFoundError:
        pytest.skip("no Chromium installed")
    png = screenshot(site, tmp_path / "latent.png", latent=0, width=800, height=600)
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(head[16:20], "big") == 800


def test_widget_renders_a_latent_and_searches(summary):
    w = browser(summary, latent=1)
    assert isinstance(w.summary, Summary)
    assert w.latent.value == 1 and w.latent_box.value == 1 and w.latent.max == summary.n_latents - 1
    assert "Latent 1" in w.info.value
    assert list(w.histogram.data[0].y) == summary.tensors["hist"][1].tolist()
    w.latent_box.value = 7
    assert w.latent.value == 7 and "Latent 7" in w.info.value
    assert list(w.histogram.data[0].y) == summary.tensors["hist"][7].tolist()
    w.query.value = "the"
    assert [v for _, v in w.results.options] == [j for j, _ in summary.search("the")]
    w.results.value = w.results.options[0][1]
    assert w.latent.value == w.results.options[0][1]
    # corpus text reaches the HTML widget escaped
    payload = next(i for i in range(summary.n_latents)
                   if any("<script>" in shown(ex["tokens"]) for ex in summary.latent(i)["examples"]))
    w.latent.value = payload
    assert "&lt;" in w.contexts.value and "<script" not in w.contexts.value and "<img" not in w.contexts.value
    assert len(w.overview_figure.data[0].y) == len(summary.overview()["density_hist"]["counts"])


def test_site_explains_its_numbers_and_shows_tiny_ones_with_significant_digits(site, summary, driver):
    from selenium.webdriver.common.by import By

    from saelib.viz.summary import HELP

    driver.get((site / "index.html").as_uri())
    wait_for(driver, "#latents tbody tr")
    headers = driver.find_elements(By.CSS_SELECTOR, "#latents th")
    assert headers and all(HELP[th.get_attribute("data-key")] in th.get_attribute("title") for th in headers)
    assert len(driver.find_elements(By.CSS_SELECTOR, "#latents-legend dt")) == len(headers)
    assert driver.execute_script("return [fmt(0.00032), fmt(0), fmt(0.5), pct(2.5e-6)]") == ["3.20e-4", "0", "0.500",
                                                                                              "2.50e-4%"]
    cells = [td.text for td in driver.find_elements(By.CSS_SELECTOR, "#latents td")]
    assert cells and not [c for c in cells if c.rstrip("%") in ("0.00", "0.000")]
    # the rarest latent's density reaches the page unrounded (4 significant digits)
    density = summary.tensors["density"]
    rarest = float(density[density > 0].min())
    assert min(x for x in summary.overview()["columns"]["density"] if x) == pytest.approx(rarest, rel=1e-3)


def test_output_effects_are_in_logits_with_their_definition(site, summary, driver):
    from selenium.webdriver.common.by import By

    from saelib.viz.summary import HELP

    latent = int(summary.tensors["ablation_latents"][0])
    driver.get((site / "index.html").as_uri() + f"#latent/{latent}")
    wait_for(driver, "#latent-title", f"Latent {latent}")
    tables = driver.find_elements(By.CSS_SELECTOR, "table.logits")
    assert len(tables) == 4  # promoted, suppressed, and the ablation's raised and lowered
    for table, kind in zip(tables, ("direct", "direct", "ablation", "ablation")):
        unit = table.find_elements(By.CSS_SELECTOR, "th")[1]
        assert unit.text == "\u0394 logit" and unit.get_attribute("title") == HELP[kind]
    promoted = [td.text for td in tables[0].find_elements(By.CSS_SELECTOR, "td:not(.tok)")]
    assert promoted and all(v.startswith("+") for v in promoted)
    assert HELP["logit"] in driver.find_element(By.ID, "effect-legend").text


def test_long_contexts_wrap_inside_a_narrow_window(site, summary, driver):
    latent = int(summary.tensors["density"].argmax())
    driver.set_window_size(480, 900)
    try:
        driver.get((site / "index.html").as_uri() + f"#latent/{latent}")
        wait_for(driver, "#examples .example")
        overflow = driver.execute_script(
            "return [...document.querySelectorAll('#examples .example')].map(e => e.scrollWidth - e.clientWidth)")
        assert overflow and max(overflow) <= 0
    finally:
        driver.set_window_size(1280, 1000)


def test_widget_gives_output_effects_a_unit_and_each_number_its_meaning(summary):
    from saelib.viz.summary import HELP
    from saelib.viz.widget import latent_html

    page = latent_html(summary.latent(int(summary.tensors["ablation_latents"][0])))
    assert "Δ logit" in page and page.count(f'title="{html.escape(HELP["ablation"])}"') > 1
    assert f'title="{html.escape(HELP["n2g_recall"])}"' in page


def test_a_byte_token_shows_its_bytes_not_a_replacement_character(summary):
    from saelib.models import load_tokenizer
    from saelib.viz.summary import token_text

    tokenizer = load_tokenizer("smollm2-135m")
    ids = tokenizer.encode(" 日 the\U0001F600")  # CJK and emoji characters split over byte tokens
    texts = [token_text(tokenizer, x) for x in ids]
    assert "\ufffd" in "".join(tokenizer.decode([x]) for x in ids)
    assert "\ufffd" not in "".join(texts) and " the" in texts
    assert texts[:3] == [" <0xE6>", "<0x97>", "<0xA5>"]
    assert not [t for t in summary.info["tokens"].values() if "\ufffd" in t]


def test_quantile_examples_come_from_other_contexts_than_the_top_ones(summary):
    t, (top, *quantiles) = summary.tensors, summary.info["groups"]
    assert top["name"] == "top activations" and quantiles
    ex_ctx = t["ex_ctx"]
    shown = 0
    for i in range(summary.n_latents):
        top_ctx = set(ex_ctx[i, :top["count"]].tolist()) - {-1}
        rest = set(ex_ctx[i, top["count"]:].tolist()) - {-1}
        assert not top_ctx & rest, f"latent {i} shows a top context again among its quantile samples"
        shown += len(rest)
    assert shown > 0


def test_lone_whitespace_tokens_are_visible_and_numbers_keep_their_digits(site, summary, driver):
    from saelib.viz.widget import _num, latent_html

    driver.get((site / "index.html").as_uri())
    wait_for(driver, "#latents")
    assert driver.execute_script("return [shownToken(' '), shownToken('\\n'), shownToken(' the'), shown(' ')]") == [
        "\u2423", "\u21b5", " the", " "]
    # the widget writes numbers as the site does
    values = [0.14, 0.255, 1, 100, 1234.5, -0.5, 0.00032, 0.0009996, -3.2e-7, 0]
    assert [_num(v) for v in values] == driver.execute_script("return arguments[0].map((v) => fmt(v))", values)
    assert _num(1) == "1.00" and _num(0.14) == "0.140" and _num(0.5, 2) == driver.execute_script("return fmt(0.5, 2)")
    data = summary.latent(int(summary.tensors["density"].argmax()))
    data["promoted"][0][0] = " "
    assert "<code>\u2423</code>" in latent_html(data)


def test_loading_a_search_address_fills_the_search_box(site, driver):
    driver.get((site / "index.html").as_uri() + "#search/the%20cat")
    wait_for(driver, "#search-query", "the cat")
    assert driver.find_element("id", "search-input").get_attribute("value") == "the cat"
