// saelib latent visualizer: a static, offline single page.
// Data come from scripts written by saelib.viz.write_site: data/overview.js and data/search.js set
// globals; data/latents/<id>.js calls saelibLatent(id, data) when loaded on demand (a <script>
// tag, which works from file:// where fetch() does not).
// Corpus text is untrusted: the DOM is built with createElement + textContent only, never innerHTML.
"use strict";

const OV = window.SAELIB_OVERVIEW;
const SEARCH = new Map(window.SAELIB_SEARCH || []);  // [[token text, [[latent, score], ...]], ...]
const latentCache = {};
const main = document.getElementById("main");
const PAGE = 100;
let table = { key: "density", desc: true, page: 0 };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
  }
  return node;
}

const shown = (tok) => tok.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");
// a token on its own (a table cell, a list): one made only of whitespace shows its spaces as "\u2423"
const shownToken = (tok) => shown(/^\s+$/.test(tok) ? tok.replace(/ /g, "\u2423") : tok);
// `d` significant digits; below 1e-3 in exponent form (3.2e-4), so that no value shows as "0.00"
function fmt(x, d = 3) {
  if (x === null || x === undefined) return "\u2013";
  const v = Number(x);
  if (v === 0) return "0";
  return Math.abs(v) < 1e-3 ? v.toExponential(d - 1) : v.toPrecision(d);
}
const pct = (x) => (x === null || x === undefined) ? "\u2013" : fmt(100 * x) + "%";
const signed = (x) => (x > 0 ? "+" : "") + fmt(x);
const latentLink = (i, text) => el("a", { href: "#latent/" + i }, text === undefined ? "#" + i : text);

function fact(value, label) { return el("div", { class: "fact" }, el("b", {}, value), el("span", {}, label)); }

// A bar chart of counts over bins given by edges (len(counts) + 1), as SVG built node by node.
function barChart(counts, edges, xlabel, ylabel, opts = {}) {
  const NS = "http://www.w3.org/2000/svg";
  const W = opts.width || 420, H = opts.height || 200, L = 44, B = 34, T = 8, R = 8;
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("class", "chart");
  svg.setAttribute("width", W);
  svg.setAttribute("height", H);
  const add = (tag, attrs, text) => {
    const n = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text !== undefined) n.textContent = text;
    svg.appendChild(n);
    return n;
  };
  const ymax = Math.max(1, ...counts);
  const bw = (W - L - R) / Math.max(1, counts.length);
  counts.forEach((c, i) => {
    const h = (H - T - B) * c / ymax;
    const bar = add("rect", { class: "bar", x: L + i * bw, y: H - B - h, width: Math.max(1, bw - 1), height: h });
    const t = document.createElementNS(NS, "title");
    t.textContent = `${fmt(edges[i])} to ${fmt(edges[i + 1])}: ${c}`;
    bar.appendChild(t);
  });
  add("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#888" });
  add("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#888" });
  for (const [i, anchor] of [[0, "start"], [Math.floor(counts.length / 2), "middle"], [counts.length, "end"]]) {
    add("text", { x: L + i * bw, y: H - B + 12, "text-anchor": anchor }, fmt(edges[i], 2));
  }
  add("text", { x: L - 4, y: T + 8, "text-anchor": "end" }, String(ymax));
  add("text", { x: L - 4, y: H - B, "text-anchor": "end" }, "0");
  add("text", { x: (L + W) / 2, y: H - 4, "text-anchor": "middle" }, xlabel);
  add("text", { x: 10, y: (H - B) / 2, "text-anchor": "middle", transform: `rotate(-90 10 ${(H - B) / 2})` }, ylabel);
  return svg;
}

function setPage(title, ...nodes) {
  document.title = title + " \u2013 saelib visualizer";
  main.replaceChildren(...nodes);
}

// ---------------------------------------------------------------- overview

function overview() {
  const m = OV.metadata || {};
  const facts = el("div", { class: "facts" },
    fact(OV.n_latents, "latents"), fact(OV.k === null ? "\u2013" : OV.k, "k"), fact(OV.n_tokens, "held-out tokens"),
    fact(OV.dead, "dead (never fire)"), fact(OV.dense, `dense (density > ${OV.dense_threshold})`));
  const hist = barChart(OV.density_hist.counts, OV.density_hist.edges, "log10(activation density)", "latents",
                        { width: 560 });
  setPage("Overview",
    el("h1", {}, "Overview"),
    el("p", { class: "muted" }, `${m.model || "?"}, layer ${m.layer}, ${m.site || "resid_post"}, corpus ${m.corpus || "?"}`),
    facts,
    el("h2", {}, "Activation density over latents (latents that fire)"), el("div", { class: "panel" }, hist),
    el("h2", {}, "Latents"), el("div", { id: "latent-table" }));
  renderTable();
}

// what each number means (summary.HELP): header tooltips, the table's legend, the output effects
const HELP = OV.help;
const COLUMNS = [
  ["id", "latent", (i) => latentLink(i, String(i))],
  ["density", "density", pct],
  ["mean_act", "mean act.", fmt],
  ["max_act", "max act.", fmt],
  ["n2g_precision", "N2G precision", fmt],
  ["n2g_recall", "N2G recall", fmt],
  ["top_token", "top token", (t) => el("span", { class: "tok" }, shownToken(t))],
];

function renderTable() {
  const host = document.getElementById("latent-table");
  if (!host) return;
  const col = OV.columns, n = OV.n_latents;
  const key = col[table.key];
  const order = Array.from({ length: n }, (_, i) => i).sort((a, b) => {
    const x = key[a], y = key[b];
    if (x === y) return a - b;
    if (x === null) return 1;
    if (y === null) return -1;
    return (x < y ? -1 : 1) * (table.desc ? -1 : 1);
  });
  const pages = Math.max(1, Math.ceil(n / PAGE));
  table.page = Math.min(table.page, pages - 1);
  const head = el("tr", {}, ...COLUMNS.map(([k, label]) => {
    const th = el("th", { class: k === "top_token" ? "text" : "", "data-key": k, title: `${HELP[k]} (click to sort)` },
                  label + (k === table.key ? (table.desc ? " \u25bc" : " \u25b2") : ""));
    th.addEventListener("click", () => {
      table = { key: k, desc: k === table.key ? !table.desc : k !== "id" && k !== "top_token", page: 0 };
      renderTable();
    });
    return th;
  }));
  const rows = order.slice(table.page * PAGE, (table.page + 1) * PAGE).map((i) =>
    el("tr", { "data-latent": i }, ...COLUMNS.map(([k, , show]) =>
      el("td", { class: k === "top_token" ? "text" : "" }, show(col[k][i])))));
  const pager = el("div", { class: "pager" });
  const go = (p) => { table.page = p; renderTable(); };
  const prev = el("button", {}, "\u2190 previous"), next = el("button", {}, "next \u2192");
  prev.disabled = table.page === 0;
  next.disabled = table.page >= pages - 1;
  prev.addEventListener("click", () => go(table.page - 1));
  next.addEventListener("click", () => go(table.page + 1));
  pager.append(prev, el("span", {}, `page ${table.page + 1} of ${pages} (click a header to sort)`), next);
  const legend = el("dl", { class: "legend", id: "latents-legend" },
    ...COLUMNS.flatMap(([k, label]) => [el("dt", {}, label), el("dd", {}, HELP[k])]));
  host.replaceChildren(pager, el("table", { id: "latents" }, el("thead", {}, head), el("tbody", {}, ...rows)), legend);
}

// ---------------------------------------------------------------- one latent

window.saelibLatent = function (id, data) {
  latentCache[id] = data;
  if (location.hash === "#latent/" + id) renderLatent(data);
};

function loadLatent(id) {
  if (!(Number.isInteger(id) && id >= 0 && id < OV.n_latents)) {
    setPage("Not found", el("h1", {}, "No such latent"),
            el("p", {}, `Latent ids go from 0 to ${OV.n_latents - 1}.`));
    return;
  }
  if (latentCache[id]) { renderLatent(latentCache[id]); return; }
  setPage(`Latent ${id}`, el("p", {}, `Loading latent ${id}\u2026`));
  const s = document.createElement("script");
  s.src = `data/latents/${id}.js`;
  s.onerror = () => setPage("Missing", el("p", {}, `The data file of latent ${id} is missing from this site.`));
  document.body.appendChild(s);
}

// One column of output effects: tokens and their logit changes (signed, in logits), `about` their tooltip
function logitTable(title, rows, about) {
  return el("div", {}, el("h3", { title: about }, title), el("table", { class: "logits" },
    el("thead", {}, el("tr", {}, el("th", { class: "text", title: "the output token" }, "token"),
                        el("th", { title: about }, "\u0394 logit"))),
    el("tbody", {}, ...rows.map(([tok, v]) =>
      el("tr", {}, el("td", { class: "tok" }, shownToken(tok)), el("td", { title: about }, signed(v)))))));
}

function example(ex, maxAct) {
  const div = el("div", { class: "example", "data-group": ex.group });
  ex.tokens.forEach((tok, j) => {
    const a = ex.acts[j];
    const span = el("span", { title: `activation ${fmt(a)}` }, shown(tok));
    if (a > 0) span.style.backgroundColor = `rgba(255, 110, 0, ${Math.min(1, 0.1 + 0.9 * a / (maxAct || 1))})`;
    if (j === ex.center) span.className = "center";
    div.appendChild(span);
  });
  return div;
}

function renderLatent(d) {
  const prevNext = el("span", {}, d.id > 0 ? latentLink(d.id - 1, "\u2190 previous") : "", " ",
                      d.id < OV.n_latents - 1 ? latentLink(d.id + 1, "next \u2192") : "");
  const facts = el("div", { class: "facts" }, fact(pct(d.density), "activation density"),
                   fact(fmt(d.mean_act), "mean activation when firing"), fact(fmt(d.max_act), "max activation"));
  const n2g = d.n2g.patterns.length
    ? el("div", {}, el("p", {}, `precision ${fmt(d.n2g.precision)}, recall ${fmt(d.n2g.recall)} (held-out half)`),
         el("div", { id: "n2g-patterns" }, ...d.n2g.patterns.map((p) => el("span", { class: "tok chip" }, shownToken(p)))))
    : el("p", { class: "muted", id: "n2g-none" }, d.n2g.explained
        ? `No n-gram explains it: N2G found no pattern on the explanation half (recall ${fmt(d.n2g.recall)} on the held-out half).`
        : d.n2g.sampled
          ? "No N2G explanation: this preset explains a sample of the latents, and this one is not in it (or does not fire on the explanation half)."
          : "No N2G explanation (the latent does not fire on the explanation half).");
  const effects = el("div", { class: "row" }, logitTable("promoted (direct logit attribution)", d.promoted, HELP.direct),
                     logitTable("suppressed", d.suppressed, HELP.direct));
  if (d.ablation) {
    effects.append(logitTable("ablation: raised at its top token", d.ablation.promoted, HELP.ablation),
                   logitTable("ablation: lowered", d.ablation.suppressed, HELP.ablation));
  }
  const groups = [];
  for (const ex of d.examples) {
    if (!groups.length || groups[groups.length - 1].name !== ex.group) groups.push({ name: ex.group, items: [] });
    groups[groups.length - 1].items.push(ex);
  }
  const examples = el("div", { id: "examples" }, ...(groups.length ? groups.map((g) =>
    el("div", {}, el("h3", {}, g.name), ...g.items.map((ex) => example(ex, d.max_act))))
    : [el("p", { class: "muted" }, "This latent never fires on the held-out tokens (dead).")]));
  setPage(`Latent ${d.id}`,
    el("h1", { id: "latent-title" }, `Latent ${d.id} `, prevNext),
    facts,
    el("div", { class: "row" },
      el("div", {}, el("h2", {}, "Activation histogram (when firing)"),
         el("div", { class: "panel" }, barChart(d.hist.counts, d.hist.edges, "activation", "tokens"))),
      el("div", {}, el("h2", {}, "N2G explanation"), n2g,
         el("h2", {}, "Nearest latents (decoder cosine)"),
         el("div", { id: "neighbours" }, ...d.neighbours.map(([j, c]) => el("span", { class: "chip" }, latentLink(j), ` ${fmt(c, 2)}`))),
         el("h2", {}, "Output effect"),
         el("p", { class: "muted", id: "effect-legend" }, `${HELP.logit}. Direct logit attribution is per unit ` +
            "of activation, through the direct path only; ablation is measured by removing the latent at its top " +
            "token. Hover a number for its definition."),
         effects)),
    el("h2", {}, "Example contexts"),
    el("p", { class: "muted" }, "Highlight is proportional to activation; the outlined token is the example."),
    examples);
}

// ---------------------------------------------------------------- search

function normalise(q) { return q.trim().toLowerCase(); }

function search(query) {
  const key = normalise(query);
  const keys = SEARCH.has(key) ? [key] : [...SEARCH.keys()].filter((k) => key && k.includes(key));
  const best = new Map();
  for (const k of keys) for (const [j, s] of SEARCH.get(k)) best.set(j, Math.max(best.get(j) || 0, s));
  return [...best.entries()].sort((a, b) => b[1] - a[1]).slice(0, 50);
}

function renderSearch(query) {
  // "#12" jumps to latent 12; "12" searches, as digits are tokens too (the latent box takes plain ids)
  if (/^\s*#\d+\s*$/.test(query)) { location.hash = "#latent/" + parseInt(query.replace("#", ""), 10); return; }
  const hits = search(query);
  setPage(`Search ${query}`,
    el("h1", {}, "Latents that fire most on ", el("span", { class: "tok", id: "search-query" }, query)),
    hits.length
      ? el("ul", { class: "results", id: "search-results" }, ...hits.map(([j, s]) =>
          el("li", { "data-latent": j }, latentLink(j), ` mean activation ${fmt(s)}, density ${pct(OV.columns.density[j])}`)))
      : el("p", { id: "search-results" }, "No token of the held-out text matches."));
}

// ---------------------------------------------------------------- routing

function route() {
  const raw = location.hash.slice(1);
  let h = raw;
  // a hand-typed or truncated escape (#search/%E0%A4%A) is not valid UTF-8: search for the text as typed
  try { h = decodeURIComponent(raw); } catch (e) { if (!(e instanceof URIError)) throw e; }
  if (h.startsWith("latent/")) {
    const id = /^\d+$/.test(h.slice(7)) ? parseInt(h.slice(7), 10) : NaN;  // "007", "1e3" and "" are no ids
    if (String(id) !== h.slice(7) && Number.isInteger(id)) { location.replace("#latent/" + id); return; }
    loadLatent(id);
  }
  else if (h.startsWith("search/")) {
    document.getElementById("search-input").value = h.slice(7);
    renderSearch(h.slice(7));
  }
  else overview();
}

document.getElementById("latent-form").addEventListener("submit", (e) => {
  e.preventDefault();
  location.hash = "#latent/" + document.getElementById("latent-input").value.trim();
});
document.getElementById("search-form").addEventListener("submit", (e) => {
  e.preventDefault();
  location.hash = "#search/" + encodeURIComponent(document.getElementById("search-input").value);
});
document.getElementById("nav-title").textContent =
  `${(OV.metadata || {}).model || ""} L${(OV.metadata || {}).layer} \u00b7 ${OV.n_latents} latents`;
window.addEventListener("hashchange", route);
route();
