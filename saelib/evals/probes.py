"""Probe loss: how well single latents recover hypothesised binary features (Gao et al., sec. 4.2).

For each binary task, a 1-D logistic regression is fitted on every latent: a cheap screen
(standardised difference of class means) keeps a shortlist, exact Newton fits follow, the latent
with the lowest *training* cross-entropy is chosen and its *validation* cross-entropy is kept.
``probe_loss`` is the mean over tasks (nats; classes are balanced, so chance is ``ln 2``).
``probe_loss_baseline`` does the same with the residual channels (normalised activations).

Two kinds of task, all listed in :data:`TASKS` with their data source:

- ``context`` tasks (text source, genre, book, topic): one example per context, the latents
  (or channels) mean-pooled over its kept tokens; each context comes from one document.
- ``token`` tasks (token classes, word lists, lexicons): one example per kept token, labelled
  at the token itself (for word lists, at the last token of the word, where it is complete).

Tasks whose source is missing on this machine are skipped with a note (see ``available_tasks``);
tasks with too few examples of either class at the chosen scale are skipped likewise.
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..data import bos_prefix, split_documents
from ..stats import mean_interval
from . import probe_sources as S
from .heldout import cached_contexts, encode

# "may" and "art" are left out: as a verb they outnumber the month and the archaic "thou art".
MONTHS = {"january", "february", "march", "april", "june", "july", "august", "september", "october",
          "november", "december"}
WEEKDAYS = {"monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"}
PRONOUNS = {"i", "me", "you", "he", "him", "she", "her", "it", "we", "us", "they", "them"}
ARTICLES = {"the", "a", "an"}
NUMBER_WORDS = {"one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
                "twenty", "thirty", "forty", "fifty", "hundred", "thousand", "million", "billion"}
ARCHAIC = {"thou", "thee", "thy", "thine", "hath", "doth", "ye", "hast", "shalt", "wilt", "dost"}
HONORIFICS = {"mr", "mrs", "miss", "sir", "lady", "lord", "dr", "madam", "king", "queen"}
QUOTES = {'"', "\u201c", "\u201d"}


@dataclass(frozen=True)
class Task:
    """A binary probe task.

    Attributes:
        name: identifier.
        kind: ``"context"`` (label per context, pooled features) or ``"token"`` (label per token).
        sources: probe sources it needs (text sources and lexicons of :mod:`probe_sources`).
        positive, negative: for context tasks, predicates on a context's tags.
        label: for token tasks, token strings of one context -> one bool per token.
        about: what the positive class is, for reports.
    """

    name: str
    kind: str
    sources: tuple[str, ...]
    about: str
    positive: Callable[[dict], bool] | None = None
    negative: Callable[[dict], bool] | None = None
    label: Callable[[list[str]], list[bool]] | None = None


def _is(key: str, *values: str) -> Callable[[dict], bool]:
    return lambda tags: tags.get(key) in values


def _context(name: str, about: str, positive: tuple, negative: tuple) -> Task:
    needed = {v for key, *values in (positive, negative) if key == "source" for v in values}
    needed |= {"shakespeare"} if positive[0] == "genre" else set()
    needed |= {"austen"} if positive[0] == "book" else set()
    needed |= {"fortunes"} if positive[0] == "category" else set()
    return Task(name, "context", tuple(sorted(needed)), about, _is(*positive), _is(*negative))


# ---- token labelling -------------------------------------------------------------------------


def _cls(ch: str) -> str:
    return "alpha" if ch.isalpha() else "digit" if ch.isdigit() else "other"


def words(tokens: list[str]) -> list[tuple[int, int, str]]:
    """Group token strings into words: ``(first, last, text)`` spans (inclusive), text stripped.

    A token starts a new word if it begins with whitespace or its first character is of another
    class (letter, digit, other) than the previous token's last character.
    """
    spans: list[list] = []
    for i, tok in enumerate(tokens):
        body = tok.strip()
        if not body:
            continue
        new = (not spans or tok[0].isspace() or spans[-1][1] != i - 1
               or _cls(body[0]) != _cls(spans[-1][2][-1]) or _cls(body[0]) == "other")
        if new:
            spans.append([i, i, body])
        else:
            spans[-1][1], spans[-1][2] = i, spans[-1][2] + body
    return [tuple(s) for s in spans]


def _word_task(test: Callable[[str], bool]) -> Callable[[list[str]], list[bool]]:
    """Label the last token of each word for which ``test(word)`` holds."""
    def label(tokens: list[str]) -> list[bool]:
        out = [False] * len(tokens)
        for _, last, word in words(tokens):
            out[last] = test(word)
        return out
    return label


def _in_word_list(get_words: Callable[[], set]) -> Callable[[list[str]], list[bool]]:
    return _word_task(lambda w: w.lower() in get_words())


def _between(open_: set, close: set) -> Callable[[list[str]], list[bool]]:
    """Tokens strictly inside ``open_ ... close`` (quotes: the same set toggles)."""
    def label(tokens: list[str]) -> list[bool]:
        depth, out = 0, []
        for tok in tokens:
            body = tok.strip()
            out.append(depth > 0 and not (set(body) & (open_ | close)))
            for ch in body:
                if ch in open_ and ch in close:
                    depth = 1 - min(depth, 1)
                elif ch in open_:
                    depth += 1
                elif ch in close:
                    depth = max(depth - 1, 0)
        return out
    return label


def _sentence_start(tokens: list[str]) -> list[bool]:
    out, prev = [], ""
    for tok in tokens:
        body = tok.strip()
        out.append(bool(body) and body[0].isalpha() and body[0].isupper() and prev[-1:] in (".", "!", "?"))
        prev = body or prev
    return out


def _per_token(test: Callable[[str, str], bool]) -> Callable[[list[str]], list[bool]]:
    """Label each token by ``test(token, previous token)``."""
    return lambda tokens: [test(t, p) for t, p in zip(tokens, [""] + tokens[:-1])]


def _valence(low: float, high: float) -> Callable[[list[str]], list[bool]]:
    return _word_task(lambda w: low <= S.vader_lexicon().get(w.lower(), 0.0) <= high and w.lower() in S.vader_lexicon())


def _token(name: str, about: str, label, sources: tuple[str, ...] = ()) -> Task:
    return Task(name, "token", sources, about, label=label)


TASKS: list[Task] = [
    # text source and genre (context level)
    _context("wikipedia_vs_austen", "Austen novel (vs Wikipedia)", ("source", "austen"), ("source", "wikipedia")),
    _context("wikipedia_vs_shakespeare", "Shakespeare (vs Wikipedia)", ("source", "shakespeare"), ("source", "wikipedia")),
    _context("wikipedia_vs_milton", "Milton (vs Wikipedia)", ("source", "milton"), ("source", "wikipedia")),
    _context("wikipedia_vs_fortunes", "fortune cookie (vs Wikipedia)", ("source", "fortunes"), ("source", "wikipedia")),
    _context("austen_vs_shakespeare", "Shakespeare (vs Austen)", ("source", "shakespeare"), ("source", "austen")),
    _context("shakespeare_vs_milton", "Milton (vs Shakespeare)", ("source", "milton"), ("source", "shakespeare")),
    _context("austen_vs_fortunes", "fortune cookie (vs Austen)", ("source", "fortunes"), ("source", "austen")),
    _context("verse_vs_prose", "Shakespeare or Milton (vs Wikipedia or Austen)", ("source", "shakespeare", "milton"),
             ("source", "wikipedia", "austen")),
    _context("tragedy_vs_comedy", "Shakespeare tragedy (vs comedy)", ("genre", "tragedy"), ("genre", "comedy")),
    _context("emma_vs_pride_and_prejudice", "Emma (vs Pride and Prejudice)", ("book", "emma"), ("book", "prideprejudice")),
    _context("fortunes_computers", "computing fortune (vs other topics)", ("category", "computers"),
             ("category", *[c for c in S.FORTUNE_CATEGORIES if c != "computers"])),
    _context("fortunes_love", "love fortune (vs other topics)", ("category", "love"),
             ("category", *[c for c in S.FORTUNE_CATEGORIES if c != "love"])),
    # token classes (token level)
    _token("digit", "token contains a digit", _per_token(lambda t, p: any(c.isdigit() for c in t))),
    _token("capitalised_word", "word-initial token starting with a capital letter",
           _per_token(lambda t, p: t.strip()[:1].isupper() and (t[:1].isspace() or not p.strip()[-1:].isalpha()))),
    _token("punctuation", "token is only punctuation",
           _per_token(lambda t, p: bool(t.strip()) and all(c in string.punctuation for c in t.strip()))),
    _token("word_continuation", "token continues a word (no leading space, follows a letter)",
           _per_token(lambda t, p: t[:1].isalpha() and p[-1:].isalpha())),
    _token("all_caps_word", "word of two or more capital letters", _word_task(lambda w: len(w) > 1 and w.isalpha() and w.isupper())),
    _token("inside_quotes", "token inside double quotes", _between(QUOTES, QUOTES)),
    _token("inside_parentheses", "token inside parentheses", _between({"("}, {")"})),
    _token("sentence_start", "first word of a sentence", _sentence_start),
    _token("year", "four-digit number 1000-2099", _word_task(lambda w: w.isdigit() and len(w) == 4 and 1000 <= int(w) < 2100)),
    # word lists (built in) and lexicons (packaged)
    _token("month", "month name", _in_word_list(lambda: MONTHS)),
    _token("weekday", "day of the week", _in_word_list(lambda: WEEKDAYS)),
    _token("pronoun", "personal pronoun", _in_word_list(lambda: PRONOUNS)),
    _token("article", "the, a, an", _in_word_list(lambda: ARTICLES)),
    _token("number_word", "number written as a word", _in_word_list(lambda: NUMBER_WORDS)),
    _token("archaic_word", "archaic pronoun or verb (thou, hath...)", _in_word_list(lambda: ARCHAIC)),
    _token("honorific", "title or honorific (Mr, Lady, King...)", _in_word_list(lambda: HONORIFICS)),
    _token("country", "country name (ISO 3166)", _in_word_list(S.country_names), ("pycountry",)),
    _token("positive_word", "positive sentiment word (VADER valence >= 1.5)", _valence(1.5, 4.0), ("vader",)),
    _token("negative_word", "negative sentiment word (VADER valence <= -1.5)", _valence(-4.0, -1.5), ("vader",)),
]

_LEXICONS = {"vader": S.vader_lexicon, "pycountry": S.country_names}


def available_sources() -> tuple[dict[str, list], dict[str, str]]:
    """Loaded text sources ``{name: documents}`` and ``{missing source: how to install it}``."""
    loaded, missing = {}, {}
    for name, load in {**S.TEXT_SOURCES, **_LEXICONS}.items():
        try:
            loaded[name] = load()
        except S.SourceUnavailable as e:
            missing[name] = str(e)
    return loaded, missing


def available_tasks() -> tuple[list[Task], dict[str, str]]:
    """Tasks whose sources are on this machine, and ``{skipped task: reason}``."""
    loaded, missing = available_sources()
    tasks, skipped = [], {}
    for task in TASKS:
        gone = [s for s in task.sources if s in missing]
        if gone:
            skipped[task.name] = missing[gone[0]]
        else:
            tasks.append(task)
    return tasks, skipped


# ---- examples --------------------------------------------------------------------------------


def probe_contexts(tokenizer, ctx_len: int = 64, per_source: int = 64, seed: int = 0,
                   prepend_bos: bool | None = None, held_out: dict[str, float] | None = None) -> tuple[Tensor, list[dict]]:
    """Contexts for the probe tasks: ``per_source`` from each available text source.

    Each context is the begin-of-sequence token where contexts start with it (``prepend_bos``, as in
    :func:`saelib.data.pack`), then the first tokens of one document up to ``ctx_len`` (documents
    shorter than that are skipped), sampled round-robin over the source's books/categories so that
    sub-groups are represented. ``held_out``: source name -> ``val_fraction``, for the sources an SAE
    trained on (:func:`saelib.evals.heldout.probe_held_out`): only their validation split's documents
    are read. Wikipedia's validation split is read in any case (0.1 unless given). Returns
    ``(ids (n, ctx_len), tags)`` with one tag dict per context.
    """
    rng = random.Random(seed)
    prefix = bos_prefix(tokenizer, prepend_bos)
    loaded, _ = available_sources()
    held_out = {"wikipedia": 0.1, **(held_out or {})}
    rows, tags = [], []
    for name in S.TEXT_SOURCES:
        if name not in loaded:
            continue
        docs = loaded[name]
        if name in held_out:
            kept = set(split_documents([text for text, _ in docs], "validation", held_out[name]))
            docs = [(text, tag) for text, tag in docs if text in kept]
        groups: dict[str, list] = {}
        for text, tag in docs:
            groups.setdefault(tag.get("book") or tag.get("category") or "", []).append((text, tag))
        for docs in groups.values():
            rng.shuffle(docs)
        order = sorted(groups)
        rng.shuffle(order)
        taken, g = 0, 0
        while taken < per_source and any(groups.values()):
            docs = groups[order[g % len(order)]]
            g += 1
            if not docs:
                continue
            text, tag = docs.pop()
            ids = prefix + tokenizer(text, add_special_tokens=False)["input_ids"][:ctx_len - len(prefix)]
            if len(ids) == ctx_len:
                rows.append(ids)
                tags.append(tag)
                taken += 1
    if not rows:
        raise ValueError(f"No probe text source gave a document of {ctx_len} tokens; install the sources "
                         "listed in data/probe_tasks/README.md or shorten ctx_len.")
    return torch.tensor(rows, dtype=torch.long), tags


def token_strings(tokenizer, ids: Tensor) -> list[list[str]]:
    """Each context's tokens as decoded strings (with their leading spaces)."""
    table = {i: tokenizer.decode([i]) for i in ids.unique().tolist()}
    return [[table[i] for i in row] for row in ids.tolist()]


def task_labels(task: Task, tags: list[dict], tokens: list[list[str]], keep: Tensor) -> tuple[Tensor, Tensor]:
    """``(positive, negative)`` bool masks: ``(n,)`` for context tasks, ``(n, T)`` for token tasks."""
    if task.kind == "context":
        pos = torch.tensor([task.positive(t) for t in tags])
        neg = torch.tensor([task.negative(t) and not task.positive(t) for t in tags])
        return pos, neg
    pos = torch.tensor([task.label(row) for row in tokens]) & keep
    return pos, keep & ~pos


# ---- 1-D logistic probes ---------------------------------------------------------------------


def _logistic_1d(x: Tensor, y: Tensor, steps: int = 30, l2: float = 1e-2) -> tuple[Tensor, Tensor]:
    """Fit ``p = sigmoid(w x + b)`` for every column of ``x (N, F)`` at once (Newton); ``(w, b)`` each ``(F,)``."""
    w = x.new_zeros(x.shape[1])
    b = x.new_full((x.shape[1],), math.log(y.mean() / (1 - y.mean())))
    y = y[:, None]
    for _ in range(steps):
        p = torch.sigmoid(x * w + b)
        r, s = p - y, (p * (1 - p)).clamp_min(1e-9)
        gw, gb = (r * x).mean(0) + l2 * w, r.mean(0)
        hww, hwb, hbb = (s * x * x).mean(0) + l2, (s * x).mean(0), s.mean(0)
        det = (hww * hbb - hwb * hwb).clamp_min(1e-12)
        w = w - (hbb * gw - hwb * gb) / det
        b = b - (hww * gb - hwb * gw) / det
    return w, b


def _ce(x: Tensor, y: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """Mean binary cross-entropy (nats) of each column's probe: ``(F,)``."""
    return torch.nn.functional.binary_cross_entropy_with_logits(x * w + b, y[:, None].expand(-1, x.shape[1]),
                                                                reduction="none").mean(0)


def best_single_feature(x_train: Tensor, y_train: Tensor, x_val: Tensor, y_val: Tensor,
                        shortlist: int = 32) -> tuple[float, int]:
    """Validation CE of the best 1-D logistic probe over the columns of ``x (N, F)``, and its column.

    Columns are screened by ``|mean_1 - mean_0| / std``; the ``shortlist`` best get exact fits;
    the one with the lowest training CE is chosen.
    """
    x_train, x_val = x_train.double(), x_val.double()
    y_train, y_val = y_train.double(), y_val.double()
    pos, neg = x_train[y_train > 0], x_train[y_train == 0]
    score = (pos.mean(0) - neg.mean(0)).abs() / x_train.std(0).clamp_min(1e-6)
    cols = score.topk(min(shortlist, x_train.shape[1])).indices
    # standardise so one Newton step size suits every column
    mu, sd = x_train[:, cols].mean(0), x_train[:, cols].std(0).clamp_min(1e-6)
    xt, xv = (x_train[:, cols] - mu) / sd, (x_val[:, cols] - mu) / sd
    w, b = _logistic_1d(xt, y_train)
    best = int(_ce(xt, y_train, w, b).argmin())
    return float(_ce(xv[:, best:best + 1], y_val, w[best:best + 1], b[best:best + 1])), int(cols[best])


def _balanced_split(pos: Tensor, neg: Tensor, max_per_class: int, min_per_class: int,
                    generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """Flat indices and labels for train and validation halves, each with equal class sizes; None if
    too few. Masks ``(n,)`` of contexts are split example by example; masks ``(n, T)`` of tokens by
    context, so that no context has tokens on both sides (a latent chosen on some tokens of a
    passage would be scored on its other tokens)."""
    def shuffled(mask: Tensor) -> Tensor:
        flat = mask.flatten().nonzero()[:, 0]
        return flat[torch.randperm(len(flat), generator=generator)]

    if pos.ndim == 1:  # contexts: one pool, whose first half trains and the rest scores
        p, n = shuffled(pos), shuffled(neg)
        m = min(len(p), len(n), max_per_class)
        pools = [(p[:m // 2], n[:m // 2]), (p[m // 2:m], n[m // 2:m])]
    else:  # tokens: half of the contexts train, the other half scores
        first = torch.zeros(len(pos), dtype=torch.bool)
        first[torch.randperm(len(pos), generator=generator)[:len(pos) // 2]] = True
        pools = [(shuffled(pos & half[:, None]), shuffled(neg & half[:, None])) for half in (first, ~first)]
    sizes = [min(len(p), len(n), max_per_class // 2) for p, n in pools]
    if sum(sizes) < min_per_class or 0 in sizes:
        return None
    (train, y_tr), (val, y_va) = [(torch.cat([p[:m], n[:m]]), torch.cat([torch.ones(m), torch.zeros(m)]))
                                  for (p, n), m in zip(pools, sizes)]
    return train, y_tr, val, y_va


@torch.no_grad()
def probe_results(sae, lm, layer: int, site: str = "resid_post", ctx_len: int = 64, per_source: int = 64,
                  max_per_class: int = 1000, min_per_class: int = 32, shortlist: int = 32, seed: int = 0,
                  progress: bool = True, prepend_bos: bool | None = None,
                  held_out: dict[str, float] | None = None) -> tuple[list[dict], dict[str, str]]:
    """Run every available task; return per-task rows and ``{skipped task: reason}``.

    ``prepend_bos``, ``held_out``: as in :func:`probe_contexts`; ``None`` follows the model's
    convention, and reads every document of the sources other than Wikipedia.
    ``min_per_class``: a task runs only with at least this many examples of each class (half of
    them choose the latent, half score it); with fewer, the latent chosen on a handful of examples
    does not hold up on the other half, and single tasks reach losses of several nats.

    Each row: ``task, kind, examples, probe_loss, latent, probe_loss_baseline, channel``.
    """
    from tqdm.auto import tqdm

    tasks, skipped = available_tasks()
    ids, tags = probe_contexts(lm.tokenizer, ctx_len, per_source, seed, prepend_bos, held_out)
    held = cached_contexts(lm, ids, layer, site, "probe-tasks", progress=progress)
    values, indices = encode(sae, held.acts)
    x = sae.normalizer.apply(held.acts)
    keep = held.keep
    tokens = token_strings(lm.tokenizer, ids)
    n, T = ids.shape
    # context features: mean over kept tokens
    weights = (values * keep[..., None]).reshape(n, -1)
    pooled_latents = torch.zeros(n, sae.n_latents).scatter_add_(1, indices.reshape(n, -1), weights)
    counts = keep.sum(1, keepdim=True).clamp_min(1)
    pooled_latents /= counts
    pooled_channels = (x * keep[..., None]).sum(1) / counts
    g = torch.Generator().manual_seed(seed)
    rows = []
    for task in tqdm(tasks, desc="probe tasks", disable=not progress, leave=False):
        pos, neg = task_labels(task, tags, tokens, keep)
        split = _balanced_split(pos, neg, max_per_class, min_per_class, g)
        if split is None:
            skipped[task.name] = (f"fewer than {min_per_class} examples of a class, or none in one half of the "
                                  f"contexts ({int(pos.sum())} positive, {int(neg.sum())} negative); use a larger preset")
            continue
        train, y_tr, val, y_va = split
        if task.kind == "context":
            lat, chan = pooled_latents, pooled_channels
        else:  # gather only the sampled tokens' features, then index them 0..len-1
            flat = torch.cat([train, val])
            lat = torch.zeros(len(flat), sae.n_latents).scatter_add_(
                1, indices.reshape(n * T, -1)[flat], values.reshape(n * T, -1)[flat])
            chan = x.reshape(n * T, -1)[flat]
            train, val = torch.arange(len(train)), torch.arange(len(train), len(flat))
        ce, latent = best_single_feature(lat[train], y_tr, lat[val], y_va, shortlist)
        ce_base, channel = best_single_feature(chan[train], y_tr, chan[val], y_va, shortlist)
        rows.append({"task": task.name, "kind": task.kind, "examples": len(y_tr) + len(y_va), "probe_loss": ce,
                     "latent": latent, "probe_loss_baseline": ce_base, "channel": channel})
    return rows, skipped


def probe_loss(sae, lm, layer: int, site: str = "resid_post", **options) -> dict:
    """Mean probe loss over tasks for the SAE's latents and for the residual channels (nats).

    ``options`` go to :func:`probe_results`. Returns ``probe_loss, probe_loss_baseline,
    probe_tasks`` (tasks evaluated) and ``probe_tasks_skipped``, each mean's 95% interval over
    the tasks (``probe_loss_ci``, ``probe_loss_baseline_ci``: half-widths), and
    ``probe_loss_by_task`` (task name -> loss): the tasks differ from one another more than SAEs
    do, so two SAEs compare best task by task (the interval of the mean difference).
    """
    rows, skipped = probe_results(sae, lm, layer, site, **options)
    if not rows:
        raise ValueError(f"No probe task could run (skipped: {skipped}); install the probe sources or use a larger preset.")
    (loss, loss_ci), (baseline, baseline_ci) = (mean_interval([r[key] for r in rows])
                                                for key in ("probe_loss", "probe_loss_baseline"))
    return {"probe_loss": loss, "probe_loss_ci": loss_ci, "probe_loss_baseline": baseline,
            "probe_loss_baseline_ci": baseline_ci, "probe_tasks": len(rows), "probe_tasks_skipped": len(skipped),
            "probe_loss_by_task": {r["task"]: r["probe_loss"] for r in rows}}
